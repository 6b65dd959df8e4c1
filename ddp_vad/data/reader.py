"""The one shard reader: windows of a shard set, in memory or streamed, all from the same block reader.

- :func:`iter_blocks` / :func:`iter_windows`: the blocks or window samples of a shard set, in manifest order;
- :func:`load_window_set`: every window in memory (cross-validation, baselines), or ``n`` of them (first ``n``, or
  ``n`` drawn uniformly with ``seed``: the similarity pool, the report's real windows);
- :func:`stream_batches` / :func:`infinite_batches`: shuffled batches for training (``ddp_vad.data.stream``).

One rule for damaged shards (missing, truncated, broken header, undecodable block): ``on_damage="refuse"`` stops
with a one-line UserError naming the shard (exit status 2: a missing shard would silently change folds and
metrics); ``on_damage="skip"`` (streaming training, figures) warns once per shard with the number of windows lost
and carries on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ddp_vad.data.format import Block, ShardDamaged, iter_shard, report_damaged
from ddp_vad.data.manifest import load_manifest
from ddp_vad.data.stream import (  # noqa: F401 - re-exported: the reader's streaming half
    InfiniteBatches,
    collate,
    epoch_shards,
    frames_to_float,
    infinite_batches,
    stream_batches,
)
from ddp_vad.errors import UserError

ON_DAMAGE = ("refuse", "skip")


def _shard_blocks(shard_dir: str | Path, entry: dict, manifest: dict, on_damage: str, frames: bool) -> Iterator[Block]:
    try:
        yield from iter_shard(shard_dir, entry, manifest, frames)
    except ShardDamaged as exc:
        if on_damage == "refuse":
            raise exc.refusal(shard_dir) from None
        report_damaged(exc)


def iter_blocks(
    shard_dir: str | Path,
    *,
    shards: Iterable[str] | None = None,
    on_damage: str = "refuse",
    frames: bool = True,
    manifest: dict | None = None,
) -> Iterator[Block]:
    """Blocks of every shard (or of the named ``shards``: file names or paths), in manifest and file order.

    ``frames=False`` skips the pixels (block.frames is None): metadata only, much cheaper.
    """
    if on_damage not in ON_DAMAGE:
        raise UserError(f"on_damage must be one of {ON_DAMAGE}, got {on_damage!r}")
    manifest = manifest or load_manifest(shard_dir)
    names = None if shards is None else {Path(s).name for s in shards}
    for entry in manifest["shards"]:
        if names is None or entry["name"] in names:
            yield from _shard_blocks(shard_dir, entry, manifest, on_damage, frames)


def iter_windows(shard_dir: str | Path, select: str = "kept", **kwargs) -> Iterator[dict]:
    """Window samples {"key", "frames", "label", "meta"} of a shard set: the ``select`` ones (see
    :meth:`Block.positions`; arguments otherwise as :func:`iter_blocks`)."""
    for block in iter_blocks(shard_dir, **kwargs):
        for j in block.positions(select).tolist():
            yield block.window_sample(j)


@dataclass
class WindowSet:
    """Windows of a shard set in memory, in manifest/block order (identical on every process and run)."""

    frames: np.ndarray  # uint8 [N, T, H, W]
    labels: np.ndarray  # int64 [N]
    keys: list[str]
    clips: list[str]
    starts: np.ndarray  # int64 [N]
    frame_labels: np.ndarray  # uint8 [N, T]
    fold_window: np.ndarray  # int64 [N]
    fold_clip: np.ndarray  # int64 [N] (-1: protocol unavailable)
    fold_leakfree: np.ndarray  # int64 [N] (-1: outside the leak-free protocol's labelled set)
    anomaly_types: list[list[str]]
    splits: list[str]
    manifest: dict

    def __len__(self) -> int:
        return len(self.keys)

    def folds(self, protocol: str) -> np.ndarray:
        """Fold index per window under ``protocol`` ("leakfree", "window" or "clip"); -1 = not in the protocol's
        labelled set (never trained or tested on)."""
        if protocol == "leakfree":
            if not (self.fold_leakfree >= 0).any():
                raise UserError(
                    f"protocol 'leakfree' needs at least {self.manifest['folds']} labelled (test) clips with windows "
                    f"of both classes; these shards have {self.manifest['counts']['test_clips']} test clips (use "
                    "--protocol clip or window, or fewer --folds at build time)"
                )
            return self.fold_leakfree
        if protocol == "window":
            return self.fold_window
        if protocol == "clip":
            if len(self.fold_clip) and self.fold_clip.min() < 0:
                raise UserError(
                    f"protocol 'clip' needs at least {self.manifest['folds']} clips; these shards have "
                    f"{self.manifest['counts']['clips']} (use --protocol window or fewer --folds at build time)"
                )
            return self.fold_clip
        raise UserError(f"unknown protocol {protocol!r} (expected 'leakfree', 'window' or 'clip')")

    def subset(self, index: np.ndarray) -> WindowSet:
        """A WindowSet of the selected windows (boolean mask or integer indices)."""
        idx = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return WindowSet(
            frames=self.frames[idx],
            labels=self.labels[idx],
            keys=[self.keys[i] for i in idx],
            clips=[self.clips[i] for i in idx],
            starts=self.starts[idx],
            frame_labels=self.frame_labels[idx],
            fold_window=self.fold_window[idx],
            fold_clip=self.fold_clip[idx],
            fold_leakfree=self.fold_leakfree[idx],
            anomaly_types=[self.anomaly_types[i] for i in idx],
            splits=[self.splits[i] for i in idx],
            manifest=self.manifest,
        )


def _picks(total: int, n: int | None, seed: int | Sequence[int] | None) -> np.ndarray | None:
    """Global indices (manifest order, among the ``total`` selected windows) of the windows to load; None for all."""
    if n is None or n >= total and seed is None:
        return None
    if seed is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))


def load_window_set(
    shard_dir: str | Path,
    *,
    n: int | None = None,
    seed: int | Sequence[int] | None = None,
    on_damage: str = "refuse",
    show_progress: bool = False,
    select: str = "kept",
) -> WindowSet:
    """Windows of ``shard_dir`` in one WindowSet (frames preallocated once): all of them, the first ``n``, or ``n``
    drawn uniformly without replacement (seeded by ``seed``). Only shards that hold wanted windows are read.

    ``on_damage`` as in the module docstring: the default refuses a damaged shard (cross-validation needs every
    window); with "skip" the set holds the readable windows only. ``select`` picks the windows (see
    :meth:`ddp_vad.data.format.Block.positions`): ``kept`` (the default, the method's balanced set), ``leakfree``
    (the leak-free protocol's labelled set) or ``train`` (every window of the train clips); ``n``/``seed`` pick
    among the selected windows (for other selections than ``kept`` a metadata pass counts them per shard first).
    """
    manifest = load_manifest(shard_dir)
    leakfree = manifest.get("protocols", {}).get("leakfree", {})
    if select in ("leakfree", "leakfree+train") and not leakfree.get("available"):
        raise UserError(
            f"protocol 'leakfree' is not available for {shard_dir}: it needs at least {manifest['folds']} test clips "
            f"holding windows of both classes (these shards: {manifest['counts']['test_clips']} test clips); use "
            "--protocol clip or window, or fewer --folds at build time"
        )
    per_shard = _per_shard_counts(shard_dir, manifest, select, on_damage) if n is not None else None
    picks = None if per_shard is None else _picks(sum(per_shard), n, seed)
    size = _selected_count(manifest, select) if picks is None else len(picks)
    t, h, w = manifest["window"], manifest["height"], manifest["width"]
    frames = np.empty((size, t, h, w), np.uint8)
    rows: list[tuple] = []
    offset = 0
    for i, entry in enumerate(tqdm(manifest["shards"], desc="load", unit="shard", disable=not show_progress)):
        lo, hi = offset, offset + (entry["samples"] if per_shard is None else per_shard[i])
        offset = hi
        local = None if picks is None else picks[(picks >= lo) & (picks < hi)] - lo  # picks index selected windows
        if local is not None and not len(local):
            continue
        seen = 0  # selected windows of this shard so far
        for block in _shard_blocks(shard_dir, entry, manifest, on_damage, frames=True):
            pos = block.positions(select)
            if local is not None:
                pos, seen = pos[np.isin(seen + np.arange(len(pos)), local)], seen + len(pos)
            for j in pos.tolist():
                if len(rows) >= size:
                    raise UserError(f"{shard_dir} holds more windows than its manifest lists ({size})")
                frames[len(rows)] = block.window_frames(j)
                rows.append(_row(block, j))
    return _window_set(frames[: len(rows)], rows, manifest, shard_dir)


def _per_shard_counts(shard_dir: str | Path, manifest: dict, select: str, on_damage: str) -> list[int]:
    """Selected windows per shard (manifest order): the manifest's counts for ``kept``, else a metadata pass (no
    pixels) over the shards."""
    if select == "kept":
        return [int(e["samples"]) for e in manifest["shards"]]
    return [
        sum(len(b.positions(select)) for b in _shard_blocks(shard_dir, e, manifest, on_damage, frames=False))
        for e in manifest["shards"]
    ]


def _selected_count(manifest: dict, select: str) -> int:
    """How many windows ``select`` yields, from the manifest's counts."""
    counts = manifest["counts"]
    if select == "leakfree+train":
        return _selected_count(manifest, "leakfree") + _selected_count(manifest, "train")
    key = {"kept": "kept", "leakfree": "leakfree_kept", "train": "train_windows"}.get(select)
    if key is None:
        raise UserError(f"unknown window selection {select!r}")
    if key not in counts:
        raise UserError(f"the shard set has no '{select}' windows recorded: rebuild it with `ddp_vad shard build`")
    return int(counts[key])


def _row(block: Block, j: int) -> tuple:
    o = int(block.start[j]) - block.first
    return (
        block.window_key(j),
        int(block.label[j]),
        block.clip,
        int(block.start[j]),
        block.frame_labels[o : o + block.window],
        int(block.fold_window[j]),
        int(block.fold_clip[j]),
        int(block.fold_leakfree[j]),
        list(block.anomaly_types),
        block.split,
    )


def _window_set(frames: np.ndarray, rows: list[tuple], manifest: dict, shard_dir: str | Path) -> WindowSet:
    if not rows:
        raise UserError(f"{shard_dir}: no readable window (run `ddp_vad shard info {shard_dir} --verify`)")
    keys, labels, clips, starts, frame_labels, fold_window, fold_clip, fold_lf, types, splits = zip(*rows, strict=True)
    return WindowSet(
        frames=frames,
        labels=np.array(labels, np.int64),
        keys=list(keys),
        clips=list(clips),
        starts=np.array(starts, np.int64),
        frame_labels=np.stack(frame_labels).astype(np.uint8),
        fold_window=np.array(fold_window, np.int64),
        fold_clip=np.array(fold_clip, np.int64),
        fold_leakfree=np.array(fold_lf, np.int64),
        anomaly_types=list(types),
        splits=list(splits),
        manifest=manifest,
    )


def load_train_clips(shard_dir: str | Path, on_damage: str = "skip") -> list[np.ndarray]:
    """The frames of every train clip (normal footage), uint8 [F, H, W] each, in clip-name order, rebuilt from the
    blocks of the shards that hold train windows (blocks overlap by window - 1 frames). The source of pseudo-anomalies
    (:mod:`ddp_vad.train.pseudo`); a damaged shard is reported and skipped (its clips come back shorter or not at
    all)."""
    from ddp_vad.data.stream import shards_holding

    manifest = load_manifest(shard_dir)
    names = [e["name"] for e in shards_holding(shard_dir, manifest, "train")]
    parts: dict[str, list[Block]] = {}
    for block in iter_blocks(shard_dir, shards=names, on_damage=on_damage, manifest=manifest) if names else ():
        if block.split == "train":
            parts.setdefault(block.clip, []).append(block)
    clips = []
    for name in sorted(parts):
        blocks = parts[name]
        frames = np.zeros((max(b.first + len(b.frames) for b in blocks), *blocks[0].frames.shape[1:]), np.uint8)
        for b in blocks:
            frames[b.first : b.first + len(b.frames)] = b.frames
        clips.append(frames)
    return clips
