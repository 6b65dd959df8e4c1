"""How much the motion prior weighs against the classifier, chosen per fold on its training clips
(``transfer --prior-share nested``).

The calibrated log-odds add the classifier's and the motion energy's normal-footage z-scores with the prior's share
``a`` (:func:`ddp_vad.train.calibration.shared_z`). Which share is right depends on the scene: on the Ped1 sample the
plain sum (0.5) is best, on UCSD Ped2 the motion energy alone (1.0) beats every mix with the classifier
(benchmarks/results/levers7.md). A fixed share is a choice made on the clips it is reported on; here each fold makes
its own, from its own training clips only: they are split into ``INNER_FOLDS`` clip-grouped folds, a model is trained
the fold's way on all but one and scores that one, and the share in :data:`PRIOR_SHARES` (the plain sum, or the
motion energy alone: does the classifier add anything to the energy on this scene?) whose pooled frame AUROC over
those scores is highest is used for the fold's model. The test fold is never looked at. With a labelled
fraction below 1 only the labelled windows are trained on and scored.
"""

from __future__ import annotations

import numpy as np

from ddp_vad.data.windows import grouped_stratified_folds
from ddp_vad.errors import UserError
from ddp_vad.train.calibration import EQUAL_SHARE, shared_z
from ddp_vad.train.crossval import CVWindows
from ddp_vad.train.metrics import frame_auroc

NESTED = "nested"
INNER_FOLDS = 2
# The candidates: the plain sum, or the motion energy alone. Seven shares from 0 to 1 were tried first and chose
# too noisily on two inner folds (some folds of the Ped1 sample picked the classifier alone and lost 0.02;
# benchmarks/results/levers7.md).
PRIOR_SHARES = (EQUAL_SHARE, 1.0)


def parse_prior_share(value: str | float) -> str | float:
    """``--prior-share``: ``nested`` or a share in [0, 1] (0: the classifier alone, 1: the motion energy alone)."""
    if str(value).strip().lower() == NESTED:
        return NESTED
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:  # also refuses nan
        raise UserError(f"--prior-share {value}: give 'nested' or a number in [0, 1]")
    return share


def inner_splits(cv: CVWindows, train_idx: np.ndarray, seed: int, fold: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, scored) windows of each inner fold of a fold's training windows, clip-grouped and stratified like the
    outer folds (seeded by ``seed`` and ``fold``); [] when the training clips cannot give every inner fold windows of
    both classes to fit on and to score."""
    labels, clips = cv.labels[train_idx], np.asarray(cv.clips, dtype=object)[train_idx]
    inner_seed = int(np.random.SeedSequence([abs(int(seed)), int(fold), 0x5AE]).generate_state(1)[0])
    inner = grouped_stratified_folds(labels, clips, INNER_FOLDS, inner_seed)
    both = lambda mask: np.unique(labels[mask]).size == 2  # noqa: E731
    if (inner < 0).any() or not all(both(inner == i) and both(inner != i) for i in range(INNER_FOLDS)):
        return []
    return [(train_idx[inner != i], train_idx[inner == i]) for i in range(INNER_FOLDS)]


def choose_share(
    cv: CVWindows, scored: np.ndarray, z_classifier: np.ndarray, z_motion: np.ndarray, frame_labels: np.ndarray
) -> tuple[float, list[float | None]]:
    """The share in :data:`PRIOR_SHARES` whose combined scores of the windows ``scored`` rank their frames best
    (:func:`ddp_vad.train.metrics.frame_auroc`; ``frame_labels`` ``[len(scored), T]``, the windows' frame labels),
    and every share's AUROC. Ties go to the share nearest the plain sum (0.5); with no AUROC defined, 0.5."""
    clips, starts = [cv.clips[i] for i in scored.tolist()], cv.starts[scored]
    aurocs = [frame_auroc(clips, starts, frame_labels, shared_z(z_classifier, z_motion, s)) for s in PRIOR_SHARES]
    ranked = [(a, -abs(s - EQUAL_SHARE), s) for a, s in zip(aurocs, PRIOR_SHARES, strict=True) if a is not None]
    return (max(ranked)[2] if ranked else EQUAL_SHARE), aurocs
