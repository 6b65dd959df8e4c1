"""Training-step cost of LRCN variants, side by side: forward + backward of one batch of windows, the models
alternated in one process so that every one sees the same load; prints a Markdown table with ratios to the first.

    python benchmarks/lrcn_step.py                     # the demo LRCN and the capacity variants of levers6.md
    python benchmarks/lrcn_step.py --threads 2 --repeats 10

A variant is the demo preset with model fields replaced, as ``transfer --input-pool N --conv-channels A,B,C`` does.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ddp_vad.models import build_lrcn, model_config_for

VARIANTS = {
    "default (pooled 3x, 8,8,8)": {},
    "--conv-channels 16,16,16": {"conv_channels": (16, 16, 16)},
    "--conv-channels 12,12,12": {"conv_channels": (12, 12, 12)},
    "--input-pool 2": {"input_pool": 2},
    "--input-pool 2 --conv-channels 16,16,16": {"input_pool": 2, "conv_channels": (16, 16, 16)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as one fold per core).")
    ap.add_argument("--repeats", type=int, default=5, help="Timed steps per model (after one untimed step).")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--width", type=int, default=182)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = {"window": 10, "height": args.height, "width": args.width}
    models = {name: build_lrcn(model_config_for("demo", shape, **fields)) for name, fields in VARIANTS.items()}
    x = torch.rand(args.batch, 10, 1, args.height, args.width)
    y = torch.randint(0, 2, (args.batch,))

    def step(model: torch.nn.Module) -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    for model in models.values():
        step(model)  # warm-up: allocations, oneDNN primitive caches
    seconds = dict.fromkeys(models, 0.0)
    for _ in range(args.repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            step(model)
            seconds[name] += time.perf_counter() - t0
    first = next(iter(seconds.values()))
    size = f"{args.batch} windows of 10 x {args.height} x {args.width}"
    print(f"{size}, {args.threads} thread(s), {args.repeats} timed steps per model")
    print("| LRCN | parameters | s per step | ratio |\n|---|---|---|---|")
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n:,} | {seconds[name] / args.repeats:.3f} | {seconds[name] / first:.2f}x |")


if __name__ == "__main__":
    main()
