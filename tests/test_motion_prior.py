"""The motion prior (``transfer --motion-prior``): the energy it measures, how it enters the logits, and its option
checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddp_vad.errors import UserError
from ddp_vad.models import build_lrcn, model_config_for
from ddp_vad.motion import EPS, TOPK, MotionPrior, cell_size, motion_energy, window_energies
from ddp_vad.train.transfer import TransferConfig


def _moving_square(t: int = 10, h: int = 120, w: int = 182, step: int = 6) -> np.ndarray:
    """A 16-pixel bright square crossing a dark frame, ``step`` pixels per frame (uint8 [t, h, w])."""
    frames = np.zeros((t, h, w), np.uint8)
    for i in range(t):
        frames[i, 50:66, 10 + step * i : 26 + step * i] = 200
    return frames


def test_energy_is_the_log_of_the_top_cells_mean_difference():
    frames = _moving_square()
    x = frames.astype(np.float64) / 255
    cell = cell_size(120)
    assert cell == 8
    expected = []
    for t in range(1, len(x)):
        d = np.abs(x[t] - x[t - 1])[: 120 // cell * cell, : 182 // cell * cell]
        means = d.reshape(120 // cell, cell, 182 // cell, cell).mean(axis=(1, 3)).ravel()
        expected.append(np.sort(means)[-TOPK:].mean())
    got = window_energies(frames[None])
    np.testing.assert_allclose(got, [np.log(np.mean(expected) + EPS)], rtol=1e-5)


def test_energy_grows_with_motion_and_a_still_window_is_finite():
    still = np.full((1, 10, 120, 182), 90, np.uint8)
    slow, fast = _moving_square(step=1)[None], _moving_square(step=6)[None]
    e_still, e_slow, e_fast = (float(window_energies(w)[0]) for w in (still, slow, fast))
    assert e_still == pytest.approx(np.log(EPS))
    assert e_still < e_slow < e_fast


def test_prior_shifts_the_log_odds_by_its_weight_times_the_energy_above_the_mean():
    prior = MotionPrior()
    x = torch.from_numpy(np.stack([_moving_square(step=1), _moving_square(step=6)])).float().div(255).unsqueeze(2)
    logits = torch.tensor([[0.2, -0.1], [1.0, 0.5]])
    assert torch.equal(prior(x, logits), logits)  # weight 0: untouched until calibration sets it
    prior.set(mean=-3.0, weight=0.5)
    out = prior(x, logits)
    shift = (out[:, 1] - out[:, 0]) - (logits[:, 1] - logits[:, 0])
    torch.testing.assert_close(shift, 0.5 * (motion_energy(x) + 3.0))
    torch.testing.assert_close(torch.softmax(out, 1)[:, 1], torch.sigmoid(out[:, 1] - out[:, 0]))


def test_the_prior_is_part_of_the_weights_and_off_while_training():
    cfg = model_config_for("tiny", {"window": 10, "height": 24, "width": 36}, motion_prior=True)
    model = build_lrcn(cfg)
    assert {"prior.mean", "prior.weight"} <= set(model.state_dict())
    model.prior.set(mean=0.0, weight=100.0)
    x = torch.rand(3, 10, 1, 24, 36)
    model.eval()
    assert not torch.allclose(model(x), model.head(model.features(x)))  # scoring adds it
    model.train()
    torch.manual_seed(0)
    trained_view = model(x)
    torch.manual_seed(0)  # the same dropout draws
    torch.testing.assert_close(trained_view, model.head(model.features(x)))  # training never sees it
    assert (
        "prior.mean" not in build_lrcn(model_config_for("tiny", {"window": 10, "height": 24, "width": 36})).state_dict()
    )


def test_options_are_checked(tiny_shards, tmp_path):
    common = dict(shards=str(tiny_shards), out=str(tmp_path / "run"), source="scratch", preset="tiny")
    assert TransferConfig(**common).motion_prior == "energy"
    assert TransferConfig(**common, calibrate="none").motion_prior == "none"
    with pytest.raises(UserError, match="--motion-prior energy needs --calibrate normal"):
        TransferConfig(**common, calibrate="none", motion_prior="energy")
    with pytest.raises(UserError, match="--motion-prior bogus"):
        TransferConfig(**common, motion_prior="bogus")
