"""Dataset readers behind open_dataset: layout detection, Avenue (real label files), ShanghaiTech, the generic
videos + labels.csv layout, --fps resampling, decode-time count mismatches, and every bad input through the CLI."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_CLIPS, square_frames, write_ucsd
from PIL import Image

from ddp_vad.cli import cli
from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest
from ddp_vad.data.sources import detect_format, open_dataset
from ddp_vad.data.sources.ucsd import discover
from ddp_vad.data.sources.video import VideoClip, frame_times, gray_of, write_video
from ddp_vad.errors import UserError


def _build(data, out, **kw):
    base = dict(data=str(data), out=str(out), height=24, width=36, folds=2, workers=1, shard_size=16)
    return load_manifest(build_shards(ShardConfig(**{**base, **kw}), show_progress=False))


def _expected_windows(clips, window=10, min_anomalous=5) -> tuple[int, int]:
    """(windows, anomalous windows) of some clips, counted here by brute force from their frame labels."""
    windows = anomalous = 0
    for labels in (c.frame_labels for c in clips):
        starts = range(len(labels) - window + 1)
        windows += len(starts)
        anomalous += sum(int(labels[s : s + window].sum() >= min_anomalous) for s in starts)
    return windows, anomalous


def _counts(manifest: dict) -> tuple[int, int]:
    return manifest["counts"]["windows"], manifest["counts"]["anomalous"]


def _frames_dir(folder: Path, frames: np.ndarray, first: int = 1, suffix: str = ".png") -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i + first:03d}{suffix}")
    return folder


def _cli_error(args: list[str]) -> str:
    """Run the CLI, expect exit 2 with a one-line error; return that line."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ------------------------------------------------------------------------------------------- Avenue
@pytest.fixture(scope="module")
def avenue(avenue_labels_dir, tmp_path_factory) -> Path:
    """Avenue layout: stand-in videos (640x360, the real frame counts) beside the two real label files."""
    root = tmp_path_factory.mktemp("avenue") / "Avenue Dataset"
    shutil.copytree(avenue_labels_dir / "testing_label_mask", root / "testing_label_mask")
    write_video(root / "training_videos" / "01.avi", square_frames(20, (360, 640)), fps=25)
    write_video(root / "testing_videos" / "08.avi", square_frames(36, (360, 640), seed=8), fps=25)
    write_video(root / "testing_videos" / "21.avi", square_frames(76, (360, 640), seed=21), fps=25)
    return root


def test_avenue_labels_come_from_the_real_masks(avenue):
    ds = open_dataset(avenue)
    assert ds.format == "avenue" and [c.name for c in ds.clips] == ["Train01", "Test08", "Test21"]
    train, test08, test21 = ds.clips
    assert (train.n_frames, test08.n_frames, test21.n_frames) == (20, 36, 76)
    assert train.frame_labels.sum() == 0 and test08.frame_labels.all()
    np.testing.assert_array_equal(np.flatnonzero(test21.frame_labels) + 1, np.arange(14, 67))  # frames 14..66
    assert test21.mask_path == avenue / "testing_label_mask" / "21_label.mat"
    assert test08.read(24, 36).shape == (36, 24, 36)


def test_avenue_shards_count_windows_from_the_masks(avenue, tmp_path):
    manifest = _build(avenue, tmp_path / "s", balance="none")
    assert manifest["layout"] == "avenue"
    assert _counts(manifest) == _expected_windows(open_dataset(avenue).clips) == (11 + 27 + 67, 27 + 54)
    # decode speed per worker: every frame of every clip was decoded (nothing is balanced away)
    assert sum(w["frames"] for w in manifest["decode"]["workers"]) == 20 + 36 + 76
    assert manifest["decode"]["frames_per_s_per_worker"] > 0


def test_avenue_labels_under_ground_truth_demo_and_count_mismatch(avenue, tmp_path):
    root = tmp_path / "avenue"
    shutil.copytree(avenue, root)
    (root / "ground_truth_demo").mkdir()
    shutil.move(root / "testing_label_mask", root / "ground_truth_demo" / "testing_label_mask")
    assert open_dataset(root).gt_path == root / "ground_truth_demo" / "testing_label_mask"
    write_video(root / "testing_videos" / "21.avi", square_frames(70, (360, 640)), fps=25)
    line = _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])
    assert "21_label.mat: 76 frame masks, but" in line and "21.avi has 70 frames" in line
    (root / "testing_videos" / "21.avi").unlink()
    write_video(root / "testing_videos" / "05.avi", square_frames(12, (36, 64)), fps=25)
    assert "5_label.mat not found" in _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])


# ------------------------------------------------------------------------------------- ShanghaiTech
@pytest.fixture(scope="module")
def shanghaitech(tmp_path_factory) -> Path:
    """ShanghaiTech layout: training videos, test clips as 0-based JPEG folders, .npy frame masks."""
    root = tmp_path_factory.mktemp("stc") / "shanghaitech"
    write_video(root / "training" / "videos" / "01_001.avi", square_frames(24), fps=24)
    write_video(root / "training" / "videos" / "01_002.avi", square_frames(20, seed=2), fps=24)
    masks = root / "testing" / "test_frame_mask"
    masks.mkdir(parents=True)
    for clip, n, (a, b) in (("01_0014", 30, (10, 22)), ("01_0015", 26, (0, 6))):
        _frames_dir(root / "testing" / "frames" / clip, square_frames(n, seed=n), first=0, suffix=".jpg")
        labels = np.zeros(n, np.int64)
        labels[a:b] = 1
        np.save(masks / f"{clip}.npy", labels)
    return root


def test_shanghaitech_layout(shanghaitech, tmp_path):
    ds = open_dataset(shanghaitech)
    assert ds.format == "shanghaitech"
    assert [(c.name, c.split, c.n_frames) for c in ds.clips] == [
        ("01_001", "train", 24),
        ("01_002", "train", 20),
        ("01_0014", "test", 30),
        ("01_0015", "test", 26),
    ]
    npy = shanghaitech / "testing" / "test_frame_mask" / "01_0014.npy"
    np.testing.assert_array_equal(ds.clips[2].frame_labels, np.load(npy))
    assert ds.clips[2].frame_paths[0].name == "000.jpg"
    manifest = _build(shanghaitech, tmp_path / "s", balance="none")
    assert _counts(manifest) == _expected_windows(ds.clips)
    ws = load_window_set(tmp_path / "s")
    i = ws.keys.index("01_0014_0008")
    np.testing.assert_array_equal(ws.frames[i], ds.clips[2].read(24, 36)[8:18])


def test_shanghaitech_bad_masks(shanghaitech, tmp_path):
    root = tmp_path / "stc"
    shutil.copytree(shanghaitech, root)
    np.save(root / "testing/test_frame_mask/01_0014.npy", np.zeros(31))
    line = _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])
    assert "01_0014.npy: 31 frame labels, but" in line and "has 30 frames" in line
    (root / "testing/test_frame_mask/01_0014.npy").unlink()
    assert "01_0014.npy not found" in _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])


# --------------------------------------------------------------------------- generic: videos + labels.csv
def _videos_layout(root: Path, labels: str) -> Path:
    write_video(root / "train" / "cam1 monday.mp4", square_frames(30), fps=10)
    write_video(root / "test" / "cam1.friday.mp4", square_frames(40, seed=1), fps=10)
    write_video(root / "test" / "door.avi", square_frames(25, seed=2), fps=10)
    _frames_dir(root / "test" / "hall", square_frames(22, seed=3))
    (root / "labels.csv").write_text(labels)
    return root


GOOD_LABELS = (
    "clip,start,end,type\n# two events that overlap\ncam1.friday,5,20,fall\ncam1.friday,15,30,fight\nhall,1,12,\n"
)


def test_videos_layout_labels_types_and_overlaps(tmp_path):
    root = _videos_layout(tmp_path / "mine", GOOD_LABELS)
    ds = open_dataset(root)
    assert ds.format == "videos" and ds.gt_path == root / "labels.csv"
    by_name = {c.name: c for c in ds.clips}
    assert list(by_name) == ["cam1 monday", "cam1_friday", "door", "hall"]  # '.' would split a sample key
    assert [c.split for c in ds.clips] == ["train", "test", "test", "test"]
    np.testing.assert_array_equal(np.flatnonzero(by_name["cam1_friday"].frame_labels) + 1, np.arange(5, 31))
    assert by_name["door"].frame_labels.sum() == 0  # no rows: normal
    assert by_name["hall"].frame_labels.sum() == 12
    assert ds.anomaly_types == {"cam1_friday": ["fall", "fight"]}
    manifest = _build(root, tmp_path / "s")
    assert manifest["anomaly_types"] == {"cam1_friday": ["fall", "fight"]}
    assert _counts(manifest) == _expected_windows(ds.clips)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("clip,start,end\ncam1.friday,5,20\nnope,1,3\n", r"labels\.csv:3: clip 'nope' is not a video or frame folder"),
        ("cam1.friday,5,41\n", r"labels\.csv:1: range 5-41 of cam1\.friday is past its last frame \(40\)"),
        ("clip,start,end\n\ncam1.friday,20,5\n", r"labels\.csv:3: inverted range 20-5"),
        ("cam1.friday,0,5\n", r"labels\.csv:1: frames are numbered from 1"),
        ("cam1.friday,a,5\n", r"labels\.csv:1: start and end must be frame numbers"),
        ("cam1.friday,1,5,x,y\n", r"labels\.csv:1: expected clip,start,end\[,type\], got 5 fields"),
        ("cam1 monday,1,5\n", r"labels\.csv:1: clip 'cam1 monday' is in train/"),
    ],
)
def test_bad_labels_rows_name_file_and_line(tmp_path, labels, message):
    root = _videos_layout(tmp_path / "mine", labels)
    line = _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])
    assert re.search(message, line), line


@pytest.mark.parametrize("labels", ["", "clip,start,end\n# nothing yet\n"])
def test_labels_that_mark_nothing_build_with_a_warning_naming_the_file(tmp_path, capsys, labels):
    root = _videos_layout(tmp_path / "mine", labels)
    manifest = _build(root, tmp_path / "s")
    assert manifest["counts"]["anomalous"] == 0
    err = capsys.readouterr().err
    assert f"warning: {root / 'labels.csv'}: marks no frame of the 3 test clip(s) anomalous" in err, err


def test_unreadable_video_and_missing_labels(tmp_path):
    root = _videos_layout(tmp_path / "mine", GOOD_LABELS)
    (root / "test" / "door.avi").write_bytes(b"not a video at all" * 100)
    line = _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])
    assert "door.avi: unreadable video" in line
    (root / "test" / "door.avi").unlink()
    (root / "labels.csv").unlink()
    assert "labels.csv not found" in _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])


def test_frame_folders_start_at_0_or_1_and_fps_needs_timestamps(tmp_path):
    root = tmp_path / "mine"
    _frames_dir(root / "train" / "a", square_frames(12), first=0)
    _frames_dir(root / "train" / "b", square_frames(12), first=1)
    (root / "labels.csv").write_text("clip,start,end\n")
    assert [c.n_frames for c in open_dataset(root).clips] == [12, 12]
    (root / "train" / "b" / "005.png").unlink()
    assert "missing frame 005" in _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s")])
    (root / "train" / "b").rename(tmp_path / "b")
    line = _cli_error(["shard", "build", str(root), "--out", str(tmp_path / "s"), "--fps", "5"])
    assert "a: --fps resamples videos by their timestamps" in line


# ------------------------------------------------------------------------------------------- detection
def test_detects_each_layout_at_the_folder_or_one_level_down(tmp_path, avenue, shanghaitech):
    ucsd = write_ucsd(tmp_path / "u", {"Train001": (12, None)})
    mine = tmp_path / "m" / "mine"
    _frames_dir(mine / "train" / "a", square_frames(12))
    assert detect_format(ucsd) == ("ucsd", ucsd)
    assert detect_format(ucsd.parent) == ("ucsd", ucsd)
    assert detect_format(avenue.parent) == ("avenue", avenue)
    assert detect_format(shanghaitech) == ("shanghaitech", shanghaitech)
    assert detect_format(mine.parent) == ("videos", mine)
    assert detect_format(mine.parent, "videos", "mine") == ("videos", mine)
    write_ucsd(tmp_path / "u", {"Train001": (12, None)}, name="UCSDped2")
    out = ["--out", str(tmp_path / "x")]
    assert "choose one with --dataset" in _cli_error(["shard", "build", str(tmp_path / "u"), *out])
    (tmp_path / "empty").mkdir()
    line = _cli_error(["shard", "build", str(tmp_path / "empty"), *out])
    assert "no dataset in" in line and "labels.csv" in line
    assert "no avenue layout" in _cli_error(["shard", "build", str(ucsd), "--format", "avenue", *out])


def test_ucsd_through_open_dataset_is_the_ucsd_reader(tmp_path):
    data = write_ucsd(tmp_path / "data", TINY_CLIPS)
    ds, ref = open_dataset(data.parent), discover(data)
    assert ds.format == "ucsd" and ds.path == ref.path and ds.gt_path == ref.gt_path
    for clip, expected in zip(ds.clips, ref.clips, strict=True):
        assert clip.frame_paths == expected.frame_paths
        np.testing.assert_array_equal(clip.frame_labels, expected.frame_labels)
    with pytest.raises(UserError, match="UCSD clips are frame folders"):
        open_dataset(data, fps=5)


# --------------------------------------------------------------------------------- fps and frame counts
def test_fps_resamples_by_timestamps_and_labels_follow(tmp_path):
    frames = square_frames(30)
    for i in range(30):
        frames[i, 0, 0] = i * 8  # a frame-number stamp in the corner pixel (lossless video keeps it)
    root = tmp_path / "mine"
    write_video(root / "test" / "cam.mkv", frames, fps=30, lossless=True)
    (root / "labels.csv").write_text("cam,7,12\n")
    clip = open_dataset(root, fps=10).clips[0]
    assert clip.n_frames == 10 and list(clip.source_index) == list(range(0, 30, 3))
    np.testing.assert_array_equal(clip.frame_labels, [0, 0, 1, 1, 0, 0, 0, 0, 0, 0])  # source frames 7, 10
    np.testing.assert_array_equal(clip.read(36, 48)[:, 0, 0], np.arange(0, 30, 3) * 8)


def test_variable_frame_rate_uses_the_decoded_timestamps(tmp_path):
    times = [0.0, 0.1, 0.15, 0.2, 0.5, 0.55, 0.6, 0.9, 1.0, 1.05]  # seconds; gaps and bursts
    path = write_video(tmp_path / "vfr.mkv", square_frames(len(times)), fps=10, lossless=True, times=times)
    np.testing.assert_allclose(frame_times(path), times, atol=1e-3)
    clip = VideoClip.create("vfr", "test", path, frame_times(path), fps=10)
    # output frame k shows the last source frame that started at or before k / 10 s
    assert list(clip.source_index) == [0, 1, 3, 3, 3, 4, 6, 6, 6, 7, 8]
    np.testing.assert_array_equal(clip.read(36, 48), square_frames(len(times))[clip.source_index])


def test_decode_time_count_mismatch_is_padded_or_cut_with_a_warning(tmp_path, capsys):
    path = write_video(tmp_path / "c.mkv", square_frames(12), fps=10, lossless=True)
    clip = VideoClip.create("c", "test", path, frame_times(path))
    longer = dataclasses.replace(clip, n_source=15, frame_labels=np.zeros(15, np.uint8))
    frames = longer.read(36, 48)
    # One line naming the file, like an error: no Python warning with its category and source line.
    assert (
        capsys.readouterr().err
        == f"warning: {path}: decoded 12 frames, 15 were counted; repeating the last one 3 times\n"
    )
    np.testing.assert_array_equal(frames[11:], np.repeat(square_frames(12)[11:], 4, axis=0))
    shorter = dataclasses.replace(clip, n_source=10, frame_labels=np.zeros(10, np.uint8))
    np.testing.assert_array_equal(shorter.read(36, 48), square_frames(12)[:10])
    assert capsys.readouterr().err == f"warning: {path}: more frames than the 10 counted; extra ones ignored\n"


# ------------------------------------------------------------------------------------------- pipeline
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("layout", ["avenue", "shanghaitech"])
def test_pipeline_runs_on_the_layout(request, tmp_path, layout):
    data = request.getfixturevalue(layout)
    out = tmp_path / "pipe"
    args = [
        "pipeline",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--methods",
        "nb",
        "--curve",
        "1",
        "--protocol",
        "window",
    ]  # fmt: skip  (2-3 labelled clips: too few for leak-free folds)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert load_manifest(out / "shards")["layout"] == layout
    report = (out / "report" / "report.md").read_text()
    assert "| GAN+LRCN |" in report and "| nb |" in report


@pytest.mark.parametrize(("name", "codec", "pixels"), [("a.mp4", "libx264", "yuv420p"), ("b.avi", "mjpeg", "yuvj420p")])
def test_gray_from_the_luma_plane_equals_ffmpegs_conversion(tmp_path, name, codec, pixels):
    frames = square_frames(4, (36, 48))
    with av.open(str(tmp_path / name), "w") as container:  # colour frames, limited (yuv) or full (yuvj) range
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 36, pixels
        for frame in frames:
            rgb = np.stack([frame, 255 - frame, frame // 2], axis=-1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(tmp_path / name)) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == 4 and decoded[0].format.name == pixels
    for frame in decoded:
        np.testing.assert_array_equal(gray_of(frame), frame.to_ndarray(format="gray"))
