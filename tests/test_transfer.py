"""Transfer learning: weight copy and freezing, cached frozen features, fold-parallel invariance (1 vs 2 real
processes), both protocols, resume, leave-one-type-out, run files and errors."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CLIPS, write_ucsd
from safetensors.torch import load_file

from ddp_vad.cli import cli
from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import load_manifest
from ddp_vad.errors import UserError
from ddp_vad.files import file_record
from ddp_vad.models import build_lrcn, model_config_for
from ddp_vad.train import fold as fold_module
from ddp_vad.train import transfer
from ddp_vad.train.classifier import build_classifier, compute_cache, fold_seed, frozen_part, trainable_forward
from ddp_vad.train.metrics import OOF_HEADER, read_oof_scores
from ddp_vad.train.transfer import TransferConfig, run_transfer
from ddp_vad.weights import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
TYPES = {"Test001": ["biker"], "Test002": ["cart"], "Test004": ["biker", "skater"]}


@pytest.fixture(scope="module")
def typed_shards(tmp_path_factory) -> Path:
    """The tiny dataset at 24x36, 4 folds, with anomaly types per test clip."""
    from ddp_vad.data.shards import ShardConfig, build_shards

    root = tmp_path_factory.mktemp("transfer")
    data = write_ucsd(root / "data", TINY_CLIPS)
    (root / "types.json").write_text(json.dumps(TYPES))
    cfg = ShardConfig(
        data=str(data), out=str(root / "shards"), height=24, width=36, folds=4, workers=1, shard_size=8,
        anomaly_types=str(root / "types.json"),
    )  # fmt: skip
    return build_shards(cfg, show_progress=False)


@pytest.fixture(scope="module")
def gan_run(typed_shards, tmp_path_factory) -> Path:
    from ddp_vad.train.pretrain import PretrainConfig, run_pretrain

    out = tmp_path_factory.mktemp("gan") / "run"
    cfg = PretrainConfig(
        shards=str(typed_shards), out=str(out), preset="tiny", steps=5, batch_size=4, similarity_every=0,
        image_every=0, checkpoint_every=0, workers=0, progress=False,
    )  # fmt: skip
    return run_pretrain(cfg)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.torch_threads


def _cfg(shards, out, source, **kw) -> TransferConfig:
    kw = {"epochs": 2, "batch_size": 8, "progress": False, "protocol": "window", **kw}  # 3 test clips: no leak-free
    return TransferConfig(shards=str(shards), out=str(out), source=str(source), **kw)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _oof(run: Path) -> dict[str, dict]:
    return {r["key"]: r for r in read_oof_scores(run)}


def _same_results(a: Path, b: Path) -> None:
    assert _metrics(a)["folds"] == _metrics(b)["folds"]
    oa, ob = _oof(a), _oof(b)
    assert oa.keys() == ob.keys()
    for key, row in oa.items():
        assert (row["fold"], row["label"]) == (ob[key]["fold"], ob[key]["label"])
        assert abs(row["score"] - ob[key]["score"]) <= 1e-6, key


# ------------------------------------------------------------------------------------------ model setup
def test_classifier_copies_gan_features_exactly_with_a_new_head_seeded_per_fold(typed_shards, gan_run, tmp_path):
    gan = load_file(str(gan_run / "discriminator.safetensors"))
    model_cfg, state, _ = transfer.resolve_model(_cfg(typed_shards, tmp_path, gan_run), load_manifest(typed_shards))
    heads = []
    for fold in (0, 1):
        model = build_classifier(model_cfg, "head", fold_seed(0, fold), state)
        sd = model.state_dict()
        for name, value in sd.items():
            if name.startswith("features."):
                assert torch.equal(value, gan[name]), name
        assert not torch.equal(sd["head.net.1.weight"], gan["head.net.1.weight"])
        heads.append(sd["head.net.1.weight"])
    assert not torch.equal(heads[0], heads[1])  # each fold its own head
    again = build_classifier(model_cfg, "head", fold_seed(0, 1), state).state_dict()["head.net.1.weight"]
    assert torch.equal(again, heads[1])  # ... and the same one every time


@pytest.mark.parametrize(
    ("train", "trainable_prefixes"),
    [("head", ("head.",)), ("head+lstm", ("head.", "features.lstm.")), ("all", ("head.", "features."))],
)
def test_requires_grad_follows_train_scope(train, trainable_prefixes):
    model = build_classifier(model_config_for("tiny", {"window": 10, "height": 24, "width": 36}), train, 0)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(trainable_prefixes), name


def test_cached_frozen_paths_equal_the_full_forward():
    model = build_classifier(model_config_for("tiny", {"window": 10, "height": 24, "width": 36}), "all", 3).eval()
    frames = np.random.default_rng(0).integers(0, 256, (70, 10, 24, 36), dtype=np.uint8)
    x = torch.from_numpy(frames[:5]).unsqueeze(2).float() / 255
    with torch.no_grad():
        full = model(x)
        for train in ("head", "head+lstm"):
            cached = trainable_forward(model, train)(frozen_part(model, train)(x))
            torch.testing.assert_close(cached, full, rtol=0, atol=1e-6)
        # Chunked cache (70 windows = two chunks) == one big batch.
        cache = compute_cache(model.features, frames, torch.device("cpu"), contextlib.nullcontext)
        direct = model.features(torch.from_numpy(frames).unsqueeze(2).float() / 255)
    torch.testing.assert_close(cache, direct, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- a run
@pytest.mark.parametrize("train", ["head", "head+lstm", "all"])
def test_transfer_from_gan_trains_only_its_scope(typed_shards, gan_run, tmp_path, train):
    run = run_transfer(_cfg(typed_shards, tmp_path / "run", gan_run, train=train))
    gan = load_file(str(gan_run / "discriminator.safetensors"))
    frozen = {"head": ("features.",), "head+lstm": ("features.convs.",), "all": ()}[train]
    n_folds = 4
    for k in range(n_folds):
        saved = load_file(str(run / "folds" / f"fold_{k:02d}" / "model.safetensors"))
        # The classifier is the discriminator's layers plus the motion prior's buffers (set at calibration).
        assert saved.keys() == gan.keys() | {"prior.mean", "prior.weight"}
        for name, value in saved.items():
            if name.startswith(frozen) and frozen:
                assert torch.equal(value, gan[name]), f"frozen {name} changed in fold {k}"
        trained = [n for n in saved if not n.startswith(frozen) or not frozen]
        changed = [n for n in trained if n.startswith("features.") and not torch.equal(saved[n], gan[n])]
        if train == "head+lstm":
            assert changed and all(n.startswith("features.lstm.") for n in changed)
        if train == "all":
            assert any(n.startswith("features.convs.") for n in changed)
    # The exported fold model alone reproduces the fold's out-of-fold scores from frames (for head: with the
    # feature standardisation folded into the head).
    ws = load_window_set(typed_shards)
    oof = _oof(run)
    model, _ = load_model(run / "folds" / "fold_01" / "model.safetensors", build_lrcn)
    test = np.flatnonzero(ws.fold_window == 1)
    with torch.no_grad():
        scores = torch.softmax(model(torch.from_numpy(ws.frames[test]).unsqueeze(2).float() / 255), dim=1)[:, 1]
    expected = torch.tensor([oof[ws.keys[i]]["score"] for i in test], dtype=torch.float32)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)

    config = json.loads((run / "config.json").read_text())
    probe = build_classifier(model_config_for("tiny", {"window": 10, "height": 24, "width": 36}), train, 0)
    assert config["parameters"]["trainable"] == sum(p.numel() for p in probe.parameters() if p.requires_grad)
    assert config["train"] == train and config["world_size"] == 1

    if train != "head":
        return
    # The standardisation folded into each exported head comes from that fold's training windows only: undo it with
    # the statistics recomputed here and compare with the trained (unfolded) head of the fold's last checkpoint.
    with torch.no_grad():
        raw = model.features(torch.from_numpy(ws.frames).unsqueeze(2).float() / 255).double()
    for k in range(n_folds):
        name = f"fold_{k:02d}"
        x = raw[torch.from_numpy(ws.fold_window != k)]
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        trained = torch.load(run / "checkpoints" / name / "epoch_0002.pt", weights_only=True)["model"]
        exported = load_file(str(run / "folds" / name / "model.safetensors"))
        w, b = trained["head.net.1.weight"].double(), trained["head.net.1.bias"].double()
        torch.testing.assert_close(exported["head.net.1.weight"].double(), w / std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(exported["head.net.1.bias"].double(), b - (w / std) @ mean, rtol=1e-4, atol=1e-5)
        all_std = raw.std(0, unbiased=False)  # statistics over every window (test fold included) differ
        assert not torch.allclose(w / torch.where(all_std < 1e-6, torch.ones_like(all_std), all_std), w / std)
    # Files and formats (docs/run-folders.md), once.
    metrics = _metrics(run)
    assert metrics["method"] == "GAN+LRCN" and metrics["protocol"] == "window"
    assert [f["fold"] for f in metrics["folds"]] == list(range(n_folds))
    for row in metrics["folds"]:
        assert {"fold", "recall", "precision", "accuracy", "f1", "n_test"} <= row.keys()
    assert (
        set(metrics["mean"])
        == set(metrics["std"])
        == {"recall", "precision", "accuracy", "f1", "balanced_accuracy", "window_auroc"}
    )
    with open(run / "oof_scores.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == OOF_HEADER
    assert sorted(oof) == sorted(ws.keys)  # every window scored exactly once, out of fold
    for i, key in enumerate(ws.keys):
        assert oof[key]["fold"] == ws.fold_window[i] and oof[key]["label"] == ws.labels[i]
        assert 0.0 <= oof[key]["score"] <= 1.0
    assert sum(f["n_test"] for f in metrics["folds"]) == len(ws)
    for k in range(n_folds):
        name = f"fold_{k:02d}"
        assert list((run / "tb" / name).glob("events.out.tfevents.*"))
        ckpt = torch.load(run / "checkpoints" / name / "epoch_0002.pt", weights_only=True)
        assert ckpt["epoch"] == 2 and ckpt["fold"] == k
        result = json.loads((run / "folds" / name / "result.json").read_text())
        assert result["metrics"] == metrics["folds"][k]
        assert result["metrics"]["n_train"] == int((ws.fold_window != k).sum())


# ----------------------------------------------------------------------------------- fold-parallel
@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "train", "from_gan"), [("window", "head", True), ("clip", "all", False)])
def test_one_and_two_processes_give_identical_folds(typed_shards, gan_run, tmp_path, protocol, train,
                                                     from_gan):  # fmt: skip
    # head from a GAN: the frozen features are computed in fixed chunks split over the processes and gathered;
    # all from scratch under clip folds: full forward/backward on frames, grouped folds.
    source = str(gan_run) if from_gan else "scratch"
    extra = [] if from_gan else ["--preset", "tiny"]
    single = run_transfer(_cfg(typed_shards, tmp_path / "p1", source, train=train, protocol=protocol,
                               preset=None if from_gan else "tiny"))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ddp_vad",
        "transfer", "--shards", str(typed_shards), "--out", str(tmp_path / "p2"), "--from", source, "--train", train,
        "--protocol", protocol, "--epochs", "2", "--batch-size", "8", "--no-progress", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = tmp_path / "p2"
    assert json.loads((double / "config.json").read_text())["world_size"] == 2
    for k in range(4):  # fold k really ran on process k % 2, which recorded the size and sha256 of its model
        result = json.loads((double / "folds" / f"fold_{k:02d}" / "result.json").read_text())
        assert result["rank"] == k % 2
        assert result["model_file"] == file_record(double / "folds" / f"fold_{k:02d}" / "model.safetensors")
    _same_results(single, double)

    oof = list(_oof(single).values())
    if protocol == "clip":  # grouped folds: no clip on both sides of any fold
        for k in range(4):
            test_clips = {r["clip"] for r in oof if r["fold"] == k}
            train_clips = {r["clip"] for r in oof if r["fold"] != k}
            assert test_clips and not test_clips & train_clips


# ------------------------------------------------------------------------------------------- resume
def test_killed_run_resumes_skips_finished_folds_and_matches_an_uninterrupted_run(
    typed_shards, gan_run, tmp_path, monkeypatch
):
    cfg = {"source": gan_run, "train": "head+lstm"}  # dropout before the LSTM: the RNG state must be restored
    reference = run_transfer(_cfg(typed_shards, tmp_path / "ref", **cfg))

    real_save = fold_module.save_fold_checkpoint

    def crash_after_fold1_epoch1(ckpt_dir, epoch, state):
        path = real_save(ckpt_dir, epoch, state)
        if state["fold"] == 1 and epoch == 1:
            raise RuntimeError("simulated kill")
        return path

    monkeypatch.setattr(fold_module, "save_fold_checkpoint", crash_after_fold1_epoch1)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_transfer(_cfg(typed_shards, run, **cfg))
    monkeypatch.undo()
    done = run / "folds" / "fold_00" / "result.json"
    assert done.is_file() and not (run / "folds" / "fold_01" / "result.json").exists()
    assert [p.name for p in (run / "checkpoints" / "fold_01").iterdir()] == ["epoch_0001.pt"]
    assert not (run / "metrics.json").exists()
    stamp = done.stat().st_mtime_ns

    # Spy on the epochs: a fold's seed depends only on (seed, fold), so retraining fold 1 from epoch 1 would give
    # the same numbers; only the epochs actually trained show that it resumed.
    trained, real_epoch = [], fold_module.train_epoch

    def counted(run_, k, epoch, *args):
        trained.append((k, epoch))
        return real_epoch(run_, k, epoch, *args)

    monkeypatch.setattr(fold_module, "train_epoch", counted)
    run_transfer(_cfg(typed_shards, run, **cfg))
    monkeypatch.undo()
    assert trained == [(1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]  # fold 0 done, fold 1 only its remaining epoch
    assert done.stat().st_mtime_ns == stamp  # fold 0 was not trained again
    _same_results(reference, run)

    with pytest.raises(UserError, match="not empty"):
        run_transfer(_cfg(typed_shards, run, resume="none", **cfg))
    with pytest.raises(UserError, match="other settings"):
        run_transfer(_cfg(typed_shards, run, epochs=3, **cfg))


# ------------------------------------------------------------------------------------------ holdout
def test_holdout_type_is_never_trained_on_and_reported(typed_shards, tmp_path):
    run = run_transfer(_cfg(typed_shards, tmp_path / "run", "scratch", preset="tiny", holdout_type="cart"))
    ws = load_window_set(typed_shards)
    cart = np.array(["cart" in t for t in ws.anomaly_types])
    assert cart.any() and not cart.all()
    holdout = _metrics(run)["holdout"]
    assert holdout["type"] == "cart" and holdout["n"] == int(cart.sum())
    assert holdout["n_anomalous"] == int(ws.labels[cart].sum())
    assert sum(p["n"] for p in holdout["per_fold"]) == holdout["n"]
    oof = _oof(run)
    correct = sum(int((oof[k]["score"] > 0.5) == bool(ws.labels[i])) for i, k in enumerate(ws.keys) if cart[i])
    assert holdout["accuracy"] == pytest.approx(correct / cart.sum())
    for k in range(4):
        row = _metrics(run)["folds"][k]
        assert row["n_train"] == int(((ws.fold_window != k) & ~cart).sum())
        assert holdout["per_fold"][k]["excluded_from_training"] == int(((ws.fold_window != k) & cart).sum())
    assert len(oof) == len(ws)  # held-out windows are still scored in their test fold

    with pytest.raises(UserError, match=r"zebra.*available: biker, cart, skater"):
        run_transfer(_cfg(typed_shards, tmp_path / "bad", "scratch", preset="tiny", holdout_type="zebra"))


# ------------------------------------------------------------------------------------------- errors
def test_cli_exits_2_naming_a_missing_gan_run(typed_shards, tmp_path):
    missing = tmp_path / "no-such-gan"
    result = CliRunner().invoke(
        cli, ["transfer", "--shards", str(typed_shards), "--out", str(tmp_path / "o"), "--from", str(missing)]
    )
    assert result.exit_code == 2
    assert str(missing) in result.output and "Traceback" not in result.output
    # The same through --config with the flag's name as key.
    conf = tmp_path / "t.yaml"
    conf.write_text(f"from: {missing}\nshards: {typed_shards}\nout: {tmp_path / 'o'}\n")
    result = CliRunner().invoke(cli, ["transfer", "--config", str(conf)])
    assert result.exit_code == 2 and str(missing) in result.output


def test_gan_of_another_frame_size_is_refused_naming_both(typed_shards, tmp_path):
    other = model_config_for("tiny", {"window": 10, "height": 28, "width": 36})
    save_model(build_lrcn(other), tmp_path / "gan" / "discriminator.safetensors", other, kind="discriminator")
    with pytest.raises(UserError, match=r"28x36.*24x36"):
        run_transfer(_cfg(typed_shards, tmp_path / "o", tmp_path / "gan"))
    with pytest.raises(UserError, match="folds"):
        run_transfer(_cfg(typed_shards, tmp_path / "o", "scratch", preset="tiny", folds=5))


def test_scratch_trains_everything_by_default_and_a_gan_run_its_head(typed_shards, gan_run, tmp_path):
    assert _cfg(typed_shards, tmp_path / "s", "scratch").train == "all"
    assert _cfg(typed_shards, tmp_path / "g", gan_run).train == "head"
    assert _cfg(typed_shards, tmp_path / "s2", "scratch", train="head").train == "head"  # the user still decides


def test_labelled_fraction_trains_each_fold_on_a_nested_share(typed_shards, gan_run, tmp_path):
    full = _metrics(run_transfer(_cfg(typed_shards, tmp_path / "full", gan_run)))
    half = _metrics(run_transfer(_cfg(typed_shards, tmp_path / "half", gan_run, labelled_fraction=0.5)))
    assert half["labelled_fraction"] == 0.5 and full["labelled_fraction"] == 1.0
    for f_full, f_half in zip(full["folds"], half["folds"], strict=True):
        assert f_half["n_test"] == f_full["n_test"]  # the test folds do not shrink
        assert f_half["n_train"] <= f_full["n_train"] // 2 + 2  # ceil per class
    assert _oof(tmp_path / "full").keys() == _oof(tmp_path / "half").keys()
    with pytest.raises(UserError, match="labelled_fraction"):  # another fraction never reuses a run's files
        run_transfer(_cfg(typed_shards, tmp_path / "half", gan_run, labelled_fraction=0.25))


def test_hparams_entry_holds_the_settings_and_mean_metrics(typed_shards, gan_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_transfer(_cfg(typed_shards, tmp_path / "hp", gan_run, labelled_fraction=0.5))
    acc = EventAccumulator(str(run / "tb" / "hparams"))
    acc.Reload()
    assert acc.Scalars("hparams/accuracy")[0].value == pytest.approx(_metrics(run)["mean"]["accuracy"])
