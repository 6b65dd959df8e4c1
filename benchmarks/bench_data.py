"""Data benchmarks, measured side by side in one run on the same windows.

1. Reading: the shard reader (``ddp_vad.data.stream_batches``) vs a plain torch Dataset that decodes 10 TIFFs and
   resizes them per sample (the usual way to feed an LRCN from frame folders), both through a DataLoader with the
   same batch size and worker count.
2. Building: ``ddp_vad shard build`` vs the bare decode+resize of the same frames (no windows, no tar, no hash),
   with the same number of processes.

    python benchmarks/bench_data.py --data ../shared/data/ucsd-ped1-sample --workers 0 2

Writes a markdown table to stdout and JSON to ``--json`` (default benchmarks/results/data.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ddp_vad.data.reader import load_window_set, stream_batches
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest
from ddp_vad.data.sources.ucsd import discover, read_frame, resize_frame


class FolderWindows(Dataset):
    """Baseline: one sample = decode the window's 10 TIFFs and resize each (what a frame-folder loader does)."""

    def __init__(self, items: list[tuple[list[Path], int]], height: int, width: int):
        self.items, self.height, self.width = items, height, width

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        paths, label = self.items[i]
        frames = np.stack([resize_frame(read_frame(p), self.height, self.width) for p in paths])
        return torch.from_numpy(frames), label


def _rate(iterable, limit: int | None = None) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for batch in iterable:
        n += len(batch["key"]) if isinstance(batch, dict) else len(batch[1])
        if limit and n >= limit:
            break
    return n / (time.perf_counter() - t0), n


def _decode_resize(args: tuple[Path, int, int]) -> int:
    path, h, w = args
    return resize_frame(read_frame(path), h, w).size


def bench_reading(shards: Path, data: Path, workers: int, batch: int, limit: int) -> dict:
    manifest = load_manifest(shards)
    ws = load_window_set(shards)
    clips = {c.name: c for c in discover(data).clips}
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ws))
    items = [
        (list(clips[ws.clips[i]].frame_paths[ws.starts[i] : ws.starts[i] + manifest["window"]]), int(ws.labels[i]))
        for i in order
    ]
    plain = DataLoader(
        FolderWindows(items, manifest["height"], manifest["width"]),
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
    )
    for _ in zip(range(2), stream_batches(shards, batch, workers=workers), strict=False):
        pass  # warm the page cache for both readers alike
    shard_rate, n_shard = _rate(stream_batches(shards, batch, workers=workers))
    plain_rate, n_plain = _rate(plain, limit)
    return {
        "workers": workers,
        "shard_samples_per_s": shard_rate,
        "plain_samples_per_s": plain_rate,
        "ratio": shard_rate / plain_rate,
        "shard_samples": n_shard,
        "plain_samples": n_plain,
    }


def _time_bare(jobs: list, workers: int) -> float:
    t0 = time.perf_counter()
    if workers <= 1:
        for job in jobs:
            _decode_resize(job)
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            list(pool.map(_decode_resize, jobs, chunksize=64))
    return time.perf_counter() - t0


def _time_build(data: Path, workers: int, height: int, width: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_shards(
            ShardConfig(data=str(data), out=f"{tmp}/s", height=height, width=width, workers=max(1, workers)),
            show_progress=False,
        )
        return time.perf_counter() - t0


def bench_building(data: Path, workers: int, height: int, width: int, repeats: int = 5) -> dict:
    """Median of ``repeats`` alternating runs of each (one run of either is ~1 s: a single pair is mostly noise)."""
    ds = discover(data)
    jobs = [(p, height, width) for c in ds.clips for p in c.frame_paths]
    bare, build = [], []
    for _ in range(repeats):
        bare.append(_time_bare(jobs, workers))
        build.append(_time_build(data, workers, height, width))
    bare_s, build_s = statistics.median(bare), statistics.median(build)
    return {
        "workers": max(1, workers),
        "frames": len(jobs),
        "repeats": repeats,
        "bare_decode_resize_s": bare_s,
        "build_s": build_s,
        "ratio": build_s / bare_s,
        "bare_runs_s": bare,
        "build_runs_s": build,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/ucsd-ped1-sample"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plain-limit", type=int, default=640, help="Samples timed for the slow baseline.")
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=182)
    parser.add_argument("--repeats", type=int, default=5, help="Alternating build/bare runs (median reported).")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()
    data = Path(args.data)

    results = {"reading": [], "building": [], "date": time.strftime("%Y-%m-%d"), "data": str(data)}
    for w in sorted({max(1, w) for w in args.workers}):
        results["building"].append(bench_building(data, w, args.height, args.width, args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(
            ShardConfig(data=str(data), out=f"{tmp}/s", height=args.height, width=args.width), show_progress=False
        )
        for w in args.workers:
            results["reading"].append(bench_reading(shards, data, w, args.batch_size, args.plain_limit))

    print(f"\nShard reading vs plain TIFF Dataset ({data.name}, batch {args.batch_size}):\n")
    print("| loader workers | shards (samples/s) | plain TIFF Dataset (samples/s) | ratio |")
    print("|---:|---:|---:|---:|")
    for r in results["reading"]:
        print(
            f"| {r['workers']} | {r['shard_samples_per_s']:.0f} | {r['plain_samples_per_s']:.0f} | {r['ratio']:.1f}x |"
        )
    print(f"\nShard building vs bare decode+resize of the same frames ({args.height}x{args.width}, "
          f"median of {args.repeats}):\n")  # fmt: skip
    print("| processes | frames | bare decode+resize (s) | shard build (s) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for r in results["building"]:
        print(
            f"| {r['workers']} | {r['frames']} | {r['bare_decode_resize_s']:.2f} | {r['build_s']:.2f} | "
            f"{r['ratio']:.2f}x |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
