"""What other shares of the motion prior would have scored, from a finished run (round 7 of the levers,
``benchmarks/results/levers7.md``).

    python benchmarks/prior_share.py RUN --shards SHARDS [--shares 0,0.333,0.5,0.6,0.667,0.75,1]
        [--rules sum,relu,max,asinh-classifier,asinh-both]

RUN is a ``transfer`` run calibrated with the motion prior (the default). Each fold's record (``result.json``,
``calibration``) holds the normal footage's mean and spread of the classifier's log-odds and of the log motion
energy, so every out-of-fold window's two z-scores are recovered from its calibrated score and its energy, and
recombined with another share ``a`` as ``2 (1 - a) z_d + 2 a z_e``, divided by that sum's spread on the normal
footage (from the two z-scores' correlation there, which the recorded spread of the run's own sum gives). Prints the
frame AUROC over every frame of the labelled clips for each share and the paired difference with the run as it is.
``--rules`` (round 8, ``levers8.md``) also fuses the two z-scores by other rules than a weighted sum (:data:`RULES`).

**Post hoc, on the test clips**: a share picked from this table is chosen on the clips it is reported on, so its
figure is optimistic. ``transfer --prior-share nested`` makes the choice per fold on its training clips instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ddp_vad.data.reader import iter_windows
from ddp_vad.eval.frame_scores import frame_summary, frames_by_repeat, paired_difference
from ddp_vad.motion import window_energies
from ddp_vad.train.calibration import shared_z
from ddp_vad.train.metrics import read_oof_scores


def z_scores(run: Path, rows: list[dict], energies: dict[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z of the classifier, z of the motion energy, correlation of the two on the normal footage) per OOF row."""
    records = {}
    for path in sorted((run / "folds").glob("fold_*/result.json")):
        result = json.loads(path.read_text())
        records[(int(result["metrics"].get("repeat", 0)), int(result["metrics"]["fold"]))] = result["calibration"]
    zd, ze, rho = (np.empty(len(rows)) for _ in range(3))
    for j, row in enumerate(rows):
        cal = records[(int(row.get("repeat", 0)), int(row["fold"]))]
        motion = cal.get("motion")
        if motion is None or cal["gain"] <= 0:
            raise SystemExit(f"{run}: fold {row['fold']} has no motion prior or no classifier part to recombine")
        p = min(max(float(row["score"]), 1e-15), 1 - 1e-15)
        prior = motion["weight"] * (energies[row["key"]] - motion["mean"])
        d = (np.log(p / (1 - p)) - cal["bias"] - prior) / cal["gain"]
        zd[j], ze[j] = (d - cal["mean"]) / cal["spread"], (energies[row["key"]] - motion["mean"]) / motion["spread"]
        c, q = 2 * (1 - motion["share"]), 2 * motion["share"]
        rho[j] = (motion["sum_spread"] ** 2 - c * c - q * q) / (2 * c * q) if c * q > 0 else 0.0
    return zd, ze, rho


# Fusions of the classifier's z-score d and the motion energy's e other than the weighted sum (round 8).
RULES = {
    "sum": lambda d, e: d + e,  # the default's ranking (share 0.5)
    "relu": lambda d, e: e + np.maximum(d, 0.0),  # the classifier may only raise a score
    "max": np.maximum,  # either alone may flag a window
    "asinh-classifier": lambda d, e: np.arcsinh(d) + e,  # the classifier's heavy tails compressed
    "asinh-both": lambda d, e: np.arcsinh(d) + np.arcsinh(e),
}


def _print_against(name: str, rows: list[dict], z: np.ndarray, labels: dict, as_is: dict) -> None:
    """One line: the frame AUROC of the OOF rows scored by the sigmoid of ``z``, and its paired difference with the
    run as it is."""
    scored = frames_by_repeat([dict(r, score=float(1 / (1 + np.exp(-v)))) for r, v in zip(rows, z, strict=True)],
                              labels)  # fmt: skip
    d = paired_difference(scored, as_is)
    print(f"{name}: {frame_summary(scored)['frame_auroc']:.3f} ({d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--shares", default="0,0.333,0.5,0.6,0.667,0.75,1")
    ap.add_argument("--rules", default="", help=f"comma-separated, of {', '.join(RULES)}")
    args = ap.parse_args()
    labels, keys, frames = {}, [], []
    for w in iter_windows(args.shards, select="leakfree"):
        labels[w["key"]] = w["meta"]["frame_labels"]
        keys.append(w["key"])
        frames.append(w["frames"])
    energies = dict(zip(keys, window_energies(np.stack(frames)).tolist(), strict=True))
    rows = read_oof_scores(args.run)
    zd, ze, rho = z_scores(args.run, rows, energies)
    as_is = frames_by_repeat(rows, labels)
    print(f"{args.run}: frame AUROC as run {frame_summary(as_is)['frame_auroc']:.3f}")
    for share in (float(s) for s in args.shares.split(",")):
        c, q = 2 * (1 - share), 2 * share
        z = shared_z(zd, ze, share) / np.sqrt(c * c + q * q + 2 * c * q * rho)
        _print_against(f"share {share:.3g}", rows, z, labels, as_is)

    for name in filter(None, args.rules.split(",")):
        if name not in RULES:
            raise SystemExit(f"--rules: unknown rule {name!r} (known: {', '.join(RULES)})")
        fused = np.clip(RULES[name](zd, ze), -30.0, 30.0)  # the sigmoid below stays finite and monotone
        _print_against(f"rule {name}", rows, fused, labels, as_is)


if __name__ == "__main__":
    main()
