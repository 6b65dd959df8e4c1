"""Per-fold calibration on normal footage (``transfer --calibrate normal``, the default): the map folded into the
head and the motion prior (``--motion-prior energy``, the default), each saved fold model standardised on the train
clips' windows, the out-of-fold scores the saved model's own,
training untouched, and the fallback for shards without train clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torch_threads, write_ucsd

from ddp_vad.data.reader import frames_to_float, load_window_set
from ddp_vad.models import build_lrcn, model_config_for
from ddp_vad.motion import window_energies
from ddp_vad.train.calibration import (
    MIN_ENERGY_SPREAD,
    TEMPERATURE,
    Z99,
    calibrated_log_odds,
    fold_calibration_into_head,
    reference_windows,
)
from ddp_vad.train.fold_steps import predict
from ddp_vad.train.metrics import read_oof_scores
from ddp_vad.train.transfer import TransferConfig, run_transfer
from ddp_vad.weights import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def _log_odds(model, frames: np.ndarray) -> np.ndarray:
    inputs = lambda idx: frames_to_float(torch.from_numpy(frames[idx]))  # noqa: E731
    return predict(model, model, inputs, np.arange(len(frames)), no_autocast)[2]


@pytest.mark.parametrize("pooling", ["topk", "cells", "flatten"])
def test_folded_map_is_the_affine_calibration(pooling):
    cfg = model_config_for("tiny", {"window": 10, "height": 24, "width": 36}, pooling=pooling, topk=2)
    torch.manual_seed(0)
    model = build_lrcn(cfg).eval()
    frames = np.random.default_rng(0).integers(0, 256, (6, cfg.window, 24, 36), dtype=np.uint8)
    before = _log_odds(model, frames)
    after = _log_odds(fold_calibration_into_head(model, gain=20.0, bias=-6.0), frames)
    np.testing.assert_allclose(after, 20.0 * before - 6.0, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(_log_odds(model, frames), before)  # the original is left as it was


def _run(shards: Path, out: Path, calibrate: str, motion_prior: str | None = None) -> Path:
    cfg = TransferConfig(
        shards=str(shards), out=str(out), source="scratch", preset="tiny", epochs=1, batch_size=8, protocol="window",
        progress=False, calibrate=calibrate, motion_prior=motion_prior,
    )  # fmt: skip
    with torch_threads(1):
        return run_transfer(cfg)


def _fold_models(run: Path) -> dict[int, torch.nn.Module]:
    return {
        int(f.parent.name.split("_")[1]): load_model(f, build_lrcn)[0].eval()
        for f in sorted((run / "folds").glob("fold_*/model.safetensors"))
    }


def test_each_fold_is_standardised_on_the_train_clips(tiny_run, tiny_shards):
    reference = reference_windows(tiny_shards, seed=0)
    assert reference is not None and len(reference) == 44 - 2 * 9  # every window of Train001 and Train002
    models = _fold_models(tiny_run)
    assert len(models) == 4
    for k, model in models.items():
        d = _log_odds(model, reference)
        # in every fold the normal footage's mean sits Z99 spreads below P = 0.5 (log-odds 0), a spread is 1 / T
        assert abs(d.mean() * TEMPERATURE + Z99) < 1e-3 and abs(d.std() * TEMPERATURE - 1) < 1e-3, k
        record = json.loads((tiny_run / "folds" / f"fold_{k:02d}" / "result.json").read_text())["calibration"]
        assert record["source"] == "train clips" and record["windows"] == len(reference) and record["gain"] > 0


def test_oof_scores_are_the_saved_models_scores(tiny_run, tiny_shards):
    ws = load_window_set(tiny_shards)  # protocol window: the kept windows
    index = {key: i for i, key in enumerate(ws.keys)}
    models = _fold_models(tiny_run)
    rows = read_oof_scores(tiny_run)
    for k, model in models.items():
        record = json.loads((tiny_run / "folds" / f"fold_{k:02d}" / "result.json").read_text())["calibration"]
        mine = [r for r in rows if int(r["fold"]) == k]
        saved = _log_odds(model, ws.frames[[index[r["key"]] for r in mine]])
        p = np.array([r["score"] for r in mine])
        oof = np.log(p) - np.log1p(-p)
        # compared on the raw model's scale: the calibration multiplies float32 rounding by the gain (~1e3 here)
        np.testing.assert_allclose(oof / record["gain"], saved / record["gain"], atol=1e-5)


def test_calibration_is_the_affine_map_plus_the_motion_prior(tiny_run, tiny_shards, tmp_path):
    """The same training without calibration (and so without the prior): the calibrated model's log-odds are the raw
    ones mapped affinely, plus the prior's weight times the window's motion energy above normal footage's mean."""
    raw = _run(tiny_shards, tmp_path / "raw", "none")
    assert "calibration" not in json.loads((raw / "folds" / "fold_00" / "result.json").read_text())
    frames = load_window_set(tiny_shards).frames
    energies = window_energies(frames)
    for k, (calibrated, plain) in enumerate(
        zip(_fold_models(tiny_run).values(), _fold_models(raw).values(), strict=True)
    ):
        assert plain.prior is None and calibrated.prior is not None
        record = json.loads((tiny_run / "folds" / f"fold_{k:02d}" / "result.json").read_text())["calibration"]
        expected = calibrated_log_odds(_log_odds(plain, frames), record, energies)
        np.testing.assert_allclose(_log_odds(calibrated, frames), expected, rtol=1e-4, atol=1e-3)


def test_the_prior_and_the_classifier_weigh_by_the_share_on_normal_footage(tiny_run, tiny_shards):
    """Two z-scores combined with the prior's share a: on the normal footage the classifier's part of the calibrated
    log-odds has spread 2 (1 - a) / (T s), s the spread of the combination, and the prior's weight is 2 a / (T s) per
    spread of log energy (floored at MIN_ENERGY_SPREAD: the tiny clips' energies barely vary)."""
    reference = reference_windows(tiny_shards, seed=0)
    energies = window_energies(reference)
    for k, model in _fold_models(tiny_run).items():
        record = json.loads((tiny_run / "folds" / f"fold_{k:02d}" / "result.json").read_text())["calibration"]
        motion = record["motion"]
        share = motion["share"]
        per_spread = 1 / (TEMPERATURE * motion["sum_spread"])
        assert motion["spread"] == pytest.approx(max(energies.std(), MIN_ENERGY_SPREAD))
        assert motion["mean"] == pytest.approx(energies.mean())
        assert motion["weight"] * motion["spread"] == pytest.approx(2 * share * per_spread)
        classifier_part = _log_odds(model, reference) - motion["weight"] * (energies - motion["mean"])
        expected = 2 * (1 - share) * per_spread
        assert abs(classifier_part.std() - expected) < 1e-2 * per_spread, k


def test_without_the_prior_calibration_changes_the_scale_only(tiny_shards, tmp_path):
    calibrated = _run(tiny_shards, tmp_path / "calibrated", "normal", motion_prior="none")
    raw = _run(tiny_shards, tmp_path / "raw", "none")
    frames = load_window_set(tiny_shards).frames
    for k, (model, plain) in enumerate(zip(_fold_models(calibrated).values(), _fold_models(raw).values(), strict=True)):
        assert model.prior is None
        record = json.loads((calibrated / "folds" / f"fold_{k:02d}" / "result.json").read_text())["calibration"]
        assert "motion" not in record
        expected = record["gain"] * _log_odds(plain, frames) + record["bias"]
        np.testing.assert_allclose(_log_odds(model, frames), expected, rtol=1e-4, atol=1e-3)


def test_shards_without_train_clips_calibrate_on_the_folds_normal_windows(tmp_path):
    from ddp_vad.data.shards import ShardConfig, build_shards

    clips = {"Test001": (24, [(8, 20)]), "Test002": (22, [(1, 6), (15, 22)]), "Test004": (26, [(10, 26)]),
             "Test005": (24, [(2, 9)])}  # fmt: skip
    data = write_ucsd(tmp_path / "data", clips)
    shards = build_shards(
        ShardConfig(data=str(data), out=str(tmp_path / "shards"), height=24, width=36, folds=2, workers=1),
        show_progress=False,
    )
    assert reference_windows(shards, seed=0) is None
    run = _run(shards, tmp_path / "run", "normal")
    result = json.loads((run / "folds" / "fold_00" / "result.json").read_text())
    assert result["calibration"]["source"] == "the fold's normal training windows"
    assert any("no train clips" in note for note in result["notes"])
