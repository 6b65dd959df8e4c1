"""GAN health: the discriminator's win rate and the similarity curve are watched, warned about once, reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddp_vad.train.gan import STAT_NAMES
from ddp_vad.train.gan_health import GanHealth
from ddp_vad.train.pretrain import PretrainConfig, run_pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(d_real: float, d_fake: float, n: int) -> np.ndarray:
    return np.tile([0.01, 6.0, d_real, d_fake, 0.1, 0.2], (n, 1))


def test_a_sustained_outright_win_is_warned_about_once():
    health = GanHealth(total_steps=300)
    assert health.sustained == 50
    assert health.observe_steps(_rows(0.99, 0.01, 49), 1, STAT_NAMES) == []  # 49 steps: not yet sustained
    assert health.observe_steps(_rows(0.5, 0.5, 1), 50, STAT_NAMES) == []  # the streak breaks
    warned = health.observe_steps(_rows(0.99, 0.01, 60), 51, STAT_NAMES)
    assert len(warned) == 1 and "wins outright" in warned[0] and "step 100" in warned[0]
    assert health.observe_steps(_rows(0.99, 0.01, 100), 111, STAT_NAMES) == []  # once only
    assert health.longest_win_streak == 160 and health.win_steps == 209 and health.first_win_step == 1
    restored = GanHealth.restore(json.loads(json.dumps(health.summary())), 300)
    assert restored.win_streak == 160 and restored.observe_steps(_rows(0.99, 0.01, 1), 211, STAT_NAMES) == []


def test_a_stalled_similarity_is_warned_about_and_a_rising_one_is_not():
    rising = GanHealth(total_steps=100)
    assert all(rising.observe_similarity(10 * i, 0.1 * i) == [] for i in range(10))
    stalled = GanHealth(total_steps=100)
    warnings = [w for i, c in enumerate([0.1, 0.5, 0.6, 0.6, 0.601, 0.59, 0.6, 0.6]) for w in
                stalled.observe_similarity(10 * i, c)]  # fmt: skip
    assert len(warnings) == 1 and "stalled" in warnings[0] and stalled.warned == ["similarity_stalls"]


def test_pretrain_logs_win_rate_and_gradient_norms_and_writes_health_and_hparams(tiny_shards, tmp_path):
    cfg = dict(shards=str(tiny_shards), preset="tiny", steps=6, batch_size=4, similarity_every=2, image_every=0,
               checkpoint_every=3, log_every=2, workers=0, progress=False)  # fmt: skip
    plain = run_pretrain(PretrainConfig(out=str(tmp_path / "plain"), **cfg))
    acc = EventAccumulator(str(plain / "tb"))
    acc.Reload()
    assert {"d/real", "d/fake", "grad_norm/d", "grad_norm/g"} <= set(acc.Tags()["scalars"])
    assert all(e.value > 0 for e in acc.Scalars("grad_norm/d"))
    health = json.loads((plain / "gan_health.json").read_text())
    assert health["last"]["step"] == 6 and len(health["similarity"]) == 4 and health["sustained_steps"] == 50
    assert (plain / "tb" / "hparams").is_dir()  # the HParams dashboard entry

    smoothed = run_pretrain(PretrainConfig(out=str(tmp_path / "smooth"), label_smoothing=0.2, **cfg))
    loss_plain = [e.value for e in acc.Scalars("loss/d")]
    acc2 = EventAccumulator(str(smoothed / "tb"))
    acc2.Reload()
    # Same seed and data: only the real targets differ, so the very first D loss already differs.
    assert [e.value for e in acc2.Scalars("loss/d")][0] != pytest.approx(loss_plain[0])
    assert json.loads((smoothed / "config.json").read_text())["config"]["label_smoothing"] == 0.2


def test_with_label_smoothing_a_win_is_judged_against_the_smoothed_target():
    health = GanHealth(total_steps=100, label_smoothing=0.1)
    assert health.real_bar == pytest.approx(0.855)
    # D(real) 0.88 is as far as a smoothed D goes (target 0.9); with D(fake) ~0 it still wins outright.
    warned = health.observe_steps(_rows(0.88, 0.001, 50), 1, STAT_NAMES)
    assert len(warned) == 1 and "D(real) > 0.855" in warned[0]
    assert GanHealth(total_steps=100).observe_steps(_rows(0.88, 0.001, 50), 1, STAT_NAMES) == []


def test_a_real_run_where_d_wins_outright_prints_the_warning_and_logs_it(tiny_shards, tmp_path, monkeypatch, capsys):
    # A discriminator 10^5 times faster than its generator wins within a few steps; "sustained" is shortened to 5
    # steps (it is 50 and 10% of a run, tested above) so that a 30-step run shows the wiring: printed once, in
    # gan_health.json and in TensorBoard.
    monkeypatch.setattr(GanHealth, "sustained", property(lambda self: 5))
    run = run_pretrain(PretrainConfig(shards=str(tiny_shards), out=str(tmp_path / "gan"), preset="tiny", steps=30,
                                      batch_size=4, lr=1e-7, lr_d=1e-2, log_every=5, similarity_every=0,
                                      image_every=0, checkpoint_every=0, workers=0, progress=False,
                                      protocol="window"))  # fmt: skip
    printed = [line for line in capsys.readouterr().out.splitlines() if "wins outright" in line]
    assert len(printed) == 1 and printed[0].startswith("pretrain: WARNING (GAN health): the discriminator wins")
    health = json.loads((run / "gan_health.json").read_text())
    assert health["warned"] == ["d_wins"] and health["warnings"] == [printed[0].split(": ", 2)[2]]
    assert health["longest_win_streak"] >= 5
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    logged = [e for tag in acc.Tags()["tensors"] if tag.startswith("health/warnings") for e in acc.Tensors(tag)]
    assert len(logged) == 1 and b"wins outright" in logged[0].tensor_proto.string_val[0]
