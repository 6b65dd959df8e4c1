"""The decision threshold of a transfer run, chosen on its out-of-fold scores and recorded in the run.

A run's ``oof_scores.csv`` holds every labelled window's score from the one fold model that did not train on it
(once per repeat of the cross-validation, with ``--repeats``). The threshold is the score ``t`` (a window is
anomalous when ``score >= t``) that maximises balanced accuracy, (TPR + TNR) / 2, over those rows:

* for the run as a whole (the fold models' mean, as ``predict`` and :class:`ddp_vad.Detector` use it): over every
  row, since no fold is a test fold of the ensemble, which is used on new footage;
* for one fold model, unit ``u = repeat * n_folds + fold`` (``folds/fold_XX``, ``--fold u``): over the rows of the
  clips that are not in its test fold, in *any* repeat (the other repeats score the same windows, dealt to other
  folds). Under the ``window`` protocol, whose folds split clips, over the rows of the windows not in its test fold.

It is chosen on window scores and applied to frame scores (a frame's score is the max over its windows). The
values go into ``RUN/threshold.json`` the first time they are needed, and are redone when ``oof_scores.csv``
changes (its sha256 is recorded) or the record is of an older rule; a run without out-of-fold scores of both
classes gets 0.5, and says so. A threshold given by hand, or read from ``threshold.json``, must be a finite number
in [0, 1] (:func:`check_threshold`).
"""

from __future__ import annotations

import contextlib
import csv
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object, sha256_file, write_json_atomic
from ddp_vad.runfiles import config_file, fold_name, oof_file, threshold_file

DEFAULT = 0.5
RULE = (
    "max balanced accuracy on out-of-fold window scores: all rows for the ensemble; for each fold model, the rows "
    "of the clips outside its test fold in every repeat"
)
VERSION = 2  # 1: per fold of repeat 0 only, rows of other repeats included: redone on load


def check_threshold(value: Any, what: str = "--threshold") -> float:
    """``value`` as a float when it is a finite number in [0, 1]; else a UserError naming ``what`` (the option,
    or the file and key it came from)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{what} must be a finite number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{what} must be in [0, 1], got {value!r}")
    return float(value)


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


@dataclass(frozen=True)
class _Oof:
    """The columns of ``oof_scores.csv`` the thresholds need."""

    scores: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    repeats: np.ndarray
    clips: np.ndarray
    keys: np.ndarray


def _read_oof(path: Path) -> _Oof:
    """The rows of ``path`` (a file written before ``--repeats`` has no ``repeat`` column: repeat 0)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        scores = np.array([float(r["score"]) for r in rows], np.float64)
        cols = [np.array([int(r[c]) for r in rows], np.int64) for c in ("label", "fold")]
        repeats = np.array([int(r.get("repeat") or 0) for r in rows], np.int64)
        clips, keys = (np.array([str(r[c]) for r in rows], dtype=object) for c in ("clip", "key"))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not an out-of-fold score table (bad or missing column: {exc})") from None
    if not np.isfinite(scores).all():
        raise UserError(f"{path}: holds non-finite scores")
    return _Oof(scores, cols[0], cols[1], repeats, clips, keys)


def _n_folds(run: Path, oof: _Oof) -> int:
    """Folds per repeat: the run's ``config.json`` says, else the out-of-fold rows' largest fold + 1."""
    with contextlib.suppress(OSError, ValueError, UserError):
        n = read_json_object(config_file(run), "run config").get("n_folds")
        if isinstance(n, int) and n > int(oof.folds.max(initial=-1)):
            return n
    return int(oof.folds.max(initial=-1)) + 1


def _clips_whole(oof: _Oof) -> bool:
    """Whether every repeat keeps each clip's rows in one fold (the leakfree and clip protocols)."""
    pairs = {(r, c, f) for r, c, f in zip(oof.repeats.tolist(), oof.clips.tolist(), oof.folds.tolist(), strict=True)}
    return len(pairs) == len({(r, c) for r, c, _ in pairs})


def compute_thresholds(run: str | Path) -> dict:
    """Thresholds of ``run`` from its ``oof_scores.csv``: {"all": t, "fold_XX": t, ...} with ``XX`` the unit
    ``repeat * n_folds + fold`` (the fold model's folder), with the rule and notes."""
    run = Path(run)
    oof_path = oof_file(run)
    record: dict = {"rule": RULE, "version": VERSION, "source": oof_path.name, "thresholds": {}, "notes": []}
    if not oof_path.is_file():
        record["notes"].append(f"no {oof_path.name} in the run")
        return record
    record["oof_sha256"] = sha256_file(oof_path)  # a re-run transfer rewrites the scores: the record is then redone
    oof = _read_oof(oof_path)
    whole = best_threshold(oof.scores, oof.labels)
    if whole is not None:
        record["thresholds"]["all"] = whole
    n_folds, by_clip = _n_folds(run, oof), _clips_whole(oof)
    record["held_out"] = "test clips" if by_clip else "test windows"
    column = oof.clips if by_clip else oof.keys
    for repeat, fold in sorted(set(zip(oof.repeats.tolist(), oof.folds.tolist(), strict=True))):
        test = (oof.repeats == repeat) & (oof.folds == fold)
        train = ~np.isin(column, np.unique(column[test]))  # its test clips' rows in every repeat are left out
        value = best_threshold(oof.scores[train], oof.labels[train])
        if value is not None:
            record["thresholds"][fold_name(repeat * n_folds + fold)] = value
    if not record["thresholds"]:
        record["notes"].append("the out-of-fold scores lack one class")
    return record


def _checked_record(path: Path) -> dict:
    """``threshold.json`` read and checked: a damaged one is a UserError naming it (never a NaN threshold)."""
    record = read_json_object(path, "threshold file")
    thresholds = record.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise UserError(f'threshold file {path}: "thresholds" must be an object of numbers, got {thresholds!r}')
    for key, value in thresholds.items():
        check_threshold(value, f"threshold file {path}: thresholds.{key}")
    notes = record.get("notes", [])
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        raise UserError(f'threshold file {path}: "notes" must be a list of strings')
    return record


def run_threshold(run: str | Path, fold: int | None = None) -> tuple[float, str]:
    """(threshold, how it was chosen) for ``run`` (all fold models' mean, or the model of unit ``fold``).

    Reads ``RUN/threshold.json``; computes and writes it when absent, stale or of an older rule (a read-only run is
    computed, not written). A damaged ``threshold.json`` is a UserError naming it.
    """
    run = Path(run)
    path, oof = threshold_file(run), oof_file(run)
    record = _checked_record(path) if path.is_file() else None
    current = sha256_file(oof) if oof.is_file() else None
    stale = record is not None and current is not None and record.get("version") != VERSION
    if record is None or record.get("oof_sha256") != current or stale:
        record = compute_thresholds(run)
        with contextlib.suppress(OSError):  # a read-only run: the value is still right, only not cached
            write_json_atomic(path, record)
    key = "all" if fold is None else fold_name(fold)
    value = record.get("thresholds", {}).get(key)
    if value is None:
        return DEFAULT, f"default {DEFAULT}: {'; '.join(record.get('notes', [])) or 'none chosen for ' + key}"
    return float(value), f"{record.get('rule', RULE)}, RUN/{path.name}"
