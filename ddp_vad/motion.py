"""The motion prior: a window's motion energy, standardised on the scene's normal footage, added to the classifier's
log-odds (``transfer --motion-prior energy``; docs/models.md, "Motion prior").

A window's motion energy is ``log(mean_t(mean of the TOPK largest cell means of |x_t - x_{t-1}|) + EPS)``, cells
being squares of ``height // CELL_DIVISOR`` pixels (8 on 120-row frames): how much the most active few patches of the
frame change, whichever they are. Standardised on the train clips' windows (the footage calibration uses), it is on
its own an unsupervised detector (frame AUROC 0.91 on UCSD Ped2, 0.84 on the Ped1 sample; benchmarks/results/
levers4.md), steady from clip to clip where the trained LRCN's scores are not. The prior has no trained weight: after
calibration the saved model's log-odds are ``((z_lrcn + z_motion) / s - Z99) / T`` (the sum of two normal-footage
z-scores, ``s`` the sum's spread on that footage; ``--prior-share`` weighs the two otherwise), so every loader of the
model gives that score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MOTION_PRIORS = ("energy", "none")  # transfer --motion-prior
CELL_DIVISOR = 15  # cell side = frame height // 15: 8 px on 120-row frames
TOPK = 4  # the most active cells averaged per step
EPS = 1e-4  # inside the log: a still window (all differences 0) gets log(1e-4), not -inf


def cell_size(height: int) -> int:
    """Side of the square cells motion energy is averaged over, for frames ``height`` rows high."""
    return max(1, height // CELL_DIVISOR)


def cell_motion(x: torch.Tensor) -> torch.Tensor:
    """Windows [B, T, 1, H, W] (or [B, T, H, W]) in [0, 1], T >= 2 -> each cell's mean absolute frame difference
    [B, T-1, cells] (float32; partial cells at the edges are dropped)."""
    x = x.float()
    if x.dim() == 5:
        x = x[:, :, 0]
    diff = (x[:, 1:] - x[:, :-1]).abs()  # [B, T-1, H, W]
    return F.avg_pool2d(diff, cell_size(x.shape[-2])).flatten(2)


def energy_of_cells(cells: torch.Tensor) -> torch.Tensor:
    """Cell motion [B, T-1, cells] (:func:`cell_motion`) -> log motion energy [B]: the mean over steps of the TOPK
    most active cells' mean."""
    top = cells.topk(min(TOPK, cells.shape[2]), dim=2).values.mean(dim=2)
    return torch.log(top.mean(dim=1) + EPS)


def motion_energy(x: torch.Tensor) -> torch.Tensor:
    """Windows [B, T, 1, H, W] (or [B, T, H, W]) in [0, 1], T >= 2 -> log motion energy [B] (float32)."""
    return energy_of_cells(cell_motion(x))


def window_energies(frames: np.ndarray, idx: np.ndarray | None = None, chunk: int = 64) -> np.ndarray:
    """uint8 windows [N, T, H, W] (those at ``idx``, when given: gathered a chunk at a time, never all copied) ->
    log motion energy (float64), ``chunk`` windows at a time (64 of 120 x 182: about 60 MB of float32 per step)."""
    n = len(frames) if idx is None else len(idx)
    out = []
    for lo in range(0, n, chunk):
        part = frames[lo : lo + chunk] if idx is None else frames[idx[lo : lo + chunk]]
        out.append(motion_energy(torch.from_numpy(np.ascontiguousarray(part)).float().div_(255.0)))
    return torch.cat(out).double().numpy() if out else np.zeros(0, np.float64)


class MotionPrior(nn.Module):
    """Adds ``weight * (motion_energy(x) - mean)`` to a 2-way classifier's log-odds (as ``[-p/2, +p/2]`` to its
    logits). ``weight`` 0 (before calibration sets it) leaves the logits as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("weight", torch.zeros(()))

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        p = (self.weight * (motion_energy(x) - self.mean)).to(logits.dtype)
        return logits + torch.stack([-p / 2, p / 2], dim=1)

    def set(self, mean: float, weight: float) -> None:
        """Store the normal footage's mean log energy and the weight (log-odds per unit of log energy)."""
        with torch.no_grad():
            self.mean.fill_(float(mean))
            self.weight.fill_(float(weight))
