"""Fold assignment: ddp_vad's splitters, scikit-learn's grouped splitter and the hand-written ones before them.

Side by side on the same kept windows: the real Ped1 sample (16 clips) and synthetic data (70 clips), 5 and 10
folds, both protocols. Reported per assignment: per-fold anomaly rate (min, max, std), fold sizes, folds without
an anomaly, and the time to assign.

    python benchmarks/bench_folds.py --data ../shared/data/ucsd-ped1-sample
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ddp_vad.data import windows
from ddp_vad.data.plan import ShardConfig, plan_windows
from ddp_vad.data.sources.ucsd import discover
from ddp_vad.data.synth import SynthConfig, run_synth


# ------------------------------------------------------------------- the hand-written splitters (before 2026-11-28)
def handwritten_stratified(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), np.int64)
    offset = 0
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset = (offset + len(idx)) % k
    return folds


def handwritten_grouped(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    names, inverse = np.unique(groups, return_inverse=True)
    if len(names) < k:
        return np.full(len(labels), -1, np.int64)
    pos = np.bincount(inverse, weights=labels, minlength=len(names))
    size = np.bincount(inverse, minlength=len(names)).astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-size[order], kind="stable")]
    w_pos, w_neg = 1.0 / max(pos.sum(), 1.0) ** 2, 1.0 / max((size - pos).sum(), 1.0) ** 2
    fold_pos, fold_neg = np.zeros(k), np.zeros(k)
    fold_of_group = np.empty(len(names), np.int64)
    for g in order:
        cost = w_pos * fold_pos * pos[g] + w_neg * fold_neg * (size[g] - pos[g]) + 1e-12 * (fold_pos + fold_neg)
        best = int(np.argmin(cost))
        fold_of_group[g] = best
        fold_pos[best] += pos[g]
        fold_neg[best] += size[g] - pos[g]
    return fold_of_group[inverse]


def describe(folds: np.ndarray, labels: np.ndarray, k: int, seconds: float) -> dict:
    n = np.bincount(folds, minlength=k)
    anomalous = np.bincount(folds, weights=labels, minlength=k)
    rate = anomalous / np.maximum(n, 1)
    out = {"rate_min": rate.min(), "rate_max": rate.max(), "rate_std": rate.std()}
    out |= {"size_min": int(n.min()), "size_max": int(n.max()), "folds_without_anomaly": int((anomalous == 0).sum())}
    return out | {"ms": 1e3 * seconds}


def sklearn_grouped(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scikit-learn's ``StratifiedGroupKFold`` (the clip splitter before the even dealing)."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.full(len(labels), -1, np.int64)
    for fold, (_, test) in enumerate(
        StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(labels, labels, groups)
    ):
        folds[test] = fold
    return folds


def compare(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> dict:
    out = {}
    for name, fn in (
        ("window/sklearn", lambda: windows.stratified_folds(labels, k, seed)),
        ("window/hand-written", lambda: handwritten_stratified(labels, k, seed)),
        ("clip/even (ddp_vad)", lambda: windows.grouped_stratified_folds(labels, groups, k, seed)),
        ("clip/sklearn", lambda: sklearn_grouped(labels, groups, k, seed)),
        ("clip/hand-written", lambda: handwritten_grouped(labels, groups, k, seed)),
    ):
        t0 = time.perf_counter()
        folds = fn()
        out[name] = describe(folds, labels, k, time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/ucsd-ped1-sample"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "folds.json"))
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "seed": args.seed, "data": {}}
    with tempfile.TemporaryDirectory() as tmp:
        synth = run_synth(SynthConfig(out=f"{tmp}/synth", seed=0), show_progress=False)
        for name, path in (("real sample (16 clips)", args.data), ("synthetic (70 clips)", synth)):
            plan = plan_windows(discover(path), ShardConfig(data=str(path), out=tmp))
            labels, groups = plan.label[plan.kept], plan.clip_index[plan.kept]
            results["data"][name] = {k: compare(labels, groups, k, args.seed) for k in (5, 10)}
    print("| data | folds | assignment | anomaly rate per fold: min-max (std) | fold sizes | no anomaly | ms |")
    print("|---|---:|---|---|---|---:|---:|")
    for name, by_k in results["data"].items():
        for k, rows in by_k.items():
            for how, r in rows.items():
                print(f"| {name} | {k} | {how} | {r['rate_min']:.2f}-{r['rate_max']:.2f} ({r['rate_std']:.3f}) | "
                      f"{r['size_min']}-{r['size_max']} | {r['folds_without_anomaly']} | {r['ms']:.1f} |")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
