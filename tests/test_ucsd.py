"""UCSD reader: discovery, gt parsing and the error for each kind of bad input."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_clips, write_ucsd
from PIL import Image

from ddp_vad.cli import cli
from ddp_vad.data.sources.ucsd import discover, parse_gt_file, read_clip, resolve_dataset_dir
from ddp_vad.errors import UserError


def _gt_ranges_by_clip(m_file):
    """Independent re-reading of the .m file for the checks below."""
    out = {}
    for k, line in enumerate(ln for ln in m_file.read_text().splitlines() if "gt_frame" in ln):
        out[f"Test{k + 1:03d}"] = [tuple(map(int, r.split(":"))) for r in re.findall(r"\d+:\d+", line)]
    return out


def test_sample_clips_and_labels_follow_the_gt_file(sample_dir):
    ds = discover(sample_dir)
    assert ds.name == "UCSDped1"
    names = [c.name for c in ds.clips]
    assert names == [
        "Train001",
        "Train002",
        "Train003",
        "Train004",
        "Test001",
        "Test003",
        "Test004",
        "Test005",
        "Test009",
        "Test012",
        "Test014",
        "Test019",
        "Test024",
        "Test029",
        "Test032",
        "Test033",
    ]
    gt = _gt_ranges_by_clip(ds.gt_path)
    for clip in ds.clips:
        assert clip.n_frames == 200
        expected = np.zeros(200, np.uint8)
        for a, b in gt.get(clip.name, []) if clip.split == "test" else []:
            expected[a - 1 : b] = 1
        np.testing.assert_array_equal(clip.frame_labels, expected, err_msg=clip.name)
    # Test032 has two ranges; Test001 has no pixel masks in the dataset
    assert int(next(c for c in ds.clips if c.name == "Test032").frame_labels.sum()) == 52 + 51
    assert next(c for c in ds.clips if c.name == "Test001").mask_dir is None
    assert next(c for c in ds.clips if c.name == "Test003").mask_dir is not None


def test_accepts_root_or_dataset_folder_and_needs_choice_when_both(sample_dir, tmp_path):
    assert resolve_dataset_dir(sample_dir) == resolve_dataset_dir(sample_dir / "UCSDped1")
    write_ucsd(tmp_path, {"Train001": (12, None)}, name="UCSDped1")
    write_ucsd(tmp_path, {"Train001": (12, None)}, name="UCSDped2")
    with pytest.raises(UserError, match="--dataset"):
        resolve_dataset_dir(tmp_path)
    assert resolve_dataset_dir(tmp_path, "UCSDped2").name == "UCSDped2"


def test_gt_parser_whitespace_variants_and_explicit_index(tmp_path):
    m = tmp_path / "x.m"
    m.write_text(
        "TestVideoFile = {};\n"
        "% a comment\n"
        "TestVideoFile{end+1}.gt_frame = [60:152];\n"
        "TestVideoFile{end+1}.gt_frame=[ 5 : 90 ,140:200 ];\n"
        "  TestVideoFile{end + 1}.gt_frame = [1:15 45:113]  ;  \n"
        "TestVideoFile{7}.gt_frame = [3];\n"
    )
    assert parse_gt_file(m) == {
        "Test001": [(60, 152)],
        "Test002": [(5, 90), (140, 200)],
        "Test003": [(1, 15), (45, 113)],
        "Test007": [(3, 3)],
    }


@pytest.mark.parametrize(
    "line",
    [
        "TestVideoFile{end+1}.gt_frame = [60-152];",
        "TestVideoFile{end+1}.gt_frame = [9:3];",
        "something else entirely",
    ],
)
def test_malformed_gt_line_names_file_and_line(tmp_path, line):
    m = tmp_path / "bad.m"
    m.write_text("TestVideoFile = {};\nTestVideoFile{end+1}.gt_frame = [1:5];\n" + line + "\n")
    with pytest.raises(UserError, match=r"bad\.m:3"):
        parse_gt_file(m)


def test_missing_data_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no UCSD-style dataset"):
        discover(tmp_path / "empty")


def test_clip_with_no_frames(sample_dir, tmp_path):
    ds = copy_clips(sample_dir, tmp_path, ["Train001"])
    (ds / "Train" / "Train002").mkdir()
    with pytest.raises(UserError, match="Train002"):
        discover(ds)


def test_gap_in_frame_numbers(sample_dir, tmp_path):
    ds = copy_clips(sample_dir, tmp_path, ["Train001"])
    (ds / "Train" / "Train001" / "007.tif").unlink()
    with pytest.raises(UserError, match="missing frame 007"):
        discover(ds)


def test_truncated_tiff_names_the_file(sample_dir, tmp_path):
    ds = copy_clips(sample_dir, tmp_path, ["Train001"])
    bad = ds / "Train" / "Train001" / "005.tif"
    bad.write_bytes(bad.read_bytes()[:300])
    clip = discover(ds).clips[0]
    with pytest.raises(UserError, match=r"005\.tif"):
        read_clip(clip, 120, 182)


def test_mixed_frame_sizes_inside_a_clip(sample_dir, tmp_path):
    ds = copy_clips(sample_dir, tmp_path, ["Train001"])
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(ds / "Train" / "Train001" / "010.tif")
    with pytest.raises(UserError, match=r"010\.tif.*100x100"):
        read_clip(discover(ds).clips[0], 120, 182)


def test_gt_range_past_the_end_of_a_clip(sample_dir, tmp_path):
    ds = copy_clips(sample_dir, tmp_path, ["Test003"])
    for f in (ds / "Test" / "Test003").glob("*.tif"):
        if int(f.stem) >= 100:
            f.unlink()  # keep frames 001..099; gt says 91:200
    with pytest.raises(UserError, match=r"91:200 of Test003 is past its last frame \(99\)"):
        discover(ds)


def test_test_clip_without_gt_entry(sample_dir, tmp_path):
    ds = copy_clips(sample_dir, tmp_path, ["Test003"])
    shutil.copytree(ds / "Test" / "Test003", ds / "Test" / "Test037")
    with pytest.raises(UserError, match="no ground-truth entry for clip Test037"):
        discover(ds)


def test_different_clip_lengths_and_frame_sizes(tmp_path):
    ds = write_ucsd(tmp_path, {"Train001": (15, None), "Test002": (31, [(3, 9)])}, size=(40, 60))
    clips = discover(ds).clips
    assert [c.n_frames for c in clips] == [15, 31]
    frames = read_clip(clips[1], 20, 30)
    assert frames.shape == (31, 20, 30) and frames.dtype == np.uint8


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["shard", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]
    assert "Traceback" not in result.output
