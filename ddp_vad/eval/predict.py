"""``ddp_vad predict``: per-frame anomaly scores for a folder of frames or a video file, from a fine-tuned run.

Every window of the clip (the run's window length, stride 1) is scored by each fold's model; a window's score is
the mean anomaly probability over the fold models (a cross-validation ensemble), and a frame's score is the max
over the windows that cover it (the rule the evaluation uses for frame-level AUROC).

The clip is streamed: frames are decoded one at a time into a buffer of ``window - 1 + batch_size`` frames, each
full buffer is scored as one batch of windows, and a frame's CSV row is written as soon as every window covering
it has been scored. Memory does not grow with the clip's length (a frame's score, 8 bytes, is kept for the plot).
``--annotate OUT.mp4`` re-reads the clip and writes a copy with a score bar and a red border on flagged frames.
"""

from __future__ import annotations

import csv
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddp_vad.data.sources.frames import IMAGE_SUFFIXES, FrameClip, frame_files, read_rgb, resize_frame
from ddp_vad.data.sources.video import VIDEO_SUFFIXES, VideoWriter, iter_gray, iter_rgb, video_rate
from ddp_vad.errors import UserError
from ddp_vad.files import make_folder
from ddp_vad.models import build_lrcn, load_model
from ddp_vad.options import option

T = TypeVar("T")
FOLDER_FPS = 10  # frame rate of an annotated copy of a frame folder (UCSD's cameras record 10 frames/s)


@dataclass
class PredictConfig:
    """Options of ``ddp_vad predict`` (``clip_dir``: a folder of numbered frames or a video file)."""

    clip_dir: str = option(help="A folder of numbered frames or a video file.", argument=True)
    model: str = option(help="A transfer run folder (its fold models are averaged) or one model.safetensors.")
    out: str | None = option(
        None, "CSV of per-frame scores (default: <clip>_scores.csv beside CLIP_DIR); a PNG goes beside it."
    )
    fold: int | None = option(None, "Use only this fold's model.")
    batch_size: int = option(64, "Windows per forward pass.")
    threshold: float = option(0.5, "Score at which a frame is flagged.")
    annotate: str | None = option(
        None, "Also write the clip as a video (.mp4/.avi/.mkv) with a score bar and a red border on flagged frames."
    )

    def __post_init__(self) -> None:
        clip = Path(self.clip_dir)
        if not clip.exists():
            raise UserError(f"clip folder or video not found: {self.clip_dir}")
        if clip.is_file() and clip.suffix.lower() not in VIDEO_SUFFIXES:
            raise UserError(f"{clip}: not a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder of frames")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.fold is not None and self.fold < 0:
            raise UserError(f"--fold must be >= 0, got {self.fold}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.annotate is not None and Path(self.annotate).suffix.lower() not in (".mp4", ".avi", ".mkv", ".mov"):
            raise UserError(f"--annotate {self.annotate}: give a .mp4, .avi, .mkv or .mov file name")


def model_files(run: str | Path, fold: int | None = None) -> list[Path]:
    """The per-fold classifier weights of a transfer run (``RUN/folds/fold_XX/model.safetensors``)."""
    run = Path(run)
    if run.suffix == ".safetensors":
        if not run.is_file():
            raise UserError(f"model file not found: {run}")
        return [run]
    if not run.is_dir():
        raise UserError(f"model run folder not found: {run}")
    files = sorted(run.glob("folds/fold_*/model.safetensors"))
    if fold is not None:
        files = [f for f in files if f.parent.name == f"fold_{fold:02d}"]
    if not files:
        which = f"fold {fold} " if fold is not None else ""
        raise UserError(
            f"no {which}classifier weights (folds/fold_XX/model.safetensors) in {run}; "
            "give a finished `ddp_vad transfer` run"
        )
    return files


def window_scores(frames: np.ndarray, models: list[torch.nn.Module], window: int, batch_size: int) -> np.ndarray:
    """Mean anomaly probability of every stride-1 window of ``frames`` (uint8 [N, H, W]) over ``models``."""
    n = len(frames) - window + 1
    video = torch.from_numpy(frames)
    scores = np.zeros(n, np.float64)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            batch = video[idx[:, None] + torch.arange(window)]  # [B, T, H, W]
            x = batch.unsqueeze(2).float().div_(255.0)
            for model in models:
                scores[start : start + len(idx)] += torch.softmax(model(x).float(), dim=1)[:, 1].numpy()
    return scores / len(models)


def frame_scores(win_scores: np.ndarray, n_frames: int, window: int) -> np.ndarray:
    """A frame's score = max over the scores of the windows that cover it."""
    out = np.zeros(n_frames)
    for start, score in enumerate(win_scores):
        np.maximum(out[start : start + window], score, out=out[start : start + window])
    return out


def stream_scores(
    items: Iterable[tuple[T, np.ndarray]],
    models: list[torch.nn.Module],
    window: int,
    batch_size: int,
    source: str = "the clip",
) -> Iterator[tuple[T, float]]:
    """Per-frame scores of a stream of ``(tag, uint8 [H, W] frame)``, yielded in order as ``(tag, score)``.

    Holds at most ``window - 1 + batch_size`` frames: each time the buffer is full its ``batch_size`` windows are
    scored in one batch (the same batches as :func:`window_scores` on the whole clip, so the same numbers), the
    first ``batch_size`` frames are final and leave, the last ``window - 1`` move to the front.
    """
    span = window - 1 + batch_size
    buf: np.ndarray | None = None
    best = np.zeros(span)  # running max of the scores of the windows covering each buffered frame
    tags: deque = deque()
    filled = total = 0
    for tag, frame in items:
        if buf is None:
            buf = np.empty((span, *frame.shape), np.uint8)
        buf[filled] = frame
        tags.append(tag)
        filled, total = filled + 1, total + 1
        if filled < span:
            continue
        _cover(best, window_scores(buf, models, window, batch_size), window)
        for j in range(batch_size):
            yield tags.popleft(), float(best[j])
        buf[: window - 1] = buf[batch_size:]
        best[: window - 1] = best[batch_size:]
        best[window - 1 :] = 0.0
        filled = window - 1
    if total < window:
        raise UserError(f"{source} has {total} frames; the model needs at least {window}")
    if filled >= window:  # the last, partial batch
        _cover(best, window_scores(buf[:filled], models, window, batch_size), window)
    for j in range(filled):
        yield tags.popleft(), float(best[j])


def _cover(best: np.ndarray, win: np.ndarray, window: int) -> None:
    for start, score in enumerate(win):
        np.maximum(best[start : start + window], score, out=best[start : start + window])


def _gray_stream(clip: Path, height: int, width: int) -> tuple[str, Iterator[tuple[str, np.ndarray]]]:
    """(name of the CSV's second column, stream of (that column's value, resized gray frame))."""
    if clip.is_dir():
        paths = frame_files(clip, IMAGE_SUFFIXES, first=None)
        frames = FrameClip(clip.name, "test", paths, np.zeros(len(paths), np.uint8)).iter_frames(height, width)
        return "file", zip((p.name for p in paths), frames, strict=True)
    rate = video_rate(clip)
    stream = (
        (f"{t if t is not None else i / rate:.3f}", resize_frame(gray, height, width))
        for i, (gray, t) in enumerate(iter_gray(clip, threads=0))
    )
    return "time", stream


def run_predict(cfg: PredictConfig) -> Path:
    """Score every frame of ``cfg.clip_dir``; write the CSV, a score-over-time PNG and, with ``cfg.annotate``,
    an annotated copy of the clip; return the CSV path."""
    files = model_files(cfg.model, cfg.fold)
    loaded = [load_model(f, build_lrcn) for f in files]
    models = [m for m, _ in loaded]
    mcfg = loaded[0][1]
    clip = Path(cfg.clip_dir)
    name = clip.name if clip.is_dir() else clip.stem
    column, stream = _gray_stream(clip, mcfg.height, mcfg.width)

    out = Path(cfg.out) if cfg.out else clip.resolve().parent / f"{name}_scores.csv"
    make_folder(out.parent)
    tmp = out.with_name(f".{out.name}.tmp")
    scores = []
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["frame", column, "score", "anomalous"])
            for tag, score in stream_scores(stream, models, mcfg.window, cfg.batch_size, str(clip)):
                scores.append(score)
                writer.writerow([len(scores), tag, f"{score:.6f}", int(score >= cfg.threshold)])
    except BaseException:  # bad frames, a full disk, Ctrl-C: no half-written CSV is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    per_frame = np.asarray(scores)
    _plot(per_frame, cfg.threshold, out.with_suffix(".png"), f"{name}: {len(files)} fold model(s)")
    flagged = int((per_frame >= cfg.threshold).sum())
    wrote = f"{out} and {out.with_suffix('.png')}"
    if cfg.annotate:
        annotate(clip, per_frame, cfg.threshold, Path(cfg.annotate))
        wrote = f"{out}, {out.with_suffix('.png')} and {cfg.annotate}"
    print(f"{name}: {len(per_frame)} frames, {flagged} at or above {cfg.threshold:.2f}; wrote {wrote}")
    return out


def annotate(clip: Path, scores: np.ndarray, threshold: float, out: Path) -> Path:
    """Write ``clip`` (a video or a frame folder) as a video with a score bar along the bottom of every frame and a
    red border on frames at or above ``threshold``; frames are streamed, never held together."""
    if clip.is_dir():
        frames = (read_rgb(p) for p in frame_files(clip, IMAGE_SUFFIXES, first=None))
        fps = FOLDER_FPS
    else:
        frames, fps = iter_rgb(clip), video_rate(clip)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    with VideoWriter(tmp, fps) as writer:
        for i, (rgb, score) in enumerate(zip(frames, scores, strict=False)):
            writer.write(draw_score(rgb, i + 1, float(score), threshold))
    os.replace(tmp, out)
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


def _plot(scores: np.ndarray, threshold: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3), dpi=100)
    frames = np.arange(1, len(scores) + 1)
    ax.plot(frames, scores, color="tab:red", lw=1.5, label="anomaly score")
    ax.fill_between(frames, 0, scores, where=scores >= threshold, color="tab:red", alpha=0.2, step="mid")
    ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax.set(xlabel="frame", ylabel="score", ylim=(0, 1.02), xlim=(1, len(scores)), title=title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
