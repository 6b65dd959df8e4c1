"""``ddp_vad predict``: per-frame anomaly scores for a folder of frames, from a fine-tuned (transfer) run.

Every window of the clip (the run's window length, stride 1) is scored by each fold's model; a window's score is
the mean anomaly probability over the fold models (a cross-validation ensemble), and a frame's score is the max
over the windows that cover it (the rule the evaluation uses for frame-level AUROC).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddp_vad.data.sources.ucsd import Clip, frame_files, read_clip
from ddp_vad.errors import UserError
from ddp_vad.models import build_lrcn, load_model

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class PredictConfig:
    """Options of ``ddp_vad predict``."""

    clip_dir: str
    model: str
    out: str | None = None
    fold: int | None = None
    batch_size: int = 64
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not Path(self.clip_dir).is_dir():
            raise UserError(f"clip folder not found: {self.clip_dir}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold must be in [0, 1], got {self.threshold}")


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


def run_predict(cfg: PredictConfig) -> Path:
    """Score every frame of ``cfg.clip_dir``; write the CSV and a score-over-time PNG; return the CSV path."""
    files = model_files(cfg.model, cfg.fold)
    loaded = [load_model(f, build_lrcn) for f in files]
    models = [m for m, _ in loaded]
    mcfg = loaded[0][1]
    paths = frame_files(Path(cfg.clip_dir), IMAGE_SUFFIXES)
    if len(paths) < mcfg.window:
        raise UserError(f"{cfg.clip_dir} has {len(paths)} frames; the model needs at least {mcfg.window}")
    clip = Clip(Path(cfg.clip_dir).name, "test", paths, np.zeros(len(paths), np.uint8))
    frames = read_clip(clip, mcfg.height, mcfg.width)
    win = window_scores(frames, models, mcfg.window, cfg.batch_size)
    per_frame = frame_scores(win, len(frames), mcfg.window)

    out = Path(cfg.out) if cfg.out else Path(cfg.clip_dir).resolve().parent / f"{clip.name}_scores.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", "file", "score", "anomalous"])
        for i, (path, score) in enumerate(zip(paths, per_frame, strict=True)):
            writer.writerow([i + 1, path.name, f"{score:.6f}", int(score >= cfg.threshold)])
    os.replace(tmp, out)
    _plot(per_frame, cfg.threshold, out.with_suffix(".png"), f"{clip.name}: {len(files)} fold model(s)")
    flagged = int((per_frame >= cfg.threshold).sum())
    print(
        f"{clip.name}: {len(frames)} frames, {flagged} at or above {cfg.threshold:.2f}; wrote {out} and "
        f"{out.with_suffix('.png')}"
    )
    return out


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
