"""``ddp_vad shard build``: decode clips, cut them into blocks (frames stored once) and write tar shards + manifest.

A build is all-or-nothing: shards are written into a hidden staging folder beside ``--out`` (each tar under a
``.tmp`` name, renamed when complete), the manifest last, and the staging folder then replaces ``--out``.
A killed build leaves only the hidden staging folder, which the next build removes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ddp_vad import __version__
from ddp_vad.config import to_jsonable
from ddp_vad.data.format import FORMAT, MANIFEST, Block, encode_block
from ddp_vad.data.plan import ShardConfig, WindowPlan, plan_blocks, plan_windows
from ddp_vad.data.sources.ucsd import Clip, UCSDDataset, discover, read_clip
from ddp_vad.data.tario import TarShardWriter
from ddp_vad.data.windows import fold_summary
from ddp_vad.errors import UserError
from ddp_vad.files import atomic_path, staging_folder, swap_in, write_json_atomic

# Clips are decoded in worker processes and written group by group: while the main process writes the shards of
# one group the workers decode the next, and only a few clips are held in memory at once. Each group's blocks are
# shuffled (seeded) before they fill shards, so a shard mixes blocks of several clips of both splits. A group is
# only written once all its clips are decoded: smaller groups start writing sooner and leave a shorter write after
# the last decode (v1 format, 8 -> 4 clips: build/decode ratio 1.69 -> 1.44 on the 10-clip sample, median of 4).
CLIPS_PER_GROUP = 4


def _decode_clip(args: tuple[Clip, int, int, Path | None]) -> np.ndarray | tuple[str, tuple[int, ...]]:
    clip, height, width, handoff = args
    frames = read_clip(clip, height, width)
    if handoff is None:
        return frames
    # Handed over as a file in the page cache, not pickled through a pipe: 0.2 s less per 70 MB of frames on the
    # sample (bench: decode in a worker and return the frames 1.50 s, return nothing 1.27 s; median of 5).
    path = handoff / f"{os.getpid()}-{clip.name}.u8"
    frames.tofile(path)
    return str(path), frames.shape


def _decoded_clips(
    clips: list[Clip], cfg: ShardConfig, show_progress: bool, handoff: Path | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, frames) for each clip, decoded in ``cfg.workers`` processes (frames handed over through files
    in the folder ``handoff`` when given: read-only memory maps, their files already removed)."""
    jobs = [(c, cfg.height, cfg.width, handoff) for c in clips]
    bar = tqdm(total=sum(c.n_frames for c in clips), desc="decode", unit="frame", disable=not show_progress)
    # Even with one worker, decoding runs in a separate process so that writing overlaps with it.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx)
    try:
        for i, result in enumerate(pool.map(_decode_clip, jobs, chunksize=1)):
            if handoff is not None:
                path, shape = result
                result = np.memmap(path, np.uint8, "r", shape=shape)
                os.unlink(path)  # the mapping stays valid; the pages go when the clip's blocks are written
            bar.update(len(result))
            yield i, result
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)


def _write_shard(path: Path, blocks: list[Block]) -> str:
    """Write one tar under a temporary name, rename it when complete, return its sha256."""
    # The rename makes the tar visible only once it is whole (a kill before it leaves just the temp file).
    with atomic_path(path) as tmp:
        writer = TarShardWriter(tmp)
        try:
            for block in blocks:
                sample = encode_block(block)
                for ext in sorted(k for k in sample if k != "__key__"):  # webdataset's member order
                    writer.add(f"{sample['__key__']}.{ext}", sample[ext])
        except BaseException:
            writer.abort()
            raise
        return writer.close()


def write_shard(path: Path, blocks: list[Block]) -> dict:
    """Write ``blocks`` into the tar ``path`` (atomically); returns its manifest entry."""
    sha = _write_shard(path, blocks)
    entry = {"name": path.name, "samples": sum(b.n_kept for b in blocks), "blocks": len(blocks)}
    return {**entry, "frames": sum(len(b.frames) for b in blocks), "bytes": path.stat().st_size, "sha256": sha}


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """Check that ``out`` may be (re)written and return a fresh, empty staging folder beside it."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out exists and is not a folder: {out}")
        if any(out.iterdir()):
            if not overwrite:
                raise UserError(f"{out} is not empty; refusing to overwrite (pass --overwrite to replace it)")
            if not (out / MANIFEST).is_file():
                raise UserError(f"{out} is not a shard set (no {MANIFEST}); refusing to replace it")
    return staging_folder(out)


def _clip_blocks(dataset: UCSDDataset, plan: WindowPlan, cfg: ShardConfig, ci: int, spans: list, frames) -> list:
    """The blocks of clip ``ci`` (``spans``: window rows per block, from plan_blocks; ``frames``: the clip)."""
    clip = dataset.clips[ci]
    types = dataset.anomaly_types.get(clip.name, []) if clip.split == "test" else []
    # Per-window columns over all windows (O(windows) per clip: negligible next to decoding it).
    kept = plan.per_window(np.ones(len(plan.kept), np.int64)) == 1
    fold_window, fold_clip = plan.per_window(plan.fold_window), plan.per_window(plan.fold_clip)
    blocks = []
    for rows in spans:
        first, end = int(plan.start[rows[0]]), int(plan.start[rows[-1]]) + cfg.window
        blocks.append(
            Block(
                key=f"{clip.name}_{first:04d}",
                clip=clip.name,
                split=clip.split,
                anomaly_types=list(types),
                first=first,
                window=cfg.window,
                frames=frames[first:end],  # a view: the npy payload is written straight from the decoded clip
                frame_labels=np.asarray(clip.frame_labels[first:end], np.uint8),
                start=plan.start[rows],
                label=plan.label[rows],
                kept=kept[rows],
                fold_window=fold_window[rows],
                fold_clip=fold_clip[rows],
            )
        )
    return blocks


def _take_shard(pending: list[Block], shard_size: int) -> list[Block]:
    """Pop whole blocks from the front of ``pending`` up to ``shard_size`` windows (at least one block)."""
    taken, n = [], 0
    while pending and (not taken or n + pending[0].n_kept <= shard_size):
        n += pending[0].n_kept
        taken.append(pending.pop(0))
    return taken


def _write_all_shards(
    dataset: UCSDDataset, plan: WindowPlan, cfg: ShardConfig, stage: Path, show_progress: bool
) -> list[dict]:
    """Decode the clips that have kept windows and write every shard into ``stage``; returns the shard entries."""
    rng = np.random.default_rng(cfg.seed)
    spans = plan_blocks(plan, min(cfg.block_windows, cfg.shard_size))
    needed = sorted(spans)
    clip_order = [needed[i] for i in rng.permutation(len(needed))]
    pending: list[Block] = []
    group: list[Block] = []
    shards: list[dict] = []
    bar = tqdm(total=len(plan.kept), desc="write", unit="window", disable=not show_progress)
    clips = [dataset.clips[c] for c in clip_order]
    handoff = stage / ".decoded"  # inside the staging folder: a killed build's leftovers go with it
    handoff.mkdir()
    for i, frames in _decoded_clips(clips, cfg, show_progress, handoff):
        group += _clip_blocks(dataset, plan, cfg, clip_order[i], spans[clip_order[i]], frames)
        last = i == len(clip_order) - 1
        if (i + 1) % CLIPS_PER_GROUP and not last:
            continue
        pending += [group[j] for j in rng.permutation(len(group))]
        group = []
        while pending and (last or sum(b.n_kept for b in pending) >= cfg.shard_size):
            blocks = _take_shard(pending, cfg.shard_size)
            shards.append(write_shard(stage / f"{dataset.name}-{len(shards):06d}.tar", blocks))
            bar.update(shards[-1]["samples"])
    bar.close()
    shutil.rmtree(handoff)
    return shards


def build_shards(cfg: ShardConfig, show_progress: bool = True) -> Path:
    """Build the shard set described by ``cfg``; returns the output folder."""
    t0 = time.perf_counter()
    dataset = discover(cfg.data, cfg.dataset, cfg.anomaly_types)
    plan = plan_windows(dataset, cfg)
    out = Path(cfg.out)
    stage = _prepare_output(out, cfg.overwrite)

    shards = _write_all_shards(dataset, plan, cfg, stage, show_progress)
    manifest = _manifest(cfg, dataset, plan, shards, time.perf_counter() - t0)
    write_json_atomic(stage / MANIFEST, manifest)
    swap_in(stage, out)
    return out


def _manifest(cfg: ShardConfig, dataset: UCSDDataset, plan: WindowPlan, shards: list[dict], seconds: float) -> dict:
    kept_labels = plan.label[plan.kept]
    clip_folds_ok = bool(len(plan.fold_clip)) and plan.fold_clip.min() >= 0
    clip_summary = fold_summary(kept_labels, plan.fold_clip, cfg.folds)
    return {
        "format": FORMAT,
        "ddp_vad_version": __version__,
        "source": str(Path(cfg.data).resolve()),
        "dataset": dataset.name,
        "dataset_path": str(dataset.path.resolve()),
        "window": cfg.window,
        "stride": cfg.stride,
        "height": cfg.height,
        "width": cfg.width,
        "min_anomalous": cfg.min_anomalous,
        "balance": cfg.balance,
        "seed": cfg.seed,
        "folds": cfg.folds,
        "counts": {
            "clips": len(dataset.clips),
            "train_clips": sum(c.split == "train" for c in dataset.clips),
            "test_clips": sum(c.split == "test" for c in dataset.clips),
            "windows": int(len(plan.label)),
            "anomalous": int(plan.label.sum()),
            "normal": int(len(plan.label) - plan.label.sum()),
            "kept": int(len(plan.kept)),
            "kept_anomalous": int(kept_labels.sum()),
            "kept_normal": int(len(kept_labels) - kept_labels.sum()),
        },
        "protocols": {
            "window": {"available": True, "folds": fold_summary(kept_labels, plan.fold_window, cfg.folds)},
            "clip": {
                "available": clip_folds_ok,
                "folds": clip_summary,
                "folds_without_anomaly": [f["fold"] for f in clip_summary if f["anomalous"] == 0],
            },
        },
        "anomaly_types": {c: t for c, t in sorted(dataset.anomaly_types.items())},
        "clip_frames": int(sum(dataset.clips[c].n_frames for c in np.unique(plan.clip_index[plan.kept]))),
        "block_windows": min(cfg.block_windows, cfg.shard_size),
        "build_seconds": round(seconds, 3),
        "config": to_jsonable(cfg),
        "shards": shards,
    }
