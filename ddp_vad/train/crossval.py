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
from ddp_vad.eval.metrics import binary_metrics, write_cv_results
from ddp_vad.files import read_json_object

PROTOCOLS = ("leakfree", "window", "clip")  # the first is the default
PROTOCOL_HELP = (
    "leakfree (default): labelled test clips in clip-grouped folds, the GAN on the train clips only, so no model "
    "for a fold has seen its test clips; window: the method's folds over windows (leaky: neighbours share 9 of 10 "
    "frames); clip: folds grouped by clip over the method's balanced windows."
)


def window_selection(protocol: str) -> str:
    """Which windows of a shard set a protocol reads (:meth:`ddp_vad.data.format.Block.positions`)."""
    return "leakfree" if protocol == "leakfree" else "kept"


@dataclass
class CVWindows:
    """What cross-validation needs of the windows: labels, fold per window and the keys of the OOF file."""

    labels: np.ndarray  # int64 [N]
    fold_of: np.ndarray  # int64 [N], fold index under the chosen protocol
    keys: list[str]
    clips: list[str]
    starts: np.ndarray  # int64 [N]

    @classmethod
    def from_window_set(cls, ws: Any, protocol: str) -> CVWindows:
        """The bookkeeping part of a :class:`ddp_vad.data.reader.WindowSet` under ``protocol``."""
        return cls(
            labels=np.asarray(ws.labels, dtype=np.int64),
            fold_of=np.asarray(ws.folds(protocol), dtype=np.int64),
            keys=list(ws.keys),
            clips=list(ws.clips),
            starts=np.asarray(ws.starts, dtype=np.int64),
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
    """(train, test, excluded) window indices of fold ``k``: test = fold ``k``; train = every other fold minus the
    windows in the boolean mask ``exclude`` (e.g. a held-out anomaly type, returned as ``excluded``), then the
    labelled ``fraction`` of it (:func:`labelled_subset`). Windows with fold -1 (outside the protocol's labelled
    set) are never used."""
    test = np.flatnonzero(cv.fold_of == k)
    others = (cv.fold_of != k) & (cv.fold_of >= 0)
    excluded = np.zeros(0, np.int64)
    if exclude is not None:
        excluded = np.flatnonzero(others & exclude)
        others &= ~exclude
    train = labelled_subset(np.flatnonzero(others), cv.labels, fraction, seed, k)
    return train, test, excluded


def score_fold(
    cv: CVWindows, k: int, test_idx: np.ndarray, scores: np.ndarray, preds: np.ndarray, **extra: Any
) -> tuple[dict, list[dict]]:
    """The metrics row of fold ``k`` (plus ``extra`` keys) and its out-of-fold rows (score = P(anomalous))."""
    row = {"fold": k, **binary_metrics(cv.labels[test_idx], preds), **extra}
    oof = [
        {"key": cv.keys[i], "clip": cv.clips[i], "start": int(cv.starts[i]), "label": int(cv.labels[i]),
         "score": float(s), "fold": k}
        for i, s in zip(np.asarray(test_idx).tolist(), np.asarray(scores).tolist(), strict=True)
    ]  # fmt: skip
    return row, oof


def fmt_metric(value: float | None) -> str:
    """A metric for a log line: three decimals, or ``n/a`` when undefined."""
    return "  n/a" if value is None else f"{value:.3f}"


def summary_line(method: str, mean: dict, seconds: float, run_dir: str | Path) -> str:
    """``METHOD recall .. precision .. accuracy .. F1 .. (Ns) -> RUN``."""
    return (
        f"{method} recall {fmt_metric(mean['recall'])} precision {fmt_metric(mean['precision'])} "
        f"accuracy {fmt_metric(mean['accuracy'])} F1 {fmt_metric(mean['f1'])} ({seconds:.1f}s) -> {run_dir}"
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
