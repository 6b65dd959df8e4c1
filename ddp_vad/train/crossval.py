"""Cross-validation bookkeeping shared by every method (the LRCNs of ``transfer`` and the ``baselines``).

A method plugs in by scoring one fold at a time: :func:`fold_split` says which windows it trains on and which it is
tested on, :func:`score_fold` turns its anomaly scores and predictions into the fold's metrics row and out-of-fold
rows, and :func:`finish_cv` writes ``RUN/metrics.json`` + ``RUN/oof_scores.csv`` and prints the one-line summary.
So the split rules, the metric rows and the summary are written once, whichever model is behind them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object
from ddp_vad.train.metrics import auroc, binary_metrics, write_cv_results

PROTOCOLS = ("leakfree", "window", "clip")  # the first is the default
PROTOCOL_HELP = (
    "leakfree (default): labelled test clips in clip-grouped folds, the GAN on the train clips only, so no model "
    "for a fold has seen its test clips; window: the method's folds over windows (leaky: neighbours share 9 of 10 "
    "frames); clip: folds grouped by clip over the method's balanced windows."
)


def window_selection(protocol: str) -> str:
    """Which windows of a shard set a protocol reads (:meth:`ddp_vad.data.format.Block.positions`)."""
    return "leakfree" if protocol == "leakfree" else "kept"


def repeat_seed(seed: int, repeat: int) -> int:
    """The fold seed of repeat ``repeat`` >= 1 of the cross-validation (repeat 0 uses the shards' stored folds)."""
    return int(np.random.SeedSequence([abs(int(seed)), int(repeat), 0xF01D]).generate_state(1)[0])


def repeat_folds(
    fold_of: np.ndarray, labels: np.ndarray, clips: list[str], protocol: str, n_folds: int, repeats: int, seed: int
) -> np.ndarray:
    """Fold per window for every repeat, ``[repeats, N]``: row 0 is ``fold_of`` (the shards' folds, seeded by the
    build's ``seed``); row r re-deals the same windows with :func:`repeat_seed` (``seed``, r), by the protocol's own
    rule (clip-grouped even folds, or stratified window folds). Windows outside the protocol's set stay -1."""
    from ddp_vad.data.windows import grouped_stratified_folds, stratified_folds

    rows = [np.asarray(fold_of, np.int64)]
    inside = rows[0] >= 0
    groups = np.asarray(clips)[inside]
    for r in range(1, repeats):
        row = np.full(len(fold_of), -1, np.int64)
        if protocol == "window":
            row[inside] = stratified_folds(labels[inside], n_folds, repeat_seed(seed, r))
        else:
            row[inside] = grouped_stratified_folds(labels[inside], groups, n_folds, repeat_seed(seed, r))
        rows.append(row)
    return np.stack(rows)


@dataclass
class CVWindows:
    """What cross-validation needs of the windows: labels, folds per repeat and the keys of the OOF file.

    A *unit* is one (repeat, fold) pair, numbered ``repeat * n_folds + fold``: with one repeat, unit k is fold k.
    """

    labels: np.ndarray  # int64 [N]
    fold_sets: np.ndarray  # int64 [R, N], fold index per repeat under the chosen protocol (-1: not in the set)
    keys: list[str]
    clips: list[str]
    starts: np.ndarray  # int64 [N]
    n_folds: int = 0

    def __post_init__(self) -> None:
        self.fold_sets = np.atleast_2d(np.asarray(self.fold_sets, np.int64))
        if not self.n_folds:
            self.n_folds = int(self.fold_sets.max(initial=-1)) + 1

    @property
    def fold_of(self) -> np.ndarray:
        """Fold per window in repeat 0 (the shards' folds)."""
        return self.fold_sets[0]

    @property
    def repeats(self) -> int:
        return int(self.fold_sets.shape[0])

    @property
    def n_units(self) -> int:
        """Number of (repeat, fold) units: folds x repeats."""
        return self.n_folds * self.repeats

    def unit(self, u: int) -> tuple[int, int]:
        """(repeat, fold) of unit ``u``."""
        return divmod(int(u), self.n_folds)

    @classmethod
    def from_window_set(
        cls, ws: Any, protocol: str, n_folds: int | None = None, repeats: int = 1, seed: int | None = None
    ) -> CVWindows:
        """The bookkeeping part of a :class:`ddp_vad.data.reader.WindowSet` under ``protocol``, with ``repeats``
        fold assignments (repeat r > 0 seeded from ``seed``, by default the shards' build seed)."""
        labels = np.asarray(ws.labels, dtype=np.int64)
        fold_of = np.asarray(ws.folds(protocol), dtype=np.int64)
        n_folds = int(n_folds or fold_of.max(initial=-1) + 1)
        seed = int(ws.manifest.get("seed", 0)) if seed is None else seed
        return cls(
            labels=labels,
            fold_sets=repeat_folds(fold_of, labels, list(ws.clips), protocol, n_folds, repeats, seed),
            keys=list(ws.keys),
            clips=list(ws.clips),
            starts=np.asarray(ws.starts, dtype=np.int64),
            n_folds=n_folds,
        )


def check_fraction(fraction: float) -> None:
    """``--labelled-fraction`` must be in (0, 1]."""
    if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise UserError(f"--labelled-fraction must be in (0, 1], got {fraction}")


def labelled_subset(train_idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int, fold: int) -> np.ndarray:
    """The labelled share of a fold's training windows: per class, the first ``ceil(fraction * n_class)`` windows of
    a permutation seeded by ``(seed, fold, class)`` (at least one per class present), returned sorted.

    The permutation does not depend on ``fraction``, so the subsets are nested: the 5% subset lies inside the 10% one.
    """
    if fraction >= 1.0:
        return train_idx
    keep = []
    for cls in np.unique(labels[train_idx]):
        members = train_idx[labels[train_idx] == cls]
        order = np.random.default_rng([abs(int(seed)), int(fold), int(cls), 0x1AB]).permutation(members.size)
        keep.append(members[order[: max(1, math.ceil(fraction * members.size))]])
    return np.sort(np.concatenate(keep)) if keep else train_idx


def fold_split(
    cv: CVWindows, k: int, exclude: np.ndarray | None = None, fraction: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, test, excluded) window indices of unit ``k`` (fold ``k % n_folds`` of repeat ``k // n_folds``):
    test = that fold; train = every other fold of the repeat minus the windows in the boolean mask ``exclude``
    (e.g. a held-out anomaly type, returned as ``excluded``), then the labelled ``fraction`` of it
    (:func:`labelled_subset`, seeded by the unit). Windows with fold -1 (outside the protocol's labelled set) are
    never used."""
    repeat, fold = cv.unit(k)
    fold_of = cv.fold_sets[repeat]
    test = np.flatnonzero(fold_of == fold)
    others = (fold_of != fold) & (fold_of >= 0)
    excluded = np.zeros(0, np.int64)
    if exclude is not None:
        excluded = np.flatnonzero(others & exclude)
        others &= ~exclude
    train = labelled_subset(np.flatnonzero(others), cv.labels, fraction, seed, k)
    return train, test, excluded


def score_fold(
    cv: CVWindows, k: int, test_idx: np.ndarray, scores: np.ndarray, preds: np.ndarray, **extra: Any
) -> tuple[dict, list[dict]]:
    """The metrics row of unit ``k`` (plus ``extra`` keys) and its out-of-fold rows (score = P(anomalous)).

    The row carries the fold and repeat, the Table 5 metrics at the predicted classes, the balanced accuracy and the
    window AUROC of the scores (None when the fold holds one class)."""
    repeat, fold = cv.unit(k)
    y = cv.labels[test_idx]
    row = {"fold": fold, "repeat": repeat, **binary_metrics(y, preds), "window_auroc": auroc(y, scores), **extra}
    oof = [
        {"key": cv.keys[i], "clip": cv.clips[i], "start": int(cv.starts[i]), "label": int(cv.labels[i]),
         "score": float(s), "fold": fold, "repeat": repeat}
        for i, s in zip(np.asarray(test_idx).tolist(), np.asarray(scores).tolist(), strict=True)
    ]  # fmt: skip
    return row, oof


def check_repeats(repeats: int) -> None:
    """``--repeats`` must be a positive integer."""
    if not (isinstance(repeats, int) and repeats >= 1):
        raise UserError(f"--repeats must be an integer >= 1, got {repeats}")


def fmt_metric(value: float | None) -> str:
    """A metric for a log line: three decimals, or ``n/a`` when undefined."""
    return "  n/a" if value is None else f"{value:.3f}"


def summary_line(method: str, mean: dict, seconds: float, run_dir: str | Path) -> str:
    """``METHOD window AUROC .. balanced accuracy .. accuracy .. F1 .. (Ns) -> RUN``."""
    return (
        f"{method} window AUROC {fmt_metric(mean.get('window_auroc'))} balanced accuracy "
        f"{fmt_metric(mean.get('balanced_accuracy'))} accuracy {fmt_metric(mean['accuracy'])} F1 "
        f"{fmt_metric(mean['f1'])} ({seconds:.1f}s) -> {run_dir}"
    )


def finish_cv(
    run_dir: str | Path,
    method: str,
    protocol: str,
    fold_rows: list[dict],
    oof_rows: list[dict],
    extra: dict[str, Any],
    seconds: float,
    log_prefix: str,
) -> dict:
    """Write the run's metrics and out-of-fold scores, print the summary line; returns the mean metrics."""
    path = write_cv_results(run_dir, method, protocol, fold_rows, oof_rows, extra=extra)
    mean = read_json_object(path, "metrics file")["mean"]
    print(f"{log_prefix}: {summary_line(method, mean, seconds, run_dir)}", flush=True)
    return mean
