"""``ddp_vad baselines`` before and after a change, method by method, interleaved on the same machine.

The code before is a git commit (``--before``), extracted with ``git archive``; the code after is this checkout.
For every scene (a shard folder) and method, both run as ``python -m ddp_vad baselines --methods M`` in a fresh
folder, in alternating order (before first for one method, after first for the next), so that a load that comes and
goes on a shared machine falls on both sides alike. Reported per method: the cross-validation seconds the run
writes to ``metrics.json`` (features and loading excluded: both sides compute the same ones), the wall time of the
command, their ratios, the frame AUROC over every frame of the labelled clips (max over the windows covering a
frame, computed here the same way for both), the largest difference between the two runs' out-of-fold scores and
whether their confusion counts agree.

    nice -n 15 python benchmarks/bench_baselines.py --before fad7625 \\
        --scene ped1=/tmp/baselines/ped1-shards --scene ped2=/tmp/baselines/ped2-shards \\
        --work /tmp/baselines/bench --out benchmarks/results/baselines.json

``--rf-curve 10,25,50,100`` instead measures the ``rf`` baseline's frame AUROC by tree count, from one forest per
fold (``benchmarks/results/baselines_rf_trees.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("logreg", "svm", "rf", "knn", "nb", "motion-logreg", "motion-gb")


def extract(ref: str, dest: Path) -> Path:
    """The ``ddp_vad`` package at commit ``ref``, unpacked under ``dest`` (reused when already there)."""
    if not (dest / "ddp_vad" / "__init__.py").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        archive = dest / "code.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "ddp_vad"], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        archive.unlink()
    return dest


def run_method(code: Path, shards: str, out: Path, method: str, extra: list[str]) -> dict:
    """One ``baselines`` run of one method with the package under ``code``; its metrics and wall time."""
    shutil.rmtree(out / method, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "ddp_vad", "baselines", "--shards", shards, "--out", str(out), "--methods", method]
    t0 = time.perf_counter()
    subprocess.run(cmd + extra, check=True, env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / method / "metrics.json").read_text())
    return {"seconds": metrics["seconds"], "wall": round(wall, 2), "metrics": metrics}


def read_oof(run: Path) -> dict[str, dict]:
    with open(run / "oof_scores.csv", newline="") as fh:
        return {row["key"]: row for row in csv.DictReader(fh)}


def frame_labels(shards: str) -> dict[str, list[int]]:
    """Per-window frame labels of every window of the labelled clips (not only the balanced set)."""
    from ddp_vad.data.reader import iter_windows

    return {w["key"]: list(w["meta"]["frame_labels"]) for w in iter_windows(shards, select="leakfree", frames=False)}


def frame_auroc(oof: dict[str, dict], labels: dict[str, list[int]]) -> tuple[float, int]:
    """Pooled frame AUROC: a frame's score is the max over the scored windows covering it; and the frame count."""
    from sklearn.metrics import roc_auc_score

    frames: dict[tuple[str, int], list] = {}
    for key, row in oof.items():
        start, score = int(row["start"]), float(row["score"])
        for t, lab in enumerate(labels[key]):
            cell = frames.setdefault((row["clip"], start + t), [0, -np.inf])
            cell[0], cell[1] = max(cell[0], int(lab)), max(cell[1], score)
    y = np.array([v[0] for v in frames.values()])
    s = np.array([v[1] for v in frames.values()])
    return float(roc_auc_score(y, s)), len(frames)


def compare(before: dict, after: dict, run_b: Path, run_a: Path, labels: dict) -> dict:
    oof_b, oof_a = read_oof(run_b), read_oof(run_a)
    assert oof_b.keys() == oof_a.keys(), "the two runs scored different windows"
    diff = max(abs(float(oof_b[k]["score"]) - float(oof_a[k]["score"])) for k in oof_b)
    counts = ("tp", "fp", "tn", "fn")
    same_counts = [{c: f[c] for c in counts} for f in before["metrics"]["folds"]] == [
        {c: f[c] for c in counts} for f in after["metrics"]["folds"]
    ]
    auc_b, n_frames = frame_auroc(oof_b, labels)
    auc_a, _ = frame_auroc(oof_a, labels)
    return {
        "before_s": before["seconds"],
        "after_s": after["seconds"],
        "ratio": round(before["seconds"] / max(after["seconds"], 1e-9), 2),
        "before_wall_s": before["wall"],
        "after_wall_s": after["wall"],
        "wall_ratio": round(before["wall"] / max(after["wall"], 1e-9), 2),
        "frame_auroc_before": round(auc_b, 4),
        "frame_auroc_after": round(auc_a, 4),
        "n_frames": n_frames,
        "max_abs_score_diff": diff,
        "same_confusion_counts": same_counts,
        "after_fold_jobs": after["metrics"].get("fold_jobs"),
        "after_threads_per_fold": after["metrics"].get("threads_per_fold"),
        "estimator_before": before["metrics"].get("estimator"),
        "estimator_after": after["metrics"].get("estimator"),
    }


def rf_tree_curve(shards: str, sizes: list[int], labels: dict[str, list[int]]) -> dict:
    """Frame AUROC of the ``rf`` baseline (this checkout's settings) with its first n trees, for each n in ``sizes``,
    from one fit per fold: a forest of n trees with the same seed is the first n trees of the larger one (scikit-learn
    draws every tree's seed from ``random_state`` in order), and its probability is their mean."""
    from ddp_vad.data.reader import load_window_set
    from ddp_vad.eval import baselines as bl
    from ddp_vad.eval.features import mean_std, standardise_
    from ddp_vad.train.crossval import CVWindows, fold_split

    ws = load_window_set(shards, select="leakfree")
    cv = CVWindows.from_window_set(ws, "leakfree")
    cfg = bl.BaselinesConfig(shards=shards, out="unused", rf_trees=max(sizes))
    x, _ = bl._features("pixels", ws.frames, cfg)
    oof: dict[int, dict[str, dict]] = {n: {} for n in sizes}
    fit_s = 0.0
    for k in range(cv.n_units):
        train, test, _ = fold_split(cv, k)
        x_train, x_test = x[train], x[test]
        mean, std = mean_std(x_train)
        standardise_(x_train, mean, std)
        standardise_(x_test, mean, std)
        t0 = time.perf_counter()
        model = bl.make_estimator("rf", cfg, threads=len(os.sched_getaffinity(0))).fit(x_train, cv.labels[train])
        fit_s += time.perf_counter() - t0
        per_tree = np.stack([t.predict_proba(x_test)[:, 1] for t in model.estimators_])
        assert np.allclose(per_tree.mean(axis=0), model.predict_proba(x_test)[:, 1])
        for n in sizes:
            score = per_tree[:n].mean(axis=0)
            for i, s in zip(test.tolist(), score.tolist(), strict=True):
                oof[n][cv.keys[i]] = {"clip": cv.clips[i], "start": int(cv.starts[i]), "score": s}
    return {
        "fit_seconds_all_trees": round(fit_s, 1),
        "frame_auroc": {str(n): round(frame_auroc(oof[n], labels)[0], 4) for n in sizes},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="git commit of the code before (not needed with --rf-curve)")
    ap.add_argument("--scene", action="append", required=True, help="NAME=SHARD_DIR (repeatable)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", default="/tmp/bench_baselines")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "baselines.json"))
    ap.add_argument("--after-args", default="", help="extra options for the code after (e.g. '--rf-trees 50')")
    ap.add_argument("--rf-curve", default="", help="only the rf tree-count curve, e.g. 10,25,50,100 (no before/after)")
    args = ap.parse_args()
    if args.rf_curve:
        sizes = [int(n) for n in args.rf_curve.split(",")]
        curve = {}
        for scene in args.scene:
            name, shards = scene.split("=", 1)
            curve[name] = rf_tree_curve(shards, sizes, frame_labels(shards))
            print(name, curve[name], flush=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rf_trees": curve}, indent=2) + "\n")
        return
    if not args.before:
        ap.error("--before is required (unless --rf-curve)")
    work = Path(args.work)
    before_code = extract(args.before, work / f"code-{args.before}")
    variants = {"before": (before_code, []), "after": (ROOT, args.after_args.split())}
    t_start = time.time()
    results: dict = {}
    flip = False
    for scene in args.scene:
        name, shards = scene.split("=", 1)
        labels = frame_labels(shards)
        results[name] = {}
        for method in args.methods.split(","):
            order = ("after", "before") if flip else ("before", "after")
            flip = not flip
            runs = {v: run_method(variants[v][0], shards, work / name / v, method, variants[v][1]) for v in order}
            dirs = (work / name / "before" / method, work / name / "after" / method)
            row = compare(runs["before"], runs["after"], *dirs, labels)
            row["order"] = "/".join(order)
            results[name][method] = row
            auc = f"frame AUROC {row['frame_auroc_before']:.4f} -> {row['frame_auroc_after']:.4f}"
            print(f"{name:5s} {method:14s} before {row['before_s']:7.1f}s after {row['after_s']:7.1f}s "
                  f"x{row['ratio']:.2f} (wall x{row['wall_ratio']:.2f}) {auc} "
                  f"max|dscore| {row['max_abs_score_diff']:.2g}", flush=True)  # fmt: skip
        tot_b = sum(r["before_s"] for r in results[name].values())
        tot_a = sum(r["after_s"] for r in results[name].values())
        results[name]["total"] = {"before_s": round(tot_b, 1), "after_s": round(tot_a, 1),
                                  "ratio": round(tot_b / max(tot_a, 1e-9), 2)}  # fmt: skip
        print(f"{name:5s} total before {tot_b:.1f}s after {tot_a:.1f}s x{tot_b / max(tot_a, 1e-9):.2f}", flush=True)
    payload = {
        "command": " ".join(sys.argv),
        "before": args.before,
        "after": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "after_args": args.after_args,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "load_avg_at_end": os.getloadavg(),
        },  # fmt: skip
        "minutes": round((time.time() - t_start) / 60, 1),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
