"""Does motion energy gain from knowing where the scene normally moves (round 8 of the levers,
``benchmarks/results/levers8.md``), or from other position-free summaries of the cells (round 9, ``levers9.md``)?
Unsupervised, no training.

    python benchmarks/cell_energy.py SHARDS [--seed 0] [--group cells|free]

The motion prior's energy (``ddp_vad.motion``) takes the mean absolute frame difference of each 8-pixel cell and
averages the TOPK most active cells, wherever they are. Here each cell is first set against its own normal motion,
measured on the normal footage calibration uses (up to 2,048 windows of the shards' train clips, drawn with
``--seed``): a z-score per cell (``cell-z``, also with the max over time instead of the mean: ``cell-z-max-t``), a
z-score of the log (``cell-log-z``), a ratio to the cell's normal mean (``cell-ratio``), and the excess over the
cell's normal 99th percentile (``cell-excess``); ``energy+cell-z`` adds the two standardised scores.

``--group free`` (round 9) keeps positions out and asks whether crowded footage is what misleads the energy: how
much the top cells stand out from the next ones (``top4-vs-next28``, ``top4-vs-mean``, ``top1-vs-next3``,
``top4-half-next28``: log ratios), the top 2 cells instead of 4 (``top2``), and the mean distance to the 5 nearest
normal windows of the 16 most active cells' log motion (``knn-top16``; standardised on the normal footage).

Prints, for each, the frame AUROC over every frame of the labelled clips (every window, a frame's score the max over
its windows) and the paired difference with the prior's energy, with a 95% bootstrap interval over clips. Labels
only measure.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ddp_vad.data.reader import iter_windows
from ddp_vad.eval.frame_scores import frame_summary, frames_by_repeat, paired_difference
from ddp_vad.motion import EPS, TOPK, cell_motion, energy_of_cells
from ddp_vad.train.calibration import reference_windows


def window_cells(frames: np.ndarray, chunk: int = 64) -> torch.Tensor:
    """uint8 windows [N, T, H, W] -> the prior's cell motion (:func:`ddp_vad.motion.cell_motion`) [N, T-1, cells]."""
    parts = [cell_motion(torch.from_numpy(np.ascontiguousarray(frames[lo : lo + chunk])).float() / 255)
             for lo in range(0, len(frames), chunk)]  # fmt: skip
    return torch.cat(parts)


def top_cells(v: torch.Tensor) -> torch.Tensor:
    """Mean of the TOPK largest cells per window and step: [N, T-1, cells] -> [N, T-1]."""
    return v.topk(min(TOPK, v.shape[2]), dim=2).values.mean(2)


def variants(m: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Window scores [N] of each variant, from the cells' motion ``m`` and the normal footage's ``ref`` (float32,
    as :func:`window_cells` gives them; the variants' statistics are taken in float64)."""
    out = {"energy": energy_of_cells(m).double()}  # the prior's own energy
    e_ref = energy_of_cells(ref).double()
    m, ref = m.double(), ref.double()
    mu, sd = ref.mean((0, 1)), ref.std((0, 1)) + 1e-3
    log_ref = torch.log(ref + EPS)
    log_mu, log_sd = log_ref.mean((0, 1)), log_ref.std((0, 1)) + 1e-2
    q99 = torch.quantile(ref.flatten(0, 1), 0.99, dim=0)
    cell_z = lambda x: top_cells((x - mu) / sd).mean(1)  # noqa: E731
    out |= {
        "cell-z": cell_z(m),
        "cell-z-max-t": top_cells((m - mu) / sd).max(1).values,
        "cell-log-z": top_cells((torch.log(m + EPS) - log_mu) / log_sd).mean(1),
        "cell-ratio": torch.log(top_cells((m + 0.01) / (mu + 0.01)).mean(1)),
        "cell-excess": torch.log(top_cells(torch.relu(m - q99)).mean(1) + EPS),
    }
    z_ref = cell_z(ref)
    out["energy+cell-z"] = (out["energy"] - e_ref.mean()) / e_ref.std() + (out["cell-z"] - z_ref.mean()) / z_ref.std()
    return out


def free_variants(m: torch.Tensor, ref: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Round 9's position-free window scores [N] from the cells' motion ``m`` and the normal footage's ``ref``."""
    out = {"energy": energy_of_cells(m).double()}
    m, ref = m.double(), ref.double()
    ranked = m.sort(dim=2, descending=True).values  # [N, T-1, cells]
    log_mean = lambda lo, hi: torch.log(ranked[..., lo:hi].mean(2) + EPS)  # noqa: E731
    out |= {
        "top4-vs-next28": (log_mean(0, 4) - log_mean(4, 32)).mean(1),
        "top4-vs-mean": (log_mean(0, 4) - torch.log(m.mean(2) + EPS)).mean(1),
        "top1-vs-next3": (log_mean(0, 1) - log_mean(1, 4)).mean(1),
        "top4-half-next28": (log_mean(0, 4) - 0.5 * log_mean(4, 32)).mean(1),
        "top2": torch.log(ranked[..., :2].mean(2).mean(1) + EPS),
    }
    top16 = lambda x: torch.log(x.topk(16, dim=2).values.mean(1) + EPS)  # noqa: E731  [N, 16]
    q, r = top16(m), top16(ref)
    mu, sd = r.mean(0), r.std(0) + 1e-6
    out["knn-top16"] = torch.cdist((q - mu) / sd, (r - mu) / sd).topk(k, largest=False).values.mean(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", choices=("cells", "free"), default="cells")
    args = ap.parse_args()
    normal = reference_windows(args.shards, seed=args.seed)
    if normal is None:
        raise SystemExit(f"{args.shards}: no train clips to learn each cell's normal motion from")
    rows, labels, frames = [], {}, []
    for w in iter_windows(args.shards, select="leakfree"):
        rows.append({"key": w["key"], "clip": w["meta"]["clip"], "start": w["meta"]["start"]})
        labels[w["key"]] = w["meta"]["frame_labels"]
        frames.append(w["frames"])
    score = variants if args.group == "cells" else free_variants
    scores = score(window_cells(np.stack(frames)), window_cells(normal))
    by_name = {k: frames_by_repeat([dict(r, score=float(s)) for r, s in zip(rows, v.tolist(), strict=True)], labels)
               for k, v in scores.items()}  # fmt: skip
    for name, scored in by_name.items():
        d = paired_difference(scored, by_name["energy"])
        print(f"{name:16s} {frame_summary(scored)['frame_auroc']:.3f} "
              f"({d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])")  # fmt: skip


if __name__ == "__main__":
    main()
