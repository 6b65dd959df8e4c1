"""The source interface every layout reader returns: a dataset of clips, each clip its frames in order and a 0/1
label per frame.

A clip is picklable (clips travel to decode worker processes), knows its frame count before it is decoded (the
window plan needs it) and decodes itself as a stream: ``iter_frames(height, width)`` yields uint8 [height, width]
gray frames one at a time, ``read(height, width)`` collects them into one uint8 [n_frames, height, width] array.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ddp_vad.errors import UserError

SPLITS = ("train", "test")


class Clip(Protocol):
    """What the window plan and the decode workers need of a clip, whatever stores it (frame files, a video)."""

    name: str  # unique in its dataset; no '.' or '/' (it starts every sample key)
    split: str  # "train" (normal footage) | "test" (labelled)
    frame_labels: np.ndarray  # uint8 [n_frames], 1 = anomalous

    @property
    def n_frames(self) -> int: ...

    @property
    def source(self) -> Path:
        """The file or folder the frames come from (for messages)."""
        ...

    @property
    def mask_path(self) -> Path | None:
        """Where this clip's pixel masks are, when the dataset has any (a folder of images, a .mat, a .npy)."""
        ...

    def iter_frames(self, height: int, width: int) -> Iterator[np.ndarray]: ...

    def read(self, height: int, width: int) -> np.ndarray: ...


def read_frames(clip: Clip, height: int, width: int) -> np.ndarray:
    """Collect ``clip.iter_frames`` into uint8 [n_frames, height, width] (the shared ``read`` of every clip)."""
    out = np.empty((clip.n_frames, height, width), np.uint8)
    n = 0
    for frame in clip.iter_frames(height, width):
        if n == len(out):
            raise UserError(f"{clip.source}: yields more frames than the {clip.n_frames} counted")
        out[n] = frame
        n += 1
    if n != len(out):
        raise UserError(f"{clip.source}: yields {n} frames, {clip.n_frames} were counted")
    return out


@dataclass(frozen=True)
class Dataset:
    """A discovered dataset: its clips (train clips first), where its labels come from, and anomaly types."""

    path: Path
    name: str
    clips: list
    gt_path: Path | None  # the labels: a UCSD .m file, labels.csv, or a folder of label files
    anomaly_types: dict[str, list[str]]
    format: str  # "ucsd" | "avenue" | "shanghaitech" | "videos"


def check_unique_names(clips: list, where: Path) -> None:
    """Clip names key every sample and every label row: two clips may not share one."""
    seen: dict[str, Path] = {}
    for clip in clips:
        if clip.name in seen:
            raise UserError(f"{where}: two clips are named {clip.name!r} ({seen[clip.name]} and {clip.source})")
        seen[clip.name] = clip.source


def clip_name(stem: str) -> str:
    """A file stem as a clip name: '.' would end a webdataset key early and '/' would make it a path."""
    return stem.replace(".", "_").replace("/", "_")


# --- decode speed per worker ------------------------------------------------------------------------------------
# Decode workers are forked after the dataset is opened, so they inherit these shared counters; each worker claims
# a slot by its pid and adds the frames and seconds of every clip it decodes. Under a "spawn" start method the
# workers do not inherit them and the report is empty.
_MAX_WORKERS = 256


class DecodeStats:
    """Frames and seconds decoded per worker process, in shared memory."""

    def __init__(self) -> None:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        self._pids = ctx.Array("q", _MAX_WORKERS)  # its lock guards slot claims
        self._clips = ctx.Array("q", _MAX_WORKERS, lock=False)
        self._frames = ctx.Array("q", _MAX_WORKERS, lock=False)
        self._seconds = ctx.Array("d", _MAX_WORKERS, lock=False)

    def add(self, frames: int, seconds: float) -> None:
        """Count one decoded clip for the calling process."""
        pid = os.getpid()
        with self._pids.get_lock():
            pids = self._pids.get_obj()
            slot = next((i for i in range(_MAX_WORKERS) if pids[i] in (pid, 0)), None)
            if slot is None:
                return  # more workers than slots: leave them out of the report
            pids[slot] = pid
        self._clips[slot] += 1
        self._frames[slot] += frames
        self._seconds[slot] += seconds

    def report(self) -> dict:
        """{"workers": [{"clips", "frames", "seconds", "frames_per_s"}...], "frames_per_s_per_worker": mean}."""
        rows = []
        for i in range(_MAX_WORKERS):
            if self._pids[i] == 0:
                break
            seconds = self._seconds[i]
            rate = self._frames[i] / seconds if seconds > 0 else None
            rows.append(
                {
                    "clips": self._clips[i],
                    "frames": self._frames[i],
                    "seconds": round(seconds, 3),
                    "frames_per_s": round(rate, 1) if rate else None,
                }
            )
        rates = [r["frames_per_s"] for r in rows if r["frames_per_s"]]
        return {"workers": rows, "frames_per_s_per_worker": round(float(np.mean(rates)), 1) if rates else None}


_stats: DecodeStats | None = None


def reset_decode_stats() -> DecodeStats:
    """Start counting afresh (called when a dataset is opened, before decode workers are forked)."""
    global _stats
    _stats = DecodeStats()
    return _stats


def decode_stats() -> dict:
    """The per-worker decode speed since the last :func:`reset_decode_stats` (empty when nothing was counted)."""
    return _stats.report() if _stats is not None else {"workers": [], "frames_per_s_per_worker": None}


def decode_clip(clip: Clip, height: int, width: int) -> np.ndarray:
    """``clip.read(height, width)``, timed into the per-worker decode statistics."""
    t0 = time.perf_counter()
    frames = clip.read(height, width)
    if _stats is not None:
        _stats.add(len(frames), time.perf_counter() - t0)
    return frames
