"""GPU throughput of ddp_vad's training steps, side by side in one run, with the FLOP/s they reach.

Measures, for one process on one device (the per-GPU figure; DDP/fold-parallel runs multiply it):

- ``gan``: the pretraining step (``ddp_vad.train.gan.gan_step``: D step on real + fake, G step through the frozen D),
  through an ``Accelerator`` exactly as ``ddp_vad pretrain`` prepares it; samples = real windows.
- ``finetune``: the classifier step of ``ddp_vad transfer --train all`` (LRCN forward/backward, cross-entropy, Adam,
  autocast as transfer does it).
- ``extract``: the frozen feature pass of ``--train head`` (conv stack + LSTM, eval, no grad, chunks of 64 windows),
  run once per transfer run; ``head``: the head-only step on those cached features.
- axes: fp32 / bf16 / fp16 autocast, channels_last on/off, torch.compile on/off (CUDA only by default),
  cudnn.benchmark, and the data source: ``memory`` (uint8 windows in host RAM, indexed and copied per batch, as
  transfer does), ``device`` (uint8 windows resident on the GPU), ``shards`` (``infinite_batches`` with loader
  workers, as pretrain reads).
- the shard reader alone with 0..N workers, beside the GPU's consumption rate;
- model FLOPs from ModelConfig (convs, LSTM, linear layers; a training step = 3x forward of what is trained, 2x
  forward of a frozen module that gradients pass through), checked against torch's FlopCounterMode; achieved
  FLOP/s against the device's peak; peak memory; and the time of the paper protocol (GAN pretraining + k-fold
  fine-tuning of 7,936 windows) from the measured rates.

    python benchmarks/gpu.py --out benchmarks/results/gpu            # CUDA machine: paper preset, 120x182
    python benchmarks/gpu.py --quick --out /tmp/gpu-quick            # any machine, tiny sizes, ~1 minute on CPU
    python benchmarks/gpu.py --out OUT --time-budget 420 --steps 10  # a 10-minute GPU slot (see README)

Without ``--shards`` it builds a small synthetic shard set (``ddp_vad.data.synth``) in a temp folder. Writes
``OUT/gpu_benchmark.json`` and ``OUT/gpu_benchmark.md`` and prints the markdown. Rows that need CUDA say
``skipped`` on other machines; a row that fails (e.g. out of memory) says ``failed`` and the run goes on.

Every row is written as soon as it is measured: appended to ``OUT/gpu_benchmark.rows.jsonl`` and folded into
``OUT/gpu_benchmark.json`` / ``.md`` (marked partial until the run ends), so a run cut by a time limit keeps what it
measured. Cheap rows come first (eager cases, then the reader, then the ``torch.compile`` cases, whose compilation
takes minutes); ``--time-budget`` stops starting new rows after that many seconds and marks the rest skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from ddp_vad.data.reader import frames_to_float, infinite_batches, load_window_set  # noqa: E402
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest  # noqa: E402
from ddp_vad.models import ModelConfig, build_generator, build_lrcn, model_config_for  # noqa: E402
from ddp_vad.train.distributed import make_accelerator, seed_everything  # noqa: E402
from ddp_vad.train.fold_steps import optimizer_step  # noqa: E402
from ddp_vad.train.gan import gan_step  # noqa: E402  (the toolkit's own step, not a copy)

PRECISIONS = ("fp32", "bf16", "fp16")
_ACCEL_MP = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
EXTRACT_CHUNK = 64  # transfer's chunk for frozen features

# Dense peak TFLOP/s from the vendors' data sheets (no sparsity): fp32 (CUDA cores), tf32 / bf16 / fp16 (tensor
# cores, fp32 accumulate). Matched against torch.cuda.get_device_name, longest key first. --peak-tflops overrides.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "GH200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1},
    "L40": {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "V100": {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0},
    "T4": {"fp32": 8.1, "tf32": 8.1, "bf16": 8.1, "fp16": 65.0},
}


# ------------------------------------------------------------------------------------------- FLOPs
def _conv(c_in: int, c_out: int, k: int, h: int, w: int) -> float:
    """Multiply-adds x 2 of a k x k convolution producing c_out x h x w (bias ignored)."""
    return 2.0 * c_in * c_out * k * k * h * w


def generator_flops(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs of one generated window, by layer group."""
    h0, w0 = cfg.gen_map
    hc, wc = cfg.gen_conv_map
    linear = 2.0 * cfg.z_dim * cfg.gen_channels[0] * h0 * w0
    convs, prev = 0.0, cfg.gen_channels[0]
    for c in cfg.gen_channels[1:]:
        convs += _conv(prev, c, 3, hc, wc)
        prev = c
    convs += _conv(prev, cfg.window, 1, hc, wc)  # 1x1 to frames
    return {"linear": linear, "convs": convs, "total": linear + convs}


def lrcn_flops(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs of one window through the LRCN (T frames of conv stack, T LSTM steps, the head)."""
    h, w = cfg.height // cfg.input_pool, cfg.width // cfg.input_pool
    convs, prev = 0.0, 1
    for c, k in zip(cfg.conv_channels, cfg.conv_kernels, strict=True):
        h, w = h - k + 1, w - k + 1
        convs += _conv(prev, c, k, h, w)
        h, w, prev = h // 2, w // 2, c
    convs *= cfg.window
    lstm = cfg.window * 2.0 * 4 * cfg.lstm_hidden * (cfg.frame_features + cfg.lstm_hidden)
    head = 2.0 * (cfg.lstm_hidden * cfg.dense + cfg.dense * cfg.num_classes)
    return {"convs": convs, "lstm": lstm, "head": head, "features": convs + lstm, "total": convs + lstm + head}


def step_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs per sample of each measured phase.

    gan: G forward+backward (3G) + D trained on real and fake (2 windows x 3D) + G step through the frozen D
    (forward + input gradients, 2D) = 3G + 8D per real window. finetune: 3D. extract: features forward. head: 3 head.
    """
    g, d = generator_flops(cfg), lrcn_flops(cfg)
    return {
        "gan": 3 * g["total"] + 8 * d["total"],
        "finetune": 3 * d["total"],
        "extract": d["features"],
        "head": 3 * d["head"],
    }


def counted_forward_flops(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per sample counted by torch's FlopCounterMode (CPU, batch 1): a check of the formulas."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with torch.no_grad():
        for name, model, x in (
            ("generator", build_generator(cfg).eval(), torch.zeros(1, cfg.z_dim)),
            ("lrcn", build_lrcn(cfg).eval(), torch.zeros(1, cfg.window, 1, cfg.height, cfg.width)),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                model(x)
            out[name] = float(counter.get_total_flops())
    return out


# ------------------------------------------------------------------------------------------ device
def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _sync(device: torch.device) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if _is_cuda(device) else None


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def device_info() -> dict:
    """What the benchmark ran on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda_version=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        info["name"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def peak_tflops(name: str, override: float | None) -> dict[str, float] | None:
    """Peak TFLOP/s per precision for the device (None when unknown)."""
    if override:
        return dict.fromkeys(("fp32", "tf32", "bf16", "fp16"), float(override))
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_TFLOPS[key]
    return None


def _peak_for(peaks: dict[str, float] | None, precision: str) -> float | None:
    if peaks is None:
        return None
    if precision == "fp32":  # convs run on TF32 tensor cores when cuDNN allows it (PyTorch's default)
        return peaks["tf32"] if torch.backends.cudnn.allow_tf32 else peaks["fp32"]
    return peaks[precision]


# -------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """The benchmark's windows: the shard folder and the same windows in host memory."""

    shards: Path
    frames: torch.Tensor  # uint8 [N, T, H, W]
    labels: torch.Tensor  # int64 [N]
    manifest: dict


def make_synthetic_shards(root: Path, quick: bool, height: int, width: int) -> Path:
    """A small synthetic UCSD-style dataset -> shards of the benchmark's frame size (balance none: all windows)."""
    from ddp_vad.data.synth import SynthConfig, run_synth

    clips = (2, 3, 30) if quick else (4, 8, 80)  # train clips, test clips, frames per clip
    data = run_synth(
        SynthConfig(out=root / "data", train_clips=clips[0], test_clips=clips[1], frames=clips[2],
                    height=max(16, height * 4 // 3), width=max(16, width * 4 // 3), seed=0),
        show_progress=False,
    )  # fmt: skip
    return build_shards(
        ShardConfig(data=str(data), out=str(root / "shards"), height=height, width=width, folds=10 if not quick else 4,
                    balance="none", shard_size=8 if quick else 32, workers=min(4, os.cpu_count() or 1)),
        show_progress=False,
    )  # fmt: skip


def load_data(shards: Path) -> Data:
    """Every window of ``shards`` in host memory (as transfer's WindowSet holds them)."""
    ws = load_window_set(shards)
    return Data(Path(shards), torch.from_numpy(ws.frames), torch.from_numpy(ws.labels), ws.manifest)


def batch_source(kind: str, data: Data, batch: int, device: torch.device, workers: int) -> Iterator[tuple]:
    """Endless (frames float [B,T,1,H,W], labels [B]) on ``device`` from the given source."""
    g = torch.Generator().manual_seed(0)
    n = len(data.labels)
    if kind == "memory":
        while True:
            idx = torch.randint(n, (batch,), generator=g)  # index + copy per batch, as transfer does
            yield frames_to_float(data.frames[idx].to(device)), data.labels[idx].to(device)
    elif kind == "device":
        frames, labels = data.frames.to(device), data.labels.to(device)
        gd = torch.Generator(device=device).manual_seed(0)
        while True:
            idx = torch.randint(n, (batch,), generator=gd, device=device)
            yield frames_to_float(frames[idx]), labels[idx]
    elif kind == "shards":
        pin = _is_cuda(device)  # non_blocking copies from pageable memory would be synchronous
        for b in infinite_batches(data.shards, batch, seed=0, rank=0, world_size=1, workers=workers, pin_memory=pin):
            yield (
                frames_to_float(b["frames"].to(device, non_blocking=True)),
                b["label"].to(device, non_blocking=True),
            )
    else:
        raise ValueError(kind)


# ------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    phase: str  # gan | finetune | extract | head
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    data: str = "memory"  # memory | device | shards | features (head: cached features on the device)
    cudnn_benchmark: bool = False
    batch: int = 32

    def label(self) -> str:
        return (
            f"{self.phase} {self.precision} cl={int(self.channels_last)} compile={int(self.compile)} "
            f"data={self.data} cudnn_bench={int(self.cudnn_benchmark)}"
        )


def _timed(step: Callable[[], torch.Tensor], warmup: int, steps: int, device: torch.device) -> tuple[float, list]:
    """Seconds for ``steps`` calls after ``warmup`` calls (device synchronised at both ends), and the outputs."""
    outs = [step() for _ in range(warmup)]
    _sync(device)
    t0 = time.perf_counter()
    outs = [step() for _ in range(steps)]
    _sync(device)
    return time.perf_counter() - t0, outs


def _convert(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    return module.to(memory_format=torch.channels_last) if channels_last else module


def run_gan(case: Case, cfg: ModelConfig, data: Data, args) -> dict:
    """The pretraining step as ``ddp_vad pretrain`` runs it (G and D prepared by accelerate, its autocast/scaler)."""
    acc = make_accelerator(_ACCEL_MP[case.precision], dynamo_backend="inductor" if case.compile else "no")
    device = acc.device
    seed_everything(0)
    gen, disc = _convert(build_generator(cfg), case.channels_last), _convert(build_lrcn(cfg), case.channels_last)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    gen, disc, opt_g, opt_d = acc.prepare(gen, disc, opt_g, opt_d)
    source = batch_source(case.data, data, case.batch, device, args.loader_workers)
    skipped = [0]

    def step() -> torch.Tensor:
        real, _ = next(source)
        stats = gan_step(acc, gen, disc, opt_g, opt_d, real, cfg.z_dim)
        if acc.scaler is not None:
            skipped[0] += int(opt_d.step_was_skipped) + int(opt_g.step_was_skipped)
        return stats

    seconds, outs = _timed(step, _warmup(case, args), args.steps, device)
    losses = torch.stack(outs)[:, :2].float().cpu()
    return {"seconds": seconds, "finite": bool(torch.isfinite(losses).all()), "loss": losses[-1].tolist(),
            "amp_skipped_steps": skipped[0], "device": str(device)}  # fmt: skip


def run_finetune(case: Case, cfg: ModelConfig, data: Data, args) -> dict:
    """``transfer --train all``'s step: LRCN forward/backward under the accelerator's autocast, Adam, CE (+ scaler)."""
    acc = make_accelerator(_ACCEL_MP[case.precision])
    device = acc.device
    seed_everything(0)
    model = _convert(build_lrcn(cfg), case.channels_last).to(device).train()
    forward = torch.compile(model) if case.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if case.precision == "fp16" else None
    source = batch_source(case.data, data, case.batch, device, args.loader_workers)

    def step() -> torch.Tensor:
        x, y = next(source)
        with acc.autocast():
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer_step(loss, opt, scaler)
        return loss.detach()

    seconds, outs = _timed(step, _warmup(case, args), args.steps, device)
    losses = torch.stack(outs).float().cpu()
    return {"seconds": seconds, "finite": bool(torch.isfinite(losses).all()), "loss": losses[-1].item(),
            "device": str(device)}  # fmt: skip


def run_extract(case: Case, cfg: ModelConfig, data: Data, args, keep: dict) -> dict:
    """The frozen feature pass of ``--train head`` over every window (eval, no grad, chunks of 64)."""
    acc = make_accelerator(_ACCEL_MP[case.precision])
    device = acc.device
    seed_everything(0)
    features = _convert(build_lrcn(cfg), case.channels_last).to(device).eval().features
    forward = torch.compile(features) if case.compile else features
    n = len(data.labels)
    chunks = [slice(lo, min(lo + EXTRACT_CHUNK, n)) for lo in range(0, n, EXTRACT_CHUNK)]
    out: list[torch.Tensor] = []

    @torch.no_grad()
    def one_pass() -> torch.Tensor:
        out.clear()
        for sl in chunks:
            frames = data.frames[sl].to(device, non_blocking=True)
            with acc.autocast():
                out.append(forward(frames_to_float(frames)).float())
        return out[-1]

    passes = max(1, args.steps // max(1, len(chunks)))
    seconds, _ = _timed(one_pass, 1, passes, device)
    keep["features"] = torch.cat(out).detach()
    return {"seconds": seconds, "samples": n * passes, "finite": bool(torch.isfinite(keep["features"]).all()),
            "device": str(device)}  # fmt: skip


def run_head(case: Case, cfg: ModelConfig, data: Data, args, keep: dict) -> dict:
    """The head-only step on cached features (``--train head``); features from the extract row when it ran."""
    acc = make_accelerator(_ACCEL_MP[case.precision])
    device = acc.device
    seed_everything(0)
    head = build_lrcn(cfg).head.to(device).train()
    forward = torch.compile(head) if case.compile else head
    feats = keep.get("features")
    if feats is None or feats.device.type != device.type:
        feats = torch.randn(len(data.labels), cfg.lstm_hidden, device=device)
    labels = data.labels.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if case.precision == "fp16" else None
    gd = torch.Generator(device=device).manual_seed(0)

    def step() -> torch.Tensor:
        idx = torch.randint(len(labels), (case.batch,), generator=gd, device=device)
        with acc.autocast():
            logits = forward(feats[idx])
        loss = F.cross_entropy(logits.float(), labels[idx])
        optimizer_step(loss, opt, scaler)
        return loss.detach()

    seconds, outs = _timed(step, _warmup(case, args), args.steps * 10, device)  # tiny steps: time more of them
    losses = torch.stack(outs).float().cpu()
    return {"seconds": seconds, "samples": args.steps * 10 * case.batch, "finite": bool(torch.isfinite(losses).all()),
            "device": str(device)}  # fmt: skip


def _warmup(case: Case, args) -> int:
    return max(args.warmup, 3) if case.compile else args.warmup  # compile: first calls compile (and recompile)


def skip_reason(case: Case, cuda: bool, args) -> str | None:
    """Why a case cannot run here (None: it can)."""
    if not cuda:
        if case.precision == "fp16":
            return "CUDA only (fp16 autocast + GradScaler)"
        if case.compile and args.compile != "on":
            return "CUDA only (torch.compile on CPU: --compile on)"
        if case.data == "device":
            return "CUDA only (on CPU equal to memory)"
        if case.cudnn_benchmark:
            return "CUDA only (cuDNN)"
    elif case.precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "bf16 not supported by this GPU"
    if case.compile and args.compile == "off":
        return "--compile off"
    return None


def plan(args, cuda: bool) -> list[Case]:
    """The cases to run: every precision x channels_last eagerly; the data sources and cudnn.benchmark for the default
    precision; the head path per precision; then (last: compiling takes minutes per case) torch.compile for
    --compile-precisions."""
    default = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    phases = (("gan", args.gan_batch), ("finetune", args.finetune_batch))
    cases: list[Case] = []
    for phase, batch in phases:
        for precision in args.precisions:
            for cl in (False, True):
                cases.append(Case(phase, precision, cl, batch=batch))
        for source in ("device", "shards"):
            cases.append(Case(phase, default, data=source, batch=batch))
        cases.append(Case(phase, default, cudnn_benchmark=True, batch=batch))
    for precision in args.precisions:
        cases.append(Case("extract", precision, batch=EXTRACT_CHUNK))
        cases.append(Case("head", precision, data="features", batch=args.finetune_batch))
    for phase, batch in phases:
        for precision in args.compile_precisions:
            for cl in (False, True):
                cases.append(Case(phase, precision, cl, compile=True, batch=batch))
    return cases


def run_case(case: Case, cfg: ModelConfig, data: Data, args, flops: dict, peaks, keep: dict, cuda: bool) -> dict:
    """Run one case; the result row (never raises: failures are recorded)."""
    row = asdict(case)
    reason = skip_reason(case, cuda, args)
    if reason:
        return {**row, "status": "skipped", "note": reason}
    device = torch.device("cuda") if cuda else torch.device("cpu")
    _cleanup(device)
    torch.backends.cudnn.benchmark = case.cudnn_benchmark
    _reset_peak(device)
    try:
        runner = {"gan": run_gan, "finetune": run_finetune}.get(case.phase)
        if runner is not None:
            out = runner(case, cfg, data, args)
        else:
            out = (run_extract if case.phase == "extract" else run_head)(case, cfg, data, args, keep)
    except Exception as exc:  # OOM, compile errors ...: record and go on
        _cleanup(device)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if args.verbose:
            traceback.print_exc()
        return {**row, "status": "failed", "note": f"{type(exc).__name__}: {first}"}
    finally:
        torch.backends.cudnn.benchmark = False
    samples = out.pop("samples", args.steps * case.batch)
    rate = samples / out["seconds"]
    achieved = flops[case.phase] * rate
    peak = _peak_for(peaks, case.precision)
    row.update(
        status="ok" if out["finite"] else "non-finite loss",
        samples_per_s=rate,
        ms_per_batch=1000.0 * out["seconds"] * case.batch / samples,
        tflops=achieved / 1e12,
        peak_tflops=peak,
        pct_peak=100.0 * achieved / (peak * 1e12) if peak else None,
        peak_mem_gib=_peak_gib(device),
        **out,
    )
    _cleanup(device)
    return row


# ------------------------------------------------------------------------------------------ reader
def reader_row(data: Data, batch: int, workers: int, samples: int) -> dict:
    """Shard reader alone (``infinite_batches``, decode + batch on the CPU) with ``workers`` loader workers:
    samples/s, including each epoch's loader start, as pretrain sees it."""
    n_shards = len(data.manifest["shards"])
    if workers > n_shards:
        return {"workers": workers, "status": "skipped", "note": f"only {n_shards} shards"}
    it = infinite_batches(data.shards, batch, seed=0, rank=0, world_size=1, workers=workers)
    t0, n = time.perf_counter(), 0
    while n < samples:
        n += len(next(it)["key"])
    return {"workers": workers, "status": "ok", "samples": n, "samples_per_s": n / (time.perf_counter() - t0)}


# ---------------------------------------------------------------------------------------- estimate
def protocol_estimate(rows: list[dict], args) -> dict:
    """Hours of the paper protocol on one device (and on --estimate-gpus devices) from the fastest ok rows."""

    def best(phase: str) -> dict | None:  # compute rates: data from memory, not the shard stream
        ok = [r for r in rows if r["phase"] == phase and r["status"] == "ok" and r["data"] != "shards"]
        return max(ok, key=lambda r: r["samples_per_s"]) if ok else None

    gan, ft, ex, hd = best("gan"), best("finetune"), best("extract"), best("head")
    n, k, epochs = args.protocol_windows, args.protocol_folds, args.protocol_epochs
    train_per_fold, test_per_fold = n * (k - 1) / k, n / k
    est: dict = {
        "assumptions": {
            "gan_steps": args.protocol_gan_steps, "gan_batch_per_process": args.gan_batch, "windows": n,
            "folds": k, "epochs": epochs, "gpus": args.estimate_gpus,
            "notes": "fastest measured configuration of each phase; fine-tuning scores the test fold after every "
                     "epoch (as transfer does, at the extract rate); GAN on P GPUs: same steps at P x the global "
                     "batch, so about the 1-GPU time; folds: ceil(folds / P) per GPU",
        },
    }  # fmt: skip
    if gan:
        est["gan_hours"] = args.protocol_gan_steps * args.gan_batch / gan["samples_per_s"] / 3600
        est["gan_config"] = _config_name(gan)
    if ft and ex:
        per_fold = epochs * (train_per_fold / ft["samples_per_s"] + test_per_fold / ex["samples_per_s"])
        est["finetune_all_hours_per_fold"] = per_fold / 3600
        est["finetune_all_hours"] = k * per_fold / 3600
        est["finetune_all_config"] = _config_name(ft)
    if hd and ex:
        per_fold = epochs * (train_per_fold + test_per_fold) / hd["samples_per_s"]
        extract = n / ex["samples_per_s"]  # once per run (GAN source)
        est["finetune_head_hours"] = (extract + k * per_fold) / 3600
        est["finetune_head_config"] = _config_name(hd)
    p = max(1, args.estimate_gpus)
    rounds = math.ceil(k / p)
    if "gan_hours" in est and "finetune_all_hours" in est:
        est["total_all_hours_1gpu"] = est["gan_hours"] + est["finetune_all_hours"]
        est[f"total_all_hours_{p}gpu"] = est["gan_hours"] + rounds * est["finetune_all_hours_per_fold"]
    if "gan_hours" in est and "finetune_head_hours" in est:
        est["total_head_hours_1gpu"] = est["gan_hours"] + est["finetune_head_hours"]
    return est


def _config_name(row: dict) -> str:
    bits = [row["precision"], f"data={row['data']}"]
    if row["channels_last"]:
        bits.append("channels_last")
    if row["compile"]:
        bits.append("compile")
    if row["cudnn_benchmark"]:
        bits.append("cudnn.benchmark")
    return ", ".join(bits)


# ------------------------------------------------------------------------------------------ report
def _f(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    info, meta = result["device"], result["meta"]
    lines = [
        f"# GPU benchmark ({meta['date']})",
        "",
        f"Device: **{info.get('name')}**, torch {info['torch']}"
        + (f", CUDA {info.get('cuda_version')}, cuDNN {info.get('cudnn')}" if info["cuda"] else "")
        + f". Preset `{meta['preset']}` at {meta['height']}x{meta['width']} (HxW), window {meta['window']}; "
        f"{meta['windows']} windows in {meta['shards_count']} shards{' (synthetic)' if meta['synthetic'] else ''}; "
        f"{meta['steps']} timed steps after {meta['warmup']} warm-up.{' --quick.' if meta['quick'] else ''}",
        "",
        *_partial_note(meta),
        "## Model FLOPs",
        "",
        "| model | forward GFLOP/sample (analytic) | of which LSTM | counted by torch FlopCounterMode (no LSTM) |",
        "|---|---:|---:|---:|",
    ]
    fl, counted = result["flops"]["per_sample"], result["flops"]["counted_forward"]
    for m in ("generator", "lrcn"):
        lstm = result["flops"][m].get("lstm", 0.0)
        lines.append(f"| {m} | {result['flops'][m]['total'] / 1e9:.4f} | {lstm / 1e9:.4f} | {counted[m] / 1e9:.4f} |")
    lines.append("\nFlopCounterMode does not see inside the fused LSTM op: its count should equal analytic - LSTM.")
    lines += ["", "| phase | training GFLOP/sample |", "|---|---:|"]
    lines += [f"| {phase} | {v / 1e9:.4f} |" for phase, v in fl.items()]
    lines += [
        "",
        "## Throughput (one process, one device)",
        "",
        "| phase | precision | channels_last | compile | data | cudnn.bench | batch | samples/s | ms/batch | "
        "TFLOP/s | % of peak | peak mem GiB | status |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["cases"]:
        status = r["status"] + (f": {r['note']}" if r.get("note") else "")
        if r["status"] == "ok" and r.get("amp_skipped_steps"):
            status += f" ({r['amp_skipped_steps']} fp16 steps skipped)"
        lines.append(
            f"| {r['phase']} | {r['precision']} | {'on' if r['channels_last'] else 'off'} | "
            f"{'on' if r['compile'] else 'off'} | {r['data']} | {'on' if r['cudnn_benchmark'] else 'off'} | "
            f"{r['batch']} | {_f(r.get('samples_per_s'))} | {_f(r.get('ms_per_batch'), '{:.2f}')} | "
            f"{_f(r.get('tflops'), '{:.3f}')} | {_f(r.get('pct_peak'))} | {_f(r.get('peak_mem_gib'), '{:.2f}')} | "
            f"{status} |"
        )
    consume = {p: r for p, r in result["fastest"].items() if r}
    lines += ["", "## Shard reader vs the device's consumption", ""]
    users = [p for p in ("gan", "finetune") if p in consume]
    heads = [f"x fastest {p} ({consume[p]['samples_per_s']:.0f}/s)" for p in users]
    lines.append("| loader workers | reader samples/s | " + " | ".join(heads) + " |")
    lines.append("|---:|---:|" + "---:|" * len(users))
    for r in result["reader"]:
        if r["status"] != "ok":
            lines.append(f"| {r['workers']} | {r['status']}: {r['note']} |")
            continue
        ratios = [f"{r['samples_per_s'] / consume[p]['samples_per_s']:.1f}x" for p in users]
        lines.append(f"| {r['workers']} | {r['samples_per_s']:.0f} | " + " | ".join(ratios) + " |")
    lines += ["", "## Fastest correct configuration per phase", ""]
    for phase, r in result["fastest"].items():
        lines.append(f"- {phase}: " + (f"{_config_name(r)} -> {r['samples_per_s']:.1f} samples/s" if r else "none ran"))
    est = result["protocol_estimate"]
    a = est["assumptions"]
    lines += [
        "",
        f"## Paper protocol estimate ({a['gan_steps']} GAN steps x batch {a['gan_batch_per_process']}, "
        f"{a['folds']}-fold fine-tuning of {a['windows']} windows x {a['epochs']} epochs)",
        "",
    ]
    names = {
        "gan_hours": "GAN pretraining",
        "finetune_all_hours": "fine-tuning, --train all (all folds, 1 GPU)",
        "finetune_head_hours": "fine-tuning, --train head (features once + head, 1 GPU)",
        "total_all_hours_1gpu": "total with --train all, 1 GPU",
        f"total_all_hours_{a['gpus']}gpu": f"total with --train all, {a['gpus']} GPUs (fold-parallel)",
        "total_head_hours_1gpu": "total with --train head, 1 GPU",
    }
    for key, name in names.items():
        if key in est:
            lines.append(f"- {name}: {est[key]:.3f} h ({est[key] * 60:.1f} min)")
    lines += ["", f"_{a['notes']}_", ""]
    return "\n".join(lines)


def _partial_note(meta: dict) -> list[str]:
    if meta.get("complete", True):
        return []
    return [
        f"**Partial: {meta['rows_done']} of {meta['rows_planned']} rows so far** (the run is going on, or was cut).",
        "",
    ]


# ------------------------------------------------------------------------------------------ output
ROWS_FILE = "gpu_benchmark.rows.jsonl"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Results:
    """The benchmark's results so far, written to OUT after every row: a run cut by a time limit keeps its rows.

    ``OUT/gpu_benchmark.rows.jsonl`` gets one line per finished row (appended, flushed); ``gpu_benchmark.json`` and
    ``gpu_benchmark.md`` are rewritten (atomically) with everything so far, marked partial until :meth:`finish`.
    """

    def __init__(self, out: Path, base: dict, args, rows_planned: int):
        self.out, self.base, self.args = out, base, args
        self.cases: list[dict] = []
        self.reader: list[dict] = []
        self.base["meta"].update(complete=False, rows_planned=rows_planned, rows_done=0)
        (out / ROWS_FILE).write_text("")  # a new run: an earlier run's rows go

    def add(self, kind: str, row: dict) -> None:
        """Record a finished row (``kind``: ``case`` or ``reader``) and write everything so far."""
        (self.cases if kind == "case" else self.reader).append(row)
        with (self.out / ROWS_FILE).open("a") as f:
            f.write(json.dumps({"kind": kind, **row}, default=str) + "\n")
        self.base["meta"]["rows_done"] += 1
        self._write()

    def finish(self, seconds: float) -> dict:
        """Mark the results complete and write them; returns the result dict."""
        self.base["meta"].update(complete=True, seconds=round(seconds, 1))
        return self._write()

    def result(self) -> dict:
        """The result dict of the rows so far (fastest rows and protocol estimate from those)."""
        fastest = {}
        for phase in ("gan", "finetune", "extract", "head"):
            ok = [r for r in self.cases if r["phase"] == phase and r["status"] == "ok"]
            fastest[phase] = max(ok, key=lambda r: r["samples_per_s"]) if ok else None
        return {**self.base, "cases": self.cases, "reader": self.reader, "fastest": fastest,
                "protocol_estimate": protocol_estimate(self.cases, self.args)}  # fmt: skip

    def _write(self) -> dict:
        result = self.result()
        _write_atomic(self.out / "gpu_benchmark.json", json.dumps(result, indent=2, default=str) + "\n")
        _write_atomic(self.out / "gpu_benchmark.md", markdown(result))
        return result


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Folder for gpu_benchmark.json / gpu_benchmark.md.")
    p.add_argument("--shards", default=None, help="Shard folder to use (default: build a synthetic one).")
    p.add_argument("--quick", action="store_true", help="Tiny preset and sizes, few steps: an end-to-end check.")
    p.add_argument("--preset", default=None, help="Model preset (default: paper; tiny with --quick).")
    p.add_argument("--height", type=int, default=None, help="Synthetic frame height (default 120; 24 with --quick).")
    p.add_argument("--width", type=int, default=None, help="Synthetic frame width (default 182; 36 with --quick).")
    p.add_argument("--gan-batch", type=int, default=None, help="GAN batch per process (default 32; 8 with --quick).")
    p.add_argument("--finetune-batch", type=int, default=None, help="Fine-tune batch (default 32; 8 with --quick).")
    p.add_argument("--steps", type=int, default=None, help="Timed steps per case (default 20; 3 with --quick).")
    p.add_argument("--warmup", type=int, default=None, help="Warm-up steps per case (default 5; 1 with --quick).")
    p.add_argument("--precisions", default="fp32,bf16,fp16", help="Comma-separated subset of fp32,bf16,fp16.")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile rows: auto = on CUDA only; on = also on CPU (slow to compile).")  # fmt: skip
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="Same as --compile off.")
    p.add_argument("--compile-precisions", default="bf16", help="Precisions that get torch.compile rows.")
    p.add_argument("--loader-workers", type=int, default=None, help="Workers for data=shards rows (default 4; 1).")
    p.add_argument("--reader-workers", default=None, help="Worker counts for the reader table (default 0,1,2,4,8).")
    p.add_argument("--reader-samples", type=int, default=None, help="Samples read per worker count (2000; 160).")
    p.add_argument("--peak-tflops", type=float, default=None, help="Device peak TFLOP/s if not in the table.")
    p.add_argument("--protocol-gan-steps", type=int, default=2000, help="GAN steps of the estimated protocol.")
    p.add_argument("--protocol-windows", type=int, default=7936, help="Windows of the estimated protocol.")
    p.add_argument("--protocol-folds", type=int, default=10)
    p.add_argument("--protocol-epochs", type=int, default=10, help="Fine-tuning epochs per fold.")
    p.add_argument("--estimate-gpus", type=int, default=8, help="GPUs for the fold-parallel estimate.")
    p.add_argument("--time-budget", type=float, default=None,
                   help="Seconds after which no new row starts (the rest are marked skipped); rows already "
                        "measured are written as they finish either way.")  # fmt: skip
    p.add_argument("--verbose", action="store_true", help="Print tracebacks of failed cases.")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"preset": ("paper", "tiny"), "height": (120, 24), "width": (182, 36), "gan_batch": (32, 8),
                "finetune_batch": (32, 8), "steps": (20, 3), "warmup": (5, 1), "loader_workers": (4, 1),
                "reader_workers": ("0,1,2,4,8", "0,1,2"), "reader_samples": (2000, 160)}  # fmt: skip
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.precisions = [s for s in args.precisions.split(",") if s]
    args.compile_precisions = [s for s in args.compile_precisions.split(",") if s]
    args.reader_workers = [int(s) for s in str(args.reader_workers).split(",") if s]
    bad = [s for s in args.precisions + args.compile_precisions if s not in PRECISIONS]
    if bad:
        p.error(f"unknown precision(s) {bad}; choose from {PRECISIONS}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    info = device_info()
    peaks = peak_tflops(info["name"], args.peak_tflops) if cuda else None
    t_start = time.perf_counter()

    def over_budget() -> bool:
        return args.time_budget is not None and time.perf_counter() - t_start > args.time_budget

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        synthetic = args.shards is None
        shards = Path(args.shards) if args.shards else make_synthetic_shards(Path(tmp), args.quick, args.height,
                                                                               args.width)  # fmt: skip
        manifest = load_manifest(shards)
        cfg = model_config_for(args.preset, manifest)
        data = load_data(shards)
        if cuda:  # the extract rows copy chunks with non_blocking=True: only asynchronous from pinned memory
            data.frames = data.frames.pin_memory()
        flops = step_flops(cfg)
        print(f"{info['name']}: preset {cfg.preset} {cfg.height}x{cfg.width}, {len(data.labels)} windows; "
              f"GFLOP/sample " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops.items()), flush=True)  # fmt: skip
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "preset": cfg.preset, "height": cfg.height,
            "width": cfg.width, "window": cfg.window, "windows": len(data.labels),
            "shards_count": len(manifest["shards"]), "synthetic": synthetic, "steps": args.steps,
            "warmup": args.warmup, "args": {k: v for k, v in vars(args).items()},
            "seconds": None,
        }  # fmt: skip
        base = {
            "meta": meta,
            "device": info,
            "peak_tflops": peaks,
            "model": cfg.to_dict(),
            "flops": {
                "per_sample": flops,
                "generator": generator_flops(cfg),
                "lrcn": lrcn_flops(cfg),
                "counted_forward": counted_forward_flops(cfg),
            },
        }
        cases = plan(args, cuda)
        results = Results(out, base, args, rows_planned=len(cases) + len(args.reader_workers))
        print(f"rows are written as they finish: {out / ROWS_FILE}, {out / 'gpu_benchmark.md'}", flush=True)
        keep: dict = {}

        def run_cases(todo: list[Case]) -> None:
            for case in todo:
                if over_budget():
                    row = {**asdict(case), "status": "skipped", "note": "time budget"}
                else:
                    row = run_case(case, cfg, data, args, flops, peaks, keep, cuda)
                results.add("case", row)
                rate = f"{row['samples_per_s']:.1f} samples/s" if row["status"] == "ok" else row.get("note", "")
                print(f"  {case.label():70s} {row['status']:8s} {rate}", flush=True)

        run_cases([c for c in cases if not c.compile])  # cheap rows first: compiling takes minutes per case
        for w in args.reader_workers:
            if over_budget():
                r = {"workers": w, "status": "skipped", "note": "time budget"}
            else:
                r = reader_row(data, args.gan_batch, w, args.reader_samples)
            results.add("reader", r)
            print(f"  reader workers={w}: " + (f"{r['samples_per_s']:.0f} samples/s" if r["status"] == "ok"
                  else r["note"]), flush=True)  # fmt: skip
        run_cases([c for c in cases if c.compile])
    result = results.finish(time.perf_counter() - t_start)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
