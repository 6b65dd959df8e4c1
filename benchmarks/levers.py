"""Measure the classifier's levers side by side: one ``ddp_vad transfer`` run per named config, one table row each.

    python benchmarks/levers.py --shards /tmp/l17/shards --work /tmp/l17/runs --epochs 4 \\
        --configs method,fast,fast-cw --reference method [--gan GANRUN] [--label "Ped1 sample"]

Each config is a list of extra ``transfer`` flags (``LEVERS``; ``--class-weight none`` unless a config names it);
runs use ``--preset`` (default demo) unless the config names another (a GAN run brings its own), the same seed and
the shards' clip-grouped leak-free folds, so rows differ only by their levers. A row appended to
``benchmarks/results/levers.md``: frame AUROC (a frame's score is the max over the scored windows covering it, every
frame of the labelled clips), window AUROC, balanced accuracy at the classifier's own decision (argmax, i.e.
P(anomalous) > 0.5), the transfer run's own wall seconds (``metrics.json``; the CPU is shared with other jobs, so
read them as rough), and the paired difference with the ``--reference`` run: frame AUROC per test clip, mean
difference over the clips and how many clips improved.
Nothing is chosen on a test fold here: the table only reports.

Round 2 (issue 22, ``benchmarks/results/levers2.md``): ``python benchmarks/levers.py round2 --scene ped1 --shards S
--work W --configs default,cells --fractions 1,0.1`` runs each ``ROUND2`` config as ``transfer --from scratch
--preset demo --epochs 4 --labelled-fraction F`` plus its flags, with the demo preset's model fields replaced by the
config's overrides (in the transfer process only), and prints one row per run: frame AUROC over every frame of the
labelled clips (every window, ``select="leakfree"``), the paired bootstrap over clips against ``--reference`` at
the same fraction, the run's wall and CPU seconds, and the mean per-fold and per-clip frame AUROCs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ddp_vad.eval.frame_scores import frame_level_auroc, frame_level_scores, read_shard_frame_labels
from ddp_vad.runfiles import metrics_file, oof_file
from ddp_vad.train.metrics import read_oof_scores, window_level_auroc

RESULTS = Path(__file__).parent / "results" / "levers.md"
GAN = "{gan}"  # placeholder for --from: the --gan run
# name -> extra transfer flags; "--from scratch --train all" unless a config says otherwise
# The measurements were made while the levers' LRCN was a preset of its own, "fast"; it then became "demo", and the
# earlier demo (the method's input and pooling) is "demo-frames". The names below keep the table's names.
FAST = ["--preset", "demo"]  # frames pooled 3x, kernels 5,3,3; diff in, top-4 out
LEVERS: dict[str, list[str]] = {
    "method": ["--preset", "demo-frames"],
    "fast": FAST,
    "fast-frames-flatten": [*FAST, "--input-mode", "frames", "--pooling", "flatten"],
    "fast-diff-flatten": [*FAST, "--pooling", "flatten"],
    "fast-frames-topk": [*FAST, "--input-mode", "frames"],
    "fast-both": [*FAST, "--input-mode", "both"],
    "fast-max": [*FAST, "--pooling", "max"],
    "fast-cw": [*FAST, "--class-weight", "balanced"],
    "fast-cw-val": [*FAST, "--class-weight", "balanced", "--val-clips", "2"],
    "fast-both-cw": [*FAST, "--input-mode", "both", "--class-weight", "balanced"],
    "fast-flip": [*FAST, "--augment", "flip"],
    "fast-aug": [*FAST, "--augment", "flip,shift,jitter"],
    "fast-val": [*FAST, "--val-clips", "2"],
    "fast-wd": [*FAST, "--weight-decay", "0.01"],
    "fast-do2": [*FAST, "--dropout", "0.2"],
    "fast-scratch-head": [*FAST, "--train", "head"],  # random-init control of the GAN's linear probe
    "diff": ["--input-mode", "diff"],
    "both": ["--input-mode", "both"],
    "topk": ["--pooling", "topk"],
    "max": ["--pooling", "max"],
    "diff-max": ["--input-mode", "diff", "--pooling", "max"],
    "diff-topk": ["--input-mode", "diff", "--pooling", "topk"],
    "both-topk": ["--input-mode", "both", "--pooling", "topk"],
    "diff-topk-cw": ["--input-mode", "diff", "--pooling", "topk", "--class-weight", "balanced"],
    "diff-topk-aug": ["--input-mode", "diff", "--pooling", "topk", "--augment", "flip,shift,jitter"],
    "diff-topk-flip": ["--input-mode", "diff", "--pooling", "topk", "--augment", "flip"],
    "diff-topk-val": ["--input-mode", "diff", "--pooling", "topk", "--val-clips", "2"],
    "diff-topk-wd": ["--input-mode", "diff", "--pooling", "topk", "--weight-decay", "0.01"],
    "diff-topk-do0": ["--input-mode", "diff", "--pooling", "topk", "--dropout", "0.0"],
    "diff-topk-do2": ["--input-mode", "diff", "--pooling", "topk", "--dropout", "0.2"],
    "scratch-head": ["--preset", "demo-frames", "--train", "head"],
    "gan-head": ["--from", GAN, "--train", "head"],
    "gan-all": ["--from", GAN, "--train", "all"],
    "gan-head+lstm": ["--from", GAN, "--train", "head+lstm"],
    "gan-head-cw": ["--from", GAN, "--train", "head", "--class-weight", "balanced"],
    "gan-all-cw": ["--from", GAN, "--train", "all", "--class-weight", "balanced"],
    "fast-scratch-head-cw": [*FAST, "--train", "head", "--class-weight", "balanced"],
    "gan-fm-head": ["--from", GAN, "--train", "head"],  # the same, named for a GAN pretrained with --feature-matching
    "gan-method-head": ["--from", GAN, "--train", "head"],  # named for the method's (demo) GAN
}


# Round 2: name -> (extra transfer flags, demo model-field overrides). "default" is the demo preset as it stood.
ROUND2: dict[str, tuple[list[str], dict]] = {
    "default": ([], {}),
    "cells": (["--pooling", "cells"], {}),
    "cells-k1": (["--pooling", "cells", "--topk", "1"], {}),
    "cells-h32": (["--pooling", "cells"], {"lstm_hidden": 32}),
    "c16": ([], {"conv_channels": (16, 16, 16)}),
    "cells-c16": (["--pooling", "cells"], {"conv_channels": (16, 16, 16)}),
    "pool2": ([], {"input_pool": 2}),
    "cells-pool2": (["--pooling", "cells"], {"input_pool": 2}),
    "e8": (["--epochs", "8"], {}),
    "cells-e8": (["--pooling", "cells", "--epochs", "8"], {}),
    "cells-flip": (["--pooling", "cells", "--augment", "flip"], {}),
    "e40": (["--epochs", "40"], {}),  # at 10% labels: as many steps as 4 epochs of all labels
    "cells-e40": (["--pooling", "cells", "--epochs", "40"], {}),
    "default-s1": (["--seed", "1"], {}),  # the default with another seed: how far one seed moves the figure
    # Round 3: per-fold calibration on normal footage became the default (--calibrate normal); "raw" is the earlier
    # default. Runs of round 2 named "default" are today's "raw".
    "raw": (["--calibrate", "none"], {}),
    "raw-s1": (["--calibrate", "none", "--seed", "1"], {}),
    "default-s2": (["--seed", "2"], {}),
    "raw-s2": (["--calibrate", "none", "--seed", "2"], {}),
    "normals": (["--normal-footage", "train"], {}),  # the train clips' windows as extra normal training windows
    "normals-s1": (["--normal-footage", "train", "--seed", "1"], {}),
}


def leakfree_frame_labels(shards: str | Path) -> dict[str, list[int]]:
    """``{key: frame labels}`` of every window of the labelled clips (``select="leakfree"``), not only the kept
    (balanced) ones, so that every frame of every labelled clip is counted."""
    from ddp_vad.data.reader import iter_windows

    return {w["key"]: w["meta"]["frame_labels"] for w in iter_windows(shards, select="leakfree", frames=False)}


def every_frame(run: Path, labels: dict) -> dict:
    """Repeat-keyed frame scores of a run (``frames_by_repeat``) from its ``oof_scores.csv``."""
    from ddp_vad.eval.frame_scores import frames_by_repeat

    return frames_by_repeat(read_oof_scores(run), labels)


def _transfer_with_overrides(overrides: str, argv: list[str]) -> None:
    """``ddp_vad transfer ARGV`` with the demo preset's model fields replaced by the JSON ``overrides``."""
    from ddp_vad import presets
    from ddp_vad.cli import main as cli_main

    demo = presets.PRESETS["demo"]
    presets.PRESETS["demo"] = presets.Preset(model={**demo.model, **json.loads(overrides)}, run=demo.run)
    sys.argv = ["ddp_vad", "transfer", *argv]
    cli_main()


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (a run's cost, whatever else shares the CPU)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def round2(argv: list[str]) -> None:
    """Run and measure ``ROUND2`` configs on one scene (see the module docstring)."""
    from ddp_vad.eval.frame_scores import frame_summary, paired_difference

    ap = argparse.ArgumentParser(prog="levers.py round2")
    ap.add_argument("--scene", required=True, help="Name written in the row (ped1, ped2, synthetic).")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--work", required=True, help="Runs go to WORK/<config>@<fraction>.")
    ap.add_argument("--configs", required=True, help=f"Comma list of {', '.join(ROUND2)}.")
    ap.add_argument("--fractions", default="1,0.1")
    ap.add_argument("--reference", default="default")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each transfer.")
    args = ap.parse_args(argv)
    labels = leakfree_frame_labels(args.shards)
    for frac in args.fractions.split(","):
        for name in args.configs.split(","):
            flags, overrides = ROUND2[name]
            run = Path(args.work) / f"{name}@{frac}"
            if not (run / "metrics.json").is_file():
                epochs = [] if "--epochs" in flags else ["--epochs", "4"]
                cmd = [sys.executable, __file__, "_transfer", json.dumps(overrides), "--shards", args.shards,
                       "--out", str(run), "--from", "scratch", "--preset", "demo", *epochs, "--no-progress",
                       "--resume", "none", "--labelled-fraction", frac, *flags]  # fmt: skip
                t0, cpu0 = time.perf_counter(), _children_cpu()
                # one torch thread: on a shared, oversubscribed CPU a second thread mostly waits
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                subprocess.run(["nice", "-n", "15", *cmd], check=True, env=env)
                wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
                (run / "levers2.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "threads": args.threads}))
            timing = json.loads((run / "levers2.json").read_text()) if (run / "levers2.json").is_file() else {}
            seconds = float(json.loads((run / "metrics.json").read_text())["seconds"])
            mine = every_frame(run, labels)
            summ = frame_summary(mine)
            ref = Path(args.work) / f"{args.reference}@{frac}"
            paired = "-"
            if name != args.reference and (ref / "oof_scores.csv").is_file():
                d = paired_difference(mine, every_frame(ref, labels), n_boot=args.n_boot)
                paired = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            cpu = timing.get("cpu_s")
            print(f"| {args.scene} | {name} | {frac} | {summ['frame_auroc']:.3f} | {summ['n_frames']} | {paired} | "
                  f"{seconds:.0f} | {'' if cpu is None else f'{cpu:.0f}'} | {summ['fold_frame_auroc_mean']:.3f} | "
                  f"{summ['clip_auroc']:.3f} |", flush=True)  # fmt: skip


def per_clip_frame_auroc(rows: list[dict], labels: dict) -> dict[str, float]:
    """Frame AUROC of each clip that holds both classes."""
    y, s, index = frame_level_scores(rows, labels)
    clips = np.array([c for c, _ in index])
    out = {}
    for clip in sorted(set(clips.tolist())):
        sel = clips == clip
        if np.unique(y[sel]).size == 2:
            out[clip] = float(roc_auc_score(y[sel], s[sel]))
    return out


def balanced_accuracy(rows: list[dict]) -> float:
    """Mean of the two classes' recalls at P(anomalous) > 0.5 (the classifier's argmax)."""
    y = np.array([r["label"] for r in rows])
    p = np.array([r["score"] for r in rows]) > 0.5
    return float(((p[y == 1]).mean() + (~p[y == 0]).mean()) / 2)


def measure(run: Path, labels: dict) -> dict:
    """The table's numbers of a finished run."""
    rows = read_oof_scores(run)
    return {
        "frame_auroc": frame_level_auroc(rows, labels),
        "window_auroc": window_level_auroc(rows),
        "balanced_accuracy": balanced_accuracy(rows),
        "per_clip": per_clip_frame_auroc(rows, labels),
    }


def run_config(name: str, flags: list[str], args: argparse.Namespace) -> float:
    """Run one transfer (fresh folder); returns wall seconds of the process."""
    out = Path(args.work) / name
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or use another --work")
    flags = [args.gan if f == GAN else f for f in flags]
    if GAN in LEVERS[name] and not args.gan:
        raise SystemExit(f"config {name} needs --gan")
    cmd = [sys.executable, "-m", "ddp_vad", "transfer", "--shards", args.shards, "--out", str(out),
           "--epochs", str(args.epochs), "--resume", "none", "--no-progress", *args.extra]  # fmt: skip
    if "--from" not in flags:
        cmd += ["--from", "scratch"] + ([] if "--preset" in flags else ["--preset", args.preset])
    if "--train" not in flags:
        cmd += ["--train", "all"]
    if "--class-weight" not in flags:  # the rows were measured when plain cross-entropy was the default
        cmd += ["--class-weight", "none"]
    t0 = time.perf_counter()
    subprocess.run(["nice", *cmd, *flags], check=True)
    return time.perf_counter() - t0


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main() -> None:
    if sys.argv[1:2] == ["round2"]:
        return round2(sys.argv[2:])
    if sys.argv[1:2] == ["_transfer"]:
        return _transfer_with_overrides(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--work", required=True, help="Folder for the runs (one per config).")
    ap.add_argument("--configs", required=True, help=f"Comma list of {', '.join(LEVERS)}.")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--reference", default="method", help="Config for the paired difference (its run in --work).")
    ap.add_argument("--gan", default=None, help="Pretrain run for the gan-* configs.")
    ap.add_argument("--label", default="", help="Data set / conditions, written in the row.")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--measure-only", action="store_true", help="Only (re)measure existing runs.")
    ap.add_argument("extra", nargs="*", help="More transfer flags for every config (after --).")
    args = ap.parse_args()
    # Every window any protocol scores: the balanced set (window, clip) and every window of the labelled clips.
    labels = {**read_shard_frame_labels(args.shards), **read_shard_frame_labels(args.shards, "leakfree")}
    results = Path(args.results)
    if not results.exists():
        results.write_text(
            "# Levers: measurements\n\n| data | lever | epochs | frame AUROC | window AUROC | balanced acc. | "
            "seconds | paired vs reference (frame AUROC per clip: mean diff, clips better) |\n"
            "|---|---|---|---|---|---|---|---|\n"
        )
    for name in args.configs.split(","):
        if name not in LEVERS:
            raise SystemExit(f"unknown config {name}")
        if not args.measure_only:
            run_config(name, LEVERS[name], args)
        m = measure(Path(args.work) / name, labels)
        # transfer's own wall time (windows loaded, every fold trained and scored), so re-measuring keeps it
        seconds = float(json.loads(metrics_file(Path(args.work) / name).read_text())["seconds"])
        paired = "-"
        ref = Path(args.work) / args.reference
        if name != args.reference and oof_file(ref).is_file():
            r = measure(ref, labels)["per_clip"]
            common = sorted(set(r) & set(m["per_clip"]))
            diffs = np.array([m["per_clip"][c] - r[c] for c in common])
            if diffs.size:
                paired = f"{diffs.mean():+.3f} ({int((diffs > 0).sum())}/{diffs.size} clips) vs {args.reference}"
        flags = " ".join(LEVERS[name]).replace(GAN, "GAN") or "(method)"
        row = (f"| {args.label} | {name}: `{flags}` {' '.join(args.extra)} | {args.epochs} | {fmt(m['frame_auroc'])} | "
               f"{fmt(m['window_auroc'])} | {fmt(m['balanced_accuracy'])} | {seconds:.0f} | {paired} |")  # fmt: skip
        with open(results, "a") as fh:
            fh.write(row + "\n")
        print(row, flush=True)
        (Path(args.work) / name / "levers.json").write_text(json.dumps({**m, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
