"""Data benchmarks: the shard format v1 (one tar sample per window) vs v2 (frames stored once, in blocks), side by
side in one run, on the real Ped1 sample and on synthetic data.

1. Bytes: tar bytes of each format vs the decoded frames of the clips (uint8 at the shard resolution).
2. Building: ``shard build`` (v1 and v2) vs the bare decode+resize of the same frames (no windows, no tar, no hash),
   with the same number of processes; median of alternating repeats.
3. Reading: windows/s of one shuffled epoch, v1 reader vs v2 reader, in the main process and with loader workers;
   median of alternating repeats. Also a plain torch Dataset that decodes 10 TIFFs and resizes per window (the usual
   frame-folder loader; real sample only).
4. Tar I/O: ddp_vad's tar writer/reader (``ddp_vad.data.tario``) vs webdataset's ``TarWriter`` (with a hashing
   file wrapper) and ``tar_file_iterator`` on the same v2 blocks.

    python benchmarks/bench_data.py --data ../shared/data/ucsd-ped1-sample --workers 0 2

Writes markdown tables to stdout and JSON to ``--json`` (default benchmarks/results/data.json).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from v1_format import build_shards_v1, stream_batches_v1
from webdataset.tariterators import tar_file_iterator

from ddp_vad.data.format import encode_block
from ddp_vad.data.reader import iter_blocks, load_window_set, stream_batches
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest
from ddp_vad.data.sources.ucsd import discover, read_frame, resize_frame
from ddp_vad.data.synth import SynthConfig, run_synth
from ddp_vad.data.tario import TarShardWriter, tar_members


def _median_alternating(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Run each callable ``repeats`` times, alternating (a noisy shared machine hits all alike); seconds per run."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            os.sync()  # untimed: no run pays for the write-back of the previous run's files (v1 writes 0.6 GB)
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    return runs


# -------------------------------------------------------------------------------------- bytes + build
def _decode_resize(args: tuple[Path, int, int]) -> int:
    path, h, w = args
    return resize_frame(read_frame(path), h, w).size


def _bare(jobs: list, workers: int) -> None:
    if workers <= 1:
        for job in jobs:
            _decode_resize(job)
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            list(pool.map(_decode_resize, jobs, chunksize=64))


def bench_building(data: Path, tmp: Path, workers: int, height: int, width: int, repeats: int) -> dict:
    jobs = [(p, height, width) for c in discover(data).clips for p in c.frame_paths]
    cfg = dict(data=str(data), height=height, width=width, workers=workers, overwrite=True)
    runs = _median_alternating(
        {
            "bare": lambda: _bare(jobs, workers),
            "v1": lambda: build_shards_v1(ShardConfig(out=str(tmp / "b1"), **cfg)),
            "v2": lambda: build_shards(ShardConfig(out=str(tmp / "b2"), **cfg), show_progress=False),
        },
        repeats,
    )
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"workers": workers, "frames": len(jobs), "median_s": med, "runs_s": runs,
            "ratio_v1": med["v1"] / med["bare"], "ratio_v2": med["v2"] / med["bare"]}  # fmt: skip


def shard_bytes(shards: dict[str, Path]) -> dict:
    manifest = load_manifest(shards["v2"])
    frame_bytes = manifest["clip_frames"] * manifest["height"] * manifest["width"]
    out = {"decoded_frame_bytes": frame_bytes, "windows": manifest["counts"]["kept"]}
    for fmt, d in shards.items():
        out[f"{fmt}_bytes"] = sum(p.stat().st_size for p in d.glob("*.tar"))
        out[f"{fmt}_ratio"] = out[f"{fmt}_bytes"] / frame_bytes
    return out


# -------------------------------------------------------------------------------------------- reading
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


def _epoch(batches) -> int:
    return sum(len(b["key"]) if isinstance(b, dict) else len(b[1]) for b in batches)


def plain_rate(shards: Path, data: Path, workers: int, batch: int, limit: int) -> float:
    ws, manifest = load_window_set(shards), load_manifest(shards)
    clips = {c.name: c for c in discover(data).clips}
    order = np.random.default_rng(0).permutation(len(ws))[:limit]
    items = [(list(clips[ws.clips[i]].frame_paths[ws.starts[i] : ws.starts[i] + manifest["window"]]), 0) for i in order]
    loader = DataLoader(FolderWindows(items, manifest["height"], manifest["width"]), batch_size=batch,
                        num_workers=workers)  # fmt: skip
    t0 = time.perf_counter()
    return _epoch(loader) / (time.perf_counter() - t0)


def bench_reading(shards: dict[str, Path], workers: int, batch: int, repeats: int) -> dict:
    n = load_manifest(shards["v2"])["counts"]["kept"]
    readers = {
        "v1": lambda: _epoch(stream_batches_v1(shards["v1"], batch, workers=workers)),
        "v2": lambda: _epoch(stream_batches(shards["v2"], batch, workers=workers)),
    }
    for read in readers.values():
        assert read() == n  # warms the page cache for both alike, and checks that both read every window
    runs = _median_alternating(readers, repeats)
    rate = {k: n / statistics.median(v) for k, v in runs.items()}
    return {"workers": workers, "windows": n, "v1_per_s": rate["v1"], "v2_per_s": rate["v2"],
            "ratio": rate["v2"] / rate["v1"], "runs_s": runs}  # fmt: skip


# --------------------------------------------------------------------------------------------- tar I/O
class _Hashing(io.RawIOBase):
    """A file wrapper that hashes what goes through it (what the builder needs from a tar writer)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def bench_tario(shards: Path, tmp: Path, repeats: int) -> dict:
    samples = [encode_block(b) for b in iter_blocks(shards)]
    flat = [{k: (b"".join(bytes(p) for p in v) if isinstance(v, list) else v) for k, v in s.items()} for s in samples]

    def own_write() -> None:
        w = TarShardWriter(tmp / "own.tar")
        for s in samples:
            for ext in sorted(k for k in s if k != "__key__"):
                w.add(f"{s['__key__']}.{ext}", s[ext])
        w.close()

    def wds_write() -> None:
        with open(tmp / "wds.tar", "wb") as f, wds.TarWriter(_Hashing(f), encoder=False, mtime=0) as w:
            for s in flat:
                w.write(s)

    def wds_read() -> None:
        with open(tmp / "wds.tar", "rb") as f:
            sum(len(m["data"]) for m in tar_file_iterator(f))

    runs = _median_alternating({"own_write": own_write, "wds_write": wds_write}, repeats)
    assert (tmp / "own.tar").read_bytes() == (tmp / "wds.tar").read_bytes()  # the same tar, byte for byte
    runs |= _median_alternating({"own_read": lambda: sum(len(p) for _, p in tar_members(tmp / "own.tar")),
                                 "wds_read": wds_read}, repeats)  # fmt: skip
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {"write_ratio": med["wds_write"] / med["own_write"], "read_ratio": med["wds_read"] / med["own_read"]}
    return {"bytes": (tmp / "own.tar").stat().st_size, "median_s": med, **ratios}


# ------------------------------------------------------------------------------------------------ main
def bench_dataset(name: str, data: Path, args, tmp: Path) -> dict:
    print(f"[{name}] building...", flush=True)
    result: dict = {"data": str(data), "building": [], "reading": []}
    for w in sorted({max(1, w) for w in args.workers}):
        result["building"].append(bench_building(data, tmp, w, args.height, args.width, args.repeats))
    cfg = dict(data=str(data), height=args.height, width=args.width)
    shards = {"v1": build_shards_v1(ShardConfig(out=str(tmp / "v1"), **cfg)),
              "v2": build_shards(ShardConfig(out=str(tmp / "v2"), **cfg), show_progress=False)}  # fmt: skip
    result["bytes"] = shard_bytes(shards)
    print(f"[{name}] reading...", flush=True)
    for w in args.workers:
        row = bench_reading(shards, w, args.batch_size, args.repeats)
        if name == "real" and args.plain_limit:
            row["plain_tiff_per_s"] = plain_rate(shards["v2"], data, w, args.batch_size, args.plain_limit)
        result["reading"].append(row)
    if name == "real":
        result["tario"] = bench_tario(shards["v2"], tmp, args.repeats)
    return result


def print_tables(results: dict, args) -> None:
    res = f"{args.height}x{args.width}"
    print(f"\nShard bytes vs the decoded frames of the clips ({res} uint8):\n")
    print("| data | windows | decoded frames (MB) | v1 tars (MB) | v1 / frames | v2 tars (MB) | v2 / frames |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results["datasets"].items():
        b = r["bytes"]
        print(f"| {name} | {b['windows']} | {b['decoded_frame_bytes'] / 1e6:.1f} | {b['v1_bytes'] / 1e6:.1f} | "
              f"{b['v1_ratio']:.2f}x | {b['v2_bytes'] / 1e6:.1f} | {b['v2_ratio']:.2f}x |")  # fmt: skip
    print(f"\n`shard build` vs bare decode+resize of the same frames (median of {args.repeats} alternating runs):\n")
    print("| data | processes | frames | bare (s) | v1 build (s) | v1 / bare | v2 build (s) | v2 / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results["datasets"].items():
        for b in r["building"]:
            m = b["median_s"]
            print(f"| {name} | {b['workers']} | {b['frames']} | {m['bare']:.2f} | {m['v1']:.2f} | {b['ratio_v1']:.2f}x "
                  f"| {m['v2']:.2f} | {b['ratio_v2']:.2f}x |")  # fmt: skip
    print(f"\nReading one shuffled epoch (windows/s, batch {args.batch_size}, median of {args.repeats}):\n")
    print("| data | loader workers | v1 reader | v2 reader | v2 / v1 | plain TIFF Dataset | v2 / plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results["datasets"].items():
        for x in r["reading"]:
            plain = x.get("plain_tiff_per_s")
            extra = f"{plain:.0f} | {x['v2_per_s'] / plain:.1f}x" if plain else "- | -"
            rates = f"{x['v1_per_s']:.0f} | {x['v2_per_s']:.0f} | {x['ratio']:.2f}x"
            print(f"| {name} | {x['workers']} | {rates} | {extra} |")
    t = results["datasets"]["real"].get("tario")
    if t:
        m = t["median_s"]
        print(f"\nTar I/O on the real sample's v2 blocks ({t['bytes'] / 1e6:.0f} MB, median of {args.repeats}):\n")
        print("| | ddp_vad.data.tario (s) | webdataset (s) | webdataset / ddp_vad |")
        print("|---|---:|---:|---:|")
        print(f"| write + sha256 | {m['own_write']:.3f} | {m['wds_write']:.3f} | {t['write_ratio']:.1f}x |")
        print(f"| read | {m['own_read']:.3f} | {m['wds_read']:.3f} | {t['read_ratio']:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/ucsd-ped1-sample"))
    parser.add_argument("--synth-clips", type=int, default=16, help="Synthetic clips (200 frames each; 0 = skip).")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plain-limit", type=int, default=640, help="Windows timed for the slow TIFF baseline.")
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=182)
    parser.add_argument("--repeats", type=int, default=3, help="Alternating runs of each (median reported).")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()

    results = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["datasets"]["real"] = bench_dataset("real", Path(args.data), args, tmp / "real")
        if args.synth_clips:
            n_test = args.synth_clips // 2 + args.synth_clips % 2
            synth = run_synth(SynthConfig(out=tmp / "synth-data", train_clips=args.synth_clips - n_test,
                                          test_clips=n_test, seed=0), show_progress=False)  # fmt: skip
            results["datasets"]["synthetic"] = bench_dataset("synthetic", synth, args, tmp / "synth")
    print_tables(results, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
