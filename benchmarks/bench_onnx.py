"""Scoring throughput: onnxruntime vs PyTorch on the CPU, side by side in one run, plus live-stream frames/s and
latency.

For each preset (demo: the CPU pipeline's model; paper: the method's), a run of ``--folds`` fold models (random
weights; the cost does not depend on the values) at 120x182 is exported with ``ddp_vad export``; windows of the real
Ped1 sample (random frames without it) are scored by ``Detector.load(run).scorer`` (PyTorch) and
``Detector.load(model.onnx).scorer`` (onnxruntime), alternating, at batch 1 and batch 32; reported: windows/s
(median of ``--repeats``) and the largest score difference. Then ``Detector.stream`` reads a Ped1 clip encoded as
MPEG-TS at batch 1 (the live setting) with each backend: frames/s end to end (decode + resize + score), and the
latency of each frame's score: how many frames had arrived when it came out, and the milliseconds from the arrival
of the last frame of its last window to its score.

    python benchmarks/bench_onnx.py --data ../shared/data/ucsd-ped1-sample --out benchmarks/results/onnx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

import ddp_vad
from ddp_vad import Detector, ExportConfig
from ddp_vad.data.sources.frames import frame_files, read_frame, resize_frame
from ddp_vad.infer.onnx_scorer import OnnxScorer
from ddp_vad.models import ModelConfig, build_lrcn
from ddp_vad.presets import PRESETS
from ddp_vad.runfiles import MODEL_FILE, fold_dir
from ddp_vad.weights import save_model

WINDOW, HEIGHT, WIDTH = 10, 120, 182


def make_run(root: Path, preset: str, folds: int) -> Path:
    cfg = ModelConfig(preset=preset, window=WINDOW, height=HEIGHT, width=WIDTH, **PRESETS[preset].model)
    for k in range(folds):
        torch.manual_seed(k)
        save_model(build_lrcn(cfg), fold_dir(root, k) / MODEL_FILE, cfg)
    return root


def clip_frames(data: Path | None, n: int) -> np.ndarray:
    if data is not None and (data / "UCSDped1").is_dir():
        paths = frame_files(data / "UCSDped1" / "Test" / "Test003")[:n]
        return np.stack([read_frame(p) for p in paths])
    return np.random.default_rng(0).integers(0, 256, (n, 158, 238), dtype=np.uint8)


def throughput(scorers: dict, windows: np.ndarray, batch: int, repeats: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, scorer in scorers.items():  # alternating, so both see the same machine load
            t0 = time.perf_counter()
            for start in range(0, len(windows), batch):
                scorer(windows[start : start + batch])
            times[name].append(time.perf_counter() - t0)
    return {name: round(len(windows) / statistics.median(t), 1) for name, t in times.items()}


def write_ts(frames: np.ndarray, path: Path) -> Path:
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": "2"}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.stack([f] * 3, -1), format="rgb24")))
        container.mux(stream.encode())
    return path


def stream_figures(detector: Detector, source: Path) -> dict:
    """Frames/s of Detector.stream and the latency of each score (frames and ms), arrivals timed at the decoder."""
    import ddp_vad.infer.detector as detector_module

    arrivals: list[float] = []
    original = detector_module.iter_frames

    def timed(*args, **kwargs):
        for frame in original(*args, **kwargs):
            arrivals.append(time.perf_counter())
            yield frame

    detector_module.iter_frames = timed
    try:
        lag_frames, lag_ms = [], []
        t0 = time.perf_counter()
        for s in detector.stream(source, batch_size=1):
            now = time.perf_counter()
            last = s.frame + detector.window - 2  # index of the last frame of the last window covering this frame
            if last < len(arrivals):  # scored as it streamed (the last window - 1 frames come out at the end)
                lag_frames.append(len(arrivals) - s.frame)
                lag_ms.append((now - arrivals[last]) * 1000)
        seconds = time.perf_counter() - t0
    finally:
        detector_module.iter_frames = original
    return {
        "frames_per_s": round(len(arrivals) / seconds, 1),
        "latency_frames": sorted(set(lag_frames)),
        "latency_ms_after_last_frame_median": round(statistics.median(lag_ms), 1),
        "latency_ms_after_last_frame_p95": round(float(np.percentile(lag_ms, 95)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/ucsd-ped1-sample"
    )
    parser.add_argument("--presets", nargs="+", default=["demo", "paper"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="Threads of both backends (default: theirs).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime

    if args.threads:
        torch.set_num_threads(args.threads)
    raw = clip_frames(args.data, args.windows + WINDOW - 1)
    frames = np.stack([resize_frame(f, HEIGHT, WIDTH) for f in raw])
    windows = frames[np.arange(args.windows)[:, None] + np.arange(WINDOW)]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
        "threads": args.threads or f"default (torch {torch.get_num_threads()}, onnxruntime: physical cores)",
        "windows": args.windows,
        "folds": args.folds,
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        ts = write_ts(raw, Path(tmp) / "clip.ts")
        for preset in args.presets:
            t0 = time.perf_counter()
            run = make_run(Path(tmp) / preset, preset, args.folds)
            onnx = ddp_vad.export_model(ExportConfig(run=str(run), out=str(Path(tmp) / f"{preset}.onnx")))
            dets = {"pytorch": Detector.load(run), "onnxruntime": Detector.load(onnx)}
            if args.threads:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = args.threads
                session = onnxruntime.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
                dets["onnxruntime"].scorer = OnnxScorer(session)
            scorers = {name: d.scorer for name, d in dets.items()}
            row: dict = {
                "max_abs_diff": float(np.abs(scorers["pytorch"](windows) - scorers["onnxruntime"](windows)).max())
            }
            for batch in (1, 32):
                row[f"windows_per_s_batch{batch}"] = throughput(scorers, windows, batch, args.repeats)
            row["stream"] = {name: stream_figures(d, ts) for name, d in dets.items()}
            result["presets"][preset] = row
            print(preset, json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
