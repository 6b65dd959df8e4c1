"""Pure window / label / balance / fold functions."""

from __future__ import annotations

import numpy as np
import pytest

from ddp_vad.data.windows import (
    grouped_stratified_folds,
    stratified_folds,
    undersample,
    window_labels,
    window_starts,
)
from ddp_vad.errors import UserError


def test_window_starts_stay_inside_the_clip():
    np.testing.assert_array_equal(window_starts(200, 10, 1), np.arange(191))
    np.testing.assert_array_equal(window_starts(25, 10, 5), [0, 5, 10, 15])
    assert len(window_starts(9, 10, 1)) == 0


def test_label_rule_at_the_threshold():
    frames = np.zeros(30, np.uint8)
    frames[10:15] = 1  # 5 anomalous frames: 10..14
    starts = window_starts(30, 10, 1)
    labels = window_labels(frames, starts, 10, 5)
    # A window [s, s+10) holds min(s+10, 15) - max(s, 10) anomalous frames.
    expected = [int(max(0, min(s + 10, 15) - max(s, 10)) >= 5) for s in starts]
    np.testing.assert_array_equal(labels, expected)
    assert labels[5] == 1 and labels[10] == 1  # windows 5..14 and 10..19 hold all five
    assert labels[4] == 0 and labels[11] == 0  # 4..13 and 11..20 hold only four
    assert window_labels(frames, starts, 10, 4)[11] == 1 and window_labels(frames, starts, 10, 5)[11] == 0


def test_undersample_is_balanced_and_seeded():
    labels = np.array([0] * 70 + [1] * 30)
    kept = undersample(labels, seed=3)
    assert (labels[kept] == 1).sum() == 30 and (labels[kept] == 0).sum() == 30
    np.testing.assert_array_equal(kept, undersample(labels, seed=3))
    assert not np.array_equal(kept, undersample(labels, seed=4))
    np.testing.assert_array_equal(undersample(np.zeros(5, int), 0), np.arange(5))


def test_stratified_folds_are_balanced_and_deterministic():
    labels = np.array([0] * 53 + [1] * 47)
    folds = stratified_folds(labels, 10, seed=0)
    np.testing.assert_array_equal(folds, stratified_folds(labels, 10, seed=0))
    sizes = np.bincount(folds, minlength=10)
    pos = np.bincount(folds, weights=labels, minlength=10)
    assert sizes.max() - sizes.min() <= 1 and pos.max() - pos.min() <= 1
    assert not np.array_equal(folds, stratified_folds(labels, 10, seed=1))  # the seed matters
    with pytest.raises(UserError, match="cannot make 10 folds from 5 windows"):
        stratified_folds(labels[:5], 10, 0)
    with pytest.raises(UserError, match="no class has 4 windows"):
        stratified_folds(np.array([0, 0, 0, 1, 1, 1]), 4, 0)


def test_grouped_folds_never_split_a_clip():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"c{i}" for i in range(23)], rng.integers(5, 40, 23))
    labels = rng.integers(0, 2, len(groups))
    folds = grouped_stratified_folds(labels, groups, 5, seed=1)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    assert set(folds) == set(range(5))
    np.testing.assert_array_equal(folds, grouped_stratified_folds(labels, groups, 5, seed=1))
    assert (grouped_stratified_folds(labels, groups, 30, seed=1) == -1).all()  # 23 clips < 30 folds
    assert (grouped_stratified_folds(labels, groups, 23, seed=1) >= 0).all()  # 23 clips = 23 folds: one each


def test_grouped_folds_are_stratified_as_far_as_clips_allow():
    # 40 clips of 10 windows, every other clip all-anomalous: 4 + 4 clips per fold is possible, and is what we get.
    groups = np.repeat(np.arange(40), 10)
    labels = (groups % 2 == 0).astype(int)
    for seed in range(3):
        folds = grouped_stratified_folds(labels, groups, 5, seed)
        assert np.bincount(folds, minlength=5).tolist() == [80] * 5
        assert np.bincount(folds, weights=labels, minlength=5).tolist() == [40] * 5
    # Uneven random clips: every fold stays within 10 points of the overall anomaly rate.
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(23), rng.integers(5, 40, 23))
    labels = rng.integers(0, 2, len(groups))
    folds = grouped_stratified_folds(labels, groups, 5, seed=1)
    rates = np.bincount(folds, weights=labels) / np.bincount(folds)
    assert np.abs(rates - labels.mean()).max() < 0.1


def _varied_clips(n_clips: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, groups) of clips of 25..35 windows whose anomaly shares run from 0 to 1 (one contiguous event)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c in range(n_clips):
        n = int(rng.integers(25, 36))
        share = (c % 11) / 10
        lab = np.zeros(n, np.int64)
        start = int(rng.integers(0, n - round(share * n) + 1))
        lab[start : start + round(share * n)] = 1
        labels.append(lab)
        groups.append(np.full(n, c))
    return np.concatenate(labels), np.concatenate(groups)


def test_grouped_folds_follow_the_seed_keep_clips_whole_and_hold_the_class_balance():
    labels, groups = _varied_clips(60)
    overall = labels.mean()
    assignments = set()
    for seed in range(4):
        folds = grouped_stratified_folds(labels, groups, 5, seed)
        for g in np.unique(groups):
            assert len(set(folds[groups == g].tolist())) == 1, f"clip {g} spans folds (seed {seed})"
        # Stated tolerance: with 60 clips of varied shares, each fold within 5 points of the overall anomaly rate.
        rates = np.bincount(folds, weights=labels, minlength=5) / np.bincount(folds, minlength=5)
        assert np.abs(rates - overall).max() < 0.05, (seed, rates.round(3).tolist(), round(overall, 3))
        clip_fold = tuple(int(folds[groups == g][0]) for g in np.unique(groups))
        assignments.add(clip_fold)
    assert len(assignments) == 4, "--seed must change which clips share a fold"


def test_window_folds_follow_the_seed():
    labels, _ = _varied_clips(20)
    runs = {tuple(stratified_folds(labels, 5, seed).tolist()) for seed in range(4)}
    assert len(runs) == 4


def test_shard_plan_folds_follow_the_build_seed():
    from types import SimpleNamespace

    from ddp_vad.data.plan import plan_windows

    # 24 clips of 40 frames (31 windows), anomalous from frame 21 in every other test clip: many equal clips, so
    # only the seed decides which of them share a fold.
    frame_labels = [np.r_[np.zeros(20), np.full(20, c % 2 and c >= 4)].astype(np.uint8) for c in range(24)]
    clips = [
        SimpleNamespace(name=f"c{c:02d}", split="train" if c < 4 else "test", frame_labels=fl, n_frames=len(fl))
        for c, fl in enumerate(frame_labels)
    ]
    dataset = SimpleNamespace(path="fake", clips=clips)
    plans = [
        plan_windows(dataset, SimpleNamespace(window=10, stride=1, min_anomalous=1, balance="none", folds=4, seed=s))
        for s in (0, 1)
    ]
    for name in ("fold_window", "fold_clip", "fold_leakfree"):
        a, b = (getattr(p, name) for p in plans)
        assert (a >= 0).all() and (b >= 0).all() and not np.array_equal(a, b), f"{name} ignores the seed"
    for seed, plan in zip((0, 1), plans, strict=True):  # exactly the fold functions under the build's seed
        kept, lf = plan.kept, plan.leakfree
        np.testing.assert_array_equal(plan.fold_window, stratified_folds(plan.label[kept], 4, seed))
        np.testing.assert_array_equal(
            plan.fold_leakfree, grouped_stratified_folds(plan.label[lf], plan.clip_index[lf], 4, seed)
        )
