"""The window plan of a shard build: options, every window with its label, balancing, folds, and the blocks.

Pure and seeded: the same dataset and options give the same plan on every machine. The writer turns the plan
into tar shards; nothing here touches pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ddp_vad.data.sources.ucsd import UCSDDataset
from ddp_vad.data.windows import grouped_stratified_folds, stratified_folds, undersample, window_labels, window_starts
from ddp_vad.errors import UserError

# Kept windows per block. A block stores its frames once; consecutive blocks of a clip repeat window-1 frames, so
# larger blocks store fewer frames twice (64: about 1.1x the clip's frames at stride 1) while a shard of the
# default 200 windows still mixes 3-4 blocks, usually of different clips. See docs/shard-format.md.
BLOCK_WINDOWS = 64


@dataclass
class ShardConfig:
    """Options of ``ddp_vad shard build`` (names match the CLI flags)."""

    data: str
    out: str
    dataset: str | None = None
    window: int = 10
    stride: int = 1
    height: int = 120
    width: int = 182
    min_anomalous: int = 5
    balance: str = "undersample"
    folds: int = 10
    seed: int = 0
    workers: int | None = None
    shard_size: int = 200
    block_windows: int = BLOCK_WINDOWS
    anomaly_types: str | None = None
    overwrite: bool = False

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
        if self.workers is None:
            self.workers = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass
class WindowPlan:
    """Every window of a dataset (one row each) and which of them go into the shards."""

    clip_index: np.ndarray  # int64 [N], index into dataset.clips
    start: np.ndarray  # int64 [N], 0-based first frame
    label: np.ndarray  # int64 [N]
    kept: np.ndarray  # int64 [K], indices of the windows written (sorted)
    fold_window: np.ndarray  # int64 [K]
    fold_clip: np.ndarray  # int64 [K], -1 when there are fewer clips than folds

    def per_window(self, values: np.ndarray) -> np.ndarray:
        """Spread a per-kept-window array ([K]) over all windows ([N]); windows that are not kept get -1."""
        out = np.full(len(self.label), -1, np.int64)
        out[self.kept] = values
        return out


def plan_windows(dataset: UCSDDataset, cfg: ShardConfig) -> WindowPlan:
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
    return WindowPlan(clip_index, starts, labels, kept, fold_window, fold_clip)


def plan_blocks(plan: WindowPlan, block_windows: int) -> dict[int, list[np.ndarray]]:
    """Per clip (index into dataset.clips): the blocks of its windows, each an array of window indices (rows of
    ``plan``) in start order.

    A block holds ``block_windows`` consecutive kept windows and the windows that are not kept between them (their
    frames are stored anyway, and their metadata says ``kept: 0``); frames before the block's first kept window and
    after its last are not stored. Every kept window lies in exactly one block; clips without kept windows get none.
    """
    is_kept = np.zeros(len(plan.label), bool)
    is_kept[plan.kept] = True
    blocks: dict[int, list[np.ndarray]] = {}
    for ci in np.unique(plan.clip_index[plan.kept]).tolist():
        rows = np.flatnonzero(plan.clip_index == ci)
        rows = rows[np.argsort(plan.start[rows], kind="stable")]
        kept_at = np.flatnonzero(is_kept[rows])  # positions (in rows) of the clip's kept windows
        spans = []
        for first in range(0, len(kept_at), block_windows):
            last = kept_at[min(first + block_windows, len(kept_at)) - 1]
            spans.append(rows[kept_at[first] : last + 1])
        blocks[ci] = spans
    return blocks
