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
