"""Rounds 8 and 9's lever benchmarks measure against the product: the cell energies' reference is the motion prior's
own energy, and the ranking term only adds to the training loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddp_vad.data.reader import load_window_set
from ddp_vad.motion import window_energies

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cell_energy_benchmark_compares_against_the_priors_own_energy(tiny_shards):
    """Its ``energy`` row is the motion prior's window energy, window by window; each cell-normalised variant scores
    every window, and a cell that moves more than its normal motion raises ``cell-z``."""
    bench = _load("cell_energy")
    ws = load_window_set(tiny_shards)
    motion = bench.window_cells(ws.frames)
    scores = bench.variants(motion, motion[: max(2, len(ws) // 2)])
    np.testing.assert_array_equal(scores["energy"].numpy(), window_energies(ws.frames))
    assert all(v.shape == (len(ws),) and torch.isfinite(v).all() for v in scores.values())
    louder = motion.clone()
    louder[0] += 0.5  # every cell of window 0 moves more
    assert bench.variants(louder, motion)["cell-z"][0] > bench.variants(motion, motion)["cell-z"][0]


def test_the_position_free_variants_compare_against_the_priors_own_energy(tiny_shards):
    """``--group free``: the ``energy`` row is the prior's energy; a window that moves like the normal footage is
    nearer to it than one that moves more; one cell standing out raises how much the top cell stands out."""
    bench = _load("cell_energy")
    ws = load_window_set(tiny_shards)
    motion = bench.window_cells(ws.frames)
    scores = bench.free_variants(motion, motion)
    np.testing.assert_array_equal(scores["energy"].numpy(), window_energies(ws.frames))
    assert all(v.shape == (len(ws),) and torch.isfinite(v).all() for v in scores.values())
    louder = motion.clone()
    louder[0] += 0.5
    assert bench.free_variants(louder, motion)["knn-top16"][0] > scores["knn-top16"][0]
    peak = motion.clone()
    peak[0, :, 0] = peak[0].max() + 1.0  # one cell far above every other, at every step
    assert bench.free_variants(peak, motion)["top1-vs-next3"][0] > scores["top1-vs-next3"][0]


def test_the_ranking_term_only_adds_where_both_classes_meet():
    """One class in the batch: plain cross-entropy. Both: a positive term, larger when an anomalous window is ranked
    below a normal one, whose gradient raises the anomalous window's log-odds."""
    bench = _load("rank_loss")
    one_class = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    zeros = torch.zeros(2, dtype=torch.long)
    assert torch.equal(bench.cross_entropy_and_rank(one_class, zeros), F.cross_entropy(one_class, zeros))
    target = torch.tensor([1, 0])
    right = torch.tensor([[0.0, 2.0], [0.0, -2.0]])  # the anomalous window's log-odds above the normal one's
    wrong = torch.tensor([[0.0, -2.0], [0.0, 2.0]], requires_grad=True)
    gap_right = bench.cross_entropy_and_rank(right, target) - F.cross_entropy(right, target)
    gap_wrong = bench.cross_entropy_and_rank(wrong, target) - F.cross_entropy(wrong, target)
    assert 0 < gap_right < gap_wrong
    gap_wrong.backward()
    assert wrong.grad[0, 1] < 0 < wrong.grad[1, 1]  # descent raises the anomalous log-odds, lowers the normal one
