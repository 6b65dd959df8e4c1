"""Shard format v2 (frames stored once, in blocks): same windows as v1, old sets refused, manifest validation."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddp_vad.cli import cli
from ddp_vad.data.reader import iter_windows, load_window_set, stream_batches
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest
from ddp_vad.data.synth import SynthConfig, run_synth
from ddp_vad.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def v1():
    """The frozen v1 builder/reader of benchmarks/v1_format.py (not a package: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("v1_format", REPO / "benchmarks" / "v1_format.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its decode function must pickle by name for the worker processes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return run_synth(
        SynthConfig(out=str(root / "data"), train_clips=2, test_clips=4, frames=60, height=48, width=72, seed=1),
        show_progress=False,
    )


def assert_same_windows(v1, old_dir: Path, new_dir: Path) -> None:
    """Both formats yield the same windows: keys, pixels, labels, frame labels, folds, types, splits."""
    old = v1.load_v1(old_dir)
    new = {w["key"]: w for w in iter_windows(new_dir)}
    assert old.keys() == new.keys() and len(new) == load_manifest(new_dir)["counts"]["kept"]
    for key, w in new.items():
        np.testing.assert_array_equal(w["frames"], old[key]["frames"], err_msg=key)
        meta = {k: v for k, v in w["meta"].items() if k != "fold_leakfree"}  # format 2's addition
        assert (w["label"], meta) == (old[key]["label"], old[key]["meta"]), key
    ws = load_window_set(new_dir)  # the in-memory set, row by row
    for i, key in enumerate(ws.keys):
        meta = old[key]["meta"]
        np.testing.assert_array_equal(ws.frames[i], old[key]["frames"], err_msg=key)
        assert ws.labels[i] == old[key]["label"] and ws.frame_labels[i].tolist() == meta["frame_labels"]
        assert (ws.clips[i], ws.starts[i], ws.splits[i]) == (meta["clip"], meta["start"], meta["split"])
        assert (ws.fold_window[i], ws.fold_clip[i]) == (meta["fold_window"], meta["fold_clip"])
        assert ws.anomaly_types[i] == meta["anomaly_types"]
    streamed = [k for b in stream_batches(new_dir, 7, workers=2) for k in b["key"]]
    assert sorted(streamed) == sorted(old)
    m_old, m_new = (json.loads((d / "manifest.json").read_text()) for d in (old_dir, new_dir))
    for key in ("counts", "protocols", "anomaly_types", "window", "stride", "folds", "seed"):
        assert m_old[key] == m_new[key], key


@pytest.mark.parametrize(
    "options",
    [
        dict(shard_size=30, block_windows=16),
        dict(shard_size=12, window=6, stride=4, min_anomalous=3, balance="none"),
    ],
    ids=["window10-stride1", "window6-stride4-unbalanced"],
)
def test_v1_and_v2_yield_identical_windows_on_synthetic_data(v1, synth_data, tmp_path, options):
    cfg = dict(data=str(synth_data), height=24, width=36, folds=3, workers=1, **options)
    old = v1.build_shards_v1(ShardConfig(out=str(tmp_path / "v1"), **cfg))
    new = build_shards(ShardConfig(out=str(tmp_path / "v2"), **cfg), show_progress=False)
    assert any(w["meta"]["anomaly_types"] for w in iter_windows(new))  # the synthetic types travel too
    assert_same_windows(v1, old, new)


def test_v1_and_v2_yield_identical_windows_on_the_real_sample(v1, sample_dir, tmp_path):
    cfg = dict(data=str(sample_dir), height=24, width=36, workers=2)
    old = v1.build_shards_v1(ShardConfig(out=str(tmp_path / "v1"), **cfg))
    new = build_shards(ShardConfig(out=str(tmp_path / "v2"), **cfg), show_progress=False)
    assert load_manifest(new)["counts"]["kept"] == 2650
    assert_same_windows(v1, old, new)
    # Frames stored once: the tars hold about 1.1x the clips' frames, v1 about 7.5x.
    frame_bytes = load_manifest(new)["clip_frames"] * 24 * 36
    size = {d: sum(p.stat().st_size for p in d.glob("*.tar")) for d in (old, new)}
    assert size[new] <= 1.5 * frame_bytes < size[old] / 4


def test_a_v1_shard_set_is_refused_with_one_line(v1, tiny_data, tmp_path):
    old = v1.build_shards_v1(ShardConfig(data=str(tiny_data), out=str(tmp_path / "v1"), height=24, width=36, folds=4))
    with pytest.raises(UserError, match=r"ddp_vad-shards/1.*rebuild with `ddp_vad shard build`"):
        load_window_set(old)
    result = CliRunner().invoke(cli, ["shard", "info", str(old)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "rebuild with `ddp_vad shard build`" in lines[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("counts"), r"'counts' must be an object, it is missing"),
        (lambda m: m.update(folds="many"), r"'folds' must be an integer >= 2, got 'many'"),
        (lambda m: m["counts"].update(kept="12"), r"'counts.kept' must be an integer >= 0, got '12'"),
        (lambda m: m["shards"][1].update(samples=None), r"'shards\[1\].samples' must be an integer"),
        (lambda m: m["shards"][0].update(name="../x.tar"), r"'shards\[0\].name' must be a tar file name"),
        (lambda m: m.update(window=10.0), r"'window' must be an integer >= 1, got 10.0"),
        (lambda m: m["protocols"]["clip"].update(available="yes"), r"'protocols.clip.available' must be true"),
        (lambda m: m.update(shards={}), r"'shards' must be a list"),
    ],
)
def test_a_manifest_with_wrong_types_is_one_error_naming_the_key(tiny_shards, tmp_path, change, message):
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "s"))
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        load_manifest(copy)
    for args in (["shard", "info", str(copy)], ["baselines", "--shards", str(copy), "--out", str(tmp_path / "b")]):
        result = CliRunner().invoke(cli, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "manifest.json" in lines[0], result.output
        assert "Traceback" not in result.output
