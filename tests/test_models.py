"""Generator / LRCN architecture (paper tables), presets, and safetensors round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddp_vad.errors import UserError
from ddp_vad.models import (
    LRCN,
    Generator,
    ModelConfig,
    build_generator,
    build_lrcn,
    count_parameters,
    model_config_for,
    real_fake_logit,
)
from ddp_vad.presets import PRESETS
from ddp_vad.weights import load_discriminator, load_generator, load_model_config, save_model

PED1 = {"window": 10, "height": 120, "width": 182}
TINY = {"window": 10, "height": 24, "width": 36}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.torch_threads


def _output_shapes(module: torch.nn.Module, x: torch.Tensor, types: tuple) -> list[tuple]:
    shapes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for m in module.modules()
        if isinstance(m, types)
    ]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return shapes


def test_paper_lrcn_layer_shapes_match_the_tables():
    cfg = model_config_for("paper", PED1)
    lrcn = build_lrcn(cfg).eval()
    x = torch.rand(1, 10, 1, 120, 182)
    # time-distributed: batch 1 x 10 frames run as 10 images; the tables list (frames, H, W, channels)
    conv_pool = _output_shapes(lrcn, x, (torch.nn.Conv2d, torch.nn.MaxPool2d))
    got = [(s[0], s[2], s[3], s[1]) for s in conv_pool]
    assert got == [
        (10, 114, 176, 16),
        (10, 57, 88, 16),
        (10, 53, 84, 16),
        (10, 26, 42, 16),
        (10, 24, 40, 16),
        (10, 12, 20, 16),
    ]
    assert cfg.frame_features == 16 * 12 * 20 == 3840
    assert lrcn.features.lstm.input_size == 3840 and lrcn.features.lstm.hidden_size == 1024
    with torch.no_grad():
        feats = lrcn.features(x)
        dense = lrcn.head.net[:3](feats)
        logits = lrcn.head(feats)
    assert feats.shape == (1, 1024) and dense.shape == (1, 256) and logits.shape == (1, 2)
    print(
        f"paper LRCN parameters: {count_parameters(lrcn):,} (features {count_parameters(lrcn.features):,}, "
        f"head {count_parameters(lrcn.head):,})"
    )


def test_paper_generator_layer_shapes_match_the_tables():
    cfg = model_config_for("paper", PED1)
    gen = build_generator(cfg).eval()
    assert gen.project.out_features == 200 * 60 * 91 == 1_092_000
    shapes = _output_shapes(gen, torch.randn(1, 100), (torch.nn.BatchNorm2d, torch.nn.Upsample, torch.nn.Conv2d))
    bn0, up, conv1, _, conv2, _, to_frames = shapes
    assert bn0 == (1, 200, 60, 91) and up == (1, 200, 120, 182)
    assert conv1 == (1, 100, 120, 182) and conv2 == (1, 50, 120, 182) and to_frames == (1, 10, 120, 182)
    n = count_parameters(gen)
    assert 110_000_000 < n < 111_000_000  # the ~110M-parameter Linear dominates
    print(f"paper generator parameters: {n:,} (first Linear {count_parameters(gen.project):,})")


@pytest.mark.parametrize(
    "preset,frames",
    [("demo", PED1), ("tiny", TINY), ("demo", {**PED1, "height": 121, "width": 181}), ("demo-frames", PED1)],
)
def test_presets_round_trip_windows_of_the_manifest_size(preset, frames):
    cfg = model_config_for(preset, frames)
    gen, lrcn = build_generator(cfg), build_lrcn(cfg)
    with torch.no_grad():
        w = gen(torch.randn(3, cfg.z_dim))
        logits = lrcn(w)
    assert w.shape == (3, frames["window"], 1, frames["height"], frames["width"])
    assert w.min() >= 0.0 and w.max() <= 1.0
    assert logits.shape == (3, 2)
    assert torch.allclose(real_fake_logit(logits), logits.log_softmax(1)[:, 1] - logits.log_softmax(1)[:, 0], atol=1e-5)
    print(
        f"{preset} {frames['height']}x{frames['width']}: generator {count_parameters(gen):,}, "
        f"LRCN {count_parameters(lrcn):,} parameters"
    )


def test_demo_is_much_smaller_than_paper():
    paper, demo = model_config_for("paper", PED1), model_config_for("demo", PED1)
    assert count_parameters(build_generator(demo)) * 20 < count_parameters(Generator(paper))
    assert demo.input_pool == 3 and demo.feature_map() == (3, 5)
    assert (demo.input_mode, demo.pooling, demo.frame_features) == ("diff", "topk", 8)  # the levers that won
    assert model_config_for("demo-frames", PED1).feature_map() == (4, 8)


def test_feature_extractor_and_head_are_separate_modules():
    lrcn = build_lrcn(model_config_for("tiny", TINY))
    assert isinstance(lrcn, LRCN)
    assert set(dict(lrcn.named_children())) == {"features", "head"}
    lrcn.head = torch.nn.Linear(lrcn.features.out_features, 2)  # what transfer does with a fresh head
    assert lrcn(torch.rand(2, 10, 1, 24, 36)).shape == (2, 2)


def test_frames_too_small_for_a_preset_is_a_user_error():
    with pytest.raises(UserError, match="too small.*paper"):
        model_config_for("paper", TINY)
    with pytest.raises(UserError, match="unknown preset"):
        model_config_for("huge", TINY)


def test_lstm_runs_in_fp32_under_bf16_autocast():
    lrcn = build_lrcn(model_config_for("tiny", TINY))
    seen = []
    lrcn.features.lstm.register_forward_hook(lambda _m, inp, out: seen.append((inp[0].dtype, out[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lrcn(torch.rand(2, 10, 1, 24, 36))
    assert seen == [(torch.float32, torch.float32)]
    assert torch.isfinite(logits).all()


def test_save_and_load_round_trip_without_pickle(tmp_path):
    cfg = model_config_for("tiny", TINY)
    gen, disc = build_generator(cfg), build_lrcn(cfg)
    torch.nn.init.normal_(gen.to_frames.weight)  # make sure we do not compare two fresh default inits
    save_model(gen, tmp_path / "generator.safetensors", cfg, kind="generator")
    save_model(disc, tmp_path / "discriminator.safetensors", cfg, kind="discriminator")
    assert load_model_config(tmp_path / "generator.safetensors") == cfg
    g2, cfg2 = load_generator(tmp_path)
    d2, _ = load_discriminator(tmp_path / "discriminator.safetensors")
    assert cfg2 == cfg and not g2.training
    for a, b in ((gen, g2), (disc, d2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    raw = load_file(str(tmp_path / "generator.safetensors"))  # plain tensors, nothing to unpickle
    assert "project.weight" in raw


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_generator(tmp_path)
    bad = tmp_path / "generator.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="generator.safetensors"):
        load_generator(tmp_path)
    cfg = model_config_for("tiny", TINY)
    other = ModelConfig.from_dict({**cfg.to_dict(), "lstm_hidden": 8})
    save_model(build_lrcn(other), tmp_path / "d.safetensors", cfg)  # config says 16, weights are 8 wide
    with pytest.raises(UserError, match="do not match"):
        load_discriminator(tmp_path / "d.safetensors")


def test_config_json_round_trip_and_presets_are_valid():
    for name in PRESETS:
        cfg = model_config_for(name, PED1 if name != "tiny" else TINY)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown field"):
        ModelConfig.from_dict({"bogus": 1})


def test_input_normalisation_is_part_of_the_saved_config(tmp_path):
    cfg = model_config_for("tiny", TINY)
    assert (cfg.input_mean, cfg.input_std) == (0.5, 0.25)
    torch.manual_seed(0)
    lrcn = build_lrcn(cfg)
    save_model(lrcn, tmp_path / "d.safetensors", cfg)
    assert load_model_config(tmp_path / "d.safetensors").input_std == 0.25
    x = torch.rand(2, 10, 1, 24, 36)
    shifted = build_lrcn(ModelConfig.from_dict({**cfg.to_dict(), "input_mean": 0.0, "input_std": 1.0}))
    shifted.load_state_dict(lrcn.state_dict())
    lrcn.eval(), shifted.eval()
    # The same weights on differently normalised input give different features: the setting is not a no-op.
    assert not torch.allclose(lrcn.features(x), shifted.features(x))
    expected = shifted.features((x - 0.5) / 0.25)
    torch.testing.assert_close(lrcn.features(x), expected)
    with pytest.raises(UserError, match="input_std"):
        ModelConfig.from_dict({**cfg.to_dict(), "input_std": 0.0})


# ------------------------------------------------------------------------------------------- levers
LEVERS = [("frames", "flatten"), ("diff", "flatten"), ("both", "topk"), ("diff", "max"), ("frames", "topk")]


@pytest.mark.parametrize("input_mode,pooling", LEVERS)
def test_input_modes_and_poolings_shape_the_lstm_input(input_mode, pooling):
    cfg = model_config_for("tiny", TINY, input_mode=input_mode, pooling=pooling, topk=2)
    model = build_lrcn(cfg).eval()
    x = torch.rand(3, 10, 1, 24, 36)
    with torch.no_grad():
        y = model.features.frame_features(x)
        # The cached head+lstm path (classifier.lstm_from_frame_features) is the full forward pass.
        from ddp_vad.train.classifier import lstm_from_frame_features

        torch.testing.assert_close(model.head(lstm_from_frame_features(model.features, y)), model(x))
    assert y.shape == (3, cfg.steps, cfg.frame_features)
    assert cfg.steps == (10 if input_mode == "frames" else 9)
    assert model.features.convs[0].in_channels == (2 if input_mode == "both" else 1)
    assert cfg.frame_features == 4 * (2 if pooling == "flatten" else 1)  # tiny: 4 channels x 1 x 2 positions


def test_diff_stem_sees_motion_only():
    """A static window gives the same scores whatever its brightness; a moving blob changes them."""
    model = build_lrcn(model_config_for("tiny", TINY, input_mode="diff", pooling="topk")).eval()
    dark, bright = torch.full((1, 10, 1, 24, 36), 0.1), torch.full((1, 10, 1, 24, 36), 0.9)
    moving = dark.clone()
    for t in range(10):
        moving[0, t, 0, 8:14, 2 + 3 * t : 8 + 3 * t] = 1.0
    with torch.no_grad():
        assert torch.equal(model(dark), model(bright))
        assert not torch.allclose(model(dark), model(moving))
    frames = build_lrcn(model_config_for("tiny", TINY)).eval()
    with torch.no_grad():
        assert not torch.allclose(frames(dark), frames(bright))  # the method's frame input does see brightness


def test_topk_of_one_is_max_pooling():
    torch.manual_seed(0)
    topk = build_lrcn(model_config_for("tiny", TINY, pooling="topk", topk=1)).eval()
    peak = build_lrcn(model_config_for("tiny", TINY, pooling="max")).eval()
    peak.load_state_dict(topk.state_dict())
    x = torch.rand(2, 10, 1, 24, 36)
    with torch.no_grad():
        torch.testing.assert_close(topk(x), peak(x))


def test_levers_are_stored_with_the_weights(tmp_path):
    cfg = model_config_for("tiny", TINY, input_mode="both", pooling="topk", topk=2, dropout=0.2)  # 2 of 1x2 positions
    save_model(build_lrcn(cfg), tmp_path / "d.safetensors", cfg)
    again = load_model_config(tmp_path / "d.safetensors")
    assert (again.input_mode, again.pooling, again.topk, again.dropout) == ("both", "topk", 2, 0.2)
    model, _ = load_discriminator(tmp_path / "d.safetensors")
    assert model.features.convs[0].in_channels == 2
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("input_mode", "pooling", "topk", "diff_std")}
    assert ModelConfig.from_dict(old).input_mode == "frames"  # a file from before the levers loads as the method


@pytest.mark.parametrize("field,value", [("input_mode", "flow"), ("pooling", "mean"), ("topk", 0), ("diff_std", 0.0)])
def test_bad_lever_values_are_user_errors(field, value):
    with pytest.raises(UserError, match=field):
        model_config_for("tiny", TINY, **{field: value})


def test_demo_preset_matches_its_table_row():
    cfg = model_config_for("demo", PED1)
    lrcn = build_lrcn(cfg)
    assert (cfg.input_mode, cfg.pooling, cfg.topk, cfg.feature_map()) == ("diff", "topk", 4, (3, 5))
    counts = [count_parameters(m) for m in (build_generator(cfg), lrcn, lrcn.features.convs, lrcn.features.lstm)]
    assert counts == [2_876_362, 80_418, 1_376, 70_656]  # docs/models.md, "Parameter counts"


def test_cells_pooling_scores_every_cell_and_keeps_the_top_cells():
    """pooling=cells: the LSTM and head run per cell of the last conv map; the window's log-odds is the mean of the
    topk largest cell log-odds (MIL style), and the cached head+lstm path is the full forward pass."""
    from ddp_vad.train.classifier import lstm_from_frame_features

    torch.manual_seed(0)
    x = torch.rand(3, 10, 1, 24, 36)
    for k in (1, 2):
        cfg = model_config_for("tiny", TINY, input_mode="diff", pooling="cells", topk=k)
        model = build_lrcn(cfg).eval()
        with torch.no_grad():
            y = model.features.frame_features(x)
            feats = model.features(x)
            cell = model.head.net(feats)
            logit = real_fake_logit(model(x))
            cached = model.head(lstm_from_frame_features(model.features, y))
        assert y.shape == (3, 9, 4, 2) and feats.shape == (3, 2, cfg.lstm_hidden)  # tiny: 4 channels, 1 x 2 cells
        for j in range(2):  # each cell is its own sequence through the shared LSTM
            with torch.no_grad():
                torch.testing.assert_close(feats[:, j], model.features.lstm(y[..., j])[0][:, -1])
        odds = cell[..., 1] - cell[..., 0]
        torch.testing.assert_close(logit, odds.max(1).values if k == 1 else odds.mean(1))
        torch.testing.assert_close(cached, model(x))
        assert cfg.frame_features == 4
    same = model_config_for("tiny", TINY, pooling="cells")
    assert count_parameters(build_lrcn(same)) == count_parameters(
        build_lrcn(model_config_for("tiny", TINY, pooling="topk"))
    )


def test_cells_head_standardization_folds_exactly(tmp_path):
    """--train head on per-cell features: one mean/std per feature over every cell, folded into the head exactly."""
    from ddp_vad.train.classifier import feature_standardization, fold_standardization_into_head

    torch.manual_seed(0)
    cfg = model_config_for("tiny", TINY, input_mode="diff", pooling="cells", topk=1)
    model = build_lrcn(cfg).eval()
    x = torch.rand(6, 10, 1, 24, 36)
    with torch.no_grad():
        cache = model.features(x)
        mean, std = feature_standardization(cache, np.arange(6))
        assert mean.shape == (cfg.lstm_hidden,)
        folded = fold_standardization_into_head(model, mean, std).eval()
        torch.testing.assert_close(folded(x), model.head((cache - mean) / std), rtol=1e-4, atol=1e-4)
    save_model(folded, tmp_path / "m.safetensors", cfg)
    assert load_model_config(tmp_path / "m.safetensors").pooling == "cells"
