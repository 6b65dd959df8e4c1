"""``ddp_vad shard build``: decode clips, cut them into blocks (frames stored once) and write tar shards + manifest.

A build is all-or-nothing: shards are written into a hidden staging folder beside ``--out`` (each tar under a
``.tmp`` name, renamed when complete), the manifest last, and the staging folder then replaces ``--out``.
A killed build leaves only the hidden staging folder, which the next build removes.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ddp_vad import __version__
from ddp_vad.data.format import FORMAT, MANIFEST, Block, encode_block
from ddp_vad.data.plan import ShardConfig, WindowPlan, plan_blocks, plan_windows
from ddp_vad.data.sources import Clip, decode_clip, decode_stats, open_dataset
from ddp_vad.data.sources.base import Dataset
from ddp_vad.data.tario import TarShardWriter
from ddp_vad.data.windows import fold_summary
from ddp_vad.errors import UserError
from ddp_vad.files import atomic_path, staging_folder, swap_in, to_jsonable, write_json_atomic
from ddp_vad.warn import warn

# Clips are split, in a seeded order, into groups of CLIPS_PER_GROUP; each group is one job: decode the group's clips
# and write the group's shards (block order shuffled within the group, so a shard mixes blocks of several clips of
# both splits). Which blocks go into which shard is planned up front, so the shards do not depend on the number of
# workers, and only a few clips per worker are in memory at once. With several processes each worker runs whole
# jobs: the decoded frames never travel, since handing them to a writing main process cost more than writing them
# (sample, decode in one worker: frames returned by pickle 1.34 s, through page-cache files 1.22 s, not returned
# 1.14 s; median of 5). With one process, a thread writes a group while the next one decodes.
CLIPS_PER_GROUP = 4


def _decode_clip(clip: Clip, height: int, width: int) -> np.ndarray:
    return decode_clip(clip, height, width)


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


def _clip_blocks(dataset: Dataset, plan: WindowPlan, cfg: ShardConfig, ci: int, spans: list) -> list[Block]:
    """The blocks of clip ``ci`` without their frames (``spans``: window rows per block, from plan_blocks)."""
    clip = dataset.clips[ci]
    types = dataset.anomaly_types.get(clip.name, []) if clip.split == "test" else []
    # Per-window columns over all windows (O(windows) per clip: negligible next to decoding it).
    kept = plan.per_window(np.ones(len(plan.kept), np.int64)) == 1
    fold_window, fold_clip = plan.per_window(plan.fold_window), plan.per_window(plan.fold_clip)
    fold_leakfree = np.full(len(plan.label), -1, np.int64)
    fold_leakfree[plan.leakfree] = plan.fold_leakfree
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
                frames=None,  # set by the worker that decodes the clip
                frame_labels=np.asarray(clip.frame_labels[first:end], np.uint8),
                start=plan.start[rows],
                label=plan.label[rows],
                kept=kept[rows],
                fold_window=fold_window[rows],
                fold_clip=fold_clip[rows],
                fold_leakfree=fold_leakfree[rows],
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


def _plan_jobs(dataset: Dataset, plan: WindowPlan, cfg: ShardConfig) -> list[dict]:
    """The build as jobs, one per group of clips: {"clips", "shards": [(name, blocks without frames), ...]}."""
    rng = np.random.default_rng(cfg.seed)
    spans = plan_blocks(plan, min(cfg.block_windows, cfg.shard_size))
    needed = sorted(spans)
    clip_order = [needed[i] for i in rng.permutation(len(needed))]
    jobs, n_shards = [], 0
    for g in range(0, len(clip_order), CLIPS_PER_GROUP):
        group = clip_order[g : g + CLIPS_PER_GROUP]
        blocks = [b for ci in group for b in _clip_blocks(dataset, plan, cfg, ci, spans[ci])]
        pending = [blocks[j] for j in rng.permutation(len(blocks))]
        shards = []
        while pending:
            shards.append((f"{dataset.name}-{n_shards + len(shards):06d}.tar", _take_shard(pending, cfg.shard_size)))
        jobs.append({"clips": [dataset.clips[ci] for ci in group], "shards": shards})
        n_shards += len(shards)
    return jobs


def _decode_job(job: dict, height: int, width: int) -> dict[str, np.ndarray]:
    return {clip.name: _decode_clip(clip, height, width) for clip in job["clips"]}


def _write_job(job: dict, frames: dict[str, np.ndarray], stage: Path) -> list[dict]:
    """Write one group's shards from its decoded clips; returns their manifest entries."""
    entries = []
    for name, blocks in job["shards"]:
        for b in blocks:  # views: the npy payloads are written straight from the decoded clips
            b.frames = frames[b.clip][b.first : b.first + len(b.frame_labels)]
        entries.append(write_shard(stage / name, blocks))
    return entries


def _run_job(job: dict, height: int, width: int, stage: Path) -> list[dict]:
    """Decode one group of clips and write its shards (in a worker process)."""
    return _write_job(job, _decode_job(job, height, width), stage)


def die_with_parent() -> None:
    """Decode-worker initializer: on Linux, ask the kernel to kill this worker when its parent dies, so a ``kill -9``
    of a shard build leaves no orphaned decoder behind (elsewhere workers exit at their next task as before)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl (musl variants): best effort
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _job_results(jobs: list[dict], cfg: ShardConfig, stage: Path) -> Iterator[list[dict]]:
    """Each job's shard entries, in job order."""
    if cfg.workers == 1:
        # One process: a thread writes a group (sha256 and file writes release the GIL) while the next one decodes.
        with ThreadPoolExecutor(1) as writer:
            pending = None
            for job in jobs:
                written = writer.submit(_write_job, job, _decode_job(job, cfg.height, cfg.width), stage)
                if pending is not None:
                    yield pending.result()
                pending = written
            if pending is not None:
                yield pending.result()
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=die_with_parent)
    try:
        yield from pool.map(functools.partial(_run_job, height=cfg.height, width=cfg.width, stage=stage), jobs)
    finally:
        pool.shutdown(cancel_futures=True)


def _write_all_shards(
    dataset: Dataset, plan: WindowPlan, cfg: ShardConfig, stage: Path, show_progress: bool
) -> list[dict]:
    """Decode the clips that have kept windows and write every shard into ``stage``; returns the shard entries."""
    jobs = _plan_jobs(dataset, plan, cfg)
    shards: list[dict] = []
    with tqdm(total=len(plan.kept), desc="build", unit="window", disable=not show_progress) as bar:
        for entries in _job_results(jobs, cfg, stage):
            shards += entries
            bar.update(sum(e["samples"] for e in entries))
    return shards


def build_shards(cfg: ShardConfig, show_progress: bool = True) -> Path:
    """Build the shard set described by ``cfg``; returns the output folder."""
    t0 = time.perf_counter()
    dataset = open_dataset(cfg.data, cfg.format, cfg.dataset, cfg.anomaly_types, cfg.fps)
    plan = plan_windows(dataset, cfg)
    warn_without_anomalies(dataset, plan, cfg)
    out = Path(cfg.out)
    stage = _prepare_output(out, cfg.overwrite)

    shards = _write_all_shards(dataset, plan, cfg, stage, show_progress)
    manifest = _manifest(cfg, dataset, plan, shards, time.perf_counter() - t0)
    write_json_atomic(stage / MANIFEST, manifest)
    swap_in(stage, out)
    return out


def warn_without_anomalies(dataset: Dataset, plan: WindowPlan, cfg: ShardConfig) -> None:
    """Warn, naming the labels file, when the shards would hold no anomalous window (an empty ``labels.csv``, a gt
    file that marks nothing): they build, but there is nothing to detect and cross-validation has one class."""
    labels = dataset.gt_path or dataset.path
    if not any(clip.frame_labels.any() for clip in dataset.clips):
        tests = sum(clip.split == "test" for clip in dataset.clips)
        warn(f"{labels}: marks no frame of the {tests} test clip(s) anomalous: the shards will hold 0 anomalous "
             "windows (nothing to detect); check the labels")  # fmt: skip
    elif not plan.label.any():
        warn(f"{labels}: no window has {cfg.min_anomalous} anomalous frames of {cfg.window}: the shards will hold 0 "
             "anomalous windows; lower --min-anomalous")  # fmt: skip


def _manifest(cfg: ShardConfig, dataset: Dataset, plan: WindowPlan, shards: list[dict], seconds: float) -> dict:
    kept_labels = plan.label[plan.kept]
    clip_folds_ok = bool(len(plan.fold_clip)) and plan.fold_clip.min() >= 0
    clip_summary = fold_summary(kept_labels, plan.fold_clip, cfg.folds)
    return {
        "format": FORMAT,
        "ddp_vad_version": __version__,
        "source": str(Path(cfg.data).resolve()),
        "dataset": dataset.name,
        "dataset_path": str(dataset.path.resolve()),
        "layout": dataset.format,
        "fps": cfg.fps,
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
            "leakfree_kept": int(len(plan.leakfree)),
            "leakfree_anomalous": int(plan.label[plan.leakfree].sum()),
            "train_windows": int(len(plan.train)),
        },
        "protocols": {
            "leakfree": {
                "available": bool((plan.fold_leakfree >= 0).any()),
                "folds": fold_summary(plan.label[plan.leakfree], plan.fold_leakfree, cfg.folds),
                "gan_windows": int(len(plan.train)),
            },
            "window": {"available": True, "folds": fold_summary(kept_labels, plan.fold_window, cfg.folds)},
            "clip": {
                "available": clip_folds_ok,
                "folds": clip_summary,
                "folds_without_anomaly": [f["fold"] for f in clip_summary if f["anomalous"] == 0],
            },
        },
        "anomaly_types": {c: t for c, t in sorted(dataset.anomaly_types.items())},
        "clip_frames": int(sum(dataset.clips[c].n_frames for c in np.unique(plan.clip_index[plan.stored]))),
        "block_windows": min(cfg.block_windows, cfg.shard_size),
        "build_seconds": round(seconds, 3),
        "decode": decode_stats(),
        "config": to_jsonable(cfg),
        "shards": shards,
    }
