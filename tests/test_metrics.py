"""Metric definitions, undefined cases, metrics.json / oof_scores.csv formats (docs/run-folders.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ddp_vad.errors import UserError
from ddp_vad.eval.frame_scores import frame_level_auroc, frame_level_scores, frames_by_repeat
from ddp_vad.train.metrics import (
    OOF_HEADER,
    binary_metrics,
    read_cv_results,
    read_oof_scores,
    summarise_folds,
    window_level_auroc,
    write_cv_results,
)


def test_binary_metrics_hand_computed():
    # TP=3, FN=1, FP=2, TN=4 (n=10)
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    m = binary_metrics(y_true, y_pred)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n_test"]) == (3, 1, 2, 4, 10)
    assert m["recall"] == pytest.approx(3 / 4)  # TP/(TP+FN), not the misprinted TP/(TP+FP)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert "note" not in m


def test_binary_metrics_undefined_are_none_with_reason():
    no_pos = binary_metrics([0, 0, 0], [0, 1, 0])
    assert no_pos["recall"] is None and no_pos["f1"] is None
    assert no_pos["precision"] == 0.0 and no_pos["accuracy"] == pytest.approx(2 / 3)
    assert "no anomalous windows" in no_pos["note"]

    no_pred = binary_metrics([1, 0, 1], [0, 0, 0])
    assert no_pred["precision"] is None
    assert no_pred["recall"] == 0.0 and no_pred["f1"] == 0.0  # anomalies existed, none found
    assert "nothing predicted anomalous" in no_pred["note"]

    empty = binary_metrics([], [])
    assert all(empty[k] is None for k in ("recall", "precision", "accuracy", "f1"))

    with pytest.raises(ValueError, match=r"labels must be 0/1, got \[2\]"):
        binary_metrics([0, 2], [0, 1])


def test_summarise_folds_skips_undefined_and_uses_population_std():
    rows = [
        {"recall": 0.5, "precision": 1.0, "accuracy": 0.6, "f1": None},
        {"recall": 1.0, "precision": None, "accuracy": 0.8, "f1": None},
        {"recall": None, "precision": 0.5, "accuracy": 1.0, "f1": None},
    ]
    mean, std = summarise_folds(rows)
    assert mean["recall"] == pytest.approx(0.75) and std["recall"] == pytest.approx(0.25)
    assert mean["precision"] == pytest.approx(0.75) and std["precision"] == pytest.approx(0.25)
    assert mean["accuracy"] == pytest.approx(0.8)
    assert std["accuracy"] == pytest.approx(math.sqrt(((0.2) ** 2 + 0 + 0.2**2) / 3))
    assert mean["f1"] is None and std["f1"] is None


def _fold_rows():
    a = {"fold": 1, **binary_metrics([1, 0, 1, 0], [1, 0, 0, 0])}
    b = {"fold": 0, **binary_metrics([0, 0], [0, 1])}  # no anomalies: recall/f1 undefined
    return [a, b]


def test_write_and_read_cv_results_format(tmp_path):
    oof = [
        {"key": "Test002_0003", "clip": "Test002", "start": 3, "label": 1, "score": 0.9, "fold": 1},
        ("Test001_0000", "Test001", 0, 0, np.float32(0.25), 0),
    ]
    write_cv_results(tmp_path, "logreg", "clip", _fold_rows(), oof, extra={"n_folds": 2})
    raw = json.loads((tmp_path / "metrics.json").read_text())
    assert raw["method"] == "logreg" and raw["protocol"] == "clip" and raw["n_folds"] == 2
    assert [f["fold"] for f in raw["folds"]] == [0, 1]  # sorted by fold
    for f in raw["folds"]:
        assert {"fold", "recall", "precision", "accuracy", "f1", "n_test"} <= set(f)
    assert raw["folds"][0]["recall"] is None and raw["folds"][0]["f1"] is None  # JSON null
    assert "null" in (tmp_path / "metrics.json").read_text()
    assert raw["mean"]["recall"] == pytest.approx(0.5)  # fold 1 only
    assert raw["n_defined"]["recall"] == 1 and raw["n_defined"]["accuracy"] == 2
    assert raw["mean"]["accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    assert raw["std"]["accuracy"] == pytest.approx(0.125)

    lines = (tmp_path / "oof_scores.csv").read_text().splitlines()
    assert lines[0] == "key,clip,start,label,score,fold,repeat" == ",".join(OOF_HEADER)
    assert lines[1] == "Test001_0000,Test001,0,0,0.25,0,0"  # sorted by key; rows without a repeat are repeat 0
    rows = read_oof_scores(tmp_path)
    assert rows[1] == {
        "key": "Test002_0003",
        "clip": "Test002",
        "start": 3,
        "label": 1,
        "score": 0.9,
        "fold": 1,
        "repeat": 0,
    }
    assert read_cv_results(tmp_path)["folds"][1]["tp"] == 1
    assert not list(tmp_path.glob(".*tmp"))  # temp files renamed away


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        read_cv_results(tmp_path)
    (tmp_path / "oof_scores.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="header"):
        read_oof_scores(tmp_path)


def test_frame_level_scores_max_over_covering_windows():
    # Clip A, window length 3: windows at 0 and 2 overlap on frame 2.
    oof = [
        {"key": "A_0000", "clip": "A", "start": 0, "label": 0, "score": 0.2},
        {"key": "A_0002", "clip": "A", "start": 2, "label": 1, "score": 0.7},
        {"key": "B_0000", "clip": "B", "start": 0, "label": 0, "score": 0.4},
    ]
    labels = {"A_0000": [0, 0, 1], "A_0002": [1, 1, 1], "B_0000": [0, 0, 0]}
    y, s, index = frame_level_scores(oof, labels)
    got = dict(zip(index, zip(y.tolist(), s.tolist(), strict=True), strict=True))
    assert got[("A", 0)] == (0, 0.2)
    assert got[("A", 2)] == (1, 0.7)  # max of 0.2 and 0.7
    assert got[("A", 4)] == (1, 0.7)
    assert ("A", 5) not in got and len(index) == 8
    # positives (A2, A3, A4) all 0.7; negatives A0, A1 = 0.2, B0..B2 = 0.4 -> perfectly separated
    assert frame_level_auroc(oof, labels, window=3) == pytest.approx(1.0)

    # Flipped window scores 0.8 / 0.3 / 0.6: frame A2 takes max(0.8, 0.3) = 0.8. Positives 0.8, 0.3, 0.3;
    # negatives 0.8, 0.8, 0.6, 0.6, 0.6 -> pairs won: 3 + 2 ties * 0.5 = 4 of 15.
    flipped = [dict(r, score=1 - r["score"]) for r in oof]
    assert frame_level_auroc(flipped, labels) == pytest.approx(4 / 15)
    assert frame_level_auroc(oof[2:], labels) is None  # one class only
    assert window_level_auroc(oof) == pytest.approx(1.0)
    assert window_level_auroc(oof[2:]) is None


def test_a_frame_belongs_to_the_fold_of_the_first_window_covering_it_and_repeats_stay_apart():
    """The per-fold frame AUROCs rest on each frame's fold: under window-level folds two folds' windows can cover
    one frame, and it goes to the first of them; each repeat's frames are reduced on their own."""
    oof = [
        {"key": "A_0000", "clip": "A", "start": 0, "score": 0.2, "fold": 1, "repeat": 0},
        {"key": "A_0002", "clip": "A", "start": 2, "score": 0.7, "fold": 0, "repeat": 0},
        {"key": "B_0000", "clip": "B", "start": 0, "score": 0.4, "fold": 2, "repeat": 0},
        {"key": "A_0002", "clip": "A", "start": 2, "score": 0.1, "fold": 3, "repeat": 1},
    ]
    labels = {"A_0000": [0, 0, 1], "A_0002": [1, 1, 1], "B_0000": [0, 0, 0]}
    by_repeat = frames_by_repeat(oof, labels)
    first = by_repeat[0]
    assert list(zip(first.clips.tolist(), first.frames.tolist(), first.folds.tolist(), strict=True)) == [
        ("A", 0, 1), ("A", 1, 1), ("A", 2, 1), ("A", 3, 0), ("A", 4, 0), ("B", 0, 2), ("B", 1, 2), ("B", 2, 2),
    ]  # fmt: skip
    assert first.scores.tolist() == [0.2, 0.2, 0.7, 0.7, 0.7, 0.4, 0.4, 0.4]
    second = by_repeat[1]
    assert second.frames.tolist() == [2, 3, 4] and second.folds.tolist() == [3, 3, 3]
    assert second.scores.tolist() == [0.1, 0.1, 0.1]  # repeat 0's 0.7 does not leak into repeat 1
