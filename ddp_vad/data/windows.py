"""Pure functions: sliding windows, window labels, class balancing and fold assignment.

Everything here is deterministic from its arguments (seeded numpy generators and scikit-learn splitters, no global
state), so every process of a distributed job computes the same windows and folds.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ddp_vad.errors import UserError


def window_starts(n_frames: int, window: int, stride: int) -> np.ndarray:
    """0-based start frames of the windows inside one clip (windows never cross the clip's end)."""
    if window < 1 or stride < 1:
        raise UserError(f"window ({window}) and stride ({stride}) must be >= 1")
    if n_frames < window:
        return np.zeros(0, np.int64)
    return np.arange(0, n_frames - window + 1, stride, dtype=np.int64)


def window_labels(frame_labels: np.ndarray, starts: np.ndarray, window: int, min_anomalous: int) -> np.ndarray:
    """1 when at least ``min_anomalous`` of the window's frames are anomalous, else 0."""
    if not 1 <= min_anomalous <= window:
        raise UserError(f"min_anomalous must be in 1..{window}, got {min_anomalous}")
    counts = np.convolve(np.asarray(frame_labels, np.int64), np.ones(window, np.int64), mode="valid")
    return (counts[starts] >= min_anomalous).astype(np.int64)


def undersample(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices (sorted) that keep every minority-class item and an equal, seeded random share of the majority.

    With a single class present nothing can be balanced and every index is kept.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        return np.arange(len(labels))
    n_keep = counts.min()
    rng = np.random.default_rng(seed)
    kept = [rng.choice(np.flatnonzero(labels == c), size=n_keep, replace=False) for c in classes]
    return np.sort(np.concatenate(kept))


def _fold_of_each(splitter, labels: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per item from a scikit-learn splitter (item i is in the test set of fold ``folds[i]``)."""
    folds = np.full(len(labels), -1, np.int64)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": a fact, not a fault
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, test) in enumerate(splitter.split(np.zeros((len(labels), 1)), labels, groups)):
            folds[test] = fold
    return folds


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per item: scikit-learn's ``StratifiedKFold`` (shuffled, seeded).

    Every fold gets the same number of items of each class (+-1), and fold sizes differ by at most one.
    """
    labels = np.asarray(labels)
    if k < 2:
        raise UserError(f"folds must be >= 2, got {k}")
    if len(labels) < k:
        raise UserError(f"cannot make {k} folds from {len(labels)} windows")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.max() < k:
        raise UserError(f"cannot make {k} stratified folds: no class has {k} windows ({counts.tolist()} per class)")
    return _fold_of_each(StratifiedKFold(k, shuffle=True, random_state=seed % 2**32), labels)


def grouped_stratified_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per item with every group (clip) entirely inside one fold, the folds as alike as the groups allow.

    Groups are sorted by their anomaly share (ties broken at random) and dealt out k at a time: each run of k
    consecutive groups goes to a seeded random permutation of the folds (a partial last run to a random subset of
    folds, preferring the folds that hold the fewest items). So every fold gets one group from each band of anomaly
    share, whatever the seed, and different seeds give different folds (``--repeats`` relies on that: scikit-learn's
    ``StratifiedGroupKFold`` gave the same folds for every seed on real clips). Evenness: docs/data.md#folds.

    Returns -1 for every item when there are fewer groups than folds (the protocol is then unavailable).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if k < 2:
        raise UserError(f"folds must be >= 2, got {k}")
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(inverse.max(initial=-1)) + 1
    if n_groups < k:
        return np.full(len(labels), -1, np.int64)
    size = np.bincount(inverse, minlength=n_groups)
    share = np.bincount(inverse, weights=labels, minlength=n_groups) / size
    rng = np.random.default_rng([abs(int(seed)), 0x5EED])
    order = np.lexsort((rng.random(n_groups), share))  # by share; random among equal shares
    fold_of_group = np.empty(n_groups, np.int64)
    items = np.zeros(k, np.int64)
    for lo in range(0, n_groups, k):
        run = order[lo : lo + k]
        if len(run) == k:
            targets = rng.permutation(k)
        else:  # a partial run: the folds with the fewest items, ties at random
            targets = np.lexsort((rng.random(k), items))[: len(run)]
            targets = targets[rng.permutation(len(run))]
        fold_of_group[run] = targets
        np.add.at(items, targets, size[run])
    return fold_of_group[inverse]


def fold_summary(labels: np.ndarray, folds: np.ndarray, k: int) -> list[dict]:
    """Per-fold counts {"fold", "windows", "anomalous", "normal"} (empty list when folds are unavailable)."""
    if len(folds) and folds.min() < 0:
        return []
    out = []
    for f in range(k):
        sel = folds == f
        n_anom = int(labels[sel].sum())
        out.append({"fold": f, "windows": int(sel.sum()), "anomalous": n_anom, "normal": int(sel.sum()) - n_anom})
    return out
