"""Cross-validation metrics and their files (``RUN/metrics.json``, ``RUN/oof_scores.csv``).

Shared by ``transfer`` and ``baselines`` (writers) and ``evaluate`` (reader). Definitions are the standard
ones, with the positive class = anomalous (label 1):

* recall = TP / (TP + FN), precision = TP / (TP + FP), accuracy = (TP + TN) / n,
  F1 = 2 TP / (2 TP + FP + FN).
* A metric whose denominator is zero is *undefined* and stored as ``None`` (JSON ``null``), never as a
  made-up 0 or 1: recall and F1 when the fold holds no anomalous window (possible under the grouped
  ``clip`` protocol with few clips), precision when nothing was predicted anomalous. The row then carries a
  ``"note"`` saying why. (F1 stays defined -- and is 0 -- when anomalies exist but none was found.)
* Mean and std over folds use the defined values only; ``std`` is the population std (``ddof=0``, numpy's
  default, as in ``np.std(cross_val_score(...))``). ``metrics.json`` records in ``"n_defined"`` how many folds
  each mean covers.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.errors import UserError
from ddp_vad.files import atomic_path, read_json_object, write_json_atomic
from ddp_vad.runfiles import metrics_file, oof_file

METRICS = ("recall", "precision", "accuracy", "f1")  # the method's Table 5 (thresholded at the argmax)
# Metrics that do not move with a fold's anomaly rate: the headline under clip-grouped folds (docs/run-folders.md).
PRIOR_FREE = ("window_auroc", "balanced_accuracy")
FOLD_METRICS = METRICS + PRIOR_FREE
OOF_HEADER = ("key", "clip", "start", "label", "score", "fold", "repeat")
_OOF_HEADER_V1 = OOF_HEADER[:-1]  # before --repeats: every row is repeat 0


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def binary_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """Recall, precision, accuracy, F1 and the confusion counts of one fold (label 1 = anomalous).

    Returns ``{"recall", "precision", "accuracy", "f1", "n_test", "tp", "fp", "tn", "fn"}``; undefined
    metrics are ``None`` and then a ``"note"`` key explains why.
    """
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    bad = set(np.unique(np.concatenate([t, p])).tolist()) - {0, 1}
    if bad:
        raise ValueError(f"labels must be 0/1, got {sorted(bad)}")
    tp = int(np.sum((t == 1) & (p == 1)))
    fp = int(np.sum((t == 0) & (p == 1)))
    tn = int(np.sum((t == 0) & (p == 0)))
    fn = int(np.sum((t == 1) & (p == 0)))
    n = int(t.size)
    row: dict[str, Any] = {
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "accuracy": _ratio(tp + tn, n),
        # Undefined without positives: F1 is about finding anomalies, and there are none to find.
        "f1": None if tp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
        # The mean of the two classes' recalls: chance is 0.5 whatever the fold's anomaly rate.
        "balanced_accuracy": None if tp + fn == 0 or tn + fp == 0 else (tp / (tp + fn) + tn / (tn + fp)) / 2,
        "n_test": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
    notes = []
    if n == 0:
        notes.append("empty fold: all metrics undefined")
    else:
        if tp + fn == 0:
            notes.append("no anomalous windows in this fold: recall and F1 undefined")
        if tp + fp == 0:
            notes.append("nothing predicted anomalous: precision undefined")
    if notes:
        row["note"] = "; ".join(notes)
    return row


def _defined(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if not math.isnan(v):
            out.append(v)
    return out


def summarise_folds(
    fold_rows: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Mean and population std (``ddof=0``) of each metric over the folds where it is defined.

    A metric undefined in every fold gets ``None``. Use :func:`count_defined` for the fold counts.
    """
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for name in FOLD_METRICS:
        vals = _defined(r.get(name) for r in fold_rows)
        mean[name] = float(np.mean(vals)) if vals else None
        std[name] = float(np.std(vals)) if vals else None
    return mean, std


def count_defined(fold_rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many folds define each metric (the number of values behind each mean)."""
    return {name: len(_defined(r.get(name) for r in fold_rows)) for name in FOLD_METRICS}


def _clean_fold_row(row: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("fold", *METRICS, "n_test") if k not in row]
    if missing:
        raise ValueError(f"fold row lacks {missing}: {dict(row)}")
    out: dict[str, Any] = {"fold": int(row["fold"]), "repeat": int(row.get("repeat", 0))}
    for name in FOLD_METRICS:
        v = row.get(name)
        out[name] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    out["n_test"] = int(row["n_test"])
    for k, v in row.items():  # keep extras (tp/fp/tn/fn, note, timings, ...) after the contract keys
        if k not in out:
            out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def _oof_tuple(row: Mapping[str, Any] | Sequence[Any]) -> tuple[str, str, int, int, float, int, int]:
    if isinstance(row, Mapping):
        row = [row.get(k, 0) if k == "repeat" else row[k] for k in OOF_HEADER]
    if len(row) == len(_OOF_HEADER_V1):
        row = [*row, 0]
    key, clip, start, label, score, fold, repeat = row
    return str(key), str(clip), int(start), int(label), float(score), int(fold), int(repeat)


def write_cv_results(
    run_dir: str | os.PathLike,
    method: str,
    protocol: str,
    fold_rows: Sequence[Mapping[str, Any]],
    oof_rows: Iterable[Mapping[str, Any] | Sequence[Any]],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``RUN/oof_scores.csv`` then ``RUN/metrics.json`` (each via temp file + rename).

    ``fold_rows``: one mapping per fold with at least fold, recall, precision, accuracy, f1, n_test (e.g.
    ``{"fold": k, **binary_metrics(...)}``); extra keys are kept. ``oof_rows``: mappings (or tuples in
    header order) with key, clip, start, label, score (= anomaly probability), fold. Rows are sorted (folds by
    index, scores by key) so the files do not depend on the order results arrived in. ``metrics.json`` is
    written last, so its presence marks a complete run. Returns the path of ``metrics.json``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folds = sorted((_clean_fold_row(r) for r in fold_rows), key=lambda r: (r["repeat"], r["fold"]))
    oof = sorted((_oof_tuple(r) for r in oof_rows), key=lambda r: (r[6], r[0], r[5]))

    csv_path = oof_file(run_dir)
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(OOF_HEADER)
        for key, clip, start, label, score, fold, repeat in oof:
            writer.writerow([key, clip, start, label, repr(score), fold, repeat])

    mean, std = summarise_folds(folds)
    payload: dict[str, Any] = {
        "method": method,
        "protocol": protocol,
        "folds": folds,
        "mean": mean,
        "std": std,
        "std_kind": "population (ddof=0) over folds where the metric is defined",
        "n_defined": count_defined(folds),
    }
    if extra:
        payload.update(extra)
    path = metrics_file(run_dir)
    write_json_atomic(path, payload)
    return path


def read_cv_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``RUN/metrics.json`` (``run_dir`` may also be the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = metrics_file(path)
    if not path.is_file():
        raise UserError(f"no metrics.json in {path.parent}")
    data = read_json_object(path, "metrics file")
    missing = [k for k in ("method", "protocol", "folds", "mean", "std") if k not in data]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}")
    for row in data["folds"]:
        lacking = [k for k in ("fold", *METRICS, "n_test") if k not in row]
        if lacking:
            raise UserError(f"{path}: a fold row lacks {', '.join(lacking)}")
    return data


def read_oof_scores(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``oof_scores.csv`` (``path`` may be the run folder) into typed dict rows."""
    path = Path(path)
    if path.is_dir():
        path = oof_file(path)
    if not path.is_file():
        raise UserError(f"no oof_scores.csv at {path}")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) not in (OOF_HEADER, _OOF_HEADER_V1):
            raise UserError(f"{path}: header must be {','.join(OOF_HEADER)}, got {header}")
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            try:
                if len(rec) != len(header):
                    raise ValueError
                key, clip, start, label, score, fold, repeat = _oof_tuple(rec)
            except (ValueError, TypeError):
                raise UserError(f"{path}:{lineno}: bad row {rec}") from None
            rows.append({"key": key, "clip": clip, "start": start, "label": label, "score": score, "fold": fold,
                         "repeat": repeat})  # fmt: skip
    return rows


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """ROC AUC (sklearn ``roc_auc_score``) of scores against 0/1 labels; ``None`` unless both classes are present.

    The one AUROC of the project: folds, frames, clips and inner validation all use it."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    if y.size == 0 or np.unique(y).size < 2:
        return None
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def window_level_auroc(oof_rows: Iterable[Mapping[str, Any]]) -> float | None:
    """Window-level AUROC of the out-of-fold scores; ``None`` when only one class is present."""
    rows = list(oof_rows)
    return auroc([int(r["label"]) for r in rows], [float(r["score"]) for r in rows])


def max_over_covering(
    clips: Sequence[str], frames: np.ndarray, labels: np.ndarray, scores: np.ndarray, folds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The frame rule of every frame-level number: flat (clip, frame, label, score, fold) entries, one per window
    and frame it covers, reduced to one per frame (``clip``, ``frame``) with the max of its labels and of its
    windows' scores, and the fold of its first entry (the first window covering it). Returns (clips, frames,
    labels, scores, folds), sorted by (clip, frame)."""
    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    if not frames.size:
        return np.zeros(0, str), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    names, clip_ids = np.unique(np.asarray(clips, dtype=object).astype(str), return_inverse=True)
    span = int(frames.max()) + 1
    keys = clip_ids.reshape(-1).astype(np.int64) * span + frames
    index, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    best, label = np.full(index.size, -np.inf), np.zeros(index.size, np.int64)
    np.maximum.at(best, inverse, np.asarray(scores, dtype=np.float64).reshape(-1))
    np.maximum.at(label, inverse, np.asarray(labels, dtype=np.int64).reshape(-1))
    return names[index // span], index % span, label, best, np.asarray(folds, dtype=np.int64).reshape(-1)[first]


def frame_auroc(clips: Sequence[str], starts: np.ndarray, frame_labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Frame AUROC of window scores by the frame rule (:func:`max_over_covering`, as the report's): frame
    ``start + t`` of a clip gets the max score over the windows covering it and the max of their labels for it.
    ``frame_labels`` is ``[N, T]`` (one row per window). For choices made inside a fold (``--prior-share nested``)."""
    frame_labels = np.asarray(frame_labels, dtype=np.int64)
    if not frame_labels.size:
        return None
    n, t = frame_labels.shape
    frames = (np.asarray(starts, dtype=np.int64)[:, None] + np.arange(t)).reshape(-1)
    per_frame = max_over_covering(
        np.repeat(np.asarray(clips, dtype=object), t), frames, frame_labels, np.repeat(np.asarray(scores), t),
        np.zeros(n * t, np.int64),
    )  # fmt: skip
    return auroc(per_frame[2], per_frame[3])
