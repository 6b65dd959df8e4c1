"""The decision threshold of a transfer run, chosen on its out-of-fold scores and recorded in the run.

A run's ``oof_scores.csv`` holds every labelled window's score from the one fold model that did not train on it.
The threshold is the score ``t`` (a window is anomalous when ``score >= t``) that maximises balanced accuracy,
(TPR + TNR) / 2, over those windows:

* for the run as a whole (the fold models' mean, as ``predict`` and :class:`ddp_vad.Detector` use it): over the
  out-of-fold scores of every fold, since no fold is a test fold of the ensemble, which is used on new footage;
* for one fold's model (``--fold k``): over the *other* folds' rows only, never fold k's own test fold.

It is chosen on window scores and applied to frame scores (a frame's score is the max over its windows). The
values go into ``RUN/threshold.json`` the first time they are needed, and are redone when ``oof_scores.csv``
changes (its sha256 is recorded); a run without out-of-fold scores of both classes gets 0.5, and says so.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

import numpy as np

from ddp_vad.files import read_json_object, sha256_file, write_json_atomic
from ddp_vad.runfiles import fold_name, oof_file, threshold_file

DEFAULT = 0.5
RULE = "max balanced accuracy on the training folds' out-of-fold window scores"


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The score ``t`` maximising balanced accuracy of ``score >= t`` (the lowest such t); None without both
    classes."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of equal scores: threshold = that score
    balanced = (tp / n_pos + 1.0 - fp / n_neg) / 2.0
    candidates = np.flatnonzero(last)
    values = balanced[candidates]
    pick = candidates[len(values) - 1 - int(np.argmax(values[::-1]))]  # ties: the lowest threshold
    return float(s[pick])


def _read_oof(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return (
        np.array([float(r["score"]) for r in rows]),
        np.array([int(r["label"]) for r in rows]),
        np.array([int(r["fold"]) for r in rows]),
    )


def compute_thresholds(run: str | Path) -> dict:
    """Thresholds of ``run`` from its ``oof_scores.csv``: {"all": t, "fold_XX": t, ...}, with the rule and notes."""
    run = Path(run)
    oof = oof_file(run)
    record: dict = {"rule": RULE, "source": oof.name, "thresholds": {}, "notes": []}
    if not oof.is_file():
        record["notes"].append(f"no {oof.name} in the run")
        return record
    record["oof_sha256"] = sha256_file(oof)  # a re-run transfer rewrites the scores: the record is then redone
    scores, labels, folds = _read_oof(oof)
    whole = best_threshold(scores, labels)
    if whole is not None:
        record["thresholds"]["all"] = whole
    for fold in sorted(set(folds.tolist())):
        train = folds != fold
        value = best_threshold(scores[train], labels[train])
        if value is not None:
            record["thresholds"][fold_name(fold)] = value
    if not record["thresholds"]:
        record["notes"].append("the out-of-fold scores lack one class")
    return record


def run_threshold(run: str | Path, fold: int | None = None) -> tuple[float, str]:
    """(threshold, how it was chosen) for ``run`` (all folds' mean, or ``fold``'s model alone).

    Reads ``RUN/threshold.json``; computes and writes it when absent (a read-only run is computed, not written).
    """
    run = Path(run)
    path, oof = threshold_file(run), oof_file(run)
    record = read_json_object(path, "threshold file") if path.is_file() else None
    current = sha256_file(oof) if oof.is_file() else None
    if record is None or record.get("oof_sha256") != current:
        record = compute_thresholds(run)
        with contextlib.suppress(OSError):  # a read-only run: the value is still right, only not cached
            write_json_atomic(path, record)
    key = "all" if fold is None else fold_name(fold)
    value = record.get("thresholds", {}).get(key)
    if value is None:
        return DEFAULT, f"default {DEFAULT}: {'; '.join(record.get('notes', [])) or 'none chosen for ' + key}"
    return float(value), f"{record.get('rule', RULE)}, RUN/{path.name}"
