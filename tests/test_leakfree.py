"""The leak-free protocol: no model trained for a fold (the GAN included) has seen any window of that fold's test
clips; identical results on 1 and 2 processes; a GAN that saw every clip is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest
from ddp_vad.data.synth import SynthConfig, run_synth
from ddp_vad.errors import UserError
from ddp_vad.train.metrics import read_oof_scores
from ddp_vad.train.pretrain import PretrainConfig, run_pretrain
from ddp_vad.train.transfer import TransferConfig, run_transfer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """2 normal train clips and 6 labelled test clips (synthetic), 3 folds at 24x36."""
    root = tmp_path_factory.mktemp("leakfree")
    data = run_synth(SynthConfig(out=str(root / "data"), train_clips=2, test_clips=6, frames=40, height=48, width=72,
                                 seed=3), show_progress=False)  # fmt: skip
    cfg = ShardConfig(data=str(data), out=str(root / "shards"), height=24, width=36, folds=3, workers=1, shard_size=16)
    return build_shards(cfg, show_progress=False)


@pytest.fixture(scope="module")
def gan(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gan") / "run"
    cfg = PretrainConfig(shards=str(shards), out=str(out), preset="tiny", steps=6, batch_size=4, similarity_every=0,
                         image_every=0, checkpoint_every=0, workers=0, progress=False, debug_keys=True)  # fmt: skip
    return run_pretrain(cfg)


def test_labelled_set_is_every_window_of_the_test_clips_in_clip_grouped_folds(shards):
    ws = load_window_set(shards, select="leakfree")
    manifest = load_manifest(shards)
    assert set(ws.splits) == {"test"} and len(ws) == manifest["counts"]["leakfree_kept"]
    # Every window of every test clip (not a balanced subset), so every frame of the labelled clips is scored.
    per_clip = {c: sorted(s for c2, s in zip(ws.clips, ws.starts.tolist(), strict=True) if c2 == c) for c in ws.clips}
    assert all(starts == list(range(len(starts))) for starts in per_clip.values())
    assert len(ws) == 6 * (40 - 10 + 1) and int(ws.labels.sum()) * 2 != len(ws)
    folds = ws.folds("leakfree")
    assert sorted(set(folds.tolist())) == [0, 1, 2]
    for k in range(3):
        test_clips = {c for c, f in zip(ws.clips, folds, strict=True) if f == k}
        train_clips = {c for c, f in zip(ws.clips, folds, strict=True) if f != k}
        assert test_clips and not test_clips & train_clips
    # The method's set (window/clip protocols) is unchanged by the leak-free one: both splits, its own balance.
    kept = load_window_set(shards)
    assert len(kept) == manifest["counts"]["kept"] and {"train", "test"} <= set(kept.splits)


def test_the_gan_only_ever_saw_train_clips(shards, gan):
    seen = (gan / "debug" / "keys_rank0.txt").read_text().split()
    clips = {key.rsplit("_", 1)[0] for key in seen[1::2]}
    assert clips and all(c.startswith("Train") for c in clips)
    test_clips = set(load_window_set(shards, select="leakfree").clips)
    assert not clips & test_clips
    assert json.loads((gan / "config.json").read_text())["config"]["protocol"] == "leakfree"


def test_the_gans_monitoring_pool_holds_train_clip_windows_only(shards, tmp_path, monkeypatch):
    # Issue 22: the similarity curve, stall warning and real-vs-generated images compared against every clip's
    # balanced windows (test clips included); they must use the windows the GAN trains on.
    from ddp_vad.train.gan_monitor import GanMonitor

    pools = []
    real_close = GanMonitor.close
    monkeypatch.setattr(GanMonitor, "close", lambda self: (pools.append(self.real_pool), real_close(self))[1])
    cfg = PretrainConfig(shards=str(shards), out=str(tmp_path / "g"), preset="tiny", steps=2, batch_size=4,
                         similarity_every=1, image_every=0, checkpoint_every=0, workers=0, progress=False)  # fmt: skip
    run_pretrain(cfg)
    train = load_window_set(shards, select="train")
    as_bytes = lambda frames: {w.tobytes() for w in frames}  # noqa: E731
    assert pools and len(pools[0]) == len(train)  # 62 train windows < the pool's 256: all of them
    assert as_bytes(pools[0]) == as_bytes(train.frames)
    assert not as_bytes(pools[0]) & as_bytes(load_window_set(shards, select="leakfree").frames)


def test_a_seeded_draw_among_train_windows(shards):
    train = load_window_set(shards, select="train")
    draw = load_window_set(shards, select="train", n=10, seed=[1, 7])
    assert len(draw) == 10 == len(set(draw.keys)) and set(draw.keys) <= set(train.keys)
    assert draw.keys == load_window_set(shards, select="train", n=10, seed=[1, 7]).keys
    assert draw.keys != load_window_set(shards, select="train", n=10, seed=[2, 7]).keys
    for key, frames in zip(draw.keys, draw.frames, strict=True):
        assert np.array_equal(frames, train.frames[train.keys.index(key)])


@pytest.fixture(scope="module")
def transfer_run(shards, gan, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("transfer") / "t"
    return run_transfer(TransferConfig(shards=str(shards), out=str(out), source=str(gan), epochs=1, batch_size=8,
                                       progress=False))  # fmt: skip


def test_transfer_never_trains_on_a_test_fold_clip_and_refuses_a_gan_that_saw_every_clip(
    shards, gan, transfer_run, tmp_path
):
    run = transfer_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "leakfree"
    oof = read_oof_scores(run)
    ws = load_window_set(shards, select="leakfree")
    assert sorted(r["key"] for r in oof) == sorted(ws.keys)  # every labelled window scored once, no train clip
    for k in range(3):
        test_clips = {r["clip"] for r in oof if r["fold"] == k}
        trained_on = {r["clip"] for r in oof if r["fold"] != k}
        assert not test_clips & trained_on
        assert metrics["folds"][k]["n_train"] == sum(1 for r in oof if r["fold"] != k)

    leaky = run_pretrain(PretrainConfig(shards=str(shards), out=str(tmp_path / "leaky"), preset="tiny", steps=2,
                                        batch_size=4, similarity_every=0, image_every=0, checkpoint_every=0,
                                        workers=0, progress=False, protocol="window"))  # fmt: skip
    with pytest.raises(UserError, match="pretrained with --protocol window.*breaks the guarantee"):
        run_transfer(TransferConfig(shards=str(shards), out=str(tmp_path / "t2"), source=str(leaky), epochs=1,
                                    progress=False))  # fmt: skip


def test_baselines_score_exactly_the_windows_and_folds_transfer_scores(shards, transfer_run, tmp_path):
    from ddp_vad.eval.baselines import BaselinesConfig, run_baselines

    run_baselines(BaselinesConfig(shards=str(shards), out=str(tmp_path), methods="nb"))  # the default protocol
    baseline = {r["key"]: r["fold"] for r in read_oof_scores(tmp_path / "nb")}
    transfer = {r["key"]: r["fold"] for r in read_oof_scores(transfer_run)}
    assert baseline == transfer and len(baseline) > 0
    assert json.loads((tmp_path / "nb" / "metrics.json").read_text())["protocol"] == "leakfree"


@pytest.mark.slow
def test_one_and_two_processes_give_identical_leakfree_folds(shards, tmp_path):
    single = run_transfer(TransferConfig(shards=str(shards), out=str(tmp_path / "p1"), source="scratch",
                                         preset="tiny", epochs=2, batch_size=8, progress=False))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ddp_vad",
           "transfer", "--shards", str(shards), "--out", str(tmp_path / "p2"), "--from", "scratch", "--preset", "tiny",
           "--epochs", "2", "--batch-size", "8", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (single, tmp_path / "p2"))
    assert a["folds"] == b["folds"] and a["protocol"] == b["protocol"] == "leakfree"
    sa = {r["key"]: r["score"] for r in read_oof_scores(single)}
    sb = {r["key"]: r["score"] for r in read_oof_scores(tmp_path / "p2")}
    assert sa.keys() == sb.keys() and np.allclose([sa[k] for k in sa], [sb[k] for k in sa], atol=1e-6)


def test_too_few_labelled_clips_is_one_clear_error(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="protocol 'leakfree' is not available.*test clips.*--protocol clip or window"):
        run_transfer(TransferConfig(shards=str(tiny_shards), out=str(tmp_path / "t"), source="scratch",
                                    preset="tiny", epochs=1, progress=False))  # fmt: skip
