"""The v1 shard format (one tar sample per window, every frame stored once per window that holds it), frozen.

A copy of the builder and reader of ``ddp_vad-shards/1`` as they were before the block format (commit da9e668),
kept only to measure the old format against the new one side by side (``bench_data.py``) and to test that both
yield the same windows (``tests/test_shard_format.py``). The window plan (labels, balancing, folds) and clip
decoding are shared with the current code, so the two formats are compared on the same windows.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import tarfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from ddp_vad.data.format import load_npy, npy_parts
from ddp_vad.data.plan import ShardConfig, WindowPlan, plan_windows
from ddp_vad.data.sources.ucsd import Clip, UCSDDataset, discover, read_clip
from ddp_vad.data.tario import TarShardWriter
from ddp_vad.data.writer import _manifest, _prepare_output
from ddp_vad.files import atomic_path, swap_in, write_json_atomic

FORMAT_V1 = "ddp_vad-shards/1"
CLIPS_PER_GROUP = 4


# ------------------------------------------------------------------------------------------------ writing
def _decode_clip(args: tuple[Clip, int, int]) -> np.ndarray:
    clip, height, width = args
    return read_clip(clip, height, width)


def _decoded_clips(clips: list[Clip], cfg: ShardConfig) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frames) per clip, decoded in ``cfg.workers`` processes and pickled back to the writing process."""
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx)
    try:
        yield from enumerate(pool.map(_decode_clip, [(c, cfg.height, cfg.width) for c in clips], chunksize=1))
    finally:
        pool.shutdown(cancel_futures=True)


def _make_sample(dataset: UCSDDataset, plan: WindowPlan, cfg: ShardConfig, pos: int, frames: np.ndarray) -> dict:
    w = plan.kept[pos]
    clip = dataset.clips[plan.clip_index[w]]
    start = int(plan.start[w])
    meta = {
        "clip": clip.name,
        "start": start,
        "frame_labels": clip.frame_labels[start : start + cfg.window].astype(int).tolist(),
        "anomaly_types": dataset.anomaly_types.get(clip.name, []) if clip.split == "test" else [],
        "split": clip.split,
        "fold_window": int(plan.fold_window[pos]),
        "fold_clip": int(plan.fold_clip[pos]),
    }
    return {
        "__key__": f"{clip.name}_{start:04d}",
        "frames.npy": npy_parts(frames[start : start + cfg.window]),
        "cls": str(int(plan.label[w])).encode(),
        "json": json.dumps(meta).encode(),
    }


def _write_shard(path: Path, samples: list[dict]) -> str:
    with atomic_path(path) as tmp:
        writer = TarShardWriter(tmp)
        for sample in samples:
            for ext, payload in sample.items():
                if ext != "__key__":
                    writer.add(f"{sample['__key__']}.{ext}", payload)
        return writer.close()


def _write_all_shards(dataset: UCSDDataset, plan: WindowPlan, cfg: ShardConfig, stage: Path) -> list[dict]:
    rng = np.random.default_rng(cfg.seed)
    clip_of = plan.clip_index[plan.kept]
    needed = sorted(set(clip_of.tolist()))
    clip_order = [needed[i] for i in rng.permutation(len(needed))]
    positions = {c: np.flatnonzero(clip_of == c) for c in needed}
    left = {c: len(positions[c]) for c in needed}
    frames_by_clip: dict[int, np.ndarray] = {}
    pending: list[int] = []
    group: list[int] = []
    shards: list[dict] = []
    for i, frames in _decoded_clips([dataset.clips[c] for c in clip_order], cfg):
        frames_by_clip[clip_order[i]] = frames
        group.append(clip_order[i])
        last = i == len(clip_order) - 1
        if len(group) < CLIPS_PER_GROUP and not last:
            continue
        pending += rng.permutation(np.concatenate([positions[c] for c in group])).tolist()
        group = []
        while len(pending) >= cfg.shard_size or (last and pending):
            chunk, pending = pending[: cfg.shard_size], pending[cfg.shard_size :]
            samples = [_make_sample(dataset, plan, cfg, pos, frames_by_clip[clip_of[pos]]) for pos in chunk]
            name = f"{dataset.name}-{len(shards):06d}.tar"
            sha = _write_shard(stage / name, samples)
            shards.append({"name": name, "samples": len(samples), "sha256": sha})
            for pos in chunk:
                c = int(clip_of[pos])
                left[c] -= 1
                if left[c] == 0:
                    del frames_by_clip[c]
    return shards


def build_shards_v1(cfg: ShardConfig) -> Path:
    """Build a v1 shard set (as ``ddp_vad shard build`` did before the block format)."""
    t0 = time.perf_counter()
    dataset = discover(cfg.data, cfg.dataset, cfg.anomaly_types)
    plan = plan_windows(dataset, cfg)
    out = Path(cfg.out)
    stage = _prepare_output(out, cfg.overwrite)
    shards = _write_all_shards(dataset, plan, cfg, stage)
    manifest = _manifest(cfg, dataset, plan, shards, time.perf_counter() - t0)
    manifest["format"] = FORMAT_V1
    write_json_atomic(stage / "manifest.json", manifest)
    swap_in(stage, out)
    return out


# ------------------------------------------------------------------------------------------------ reading
def _tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    with open(path, "rb") as f:
        while True:
            header = f.read(tarfile.BLOCKSIZE)
            if len(header) < tarfile.BLOCKSIZE:
                raise ValueError(f"{path}: truncated tar (no end-of-archive marker)")
            if header.count(0) == tarfile.BLOCKSIZE:
                return
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            payload = f.read(size)
            if len(payload) < size:
                raise ValueError(f"{path}: truncated tar member")
            f.read((-size) % tarfile.BLOCKSIZE)
            yield header[0:100].split(b"\0", 1)[0].decode(), payload


def iter_tar(path: str | Path) -> Iterator[dict]:
    """Decoded v1 samples {"key", "frames", "label", "meta"} of one tar, in file order."""
    current: dict = {}
    for name, payload in _tar_members(path):
        key, _, ext = name.partition(".")
        if current and current["__key__"] != key:
            yield _decode(current)
            current = {}
        current["__key__"] = key
        current[ext] = payload
    if current:
        yield _decode(current)


def _decode(sample: dict) -> dict:
    return {
        "key": sample["__key__"],
        "frames": load_npy(sample["frames.npy"]),
        "label": int(sample["cls"]),
        "meta": json.loads(sample["json"]),
    }


def load_v1(shard_dir: str | Path) -> dict[str, dict]:
    """Every v1 window of a shard set: {key: sample}."""
    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    return {s["key"]: s for entry in manifest["shards"] for s in iter_tar(Path(shard_dir) / entry["name"])}


def _samples(src: Iterable[dict]) -> Iterator[dict]:
    for item in src:
        yield from iter_tar(item["url"])


def _shuffle(bufsize: int, seed: tuple[int, ...]):
    def stage(src: Iterable) -> Iterator:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(hash((*seed, info.id if info else 0)))
        buf: list = []
        for item in src:
            buf.append(item)
            if len(buf) >= bufsize:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    return stage


def _collate(samples: list[dict]) -> dict:
    return {
        "frames": torch.from_numpy(np.stack([s["frames"] for s in samples])),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def stream_batches_v1(shard_dir: str | Path, batch_size: int, workers: int = 0, seed: int = 0, epoch: int = 0):
    """One shuffled epoch of v1 batches, the v1 reader's chain (single process, ``workers`` loader workers)."""
    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    urls = [str(Path(shard_dir) / s["name"]) for s in manifest["shards"]]
    urls = [urls[i] for i in np.random.default_rng([seed, epoch]).permutation(len(urls))]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        _samples,
        _shuffle(1000, (seed, epoch, 0)),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    if workers > 0:
        return wds.WebLoader(pipeline, batch_size=None, num_workers=min(workers, len(urls)), shuffle=False)
    return pipeline
