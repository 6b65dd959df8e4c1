"""Pseudo-anomalies (train/pseudo.py: pure, seeded) and the pretraining variants that use them (train/disc_phase.py:
pseudo-anomalies on D's negative side, OGNet's phase 2, the pseudo objective), end to end on the tiny shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import ddp_vad.train.pretrain as pretrain
from ddp_vad.cli import cli
from ddp_vad.data.reader import load_train_clips, load_window_set
from ddp_vad.errors import UserError
from ddp_vad.train.pretrain import PretrainConfig, run_pretrain
from ddp_vad.train.pseudo import (
    frozen_window,
    parse_kinds,
    patched_window,
    pseudo_count,
    reversed_window,
    sample_pseudo,
    skip_window,
)
from ddp_vad.weights import load_discriminator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
T = 10


def counting_clip(n: int, offset: int = 0, size=(12, 16)) -> np.ndarray:
    """A clip whose frame i holds the value offset + i everywhere: a window's values say which frames it took."""
    return np.repeat((offset + np.arange(n, dtype=np.uint8))[:, None, None], size[0] * size[1], 1).reshape(n, *size)


def frame_ids(window: np.ndarray) -> list[int]:
    assert all(len(np.unique(f)) == 1 for f in window), "a frame mixes frames"
    return [int(f.flat[0]) for f in window]


# ------------------------------------------------------------------------------------------ the kinds
def test_a_skip_window_really_skips():
    clip = counting_clip(60)
    assert frame_ids(skip_window(clip, 3, 2, T)) == list(range(3, 23, 2))
    windows, kinds = sample_pseudo([clip, counting_clip(40)], 20, ("skip",), T, np.random.default_rng(0))
    assert kinds == ["skip"] * 20
    strides = set()
    for w in windows:
        steps = np.diff(frame_ids(w))
        assert len(set(steps.tolist())) == 1 and steps[0] in (2, 3, 4)
        strides.add(int(steps[0]))
    assert strides == {2, 3, 4}


def test_a_jump_window_jumps_once():
    windows, _ = sample_pseudo([counting_clip(60)], 10, ("jump",), T, np.random.default_rng(1))
    for w in windows:
        steps = np.diff(frame_ids(w))
        assert sorted(set(steps.tolist()))[0] == 1 and (steps > 1).sum() == 1 and steps.max() >= 5


def test_a_reversed_window_is_reversed():
    base = counting_clip(T)
    assert frame_ids(reversed_window(base)) == list(range(T - 1, -1, -1))
    windows, _ = sample_pseudo([counting_clip(50)], 8, ("reverse",), T, np.random.default_rng(2))
    assert all((np.diff(frame_ids(w)) == -1).all() for w in windows)


def test_a_frozen_window_freezes_from_its_step_on():
    assert frame_ids(frozen_window(counting_clip(T), 4)) == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]
    windows, _ = sample_pseudo([counting_clip(50)], 8, ("freeze",), T, np.random.default_rng(3))
    for w in windows:
        steps = np.diff(frame_ids(w))
        at = int(np.argmin(steps != 0))  # the first repeated frame
        assert steps[-1] == 0 and (steps[:at] == 1).all() and (steps[at:] == 0).all()


def test_a_patch_changes_only_a_patch_region_that_moves_across():
    base, source = counting_clip(T), counting_clip(T, offset=100)
    out = patched_window(base, source, (3, 4), (2, 5), (1, 0), (0.5, 1.5))
    changed = out != base
    for t in range(T):
        ys, xs = np.nonzero(changed[t])
        assert len(ys) == 12 and ys.max() - ys.min() == 2 and xs.max() - xs.min() == 3  # one 3x4 rectangle
        assert (out[t][changed[t]] == 100 + t).all()  # the source's frame t, its own motion
        assert ys.min() == round(1 + 0.5 * t) and xs.min() == min(round(1.5 * t), 16 - 4)  # across, to the edge
    # Sampled: a patch of the other clip on a normal window, the same size in every frame, nothing else changed.
    a, b = counting_clip(40), counting_clip(40, offset=100)
    windows, _ = sample_pseudo([a, b], 12, ("patch",), T, np.random.default_rng(4))
    for w in windows:
        from_b = w >= 100
        base_ids = [int(f[~m].flat[0]) for f, m in zip(w, from_b, strict=True)]
        assert np.diff(base_ids).tolist() == [1] * (T - 1)  # the rest is a normal window of clip a
        assert (w[~from_b] < 100).all() and len({int(m.sum()) for m in from_b}) == 1 and from_b[0].sum() > 0


def test_pseudo_anomalies_are_seeded():
    clips = [counting_clip(50), counting_clip(45, offset=100)]
    kinds = parse_kinds("skip,jump,reverse,freeze,patch")
    a, ka = sample_pseudo(clips, 16, kinds, T, np.random.default_rng([7, 0, 3]))
    b, kb = sample_pseudo(clips, 16, kinds, T, np.random.default_rng([7, 0, 3]))
    c, _ = sample_pseudo(clips, 16, kinds, T, np.random.default_rng([7, 1, 3]))
    assert np.array_equal(a, b) and ka == kb and not np.array_equal(a, c)
    assert set(ka) == set(kinds)


def test_rate_zero_gives_no_pseudo_windows_and_kinds_are_checked():
    assert pseudo_count(0.0, 32) == 0 and pseudo_count(0.5, 32) == 16 and pseudo_count(1.0, 5) == 5
    assert sample_pseudo([counting_clip(20)], 0, ("skip",), T, np.random.default_rng(0))[0].shape == (0, T, 12, 16)
    with pytest.raises(UserError, match="--pseudo-kinds 'skip,bogus'"):
        parse_kinds("skip,bogus")


def test_train_clips_are_rebuilt_whole_from_the_blocks(tiny_shards):
    clips = load_train_clips(tiny_shards)
    train = load_window_set(tiny_shards, select="train")
    by_clip = sorted(set(train.clips))
    assert len(clips) == len(by_clip)
    for key, clip, start, frames in zip(train.keys, train.clips, train.starts, train.frames, strict=True):
        assert np.array_equal(clips[by_clip.index(clip)][start : start + T], frames), key


# ------------------------------------------------------------------------------------------ the runs
def config(shards: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(preset="tiny", steps=6, batch_size=4, checkpoint_every=0, similarity_every=2, image_every=0,
                log_every=2, workers=0, progress=False)  # fmt: skip
    return PretrainConfig(shards=str(shards), out=str(out), **{**base, **kw})


def spy_gan_steps(monkeypatch) -> list:
    seen = []
    real = pretrain.gan_step

    def spy(*args, **kwargs):
        seen.append(args[-1] if len(args) > 10 else kwargs.get("pseudo"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "gan_step", spy)
    return seen


def test_the_plain_gan_gets_no_pseudo_windows_and_a_rate_adds_them(tiny_shards, tmp_path, monkeypatch):
    seen = spy_gan_steps(monkeypatch)
    run_pretrain(config(tiny_shards, tmp_path / "plain", steps=2))
    assert seen == [None, None]  # rate 0 (the default): the method's D step, batches untouched
    seen.clear()
    run_pretrain(config(tiny_shards, tmp_path / "p", steps=2, pseudo_anomalies=0.5))
    assert [tuple(p.shape) for p in seen] == [(2, T, 1, 24, 36)] * 2  # half a batch of 4, on D's negative side


def test_gan_with_pseudo_anomalies_and_phase2_records_itself_and_transfers(tiny_shards, tmp_path):
    from ddp_vad.train.transfer import TransferConfig, run_transfer

    run = run_pretrain(config(tiny_shards, tmp_path / "gan", pseudo_anomalies=0.5, phase2_steps=4,
                              pseudo_kinds="skip,patch"))  # fmt: skip
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["steps_done"] == 10
    assert {k: cfg["config"][k] for k in ("pseudo_anomalies", "pseudo_kinds", "phase2_steps", "objective")} == {
        "pseudo_anomalies": 0.5, "pseudo_kinds": "skip,patch", "phase2_steps": 4, "objective": "gan"}  # fmt: skip
    with safe_open(str(run / "discriminator.safetensors"), "pt") as f:
        extra = json.loads(f.metadata()["extra"])
    assert extra["pretraining"] == {"objective": "gan", "pseudo_anomalies": 0.5, "pseudo_kinds": "skip,patch",
                                    "phase2_steps": 4}  # fmt: skip
    assert (run / "generator_early.safetensors").is_file()
    health = json.loads((run / "gan_health.json").read_text())
    assert health["last"]["step"] == 6 and max(s for s, _ in health["similarity"]) == 6  # phase 2 is not a game
    load_discriminator(run)  # the file format stays loadable
    out = run_transfer(TransferConfig(shards=str(tiny_shards), out=str(tmp_path / "t"), source=str(run), epochs=1,
                                      batch_size=8, progress=False, protocol="window", folds=4))  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["folds"]

    from ddp_vad.eval.runs import pretrain_health

    described = pretrain_health(run)
    assert described["pretraining"] == (
        "GAN + pseudo-anomalies 0.5 per real window (skip,patch) + phase 2: 4 D-only steps (OGNet)"
    )
    assert described["stabilisers"] == "none"  # not "the method's plain GAN": it is not


def test_phase2_resumes_bit_identically(tiny_shards, tmp_path):
    opts = dict(pseudo_anomalies=0.5, phase2_steps=4, checkpoint_every=2, keep_checkpoints=0)
    straight = run_pretrain(config(tiny_shards, tmp_path / "a", **opts))
    resumed = tmp_path / "b"
    run_pretrain(config(tiny_shards, resumed, **{**opts, "phase2_steps": 2}))  # stops inside phase 2 (step 8)
    run_pretrain(config(tiny_shards, resumed, **opts))  # resumes at 8, with the early generator from its file
    for name in ("discriminator.safetensors", "generator_early.safetensors"):
        with safe_open(str(straight / name), "pt") as a, safe_open(str(resumed / name), "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), name  # noqa: SIM118


def test_the_pseudo_objective_trains_only_the_discriminator(tiny_shards, tmp_path):
    from ddp_vad.models import build_generator
    from ddp_vad.train.distributed import seed_everything
    from ddp_vad.weights import load_generator

    run = run_pretrain(config(tiny_shards, tmp_path / "ps", objective="pseudo", pseudo_anomalies=1.0))
    gen, model_cfg = load_generator(run)
    seed_everything(0)  # as the run built it: the generator never trained
    init = build_generator(model_cfg).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in gen.state_dict().items())
    assert not (run / "similarity.csv").read_text().strip().split("\n")[1:]  # no generator to compare
    with safe_open(str(run / "discriminator.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["extra"])["pretraining"]["objective"] == "pseudo"


def test_variant_options_are_checked(tiny_shards, tmp_path):
    runner = CliRunner()
    base = ["pretrain", "--shards", str(tiny_shards), "--out", str(tmp_path / "x"), "--preset", "tiny"]
    for extra, message in ((["--pseudo-anomalies", "-1"], "--pseudo-anomalies must be a rate >= 0"),
                           (["--pseudo-kinds", "skip,bogus"], "--pseudo-kinds 'skip,bogus'"),
                           (["--objective", "pseudo"], "give --pseudo-anomalies > 0"),
                           (["--objective", "pseudo", "--pseudo-anomalies", "1", "--phase2-steps", "3"],
                            "--phase2-steps needs a generator"),
                           (["--phase2-steps", "-1"], "--phase2-steps must be >= 0")):  # fmt: skip
        result = runner.invoke(cli, base + extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)


def test_pseudo_windows_join_the_discriminators_negative_side():
    from accelerate import Accelerator

    from ddp_vad.models import build_generator, build_lrcn, model_config_for
    from ddp_vad.train.gan import gan_step

    manifest = {"window": T, "height": 24, "width": 36}
    model_cfg = model_config_for("tiny", manifest)
    real = torch.rand(4, T, 1, 24, 36)
    pseudo = torch.rand(3, T, 1, 24, 36)
    losses = []
    for extra in (None, pseudo):
        torch.manual_seed(0)
        gen, disc = build_generator(model_cfg), build_lrcn(model_cfg)
        opt_g, opt_d = torch.optim.Adam(gen.parameters()), torch.optim.Adam(disc.parameters())
        torch.manual_seed(1)
        losses.append(gan_step(Accelerator(cpu=True), gen, disc, opt_g, opt_d, real, model_cfg.z_dim, pseudo=extra))
    plain, with_pseudo = losses
    assert not torch.equal(plain[0], with_pseudo[0])  # the D loss also counts the pseudo windows
