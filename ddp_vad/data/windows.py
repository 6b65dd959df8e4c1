"""Pure functions: sliding windows, window labels, class balancing and fold assignment.

Everything here is deterministic from its arguments (seeded numpy generators, no global state), so every
process of a distributed job computes the same windows and folds.
"""

from __future__ import annotations

import numpy as np

from ddp_vad.errors import UserError

PROTOCOLS = ("window", "clip")


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


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per item: a seeded shuffle inside each class, dealt round-robin over ``k`` folds.

    Every fold gets the same number of items of each class (+-1), like a stratified k-fold.
    """
    labels = np.asarray(labels)
    if k < 2:
        raise UserError(f"folds must be >= 2, got {k}")
    if len(labels) < k:
        raise UserError(f"cannot make {k} folds from {len(labels)} windows")
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), np.int64)
    offset = 0
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        # Continue dealing where the previous class stopped so fold sizes stay within one of each other.
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset = (offset + len(idx)) % k
    return folds


def grouped_stratified_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per item with every group (clip) entirely inside one fold.

    Groups are shuffled (seeded) and then placed greedily, largest first, into the fold where they least
    increase the spread of per-fold class counts, which keeps folds stratified as far as groups allow.
    Returns -1 for every item when there are fewer groups than folds (the protocol is then unavailable).
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    names, inverse = np.unique(groups, return_inverse=True)
    if len(names) < k:
        return np.full(len(labels), -1, np.int64)
    pos = np.bincount(inverse, weights=labels, minlength=len(names))
    size = np.bincount(inverse, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    order = order[np.argsort(-size[order], kind="stable")]
    # Scale both classes alike so the rarer one counts as much as the common one.
    w_pos, w_neg = 1.0 / max(pos.sum(), 1.0) ** 2, 1.0 / max((size - pos).sum(), 1.0) ** 2
    fold_pos, fold_neg = np.zeros(k), np.zeros(k)
    fold_of_group = np.empty(len(names), np.int64)
    for g in order:
        # Growth of the sum of squared class counts if g joins each fold: least-loaded fold wins.
        cost = w_pos * fold_pos * pos[g] + w_neg * fold_neg * (size[g] - pos[g])
        cost += 1e-12 * (fold_pos + fold_neg)  # tie-break towards smaller folds
        best = int(np.argmin(cost))
        fold_of_group[g] = best
        fold_pos[best] += pos[g]
        fold_neg[best] += size[g] - pos[g]
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
