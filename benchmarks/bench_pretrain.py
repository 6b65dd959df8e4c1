"""GAN pretraining benchmark: the toolkit's loop vs a plain PyTorch loop, side by side in one run.

Both train the same generator and LRCN discriminator (same preset, frame size, batch and step order: D step on
real vs detached fake, then G step through the frozen D, Adam). They differ in everything around the step:

- toolkit: ``ddp_vad.train.pretrain.run_pretrain`` (Accelerate, shard streaming + uint8 -> float on the fly, per-step
  loss bookkeeping, reduction + NaN check + TensorBoard every ``--log-every`` steps; checkpoints, similarity and
  images off). Its steps/s comes from the run's own ``throughput/samples_per_s`` events after the warmup interval,
  so start-up and the final export are excluded.
- plain: the models and optimizers alone, batches indexed from float windows already in memory.

Runs alternate (plain then toolkit, toolkit then plain, ...) and each side reports its best repeat, which damps
the noise of a shared machine. Without ``--shards`` a small synthetic set at the paper frame size (120x182) is
built first.

    python benchmarks/bench_pretrain.py --preset demo --steps 30 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddp_vad.data.reader import frames_to_float, load_window_set
from ddp_vad.data.shards import ShardConfig, build_shards
from ddp_vad.data.synth import SynthConfig, run_synth
from ddp_vad.models import build_generator, build_lrcn, model_config_for, real_fake_logit
from ddp_vad.train.pretrain import PretrainConfig, run_pretrain


def synthetic_shards(root: Path, height: int, width: int) -> Path:
    """~360 windows (4 clips of 100 frames, unbalanced) so an epoch lasts ~20 batches, as on real data."""
    data = run_synth(
        SynthConfig(out=root / "data", train_clips=2, test_clips=2, frames=100, seed=0), show_progress=False
    )
    return build_shards(
        ShardConfig(
            data=str(data),
            out=str(root / "shards"),
            height=height,
            width=width,
            folds=2,
            workers=1,
            shard_size=32,
            balance="none",
        ),
        show_progress=False,
    )


def plain_loop(shards: Path, preset: str, batch: int, warmup: int, steps: int, seed: int) -> float:
    """Steps/s of a bare PyTorch loop over the same two models (after ``warmup`` steps)."""
    ws = load_window_set(shards)
    cfg = model_config_for(preset, ws.manifest)
    torch.manual_seed(seed)
    gen, disc = build_generator(cfg), build_lrcn(cfg)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    windows = frames_to_float(torch.from_numpy(ws.frames))
    rng = np.random.default_rng(seed)
    ones, zeros = torch.ones(batch), torch.zeros(batch)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        real = windows[torch.from_numpy(rng.choice(len(windows), batch, replace=False))]
        fake = gen(torch.randn(batch, cfg.z_dim))
        loss_d = F.binary_cross_entropy_with_logits(
            real_fake_logit(disc(torch.cat([real, fake.detach()]))), torch.cat([ones, zeros])
        )
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        disc.requires_grad_(False)
        loss_g = F.binary_cross_entropy_with_logits(real_fake_logit(disc(fake)), ones)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        disc.requires_grad_(True)
        loss_d.item()  # a plain loop looks at its losses too
    return steps / (time.perf_counter() - t0)


def toolkit_loop(
    shards: Path,
    out: Path,
    preset: str,
    batch: int,
    warmup: int,
    steps: int,
    seed: int,
    workers: int,
    cache: bool = False,
) -> float:
    """Steps/s of ``run_pretrain`` after the first ``warmup`` steps, from its throughput events."""
    run = run_pretrain(
        PretrainConfig(
            shards=str(shards),
            out=str(out),
            preset=preset,
            steps=warmup + steps,
            batch_size=batch,
            seed=seed,
            checkpoint_every=0,
            similarity_every=0,
            image_every=0,
            log_every=warmup,
            workers=workers,
            cache=cache,
            progress=False,
            resume="none",
        )
    )
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    timed = [e for e in acc.Scalars("throughput/samples_per_s") if e.step > warmup]
    seconds = sum(warmup * batch / e.value for e in timed)  # each event covers `warmup` steps
    return len(timed) * warmup / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", choices=["paper", "demo", "tiny"])
    ap.add_argument("--shards", default=None, help="Shard folder (default: build a small synthetic set).")
    ap.add_argument("--steps", type=int, default=30, help="Timed steps per run (a multiple of --warmup).")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="Toolkit shard-reading workers.")
    ap.add_argument("--cache", action="store_true", help="Toolkit keeps decoded shards in memory (forces 0 workers).")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "pretrain.json"))
    args = ap.parse_args()
    if args.steps % args.warmup:
        ap.error("--steps must be a multiple of --warmup (throughput is logged every --warmup steps)")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = Path(args.shards) if args.shards else synthetic_shards(tmp, 120, 182)
        manifest_size = load_window_set(shards).frames.shape
        plain, toolkit = [], []
        for r in range(args.repeats):
            runs = [
                lambda: plain.append(
                    plain_loop(shards, args.preset, args.batch_size, args.warmup, args.steps, args.seed)
                ),
                lambda r=r: toolkit.append(
                    toolkit_loop(
                        shards,
                        tmp / f"run{r}",
                        args.preset,
                        args.batch_size,
                        args.warmup,
                        args.steps,
                        args.seed,
                        args.workers,
                        args.cache,
                    )
                ),
            ]
            for run in runs if r % 2 == 0 else runs[::-1]:  # alternate who goes first
                run()

    best_plain, best_toolkit = max(plain), max(toolkit)
    result = {
        "preset": args.preset,
        "frames": list(manifest_size[1:]),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "cache": args.cache,
        "plain_steps_per_s": plain,
        "toolkit_steps_per_s": toolkit,
        "ratio_toolkit_over_plain": best_toolkit / best_plain,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"\nGAN pretraining, preset {args.preset}, frames {manifest_size[1:]}, batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup} warmup, {torch.get_num_threads()} threads, "
        f"best of {args.repeats}\n"
    )
    print("| loop | steps/s | samples/s | all repeats (steps/s) |")
    print("|---|---:|---:|---|")
    for name, runs in (("plain PyTorch", plain), ("ddp_vad pretrain", toolkit)):
        best = max(runs)
        print(f"| {name} | {best:.2f} | {best * args.batch_size:.1f} | {', '.join(f'{v:.2f}' for v in runs)} |")
    print(f"\ntoolkit / plain = {result['ratio_toolkit_over_plain']:.3f} (target: >= 1.0, i.e. no slower)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
