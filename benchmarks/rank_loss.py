"""``ddp_vad transfer`` trained with a ranking term beside the cross-entropy: an experiment outside the product
(round 8 of the levers, ``benchmarks/results/levers8.md``).

    RANK_WEIGHT=1 python benchmarks/rank_loss.py transfer --shards S --out RUN --from scratch --labelled-fraction 0.1

Every training batch's loss becomes the (class-weighted) cross-entropy plus ``RANK_WEIGHT`` times the mean over the
batch's (anomalous, normal) pairs of ``softplus(s_normal - s_anomalous)``, ``s`` the window's log-odds
``l1 - l0``: a pairwise surrogate of the window AUROC, the few-label lever the issue names ("a ranking loss"). A
batch that holds one class only keeps the cross-entropy alone. Everything else is ``transfer`` as the command line
asks; the run folder is an ordinary one (its config does not record the term: name the folder after it).
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F

from ddp_vad.cli import main
from ddp_vad.train import fold_steps

RANK_WEIGHT = float(os.environ.get("RANK_WEIGHT", "1"))


def cross_entropy_and_rank(logits: torch.Tensor, target: torch.Tensor, weight=None, **kwargs) -> torch.Tensor:
    """Cross-entropy plus RANK_WEIGHT times the pairwise ranking term of the batch."""
    loss = F.cross_entropy(logits, target, weight=weight, **kwargs)
    s = logits[:, 1] - logits[:, 0]
    anomalous, normal = s[target == 1], s[target == 0]
    if not anomalous.numel() or not normal.numel():
        return loss
    return loss + RANK_WEIGHT * F.softplus(normal[None, :] - anomalous[:, None]).mean()


if __name__ == "__main__":
    # fold_steps reaches the loss through its module attribute F: give it a copy of torch.nn.functional whose
    # cross_entropy is the one above, and leave every other user of F alone.
    patched = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    patched.cross_entropy = cross_entropy_and_rank
    fold_steps.F = patched
    main()
