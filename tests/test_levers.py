"""Training levers: augmentation (seeded, per window), inner validation split, class weights, and a tiny transfer
run that uses them all, resumes exactly and keeps the epoch chosen on the validation clips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddp_vad.errors import UserError
from ddp_vad.train import fold as fold_module
from ddp_vad.train import fold_steps
from ddp_vad.train.augment import augment_windows, epoch_generator, parse_augment
from ddp_vad.train.crossval import CVWindows
from ddp_vad.train.fold import inner_validation_split
from ddp_vad.train.fold_steps import class_weights
from ddp_vad.train.transfer import TransferConfig, run_transfer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.torch_threads


# -------------------------------------------------------------------------------------------- augment
def _windows(b: int = 6) -> torch.Tensor:
    return torch.rand(b, 10, 1, 24, 36, generator=torch.Generator().manual_seed(1))


def test_augmentation_is_a_function_of_seed_fold_and_epoch():
    x, names = _windows(), parse_augment("flip,shift,jitter")
    a = augment_windows(x, names, epoch_generator(0, 1, 2))
    assert torch.equal(a, augment_windows(x, names, epoch_generator(0, 1, 2)))
    assert not torch.equal(a, augment_windows(x, names, epoch_generator(0, 1, 3)))
    assert not torch.equal(a, augment_windows(x, names, epoch_generator(0, 2, 2)))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_flip_treats_every_frame_of_a_window_alike():
    x = _windows(16)
    out = augment_windows(x, ("flip",), epoch_generator(0, 0, 1))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(out[i], x[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_shift_moves_content_by_whole_pixels():
    x = torch.zeros(8, 10, 1, 24, 36)
    x[:, :, :, 10, 18] = 1.0  # one bright pixel, far from the border
    out = augment_windows(x, ("shift",), epoch_generator(3, 0, 1))
    for i in range(8):
        ys, xs = torch.nonzero(out[i, 0, 0], as_tuple=True)
        assert ys.numel() == 1 and abs(int(ys) - 10) <= 4 and abs(int(xs) - 18) <= 4
        assert torch.equal(out[i], out[i, :1].expand_as(out[i]))  # the same offset for every frame


def test_parse_augment_rejects_unknown_names():
    assert parse_augment("none") == () and parse_augment("flip, flip,jitter") == ("flip", "jitter")
    with pytest.raises(UserError, match="rotate"):
        parse_augment("flip,rotate")


# ------------------------------------------------------------------------------- split and weights
def _cv() -> CVWindows:
    clips = [f"C{c}" for c in range(6) for _ in range(5)]
    labels = np.array([1 if c in (0, 1) else 0 for c in range(6) for _ in range(5)])  # C0, C1 anomalous only
    return CVWindows(labels=labels, fold_sets=np.zeros(30, np.int64), keys=[str(i) for i in range(30)],
                     clips=clips, starts=np.zeros(30, np.int64))  # fmt: skip


def test_inner_validation_holds_out_whole_clips_with_both_classes():
    cv, train = _cv(), np.arange(30)
    for seed in range(8):
        fit, val = inner_validation_split(cv, train, 2, seed, 0)
        assert np.array_equal(np.sort(np.concatenate([fit, val])), train)
        val_clips = {cv.clips[i] for i in val}
        assert len(val_clips) == 2 and not val_clips & {cv.clips[i] for i in fit}
        assert set(cv.labels[val].tolist()) == {0, 1}
        assert np.array_equal(val, inner_validation_split(cv, train, 2, seed, 0)[1])
    assert inner_validation_split(cv, train, 0, 0, 0)[1].size == 0


def test_balanced_class_weights_equalise_the_classes():
    w = class_weights(np.array([0, 0, 0, 1]))
    torch.testing.assert_close(w, torch.tensor([4 / 6, 4 / 2]))
    assert float(w[0] * 3) == pytest.approx(float(w[1] * 1))
    assert torch.equal(class_weights(np.array([0, 1, 1, 0])), torch.ones(2))  # a balanced set: plain cross-entropy


# ------------------------------------------------------------------------------------------ a run
def _cfg(shards, out, **kw) -> TransferConfig:
    kw = {"epochs": 3, "batch_size": 8, "progress": False, "protocol": "window", "preset": "tiny", **kw}
    return TransferConfig(shards=str(shards), out=str(out), source="scratch", **kw)


LEVER_RUN = {"input_mode": "diff", "pooling": "topk", "augment": "flip,shift,jitter", "class_weight": "balanced",
             "val_clips": 1, "weight_decay": 0.01, "dropout": 0.2}  # fmt: skip


def test_levers_run_resume_exactly_and_keep_the_validation_epoch(tiny_shards, tmp_path, monkeypatch):
    ref = run_transfer(_cfg(tiny_shards, tmp_path / "ref", **LEVER_RUN))
    config = json.loads((ref / "config.json").read_text())
    assert config["model"]["input_mode"] == "diff" and config["model"]["dropout"] == 0.2
    for k in range(4):
        result = json.loads((ref / "folds" / f"fold_{k:02d}" / "result.json").read_text())
        best = max((h for h in result["history"] if h["val_auroc"] is not None), key=lambda h: h["val_auroc"],
                   default=result["history"][0])  # fmt: skip
        assert result["metrics"]["chosen_epoch"] == best["epoch"]  # first epoch with the best validation AUROC
        assert result["metrics"]["n_validation"] > 0

    real_save = fold_module.save_fold_checkpoint

    def crash(ckpt_dir, epoch, state):
        path = real_save(ckpt_dir, epoch, state)
        if state["fold"] == 1 and epoch == 2:
            raise RuntimeError("simulated kill")
        return path

    monkeypatch.setattr(fold_module, "save_fold_checkpoint", crash)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_transfer(_cfg(tiny_shards, run, **LEVER_RUN))
    monkeypatch.undo()
    run_transfer(_cfg(tiny_shards, run, **LEVER_RUN))
    a, b = (json.loads((r / "metrics.json").read_text())["folds"] for r in (ref, run))
    assert a == b  # augmentation, best-epoch weights and all: resumed == uninterrupted
    assert (ref / "oof_scores.csv").read_text() == (run / "oof_scores.csv").read_text()


def test_augment_needs_train_all_and_gan_architecture_is_not_overridden(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="needs --train all"):
        _cfg(tiny_shards, tmp_path / "x", train="head", augment="flip")
    plain = run_transfer(_cfg(tiny_shards, tmp_path / "plain", epochs=1))
    assert json.loads((plain / "config.json").read_text())["model"]["input_mode"] == "frames"  # default: the method


def test_gan_carries_its_levers_into_transfer(tiny_shards, tmp_path):
    from ddp_vad.train.pretrain import PretrainConfig, run_pretrain
    from ddp_vad.weights import load_discriminator

    gan = run_pretrain(PretrainConfig(
        shards=str(tiny_shards), out=str(tmp_path / "gan"), preset="tiny", steps=3, batch_size=4, similarity_every=0,
        image_every=0, checkpoint_every=0, workers=0, progress=False, protocol="window", input_mode="both",
        pooling="topk", topk=2,
    ))  # fmt: skip
    disc, cfg = load_discriminator(gan)
    assert (cfg.input_mode, cfg.pooling, cfg.topk) == ("both", "topk", 2)
    for train in ("head", "head+lstm"):
        run = run_transfer(
            TransferConfig(
                shards=str(tiny_shards),
                out=str(tmp_path / train),
                source=str(gan),
                train=train,
                epochs=1,
                batch_size=8,
                progress=False,
                protocol="window",
            )
        )
        model = json.loads((run / "config.json").read_text())["model"]
        assert (model["input_mode"], model["pooling"]) == ("both", "topk")
    with pytest.raises(UserError, match="brings its own architecture"):
        run_transfer(
            TransferConfig(
                shards=str(tiny_shards),
                out=str(tmp_path / "x"),
                source=str(gan),
                input_mode="frames",
                epochs=1,
                progress=False,
                protocol="window",
            )
        )


def test_feature_matching_adds_a_positive_term_to_the_generator_loss():
    from ddp_vad.models import build_generator, build_lrcn, model_config_for
    from ddp_vad.train.distributed import make_accelerator, seed_everything
    from ddp_vad.train.gan import gan_step

    cfg = model_config_for("tiny", {"window": 10, "height": 24, "width": 36}, input_mode="diff", pooling="topk")
    losses = []
    for weight in (0.0, 1.0):
        acc = make_accelerator("no")
        seed_everything(0)
        gen, disc = build_generator(cfg), build_lrcn(cfg)
        opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (gen, disc)]
        gen, disc, opt_g, opt_d = acc.prepare(gen, disc, *opts)
        real = torch.rand(4, 10, 1, 24, 36, generator=torch.Generator().manual_seed(0))
        stats = gan_step(acc, gen, disc, opt_g, opt_d, real, cfg.z_dim, feature_matching=weight)
        assert torch.isfinite(stats).all()
        losses.append(stats)
    assert torch.equal(losses[0][0], losses[1][0])  # the D step is the same
    assert losses[1][1] > losses[0][1]  # G's loss gains the (positive) feature-matching term


def test_balanced_class_weights_are_in_the_loss_training_uses(tiny_shards, tmp_path, monkeypatch):
    """Not only the config's default: the cross-entropy each fold trains with gets the balanced weights of that
    fold's training labels (and none with --class-weight none)."""
    real_loss, real_epoch = fold_steps.F.cross_entropy, fold_module.train_epoch
    seen: dict[str, dict[int, list]] = {}
    current: list = [None, None]  # (mode, fold) of the epoch being trained

    def epoch(run, k, *args, **kwargs):
        current[1] = k
        return real_epoch(run, k, *args, **kwargs)

    def loss(logits, target, weight=None, **kwargs):
        seen[current[0]].setdefault(current[1], []).append((weight, target.cpu()))
        return real_loss(logits, target, weight=weight, **kwargs)

    monkeypatch.setattr(fold_module, "train_epoch", epoch)
    monkeypatch.setattr(fold_steps.F, "cross_entropy", loss)
    for mode in ("balanced", "none"):
        current[0], seen[mode] = mode, {}
        run_transfer(_cfg(tiny_shards, tmp_path / mode, epochs=1, class_weight=mode, protocol="clip"))
    assert sorted(seen["balanced"]) == [0, 1, 2, 3]
    unequal = 0
    for k, calls in seen["balanced"].items():
        labels = torch.cat([t for _, t in calls]).numpy()  # one epoch: every training window of the fold once
        unequal += not torch.equal(class_weights(labels), torch.ones(2))
        for weight, _ in calls:
            assert weight is not None, f"fold {k}: trained without the class weights"
            torch.testing.assert_close(weight.cpu(), class_weights(labels))
    assert unequal  # some fold's classes are unequal: its weights are not plain cross-entropy's
    assert all(w is None for calls in seen["none"].values() for w, _ in calls)


@pytest.mark.parametrize("source,train", [("random", "head"), ("scratch", "head+lstm")])
def test_cells_pooling_trains_and_its_exported_model_reproduces_the_scores(tiny_shards, tmp_path, source, train):
    """--pooling cells through transfer: the frozen per-cell cache, its standardisation folded into the head, and the
    exported fold model scores its test windows exactly as the run did."""
    from ddp_vad.data.reader import load_window_set
    from ddp_vad.models import build_lrcn
    from ddp_vad.train.metrics import read_oof_scores
    from ddp_vad.weights import load_model

    cfg = _cfg(tiny_shards, tmp_path / "run", epochs=1, input_mode="diff", pooling="cells", topk=1, train=train)
    run = run_transfer(TransferConfig(**{**cfg.__dict__, "source": source}))
    assert json.loads((run / "config.json").read_text())["model"]["pooling"] == "cells"
    ws = load_window_set(tiny_shards)
    oof = {r["key"]: r["score"] for r in read_oof_scores(run)}
    model, _ = load_model(run / "folds" / "fold_01" / "model.safetensors", build_lrcn)
    test = np.flatnonzero(ws.fold_window == 1)
    with torch.no_grad():
        scores = torch.softmax(model(torch.from_numpy(ws.frames[test]).unsqueeze(2).float() / 255), dim=1)[:, 1]
    torch.testing.assert_close(scores, torch.tensor([oof[ws.keys[i]] for i in test]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- capacity: --input-pool, --conv-channels
def test_conv_channels_and_input_pool_reach_the_lrcn_and_a_gan_keeps_its_own(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    from ddp_vad.train.pretrain import PretrainConfig, run_pretrain
    from ddp_vad.weights import load_discriminator

    run = run_transfer(_cfg(tiny_shards, tmp_path / "narrow", epochs=1, conv_channels=" 6, 5,4"))
    assert json.loads((run / "config.json").read_text())["model"]["conv_channels"] == [6, 5, 4]
    weights = load_file(run / "folds" / "fold_00" / "model.safetensors")
    assert [w.shape[0] for k, w in sorted(weights.items()) if k.endswith("convs.0.weight")] == [6]
    # 24x36 frames pooled 2x leave no room for tiny's three conv stages: refused before any fold is written
    with pytest.raises(UserError, match=r"frames of 24x36 pooled 2x are too small .* less --input-pool"):
        run_transfer(_cfg(tiny_shards, tmp_path / "pooled", input_pool=2))
    assert not (tmp_path / "pooled" / "folds").exists()
    for bad in ("8,0,8", "8,,8", "wide"):
        with pytest.raises(UserError, match=f"--conv-channels {bad}: give positive integers"):
            _cfg(tiny_shards, tmp_path / "x", conv_channels=bad)
    with pytest.raises(UserError, match=r"--conv-channels 8,8: the 'tiny' preset has 3 conv layers \(kernels 3,3,3\)"):
        run_transfer(_cfg(tiny_shards, tmp_path / "x", conv_channels="8,8"))
    with pytest.raises(UserError, match="--input-pool must be >= 1, got 0"):
        _cfg(tiny_shards, tmp_path / "x", input_pool=0)

    def pretrain(out, **kw):
        return run_pretrain(PretrainConfig(
            shards=str(tiny_shards), out=str(tmp_path / out), preset="tiny", steps=2, batch_size=4, similarity_every=0,
            image_every=0, checkpoint_every=0, workers=0, progress=False, protocol="window", **kw,
        ))  # fmt: skip

    gan = pretrain("gan", conv_channels="6,5,4")
    assert load_discriminator(gan)[1].conv_channels == (6, 5, 4)
    with pytest.raises(UserError, match="pooled 2x are too small"):
        pretrain("gan2", input_pool=2)

    def transfer(out, **kw):
        return run_transfer(TransferConfig(shards=str(tiny_shards), out=str(tmp_path / out), source=str(gan), epochs=1,
                                           batch_size=8, progress=False, protocol="window", **kw))  # fmt: skip

    head = transfer("head", conv_channels="6,5,4")  # asking for what the GAN has is fine
    assert json.loads((head / "config.json").read_text())["model"]["conv_channels"] == [6, 5, 4]
    with pytest.raises(UserError, match=r"--conv-channels 4,4,4: the GAN run .* pretrained with conv_channels 6,5,4"):
        transfer("x", conv_channels="4,4,4")
    with pytest.raises(UserError, match=r"--input-pool 2: the GAN run .* pretrained with input_pool 1"):
        transfer("x", input_pool=2)
