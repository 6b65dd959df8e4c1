"""``ddp_vad predict``: per-frame anomaly scores for a folder of frames, a video file or live footage.

A thin shell over :class:`ddp_vad.Detector`: every window of the source (the run's window length, stride 1) is
scored by each fold's model, a window's score is the mean anomaly probability over the fold models (a
cross-validation ensemble), and a frame's score is the max over the windows that cover it.

The source is streamed (:meth:`Detector.stream`): memory does not grow with its length (a frame's score, 8 bytes,
is kept for the plot), and a frame's CSV row is written as soon as its score is final: ``window - 2 + batch_size``
frames after it arrives at most. A file source's CSV appears whole when done (``files.atomic_path``); a live
source's CSV grows in place, row by row (each appended whole: a failed write never leaves half a row), so it can be
followed while the stream runs. ``--events`` writes one JSON line per anomalous interval as it closes, and
``--webhook URL`` POSTs it (:mod:`ddp_vad.infer.events`, :mod:`ddp_vad.infer.webhook`). Ctrl-C (SIGINT) ends the
stream: the frames read so far are scored, the files are finished, and the command exits 130. ``--annotate
OUT.mp4`` re-reads a file source and writes a copy with a score bar and a red border on flagged frames.
"""

from __future__ import annotations

import contextlib
import csv
import io
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ddp_vad.errors import UserError
from ddp_vad.files import append_text, atomic_path, make_folder, naming
from ddp_vad.infer.detector import Detector, model_files
from ddp_vad.infer.events import Events
from ddp_vad.infer.live import StreamBroken, check_source, is_live, source_name
from ddp_vad.infer.scoring import frame_scores, stream_scores, window_scores
from ddp_vad.infer.threshold import check_threshold
from ddp_vad.infer.webhook import Webhook, check_webhook_url, parse_when
from ddp_vad.options import option

__all__ = ["PredictConfig", "annotate", "draw_score", "frame_scores", "model_files", "run_predict",
           "stream_scores", "window_scores"]  # fmt: skip

FOLDER_FPS = 10  # frame rate of an annotated copy of a frame folder (UCSD's cameras record 10 frames/s)


@dataclass
class PredictConfig:
    """Options of ``ddp_vad predict``."""

    source: str = option(
        help="A folder of numbered frames, a video file, a stream URL, a capture device or - (stdin).", argument=True
    )
    model: str | None = option(
        None, "A transfer run folder (its fold models are averaged), one model.safetensors, or an exported .onnx."
    )
    onnx: str | None = option(None, "Score with this exported ONNX model (onnxruntime) instead of --model.")
    out: str | None = option(
        None,
        "CSV of per-frame scores (default: <clip>_scores.csv beside a file source, in the current folder for a live "
        "one); a PNG goes beside it.",
    )
    fold: int | None = option(None, "Use only this fold's model.")
    batch_size: int | None = option(
        None, "Windows per forward pass (default 64 for files, 1 for live sources: a row every frame)."
    )
    threshold: float | None = option(
        None, "Score at which a frame is flagged (default: the run's, chosen on its training folds; else 0.5)."
    )
    events: str | None = option(None, "Write anomalous intervals (frames at or above the threshold) as JSON lines.")
    webhook: str | None = option(
        None,
        "POST each anomalous interval as JSON to this http(s) URL when it closes (background thread, bounded queue, "
        "retries; never holds up scoring).",
    )
    webhook_on: str = option("close", "When to POST to --webhook: close, open (an interval starts) or open,close.")
    labels: str | None = option(
        None, "labels.csv (clip,start,end) whose rows for this clip shade the plot (UCSD .m ground truth is found)."
    )
    reconnect: int = option(0, "Live sources: reopen a broken stream this many times before stopping.")
    annotate: str | None = option(
        None, "Also write the clip as a video (.mp4/.avi/.mkv) with a score bar and a red border on flagged frames."
    )

    def __post_init__(self) -> None:
        check_source(self.source)
        if (self.model is None) == (self.onnx is None):
            raise UserError("give --model RUN (or a model file) or --onnx FILE")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.fold is not None and self.fold < 0:
            raise UserError(f"--fold must be >= 0, got {self.fold}")
        if self.threshold is not None:
            check_threshold(self.threshold, "--threshold")
        if self.reconnect < 0:
            raise UserError(f"--reconnect must be >= 0, got {self.reconnect}")
        if self.annotate is not None and Path(self.annotate).suffix.lower() not in (".mp4", ".avi", ".mkv", ".mov"):
            raise UserError(f"--annotate {self.annotate}: give a .mp4, .avi, .mkv or .mov file name")
        if self.annotate is not None and is_live(self.source):
            raise UserError("--annotate needs a file source (a live stream cannot be read twice)")
        if self.labels is not None and not Path(self.labels).is_file():
            raise UserError(f"--labels {self.labels}: file not found")
        if self.webhook is not None:
            check_webhook_url(self.webhook)
        parse_when(self.webhook_on)


class _Interrupt:
    """The first SIGINT only sets a flag, checked per frame (``Detector.stream(stop=...)``): the stream ends after the
    current frame and the frames read so far are scored as at any end of stream. A second SIGINT kills at once (a
    source that sends nothing more leaves PyAV waiting in C, where no Python exception reaches it); the rows
    written until then stay, as a live CSV is flushed row by row.
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # handlers can only be set from the main thread; the default one stays
            return

        def handle(signum, frame) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        before = signal.signal(signal.SIGINT, handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, before)


def _detector(cfg: PredictConfig) -> Detector:
    return Detector.load(cfg.onnx or cfg.model, fold=cfg.fold, threshold=cfg.threshold)


class _Rows:
    """The scores CSV. A file source's rows go to a hidden temp file, renamed onto ``out`` when whole
    (:func:`ddp_vad.files.atomic_path`); a live source's grow in place, each row appended whole
    (:func:`ddp_vad.files.append_text`), so that a reader following the file sees each score as soon as it is final
    and a failed write (disk full, Ctrl-C) never leaves half a row."""

    def __init__(self, stack: contextlib.ExitStack, out: Path, live: bool, column: str):
        self.out, self.file = out, None
        if live:
            with naming(out), open(out, "w"):
                pass
        else:
            self.file = stack.enter_context(open(stack.enter_context(atomic_path(out)), "w", newline=""))  # noqa: SIM115
            self.writer = csv.writer(self.file)
        self.write(["frame", column, "score", "anomalous"])

    def write(self, row: list) -> None:
        if self.file is not None:
            self.writer.writerow(row)
            return
        line = io.StringIO()
        csv.writer(line).writerow(row)
        append_text(self.out, line.getvalue())


def _out_path(cfg: PredictConfig, live: bool, name: str) -> Path:
    """``--out``, else ``<clip>_scores.csv`` beside a file source or in the working folder for a live one."""
    if cfg.out:
        out = Path(cfg.out)
    elif not live:
        out = Path(cfg.source).resolve().parent / f"{name}_scores.csv"
    else:
        out = Path(f"{name}_scores.csv")
    make_folder(out.parent)
    return out


def _score_into_files(
    cfg: PredictConfig, detector: Detector, out: Path, hook: Webhook | None, interrupt: _Interrupt
) -> tuple[list[float], Events, BaseException | None]:
    """Stream the source's frame scores into the CSV and the events (file, webhook); returns the scores, the
    events and the StreamBroken / KeyboardInterrupt that ended the stream early, if one did."""
    live, name = is_live(cfg.source), source_name(cfg.source)
    column = "file" if not live and Path(cfg.source).is_dir() else "time"
    batch = cfg.batch_size or (1 if live else 64)
    failure: BaseException | None = None
    scores: list[float] = []
    with contextlib.ExitStack() as stack:
        rows = _Rows(stack, out, live, column)
        events = Events(name, detector.threshold, cfg.events, hook, parse_when(cfg.webhook_on))
        stack.enter_context(interrupt.installed())
        try:
            for s in detector.stream(cfg.source, batch_size=batch, reconnect=cfg.reconnect, stop=interrupt):
                scores.append(s.score)
                tag = s.name if column == "file" else f"{s.time if s.time is not None else 0.0:.3f}"
                rows.write([s.frame, tag, f"{s.score:.6f}", int(s.anomalous)])
                events.add(s)
        except (StreamBroken, KeyboardInterrupt) as exc:
            failure = exc  # the rows so far are kept: finish the files, then report
        except UserError:
            if not interrupt.requested:
                raise
            # stopped before the first window was full ("too few frames"): an interrupt, not bad input
        events.close()
    return scores, events, failure


def run_predict(cfg: PredictConfig) -> Path:
    """Score every frame of ``cfg.source``; write the CSV, a score-over-time PNG and, with ``cfg.events`` /
    ``cfg.annotate``, the events and an annotated copy of the clip; POST the events to ``cfg.webhook``; return
    the CSV path.

    Ctrl-C finishes the files for the frames read so far and then raises KeyboardInterrupt; a live stream that
    breaks (after ``cfg.reconnect`` tries) does the same and then raises :class:`ddp_vad.infer.live.StreamBroken`.
    """
    detector = _detector(cfg)
    name = source_name(cfg.source)
    out = _out_path(cfg, is_live(cfg.source), name)
    interrupt = _Interrupt()
    hook = Webhook(cfg.webhook) if cfg.webhook else None
    try:
        scores, events, failure = _score_into_files(cfg, detector, out, hook, interrupt)
    finally:
        delivery = hook.close() if hook is not None else None  # the queued events go out, in bounded time
    stopped = isinstance(failure, KeyboardInterrupt) or interrupt.requested
    if not scores:
        if stopped:
            print(f"interrupted: {cfg.source}: no frame scored yet", file=sys.stderr)
            raise KeyboardInterrupt
        if failure is not None:
            raise failure
        raise UserError(f"{cfg.source}: no frame was scored")

    per_frame = np.asarray(scores)
    png = out.with_suffix(".png")
    truth = ground_truth(cfg.source, cfg.labels)
    _plot(per_frame, detector.threshold, png, f"{name}: {detector.description}", truth)
    wrote = [str(out), str(png)] + ([cfg.events] if cfg.events else [])
    if cfg.annotate and failure is None:
        annotate(Path(cfg.source), per_frame, detector.threshold, Path(cfg.annotate))
        wrote.append(cfg.annotate)
    flagged = int((per_frame >= detector.threshold).sum())
    summary = (f"{name}: {len(per_frame)} frames, {flagged} at or above {detector.threshold:.3f} "
               f"({detector.threshold_note}), {events.count} event(s); wrote {', '.join(wrote)}")  # fmt: skip
    if delivery is not None:
        summary += f"\n{delivery.summary(cfg.webhook)}"
    if stopped:
        print(f"interrupted: {summary}", file=sys.stderr)
        raise KeyboardInterrupt
    print(summary)
    if failure is not None:
        raise failure
    return out


def ground_truth(source: str, labels: str | None) -> list[tuple[int, int]]:
    """Anomalous frame ranges (1-based, inclusive) of the clip: its rows in ``labels`` (``clip,start,end``), else
    its entry in the UCSD ``.m`` file beside a test-clip folder; [] when neither has it."""
    name = source_name(source)
    if labels is not None:
        from ddp_vad.data.sources.videos import parse_labels_csv

        return [(r.start, r.end) for r in parse_labels_csv(Path(labels)) if r.clip == name]
    path = Path(source)
    if is_live(source) or not path.is_dir():
        return []
    found = sorted(path.parent.glob("*.m"))
    if len(found) != 1:
        return []
    from ddp_vad.data.sources.ucsd import parse_gt_file

    try:
        return parse_gt_file(found[0]).get(name, [])
    except UserError:
        return []  # a malformed gt file only costs the shading


def annotate(clip: Path, scores: np.ndarray, threshold: float, out: Path) -> Path:
    """Write ``clip`` (a video or a frame folder) as a video with a score bar along the bottom of every frame and a
    red border on frames at or above ``threshold``; frames are streamed, never held together."""
    from ddp_vad.data.sources.frames import IMAGE_SUFFIXES, frame_files, read_rgb
    from ddp_vad.data.sources.video import VideoWriter, iter_rgb, video_rate

    if clip.is_dir():
        frames = (read_rgb(p) for p in frame_files(clip, IMAGE_SUFFIXES, first=None))
        fps = FOLDER_FPS
    else:
        frames, fps = iter_rgb(clip), video_rate(clip)
    with atomic_path(out) as tmp, VideoWriter(tmp, fps) as writer:
        for i, (rgb, score) in enumerate(zip(frames, scores, strict=False)):
            writer.write(draw_score(rgb, i + 1, float(score), threshold))
    return out


def draw_score(rgb: np.ndarray, frame: int, score: float, threshold: float) -> np.ndarray:
    """One annotated frame: a score bar (red at or above ``threshold``), a tick at the threshold, the frame number
    and score as text, and a red border when flagged."""
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    w, h = img.size
    flagged = score >= threshold
    bar = max(4, h // 24)
    draw.rectangle([0, h - bar, w - 1, h - 1], fill=(40, 40, 40))
    draw.rectangle([0, h - bar, round(score * (w - 1)), h - 1], fill=(220, 30, 30) if flagged else (60, 190, 60))
    tick = round(threshold * (w - 1))
    draw.line([tick, h - bar, tick, h - 1], fill=(255, 255, 255))
    if flagged:
        border = max(2, min(w, h) // 60)
        for k in range(border):
            draw.rectangle([k, k, w - 1 - k, h - 1 - k], outline=(220, 30, 30))
    draw.text((4, 2), f"{frame}  {score:.2f}", fill=(255, 255, 0))
    return np.asarray(img)


def _plot(scores: np.ndarray, threshold: float, path: Path, title: str, truth: list[tuple[int, int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3), dpi=100)
    frames = np.arange(1, len(scores) + 1)
    for k, (first, last) in enumerate(truth):  # ground truth: frames first..last, drawn as their full width
        ax.axvspan(
            first - 0.5, last + 0.5, color="tab:blue", alpha=0.15, lw=0, label="ground truth" if k == 0 else None
        )
    ax.plot(frames, scores, color="tab:red", lw=1.5, label="anomaly score")
    ax.fill_between(frames, 0, scores, where=scores >= threshold, color="tab:red", alpha=0.2, step="mid")
    ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax.set(xlabel="frame", ylabel="score", ylim=(0, 1.02), xlim=(1, max(len(scores), 2)), title=title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
