"""``baselines`` on tiny shards: output folders and format, fold bookkeeping, resume, bad input."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from click.testing import CliRunner

from ddp_vad.cli import cli
from ddp_vad.data.reader import load_window_set
from ddp_vad.errors import UserError
from ddp_vad.eval.baselines import BaselinesConfig, make_estimator, run_baselines
from ddp_vad.eval.features import feature_size, motion_features, window_features
from ddp_vad.motion import window_energies
from ddp_vad.train.metrics import read_oof_scores

METHODS = ["logreg", "svm", "rf", "knn", "nb"]


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory):
    """Shards of a tiny synthetic dataset (5 clips, 24x36, 4 folds), built once."""
    from ddp_vad.data.shards import ShardConfig, build_shards
    from ddp_vad.data.synth import SynthConfig, run_synth

    root = tmp_path_factory.mktemp("synth")
    run_synth(SynthConfig(out=str(root / "data"), train_clips=2, test_clips=3, frames=30, height=48, width=72, seed=0))
    cfg = ShardConfig(data=str(root / "data"), out=str(root / "shards"), height=24, width=36, folds=4, workers=1)
    return build_shards(cfg, show_progress=False)


@pytest.fixture(scope="module")
def window_run(synth_shards, tmp_path_factory):
    """Every method once, protocol window, two folds at a time (one thread per estimator)."""
    out = tmp_path_factory.mktemp("baselines") / "bl"
    run_baselines(BaselinesConfig(shards=str(synth_shards), out=str(out), rf_trees=20, protocol="window", n_jobs=2))
    return out


def test_outputs_format_and_folds(window_run, synth_shards):
    ws = load_window_set(synth_shards)
    fold_of = dict(zip(ws.keys, ws.fold_window.tolist(), strict=True))
    label_of = dict(zip(ws.keys, ws.labels.tolist(), strict=True))
    best = 0.0
    for method in METHODS:
        run = window_run / method
        assert {p.name for p in run.iterdir()} >= {"metrics.json", "oof_scores.csv", "config.json"}
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["protocol"] == "window"
        assert [f["fold"] for f in metrics["folds"]] == [0, 1, 2, 3]
        for f in metrics["folds"]:
            assert {"fold", "recall", "precision", "accuracy", "f1", "n_test"} <= set(f)
            assert f["tp"] + f["fp"] + f["tn"] + f["fn"] == f["n_test"]
        assert sum(f["n_test"] for f in metrics["folds"]) == len(ws) > 0
        assert (
            set(metrics["mean"])
            == set(metrics["std"])
            == {"recall", "precision", "accuracy", "f1", "balanced_accuracy", "window_auroc"}
        )
        # 24x36 shards are smaller than 60x90: used as is, and said so.
        assert metrics["features"]["n_features"] == 10 * 24 * 36 and "smaller than 60x90" in metrics["features"]["note"]

        assert (run / "oof_scores.csv").read_text().splitlines()[0] == "key,clip,start,label,score,fold,repeat"
        oof = read_oof_scores(run)
        assert sorted(r["key"] for r in oof) == sorted(ws.keys)  # every window scored exactly once
        assert all(r["fold"] == fold_of[r["key"]] and r["label"] == label_of[r["key"]] for r in oof)
        assert all(0.0 <= r["score"] <= 1.0 for r in oof)
        # The scores agree with the fold's confusion counts (prediction = score above 0.5).
        tp = sum(r["label"] == 1 and r["score"] > 0.5 for r in oof)
        assert abs(tp - sum(f["tp"] for f in metrics["folds"])) <= 1  # a 0.5 tie may fall either way

        cfg = json.loads((run / "config.json").read_text())
        assert cfg["config"]["shards"] == str(synth_shards) and cfg["method"] == method
        best = max(best, metrics["mean"]["accuracy"])
    assert best >= 0.8  # balanced classes: chance is 0.5


def test_resume_skips_finished_methods(window_run, synth_shards, capsys):
    before = (window_run / "nb" / "metrics.json").stat().st_mtime_ns
    run_baselines(BaselinesConfig(shards=str(synth_shards), out=str(window_run), methods="nb", protocol="window"))
    assert (window_run / "nb" / "metrics.json").stat().st_mtime_ns == before
    assert "already done" in capsys.readouterr().out
    with pytest.raises(UserError, match="protocol 'window'"):
        run_baselines(BaselinesConfig(shards=str(synth_shards), out=str(window_run), methods="nb", protocol="clip"))


def test_clip_protocol_undefined_fold_is_null(synth_shards, tmp_path):
    run_baselines(BaselinesConfig(shards=str(synth_shards), out=str(tmp_path), methods="logreg", protocol="clip"))
    metrics = json.loads((tmp_path / "logreg" / "metrics.json").read_text())
    oof = read_oof_scores(tmp_path / "logreg")
    clip_folds = {}
    for r in oof:
        clip_folds.setdefault(r["clip"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in clip_folds.values())  # no clip on both sides
    no_anomaly = [f for f in metrics["folds"] if f["tp"] + f["fn"] == 0]
    assert no_anomaly, "the tiny set has a fold made of a train clip only (Train002)"
    for f in no_anomaly:
        assert f["recall"] is None and f["f1"] is None and "no anomalous windows" in f["note"]
    assert metrics["n_defined"]["recall"] == len(metrics["folds"]) - len(no_anomaly)


def test_window_features_resize():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 10, 120, 182), dtype=np.uint8)
    x = window_features(frames, 60, 90, chunk=2)
    assert x.shape == (3, 54_000) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # A constant window stays constant after resizing.
    flat = window_features(np.full((1, 10, 120, 182), 51, np.uint8), 60, 90)
    assert np.allclose(flat, 51 / 255, atol=1e-6)
    assert feature_size(120, 182, 60, 90) == (60, 90, None)
    assert feature_size(24, 36, 60, 90)[:2] == (24, 36)


def test_bad_config(synth_shards, tmp_path):
    with pytest.raises(UserError, match="--methods"):
        BaselinesConfig(shards=str(synth_shards), out=str(tmp_path), methods="logreg,tree")
    with pytest.raises(UserError, match="--folds 5"):
        run_baselines(BaselinesConfig(shards=str(synth_shards), out=str(tmp_path), folds=5, protocol="window"))
    result = CliRunner().invoke(cli, ["baselines", "--shards", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error:") and str(tmp_path / "none") in result.output


def test_motion_methods_run_on_frame_difference_energy(window_run, synth_shards):
    # The default method list includes the motion baselines; their features are a few dozen numbers per window.
    for method in ("motion-logreg", "motion-gb"):
        metrics = json.loads((window_run / method / "metrics.json").read_text())
        assert metrics["features"]["kind"] == "motion" and metrics["features"]["n_features"] == 9 + 2 * 24
        assert sum(f["n_test"] for f in metrics["folds"]) == len(load_window_set(synth_shards))


def test_motion_energy_scores_follow_the_windows_energy(window_run, synth_shards):
    # One feature, a logistic fit per fold: within a fold the scores rank the windows exactly as their energy does.
    metrics = json.loads((window_run / "motion-energy" / "metrics.json").read_text())
    assert metrics["features"]["kind"] == "energy" and metrics["features"]["n_features"] == 1
    ws = load_window_set(synth_shards)
    energy = dict(zip(ws.keys, window_energies(ws.frames).tolist(), strict=True))
    rows = read_oof_scores(window_run / "motion-energy")
    assert len(rows) == len(ws)
    for fold in {int(r["fold"]) for r in rows}:
        mine = sorted((r for r in rows if int(r["fold"]) == fold), key=lambda r: energy[r["key"]])
        scores = [r["score"] for r in mine]
        assert scores == sorted(scores) or scores == sorted(scores, reverse=True), fold


def test_motion_features_measure_frame_differences():
    frames = np.zeros((2, 10, 24, 36), np.uint8)
    frames[1, 5:, :6, :6] = 255  # window 1: the top-left cell (6x6 pixels) lights up between frames 4 and 5
    x = motion_features(frames)
    assert x.shape == (2, 9 + 2 * 24) and not x[0].any()
    per_step, cell_mean, cell_max = x[1, :9], x[1, 9:33], x[1, 33:]
    assert np.flatnonzero(per_step).tolist() == [4] and per_step[4] == pytest.approx(36 / (24 * 36))
    assert np.flatnonzero(cell_max).tolist() == [0] and cell_max[0] == pytest.approx(1.0)
    assert cell_mean[0] == pytest.approx(1 / 9)


def test_labelled_fraction_is_stratified_seeded_and_nested():
    from ddp_vad.train.crossval import labelled_subset

    labels = np.array([0] * 80 + [1] * 20)
    train = np.arange(100)
    subsets = {f: set(labelled_subset(train, labels, f, seed=3, fold=1).tolist()) for f in (0.05, 0.1, 0.25, 1.0)}
    assert subsets[0.05] <= subsets[0.1] <= subsets[0.25] <= subsets[1.0] == set(range(100))
    assert int(labels[list(subsets[0.1])].sum()) == 2 and len(subsets[0.1]) == 10  # 10% of each class
    assert subsets[0.05] == set(labelled_subset(train, labels, 0.05, seed=3, fold=1).tolist())  # seeded
    assert subsets[0.25] != set(labelled_subset(train, labels, 0.25, seed=4, fold=1).tolist())
    # Each fold draws its own share: the fold is part of the seed, so folds do not all keep the same windows.
    assert subsets[0.25] != set(labelled_subset(train, labels, 0.25, seed=3, fold=2).tolist())


def test_labelled_fraction_run_trains_on_fewer_windows(synth_shards, tmp_path):
    full = json.loads((_run_fraction(synth_shards, tmp_path / "full", 1.0) / "metrics.json").read_text())
    part = json.loads((_run_fraction(synth_shards, tmp_path / "part", 0.25) / "metrics.json").read_text())
    assert part["labelled_fraction"] == 0.25 and full["labelled_fraction"] == 1.0
    for f_full, f_part in zip(full["folds"], part["folds"], strict=True):
        assert f_part["n_test"] == f_full["n_test"]  # same test folds
        assert f_part["n_train"] < f_full["n_train"] / 2
    with pytest.raises(UserError, match="labelled fraction"):
        _run_fraction(synth_shards, tmp_path / "part", 0.5)  # a finished run of another fraction is not mixed in
    with pytest.raises(UserError, match="--labelled-fraction"):
        _run_fraction(synth_shards, tmp_path / "bad", 0.0)


def _run_fraction(shards, out, fraction):
    cfg = BaselinesConfig(
        shards=str(shards), out=str(out), methods="logreg", labelled_fraction=fraction, protocol="window"
    )
    run_baselines(cfg)
    return out / "logreg"


class _Spy:
    """An estimator that records what it was fitted on and asked to score (and predicts the training prior).
    Folds run in threads: each instance keeps its own data and files one record when it scores."""

    calls: list[dict] = []

    def fit(self, x, y):
        self.classes_ = np.unique(y)
        self.prior = float(np.mean(y))
        self.seen = {"x_train": x.copy(), "y_train": np.asarray(y).copy()}
        time.sleep(0.2)  # long enough for the other fold thread to prepare its own fold meanwhile
        self.seen["intact"] = np.array_equal(x, self.seen["x_train"])  # nobody wrote into this fold's rows
        return self

    def predict(self, x):
        _Spy.calls.append({**self.seen, "x_test": x.copy()})
        return np.full(len(x), int(self.prior > 0.5))

    def predict_proba(self, x):
        return np.column_stack([np.full(len(x), 1 - self.prior), np.full(len(x), self.prior)])


@pytest.mark.parametrize("protocol", ["window", "clip"])
def test_each_fold_trains_and_standardises_on_its_training_folds_only(synth_shards, tmp_path, monkeypatch, protocol):
    import ddp_vad.eval.baselines as bl
    from ddp_vad.eval.baselines import Baseline
    from ddp_vad.train.crossval import CVWindows, window_selection

    monkeypatch.setitem(bl.BASELINES, "spy", Baseline("pixels", lambda c: _Spy()))
    monkeypatch.setattr(bl, "METHODS", (*bl.METHODS, "spy"))
    monkeypatch.setattr(_Spy, "calls", [])
    cfg = BaselinesConfig(shards=str(synth_shards), out=str(tmp_path), methods="spy", protocol=protocol, n_jobs=2)
    run_baselines(cfg)
    ws = load_window_set(synth_shards, select=window_selection(protocol))
    cv = CVWindows.from_window_set(ws, protocol)
    x = window_features(ws.frames, 24, 36)  # the shards' size: the features are the pixels in [0, 1]
    folds = sorted(set(cv.fold_of[cv.fold_of >= 0].tolist()))
    assert len(_Spy.calls) == len(folds) >= 2
    for k in folds:
        train = (cv.fold_of != k) & (cv.fold_of >= 0)
        # The fold's test rows, standardised with its training rows' statistics (constant pixels left centred).
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        expected = (x[cv.fold_of == k] - mean) / np.where(std < 1e-6, 1.0, std)
        (call,) = [
            c
            for c in _Spy.calls
            if c["x_test"].shape == expected.shape and np.allclose(c["x_test"], expected, atol=1e-4)
        ]
        assert len(call["x_train"]) == int(train.sum()) and call["intact"]
        assert sorted(call["y_train"].tolist()) == sorted(cv.labels[train].tolist())
        # No scored window is among the training rows (both went through the same standardisation).
        fitted = {row.tobytes() for row in call["x_train"]}
        assert not any(row.tobytes() in fitted for row in call["x_test"])
        # Standardised with the training rows' own statistics: mean 0 and std 1 (or 0, constant pixels) per column.
        xt = call["x_train"].astype(np.float64)
        assert np.abs(xt.mean(axis=0)).max() < 1e-3
        std = xt.std(axis=0)
        assert np.all((np.abs(std - 1) < 1e-3) | (std < 1e-3))


def test_every_baseline_copes_with_a_tiny_training_set(synth_shards, tmp_path):
    # 1% of the labels: one window of each class per fold, fewer than k-NN's 5 neighbours.
    cfg = BaselinesConfig(
        shards=str(synth_shards), out=str(tmp_path), labelled_fraction=0.01, rf_trees=5, protocol="window"
    )
    run_baselines(cfg)
    for method in cfg.method_list:
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert all(f["n_train"] <= 2 for f in metrics["folds"]), method
        assert sum(f["n_test"] for f in metrics["folds"]) > 0
    notes = json.loads((tmp_path / "knn" / "metrics.json").read_text())["notes"]
    assert notes and all(re.fullmatch(r"fold \d: \d training windows < 5 neighbours: k = \d", n) for n in notes)


def test_a_fold_trained_on_one_class_predicts_it_with_a_note(monkeypatch, synth_shards, tmp_path):
    from ddp_vad.eval import baselines as bl

    cfg = BaselinesConfig(shards=str(synth_shards), out=str(tmp_path), methods="knn")
    y = np.zeros(3, np.int64)
    score, pred, note = bl._fit_predict("knn", cfg, np.zeros((3, 4), np.float32), y, np.ones((2, 4), np.float32), 1)
    assert score.tolist() == [0.0, 0.0] and pred.tolist() == [0, 0] and "class 0 only" in note


def test_folds_in_parallel_score_exactly_what_folds_one_by_one_score(window_run, synth_shards, tmp_path):
    # One fold at a time, one thread per estimator as in window_run: nothing may differ but the fold plan.
    cfg = BaselinesConfig(shards=str(synth_shards), out=str(tmp_path), rf_trees=20, protocol="window", n_jobs=1)
    run_baselines(cfg)
    for method in cfg.method_list:
        serial = json.loads((tmp_path / method / "metrics.json").read_text())
        parallel = json.loads((window_run / method / "metrics.json").read_text())
        assert (serial["fold_jobs"], parallel["fold_jobs"]) == (1, 2), method
        assert serial["threads_per_fold"] == parallel["threads_per_fold"] == 1
        assert read_oof_scores(tmp_path / method) == read_oof_scores(window_run / method), method  # bit for bit
        drop = {"seconds"}
        assert [{k: v for k, v in f.items() if k not in drop} for f in serial["folds"]] == [
            {k: v for k, v in f.items() if k not in drop} for f in parallel["folds"]
        ], method
        assert serial["warnings"] == parallel["warnings"], method
        assert not any("n_jobs" in w for w in parallel["warnings"]), method  # set only where the estimator uses it
    # Warnings raised in the fold threads are collected (SGD stops at max_iter on this data).
    assert any(
        "ConvergenceWarning" in w for w in json.loads((window_run / "svm" / "metrics.json").read_text())["warnings"]
    )


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("method", ["svm", "knn", "nb"])
def test_scores_are_those_of_the_plain_serial_loop(window_run, synth_shards, method):
    """The computation before folds ran in threads: per fold, standardise on the training rows, fit, then predict and
    score separately (k-NN's predict and predict_proba each computing the distances). Same scores, bit for bit."""
    from ddp_vad.eval.baselines import anomaly_scores, make_estimator
    from ddp_vad.eval.features import mean_std, standardise_
    from ddp_vad.train.crossval import CVWindows, fold_split

    ws = load_window_set(synth_shards)
    cv = CVWindows.from_window_set(ws, "window")
    x = window_features(ws.frames, 24, 36)
    cfg = BaselinesConfig(shards=str(synth_shards), out="unused", protocol="window")
    oof = {r["key"]: r for r in read_oof_scores(window_run / method)}
    folds = json.loads((window_run / method / "metrics.json").read_text())["folds"]
    for k in range(cv.n_units):
        train, test, _ = fold_split(cv, k)
        x_train, x_test = x[train], x[test]
        mean, std = mean_std(x_train)
        standardise_(x_train, mean, std)
        standardise_(x_test, mean, std)
        model = make_estimator(method, cfg).fit(x_train, cv.labels[train])
        pred = model.predict(x_test)
        assert [oof[cv.keys[i]]["score"] for i in test] == anomaly_scores(model, x_test).tolist()
        assert folds[k]["tp"] == int(((pred == 1) & (cv.labels[test] == 1)).sum())
        assert folds[k]["fp"] == int(((pred == 1) & (cv.labels[test] == 0)).sum())


@pytest.mark.parametrize("method", ["rf", "knn"])
def test_one_pass_predicts_what_the_estimators_predict_says_ties_included(synth_shards, monkeypatch, method):
    # rf and knn take scores and classes from one predict_proba; the classes must be the estimator's own predict.
    from ddp_vad.eval import baselines as bl

    if method == "knn":  # an even k: 2-2 votes are ties, which predict gives to class 0 (the first of the argmax)
        knn4 = lambda c: bl._sk("neighbors.KNeighborsClassifier")(n_neighbors=4, algorithm="brute")  # noqa: E731
        monkeypatch.setitem(bl.BASELINES, "knn", bl.Baseline("pixels", knn4, predict_from_proba=True))
    assert bl.BASELINES[method].predict_from_proba
    cfg = BaselinesConfig(shards=str(synth_shards), out="unused", rf_trees=7)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (40, 6)).astype(np.float32)
    y = (rng.random(40) < 0.5).astype(np.int64)
    x_test = rng.integers(0, 3, (200, 6)).astype(np.float32)
    score, pred, _ = bl._fit_predict(method, cfg, x, y, x_test, 1)
    model = bl.make_estimator(method, cfg, 1).fit(x, y)
    assert pred.tolist() == model.predict(x_test).tolist()
    assert score.tolist() == model.predict_proba(x_test)[:, 1].tolist()
    assert method == "rf" or (score == 0.5).any()  # k-NN's ties are there


def test_fold_plan_shares_the_cores_and_respects_memory():
    from ddp_vad.eval.fold_threads import cores, fold_plan

    gib = 2**30
    assert fold_plan(2, 5, gib, None) == (2, 1)  # 2 cores, 5 folds: two folds at once, one thread each
    assert fold_plan(8, 2, gib, None) == (2, 4)  # more cores than folds: the rest go to the estimators
    assert fold_plan(1, 5, gib, None) == (1, 1)
    assert fold_plan(8, 10, gib, int(2.5 * gib)) == (2, 4)  # 80% of 2.5 GiB holds two 1 GiB folds
    assert fold_plan(8, 10, 4 * gib, gib) == (1, 8)  # not even one: still one fold at a time
    assert fold_plan(None, 100, 1, None)[0] == fold_plan(-1, 100, 1, None)[0] == cores(None) >= 1


def test_the_forest_size_is_named_where_the_run_is_described(window_run, synth_shards):
    # 50 trees since issue 22's budget (100 before): config.json and metrics.json say which forest scored.
    cfg = BaselinesConfig(shards=str(synth_shards), out="unused")
    assert cfg.rf_trees == 50 and "n_estimators=50" in repr(make_estimator("rf", cfg))
    metrics = json.loads((window_run / "rf" / "metrics.json").read_text())
    assert "n_estimators=20" in metrics["estimator"]  # window_run asks for 20
