"""Anomalous events of a scored stream: runs of consecutive frames at or above the threshold.

:class:`Events` takes each :class:`ddp_vad.infer.detector.FrameScore` as it becomes final and, when a run of
flagged frames closes, writes it as one JSON line (``predict --events``) and/or POSTs it to a
:class:`ddp_vad.infer.webhook.Webhook` (``predict --webhook``; also when it opens, with ``--webhook-on open``).
A line is appended whole (:func:`ddp_vad.files.append_text`): a failed write never leaves half a line.

An event: ``{"clip", "start_frame", "start_time", "peak_score", "peak_frame", "end_frame", "end_time",
"threshold"}`` (frames 1-based and inclusive, times in seconds or null). A webhook payload is the same object with
``"event": "close"``; the one sent when an event opens is ``{"event": "open", "clip", "start_frame",
"start_time", "score", "threshold"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ddp_vad.files import append_text, naming
from ddp_vad.infer.webhook import Webhook


class Events:
    """Anomalous intervals of one clip's frame scores, written and/or POSTed as they close (module docstring).

    ``path``: the JSON-lines file (emptied first); ``webhook`` and ``when`` (``open``, ``close``): where and when to
    POST. Feed every frame to :meth:`add` in order, then call :meth:`close` once.
    """

    def __init__(
        self,
        clip: str,
        threshold: float,
        path: str | os.PathLike | None = None,
        webhook: Webhook | None = None,
        when: Iterable[str] = ("close",),
    ):
        self.clip, self.threshold, self.path = clip, threshold, None if path is None else Path(path)
        self.webhook, self.when = webhook, frozenset(when)
        self.open: dict[str, Any] | None = None
        self.count = 0
        if self.path is not None:
            with naming(self.path), open(self.path, "w"):
                pass  # a fresh file: lines are appended as events close

    def add(self, s: Any) -> None:
        """One frame's score (``frame``, ``time``, ``score``, ``anomalous``), in frame order."""
        if s.anomalous:
            if self.open is None:
                self.open = {"clip": self.clip, "start_frame": s.frame, "start_time": s.time, "peak_score": s.score,
                             "peak_frame": s.frame}  # fmt: skip
                if self.webhook is not None and "open" in self.when:
                    self.webhook.send({"event": "open", "clip": self.clip, "start_frame": s.frame,
                                       "start_time": s.time, "score": round(s.score, 6),
                                       "threshold": self.threshold})  # fmt: skip
            elif s.score > self.open["peak_score"]:
                self.open.update(peak_score=s.score, peak_frame=s.frame)
            self.open.update(end_frame=s.frame, end_time=s.time)
        elif self.open is not None:
            self.close()

    def close(self) -> None:
        """Close the open interval, if any: write its line, POST it."""
        if self.open is None:
            return
        event = {**self.open, "threshold": self.threshold}
        event["peak_score"] = round(event["peak_score"], 6)
        self.open = None
        self.count += 1
        if self.webhook is not None and "close" in self.when:
            self.webhook.send({"event": "close", **event})
        if self.path is not None:
            append_text(self.path, json.dumps(event) + "\n")
