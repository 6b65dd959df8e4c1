"""The window plan of a shard build: options, every window with its label, balancing, folds, and the blocks.

Pure and seeded: the same dataset and options give the same plan on every machine. The writer turns the plan
into tar shards; nothing here touches pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddp_vad.data.sources import FORMATS
from ddp_vad.data.sources.base import Dataset
from ddp_vad.data.windows import grouped_stratified_folds, stratified_folds, undersample, window_labels, window_starts
from ddp_vad.errors import UserError
from ddp_vad.options import option

# Kept windows per block. A block stores its frames once; consecutive blocks of a clip repeat window-1 frames, so
# larger blocks store fewer frames twice (64: about 1.1x the clip's frames at stride 1) while a shard of the
# default 200 windows still mixes 3-4 blocks, usually of different clips. See docs/shard-format.md.
BLOCK_WINDOWS = 64


@dataclass
class ShardConfig:
    """Options of ``ddp_vad shard build`` (names match the CLI flags)."""

    data: str = option(help="Dataset folder (UCSD, Avenue, ShanghaiTech, or train/ test/ + labels.csv).", argument=True)
    out: str | None = option(None, "Output folder. Default: shards/<dataset-name> in the working directory.")
    dataset: str | None = option(None, "UCSDped1 or UCSDped2 when DATA holds both.")
    window: int = option(10, "Frames per window.")
    stride: int = option(1, "Step between window starts.")
    height: int = option(120, "Resize frames to this height.")
    width: int = option(182, "Resize frames to this width.")
    min_anomalous: int = option(5, "A window is anomalous when at least this many of its frames are.")
    balance: str = option(
        "undersample",
        "Under-sample the majority class to the minority count (seeded).",
        choices=("undersample", "none"),
    )
    folds: int = option(10, "Number of CV folds to assign.")
    seed: int = option(0, "Seed for balancing and fold assignment.")
    workers: int | None = option(None, "Decoding processes (default: cores).")
    shard_size: int = option(200, "Windows per tar shard (whole blocks, at most this).")
    block_windows: int = option(
        BLOCK_WINDOWS,
        "Windows per block (at most --shard-size): a block stores its frames once; consecutive blocks share window-1 "
        "frames.",
    )
    anomaly_types: str | None = option(
        None, "JSON {clip: [types]} for real data (synthetic data brings anomaly_types.json)."
    )
    overwrite: bool = option(False, "Replace an existing shard set in --out.")
    format: str | None = option(
        None,
        "Layout of DATA (default: detected). videos = train/ and test/ (videos or frame folders) + labels.csv.",
        choices=FORMATS,
    )
    fps: float | None = option(None, "Resample videos to this frame rate by their timestamps (default: every frame).")

    def __post_init__(self) -> None:
        if self.balance not in ("undersample", "none"):
            raise UserError(f"--balance must be undersample or none, got {self.balance!r}")
        for name in ("window", "stride", "height", "width", "shard_size", "block_windows"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.min_anomalous <= self.window:
            raise UserError(f"--min-anomalous must be in 1..{self.window}, got {self.min_anomalous}")
        if self.folds < 2:
            raise UserError(f"--folds must be >= 2, got {self.folds}")
        if self.fps is not None and not self.fps > 0:
            raise UserError(f"--fps must be > 0, got {self.fps}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.out is None:  # relative to the working directory, never inside an installed package
            self.out = str(Path("shards") / (self.dataset or Path(self.data).resolve().name))
        if self.workers is None:
            self.workers = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass
class WindowPlan:
    """Every window of a dataset (one row each) and which of them go into the shards."""

    clip_index: np.ndarray  # int64 [N], index into dataset.clips
    start: np.ndarray  # int64 [N], 0-based first frame
    label: np.ndarray  # int64 [N]
    kept: np.ndarray  # int64 [K], the method's balanced windows (sorted): the window and clip protocols' set
    fold_window: np.ndarray  # int64 [K]
    fold_clip: np.ndarray  # int64 [K], -1 when there are fewer clips than folds
    leakfree: np.ndarray  # int64 [L], the leak-free protocol's set: every window of the test clips
    fold_leakfree: np.ndarray  # int64 [L], clip-grouped folds of those (-1 when there are fewer test clips than folds)
    train: np.ndarray  # int64 [R], every window of the train clips (the leak-free GAN's unlabelled footage)

    @property
    def stored(self) -> np.ndarray:
        """Windows whose frames the shards hold: every window some protocol or the GAN reads (sorted)."""
        return np.union1d(np.union1d(self.kept, self.leakfree), self.train)

    def per_window(self, values: np.ndarray) -> np.ndarray:
        """Spread a per-kept-window array ([K]) over all windows ([N]); windows that are not kept get -1."""
        out = np.full(len(self.label), -1, np.int64)
        out[self.kept] = values
        return out


def plan_windows(dataset: Dataset, cfg: ShardConfig) -> WindowPlan:
    """Cut every clip into windows, label them, balance, and assign folds (pure, seeded)."""
    clip_index, starts, labels = [], [], []
    for ci, clip in enumerate(dataset.clips):
        s = window_starts(clip.n_frames, cfg.window, cfg.stride)
        clip_index.append(np.full(len(s), ci, np.int64))
        starts.append(s)
        labels.append(window_labels(clip.frame_labels, s, cfg.window, cfg.min_anomalous))
    clip_index, starts, labels = (np.concatenate(a) for a in (clip_index, starts, labels))
    if len(labels) == 0:
        raise UserError(f"no clip in {dataset.path} has at least {cfg.window} frames")
    kept = undersample(labels, cfg.seed) if cfg.balance == "undersample" else np.arange(len(labels))
    if len(kept) < cfg.folds:
        raise UserError(f"only {len(kept)} windows to split into --folds {cfg.folds}")
    fold_window = stratified_folds(labels[kept], cfg.folds, cfg.seed)
    fold_clip = grouped_stratified_folds(labels[kept], clip_index[kept], cfg.folds, cfg.seed)
    # Leak-free: the labelled set is every window of the test clips (both classes come from the same recordings),
    # never balanced, so that every frame of the labelled clips is scored out of fold (the field's frame-level
    # measure); training weighs the classes instead. Clip-grouped, even folds; the train clips go to the GAN.
    split = np.array([c.split for c in dataset.clips])[clip_index]
    leakfree = np.flatnonzero(split == "test")
    fold_leakfree = np.full(len(leakfree), -1, np.int64)
    if len(np.unique(labels[leakfree])) == 2:
        fold_leakfree = grouped_stratified_folds(labels[leakfree], clip_index[leakfree], cfg.folds, cfg.seed)
    if (fold_leakfree < 0).all():  # too few labelled clips: the protocol is unavailable and stores nothing
        leakfree, fold_leakfree = leakfree[:0], fold_leakfree[:0]
    train = np.flatnonzero(split == "train")
    return WindowPlan(clip_index, starts, labels, kept, fold_window, fold_clip, leakfree, fold_leakfree, train)


def plan_blocks(plan: WindowPlan, block_windows: int) -> dict[int, list[np.ndarray]]:
    """Per clip (index into dataset.clips): the blocks of its windows, each an array of window indices (rows of
    ``plan``) in start order.

    A block holds ``block_windows`` consecutive stored windows (:attr:`WindowPlan.stored`: read by some protocol or
    the GAN) and the windows between them (their frames are stored anyway; their metadata says which protocol, if
    any, uses them); frames before the block's first stored window and after its last are not stored. Every stored
    window lies in exactly one block; clips without stored windows get none.
    """
    stored = plan.stored
    is_kept = np.zeros(len(plan.label), bool)
    is_kept[stored] = True
    blocks: dict[int, list[np.ndarray]] = {}
    for ci in np.unique(plan.clip_index[stored]).tolist():
        rows = np.flatnonzero(plan.clip_index == ci)
        rows = rows[np.argsort(plan.start[rows], kind="stable")]
        kept_at = np.flatnonzero(is_kept[rows])  # positions (in rows) of the clip's kept windows
        spans = []
        for first in range(0, len(kept_at), block_windows):
            last = kept_at[min(first + block_windows, len(kept_at)) - 1]
            spans.append(rows[kept_at[first] : last + 1])
        blocks[ci] = spans
    return blocks
