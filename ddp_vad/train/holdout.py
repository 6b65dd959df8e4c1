"""Leave-one-anomaly-type-out (``transfer --holdout-type TYPE``): which windows are held out of every training fold,
how each fold classified them, and the run's summary in ``metrics.json``."""

from __future__ import annotations

import numpy as np

from ddp_vad.data.reader import WindowSet
from ddp_vad.errors import UserError


def holdout_mask(ws: WindowSet, holdout_type: str | None) -> np.ndarray:
    """Windows whose anomaly types include ``holdout_type`` (all False without one)."""
    if holdout_type is None:
        return np.zeros(len(ws), bool)
    mask = np.array([holdout_type in types for types in ws.anomaly_types], bool)
    if not mask.any():
        known = sorted({t for ts in (ws.manifest.get("anomaly_types") or {}).values() for t in ts})
        known = known or sorted({t for ts in ws.anomaly_types for t in ts})
        listing = ", ".join(known) if known else "none: build the shards with --anomaly-types JSON"
        raise UserError(f"--holdout-type {holdout_type}: no window has that anomaly type (available: {listing})")
    return mask


def holdout_part(
    holdout_type: str | None,
    held_out: np.ndarray,
    labels: np.ndarray,
    test_idx: np.ndarray,
    preds: np.ndarray,
    n_excluded: int,
) -> dict | None:
    """How one fold classified the held-out windows of its test fold (None without ``--holdout-type``)."""
    if holdout_type is None:
        return None
    sel = held_out[test_idx]
    labels, pred = labels[test_idx][sel], preds[sel]
    return {
        "n": int(sel.sum()),
        "n_anomalous": int(labels.sum()),
        "correct": int((pred == labels).sum()),
        "predicted_anomalous": int(pred.sum()),
        "detected": int(((pred == 1) & (labels == 1)).sum()),
        "excluded_from_training": n_excluded,
    }


def holdout_summary(holdout_type: str, gathered: list[dict]) -> dict:
    """The run's held-out summary for ``metrics.json``, from every fold's :func:`holdout_part`."""
    per_fold = [{"fold": r["fold"], **r["holdout"]} for r in gathered]
    n = sum(p["n"] for p in per_fold)
    n_anom = sum(p["n_anomalous"] for p in per_fold)
    return {
        "type": holdout_type,
        "n": n,
        "n_anomalous": n_anom,
        "accuracy": sum(p["correct"] for p in per_fold) / n if n else None,
        "detection_rate": sum(p["detected"] for p in per_fold) / n_anom if n_anom else None,
        "predicted_anomalous": sum(p["predicted_anomalous"] for p in per_fold) / n if n else None,
        "per_fold": per_fold,
        "note": "held-out windows are removed from every training fold and scored in their own test fold; "
        "accuracy uses their labels, detection_rate = held-out anomalous windows predicted anomalous",
    }
