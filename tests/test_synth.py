"""Synthetic UCSD-style data: layout, ground truth, determinism, overwrite policy, CLI and reader round trip."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddp_vad.data.synth import ANOMALY_TYPES, SynthConfig, render, run_synth
from ddp_vad.data.synth import scene as scene_module
from ddp_vad.errors import UserError

H, W, FRAMES = 48, 72, 30
GT_FIRST = "TestVideoFile = {};"
GT_LINE = re.compile(r"^TestVideoFile\{end\+1\}\.gt_frame = \[(\d+:\d+(?:, \d+:\d+)*)\];$")


def _config(out: Path, **overrides) -> SynthConfig:
    values = dict(out=out, train_clips=2, test_clips=5, frames=FRAMES, height=H, width=W, seed=0)
    return SynthConfig(**{**values, **overrides})


def _digest(dataset: Path) -> str:
    """Hash of every data file (names and bytes); config.json is left out because it records OUT."""
    h = hashlib.sha256()
    for path in sorted(p for p in dataset.rglob("*") if p.is_file() and p.name != "config.json"):
        h.update(str(path.relative_to(dataset)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _parse_gt(path: Path) -> list[list[tuple[int, int]]]:
    lines = path.read_text().splitlines()
    assert lines[0] == GT_FIRST
    entries = []
    for line in lines[1:]:
        match = GT_LINE.match(line)
        assert match, f"not UCSD gt syntax: {line!r}"
        entries.append([tuple(int(v) for v in part.split(":")) for part in match[1].split(", ")])
    return entries


def _labels(ranges: list[tuple[int, int]], n: int) -> np.ndarray:
    labels = np.zeros(n, bool)
    for first, last in ranges:
        labels[first - 1 : last] = True
    return labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny synthetic set (2 train + 5 test clips of 30 frames, 48x72); read-only for the tests."""
    return run_synth(_config(tmp_path_factory.mktemp("synth")), show_progress=False)


def test_layout(dataset: Path) -> None:
    assert dataset.name == "SynthPed"
    assert sorted(p.name for p in (dataset / "Train").iterdir()) == ["Train001", "Train002"]
    tests = [f"Test{k:03d}" for k in range(1, 6)]
    assert sorted(p.name for p in (dataset / "Test").iterdir()) == sorted(
        tests + [f"{t}_gt" for t in tests] + ["SynthPed.m"]
    )
    expected = [f"{i:03d}.tif" for i in range(1, FRAMES + 1)]
    for clip in [dataset / "Train" / "Train001", dataset / "Test" / "Test005"]:
        assert sorted(p.name for p in clip.iterdir()) == expected
        with Image.open(clip / "017.tif") as img:
            assert (img.format, img.mode, img.size) == ("TIFF", "L", (W, H))
    assert sorted(p.name for p in (dataset / "Test" / "Test003_gt").iterdir()) == [
        e.replace(".tif", ".bmp") for e in expected
    ]
    assert not list(dataset.parent.glob(".SynthPed*"))  # no partial or old copies left behind


def test_gt_file_matches_masks(dataset: Path) -> None:
    entries = _parse_gt(dataset / "Test" / "SynthPed.m")
    assert len(entries) == 5
    for k, ranges in enumerate(entries, start=1):
        assert all(1 <= a <= b <= FRAMES for a, b in ranges)
        assert all(b1 + 1 < a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:], strict=False)), "ranges apart"
        masks = [np.asarray(Image.open(p)) for p in sorted((dataset / "Test" / f"Test{k:03d}_gt").glob("*.bmp"))]
        masks = np.stack(masks)
        assert masks.shape == (FRAMES, H, W)
        assert set(np.unique(masks)) <= {0, 255}
        visible = masks.any(axis=(1, 2))
        assert visible.any(), f"Test{k:03d} has no anomalous frame"
        np.testing.assert_array_equal(_labels(ranges, FRAMES), visible)


def test_every_anomaly_type_appears(dataset: Path) -> None:
    types = json.loads((dataset / "anomaly_types.json").read_text())
    assert json.loads((dataset.parent / "anomaly_types.json").read_text()) == types
    assert sorted(types) == [f"Test{k:03d}" for k in range(1, 6)]
    assert all(len(v) == 1 for v in types.values())
    assert sorted(v[0] for v in types.values()) == sorted(ANOMALY_TYPES)
    assert [types[f"Test{k:03d}"][0] for k in range(1, 6)] == render.anomaly_type_order(0)


def test_train_clips_have_no_anomaly(dataset: Path) -> None:
    """Rebuilt from the scene's parts rather than by calling the clip renderer (which would only compare it with
    itself): the crowd of a train clip holds walkers only, none flagged anomalous; drawn with the anomaly mask on,
    no pixel is anomalous; and those exact frames are what is on disk."""
    assert not list((dataset / "Train").glob("*_gt"))
    scene = scene_module.build_scene(H, W, 0)
    for index in range(2):
        rng = np.random.default_rng([0, 2, 0, index])  # the train clip's stream (seed 0, split train)
        actors = scene_module._crowd(rng, FRAMES)
        assert actors and {a.kind for a in actors} == {"walker"} and not any(a.anomaly for a in actors)
        frames, mask = render._render_clip(scene, actors, FRAMES, rng, with_mask=True)
        assert not mask.any()
        clip = dataset / "Train" / f"Train{index + 1:03d}"
        on_disk = np.stack([np.asarray(Image.open(p)) for p in sorted(clip.glob("*.tif"))])
        np.testing.assert_array_equal(on_disk, frames)


def test_scene_has_people_and_texture(dataset: Path) -> None:
    """Frames are not blank: a textured background with moving dark walkers (frame differences)."""
    clip = np.stack([np.asarray(Image.open(p)) for p in sorted((dataset / "Train" / "Train001").glob("*.tif"))])
    assert 40 < clip.mean() < 200 and clip.std() > 15
    moving = np.abs(clip[-1].astype(int) - clip[0].astype(int)) > 40
    assert moving.sum() > 10, "no walker moved"


def test_reader_reads_synthetic_data(dataset: Path) -> None:
    from ddp_vad.data.sources import ucsd

    ds = ucsd.discover(dataset.parent)
    assert ds.name == "SynthPed"
    assert [c.name for c in ds.clips] == ["Train001", "Train002"] + [f"Test{k:03d}" for k in range(1, 6)]
    entries = _parse_gt(dataset / "Test" / "SynthPed.m")
    for clip in ds.clips:
        assert clip.n_frames == FRAMES
        if clip.split == "train":
            assert not clip.frame_labels.any() and clip.mask_dir is None
        else:
            expected = _labels(entries[int(clip.name[4:]) - 1], FRAMES)
            np.testing.assert_array_equal(clip.frame_labels.astype(bool), expected)
            assert clip.mask_dir == dataset / "Test" / f"{clip.name}_gt"
    assert ds.anomaly_types == json.loads((dataset / "anomaly_types.json").read_text())
    frames = ucsd.read_clip(ds.clips[0], H, W)
    assert frames.shape == (FRAMES, H, W) and frames.dtype == np.uint8


def test_deterministic_from_seed(tmp_path: Path) -> None:
    small = dict(train_clips=1, test_clips=2, frames=12)
    first = run_synth(_config(tmp_path / "a", **small), show_progress=False)
    again = run_synth(_config(tmp_path / "b", **small), show_progress=False)
    other = run_synth(_config(tmp_path / "c", seed=1, **small), show_progress=False)
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)


def test_refuses_to_overwrite_and_replaces_cleanly(tmp_path: Path) -> None:
    small = dict(train_clips=1, test_clips=1, frames=10)
    dataset = run_synth(_config(tmp_path, **small), show_progress=False)
    before = _digest(dataset)
    with pytest.raises(UserError, match=re.escape(str(dataset))):
        run_synth(_config(tmp_path, seed=3, **small), show_progress=False)
    assert _digest(dataset) == before  # the refused run changed nothing
    (dataset / "stale.txt").write_text("from an older run")
    (tmp_path / ".SynthPed.partial" / "junk").mkdir(parents=True)  # left by a killed run
    replaced = run_synth(_config(tmp_path, seed=3, overwrite=True, **small), show_progress=False)
    assert replaced == dataset and not (dataset / "stale.txt").exists()
    assert _digest(replaced) == _digest(run_synth(_config(tmp_path / "fresh", seed=3, **small), show_progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SynthPed", "anomaly_types.json", "fresh"]


@pytest.mark.parametrize(
    "field, value", [("frames", 5), ("height", 8), ("seed", -1), ("test_clips", 0), ("train_clips", 1000)]
)
def test_config_rejects_bad_values(tmp_path: Path, field: str, value: int) -> None:
    with pytest.raises(UserError, match=field.replace("_", "-")):
        _config(tmp_path, **{field: value})


def test_out_must_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        run_synth(_config(tmp_path / "file"), show_progress=False)


def test_cli_synth(tmp_path: Path) -> None:
    from ddp_vad.cli import cli

    out = tmp_path / "out"
    args = ["synth", str(out), "--train-clips", "1", "--test-clips", "2", "--frames", "12", "--height", "48",
            "--width", "72"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(list((out / "SynthPed" / "Test" / "Test002").glob("*.tif"))) == 12
    assert len(_parse_gt(out / "SynthPed" / "Test" / "SynthPed.m")) == 2
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0


def test_anomaly_moves_differently_from_walkers() -> None:
    """Bikers and skaters move several times faster than walkers; wheelchairs slower (mask centroids)."""
    scene = scene_module.build_scene(96, 144, 0)
    speeds = {}
    for kind in ("biker", "skater", "wheelchair", "grass"):
        rng = np.random.default_rng(7)
        actor = scene_module._fallback(kind, 40, rng)[0]
        _, mask = render._render_clip(scene, [actor], 40, rng, with_mask=True)
        ys, xs = [], []
        for m in mask[15:25]:  # around mid-clip the fallback actor is in plain sight
            yy, xx = np.nonzero(m)
            ys.append(yy.mean())
            xs.append(xx.mean())
        speeds[kind] = np.hypot(np.diff(xs), np.diff(ys)).mean()
    assert speeds["biker"] > 2 * speeds["grass"] and speeds["skater"] > 2 * speeds["grass"]
    assert speeds["wheelchair"] < speeds["grass"]
