"""Shard building: round trip, contract fields, real-sample counts, atomicity, verify."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddp_vad.cli import cli
from ddp_vad.data import writer as writer_mod
from ddp_vad.data.reader import iter_blocks, iter_windows, load_window_set
from ddp_vad.data.shards import FORMAT, ShardConfig, build_shards, load_manifest, verify_shards
from ddp_vad.data.sources.ucsd import discover, read_clip
from ddp_vad.errors import UserError


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), height=24, width=36, folds=4, workers=1, shard_size=8)
    return ShardConfig(**{**base, **kw})


def test_round_trip_matches_frames_and_labels_computed_directly(tiny_shards, tmp_path):
    ws = load_window_set(tiny_shards)
    manifest = load_manifest(tiny_shards)
    clips = {c.name: c for c in discover(manifest["source"]).clips}
    decoded = {name: read_clip(c, 24, 36) for name, c in clips.items()}
    assert len(ws) == manifest["counts"]["kept"] == manifest["counts"]["kept_anomalous"] * 2
    for i, key in enumerate(ws.keys):
        clip, start = ws.clips[i], int(ws.starts[i])
        assert key == f"{clip}_{start:04d}"
        np.testing.assert_array_equal(ws.frames[i], decoded[clip][start : start + 10])
        labels = clips[clip].frame_labels[start : start + 10]
        np.testing.assert_array_equal(ws.frame_labels[i], labels)
        assert ws.labels[i] == int(labels.sum() >= 5)
        assert ws.splits[i] == ("train" if clip.startswith("Train") else "test")


def test_contract_fields_and_no_pickle(tiny_shards):
    manifest = load_manifest(tiny_shards)
    for field in (
        "source",
        "dataset",
        "window",
        "stride",
        "height",
        "width",
        "min_anomalous",
        "balance",
        "seed",
        "folds",
        "counts",
        "shards",
    ):
        assert field in manifest
    assert set(manifest["counts"]) >= {
        "clips",
        "windows",
        "anomalous",
        "normal",
        "kept",
        "kept_anomalous",
        "kept_normal",
    }
    assert manifest["format"] == FORMAT
    names = [s["name"] for s in manifest["shards"]]
    assert names == [f"UCSDped1-{i:06d}.tar" for i in range(len(names))]
    assert sorted(p.name for p in Path(tiny_shards).glob("*.tar")) == names
    with tarfile.open(Path(tiny_shards) / names[0]) as tar:  # plain webdataset tars: tarfile reads them
        members = tar.getnames()
        key = members[0].split(".")[0]
        assert re.fullmatch(r"(Train|Test)\d{3}_\d{4}", key)
        assert {m.split(".", 1)[1] for m in members if m.startswith(key + ".")} == {"frames.npy", "json"}
        frames = np.load(io.BytesIO(tar.extractfile(f"{key}.frames.npy").read()), allow_pickle=False)
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        assert set(meta) == {"clip", "split", "anomaly_types", "first_frame", "window", "frame_labels", "windows"}
        assert set(meta["windows"]) == {"start", "label", "kept", "fold_window", "fold_clip", "fold_leakfree"}
        assert frames.dtype == np.uint8 and frames.shape == (len(meta["frame_labels"]), 24, 36)
        assert key == f"{meta['clip']}_{meta['first_frame']:04d}" and meta["windows"]["start"][0] == meta["first_frame"]
    # What the stages see per window is the v1 per-window json, unchanged.
    window = next(iter_windows(tiny_shards))
    assert window["frames"].dtype == np.uint8 and window["frames"].shape == (10, 24, 36)
    meta_keys = {"clip", "start", "frame_labels", "anomaly_types", "split", "fold_window", "fold_clip", "fold_leakfree"}
    assert set(window["meta"]) == meta_keys
    assert window["label"] in (0, 1)


def test_frames_are_stored_once_in_blocks(tiny_shards):
    manifest = load_manifest(tiny_shards)
    blocks = list(iter_blocks(tiny_shards))
    assert len(blocks) == sum(s["blocks"] for s in manifest["shards"])
    assert sum(len(b.frames) for b in blocks) == sum(s["frames"] for s in manifest["shards"])
    by_clip: dict[str, list] = {}
    for b in blocks:
        assert b.kept.any() and b.n_kept <= manifest["block_windows"]
        by_clip.setdefault(b.clip, []).append(b)
    for clip_blocks in by_clip.values():  # every window in exactly one block; blocks overlap by <= window-1 frames
        clip_blocks.sort(key=lambda b: b.first)
        starts = np.concatenate([b.start for b in clip_blocks])
        assert (np.diff(starts) > 0).all()
        for a, b in zip(clip_blocks, clip_blocks[1:], strict=False):
            assert a.first + len(a.frames) - b.first <= 9
    assert sum(len(b.frames) for b in blocks) < 1.5 * manifest["clip_frames"]


def test_counts_on_the_real_sample_follow_its_gt_file(sample_dir, tmp_path):
    out = build_shards(
        ShardConfig(data=str(sample_dir), out=str(tmp_path / "s"), height=24, width=36, workers=2),
        show_progress=False,
    )
    manifest = load_manifest(out)
    # Independent count: parse the gt lines here, look up clips by name, apply the >= 5 of 10 rule.
    lines = [ln for ln in (sample_dir / "UCSDped1/Test/UCSDped1.m").read_text().splitlines() if "gt_frame" in ln]
    windows = anomalous = 0
    for clip_dir in sorted((sample_dir / "UCSDped1").glob("T*/T*[0-9]")):
        n = len(list(clip_dir.glob("*.tif")))
        flags = np.zeros(n, int)
        if clip_dir.parent.name == "Test":
            for a, b in re.findall(r"(\d+):(\d+)", lines[int(clip_dir.name[4:]) - 1]):
                flags[int(a) - 1 : int(b)] = 1
        for s in range(n - 9):
            windows += 1
            anomalous += int(flags[s : s + 10].sum() >= 5)
    c = manifest["counts"]
    assert (c["clips"], c["windows"], c["anomalous"]) == (16, windows, anomalous)
    assert (c["windows"], c["anomalous"], c["kept"]) == (3056, 1325, 2650)  # the sample's README
    assert c["kept_anomalous"] == c["kept_normal"] == min(anomalous, windows - anomalous)
    assert sum(s["samples"] for s in manifest["shards"]) == c["kept"]
    assert verify_shards(out, show_progress=False) == []


def test_build_is_deterministic(tiny_data, tmp_path):
    a = load_manifest(build_shards(_cfg(tiny_data, tmp_path / "a"), show_progress=False))
    b = load_manifest(build_shards(_cfg(tiny_data, tmp_path / "b", workers=2), show_progress=False))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_refuses_to_overwrite_and_replaces_cleanly(tiny_data, tmp_path):
    out = build_shards(_cfg(tiny_data, tmp_path / "s"), show_progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        build_shards(_cfg(tiny_data, out), show_progress=False)
    first = load_manifest(out)
    build_shards(_cfg(tiny_data, out, shard_size=5, overwrite=True), show_progress=False)
    second = load_manifest(out)
    assert len(second["shards"]) > len(first["shards"])
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in second["shards"]]
    assert not list(tmp_path.glob(".*"))  # no staging or old folders left behind


def test_a_build_killed_midway_leaves_the_old_set_intact(tiny_data, tmp_path, monkeypatch):
    out = build_shards(_cfg(tiny_data, tmp_path / "s"), show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real_write = writer_mod._write_shard

    def dying_write(path, blocks):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands in for a kill between two shards
        return real_write(path, blocks)

    monkeypatch.setattr(writer_mod, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build_shards(_cfg(tiny_data, out, overwrite=True), show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # No complete-looking tar outside the hidden staging folder; the next build cleans it up.
    monkeypatch.setattr(writer_mod, "_write_shard", real_write)
    build_shards(_cfg(tiny_data, out, overwrite=True), show_progress=False)
    assert not list(tmp_path.glob(".*"))


def test_verify_names_a_corrupted_shard_and_cli_exits_2(tiny_data, tmp_path):
    out = build_shards(_cfg(tiny_data, tmp_path / "s"), show_progress=False)
    victim = sorted(out.glob("*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    runner = CliRunner()
    ok = runner.invoke(cli, ["shard", "info", str(out)])
    assert ok.exit_code == 0 and "anomalous" in ok.output
    bad = runner.invoke(cli, ["shard", "info", str(out), "--verify"])
    assert bad.exit_code == 2
    assert f"{victim.name}: sha256 mismatch" in bad.output


def test_cli_build_with_config_file_and_flag_override(tiny_data, tmp_path):
    cfg = tmp_path / "shards.toml"
    cfg.write_text("height = 24\nwidth = 36\nfolds = 3\nmin-anomalous = 6\nworkers = 1\n")
    out = tmp_path / "s"
    result = CliRunner().invoke(
        cli, ["shard", "build", str(tiny_data), "--out", str(out), "--config", str(cfg), "--folds", "2"]
    )
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert (manifest["height"], manifest["min_anomalous"], manifest["folds"]) == (24, 6, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("heigth: 3\n")
    result = CliRunner().invoke(cli, ["shard", "build", str(tiny_data), "--out", str(out), "--config", str(bad)])
    assert result.exit_code == 2 and "heigth" in result.output
