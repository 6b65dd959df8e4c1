"""The video path end to end: synth writes videos + labels.csv, the same clips as frames and as videos give the
same windows, predict streams a video (same scores as the frame folder, bounded memory, annotated copy), and the
pipeline runs on every layout."""

from __future__ import annotations

import csv
import json
import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import square_frames
from PIL import Image

from ddp_vad.cli import cli
from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest
from ddp_vad.data.sources.ucsd import parse_gt_file
from ddp_vad.data.sources.video import frame_times, iter_gray, iter_rgb, write_video
from ddp_vad.data.synth import SynthConfig, run_synth
from ddp_vad.infer.scoring import frame_scores, stream_scores, window_scores
from ddp_vad.models import ModelConfig, build_lrcn
from ddp_vad.presets import PRESETS
from ddp_vad.weights import save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: more threads only contend

SYNTH = dict(train_clips=2, test_clips=3, frames=40, height=48, width=72, seed=3)


@pytest.fixture(scope="module")
def synth_sets(tmp_path_factory) -> dict[str, Path]:
    """The same synthetic scenes as UCSD frames, as .mp4 videos and as .avi videos."""
    root = tmp_path_factory.mktemp("synth")
    out = {"ucsd": run_synth(SynthConfig(out=root / "ucsd", **SYNTH), show_progress=False)}
    for container in ("mp4", "avi"):
        cfg = SynthConfig(out=root / container, format="videos", container=container, **SYNTH)
        out[container] = run_synth(cfg, show_progress=False)
    return out


def test_synth_videos_layout_and_labels_match_the_frames_version(synth_sets):
    videos, frames = synth_sets["mp4"], synth_sets["ucsd"]
    assert sorted(p.name for p in (videos / "train").iterdir()) == ["Train001.mp4", "Train002.mp4"]
    assert sorted(p.name for p in (synth_sets["avi"] / "test").iterdir()) == [f"Test00{i}.avi" for i in (1, 2, 3)]
    rows = list(csv.DictReader((videos / "labels.csv").open()))
    ranges: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        ranges.setdefault(row["clip"], []).append((int(row["start"]), int(row["end"])))
    assert ranges == {k: v for k, v in parse_gt_file(frames / "Test" / "SynthPed.m").items() if v}
    types = json.loads((frames / "anomaly_types.json").read_text())
    assert {row["clip"]: [row["type"]] for row in rows} == types
    assert len(frame_times(videos / "test" / "Test001.mp4")) == SYNTH["frames"]


@pytest.mark.parametrize(("container", "max_mean_diff"), [("mp4", 1.5), ("avi", 8.0)])
def test_frames_and_videos_give_the_same_windows(synth_sets, tmp_path, container, max_mean_diff):
    sets = {}
    for name in ("ucsd", container):
        cfg = ShardConfig(data=str(synth_sets[name]), out=str(tmp_path / name), height=24, width=36, folds=3, workers=2)
        sets[name] = (load_manifest(build_shards(cfg, show_progress=False)), load_window_set(tmp_path / name))
    (m_frames, w_frames), (m_video, w_video) = sets["ucsd"], sets[container]
    assert m_frames["layout"] == "ucsd" and m_video["layout"] == "videos"
    assert m_frames["counts"] == m_video["counts"] and m_frames["protocols"] == m_video["protocols"]
    assert m_frames["anomaly_types"] == m_video["anomaly_types"]
    assert w_frames.keys == w_video.keys
    np.testing.assert_array_equal(w_frames.labels, w_video.labels)
    np.testing.assert_array_equal(w_frames.frame_labels, w_video.frame_labels)
    diff = np.abs(w_frames.frames.astype(np.int16) - w_video.frames.astype(np.int16))
    assert diff.mean() < max_mean_diff  # codec loss only


# -------------------------------------------------------------------------------------------- predict
WINDOW = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A transfer-run folder with two tiny fold models (random weights: scores differ from frame to frame)."""
    root = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(preset="tiny", window=WINDOW, height=24, width=36, **PRESETS["tiny"].model)
    for fold in range(2):
        torch.manual_seed(fold)
        save_model(build_lrcn(cfg), root / "folds" / f"fold_{fold:02d}" / "model.safetensors", cfg)
    return root


def _models(run: Path) -> list[torch.nn.Module]:
    from ddp_vad.weights import load_model

    return [load_model(p, build_lrcn)[0] for p in sorted(run.glob("folds/*/model.safetensors"))]


def _predict(clip: Path, run: Path, out: Path, *extra: str) -> list[dict]:
    args = ["predict", str(clip), "--model", str(run), "--out", str(out), "--batch-size", "8", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(out.open()))


@pytest.mark.parametrize("n", [10, 11, 17, 40])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_streamed_scores_equal_whole_clip_scores(run, n, batch):
    frames = square_frames(n, (24, 36))
    models = _models(run)
    expected = frame_scores(window_scores(frames, models, WINDOW, batch), n, WINDOW)
    streamed = list(stream_scores(enumerate(frames), models, WINDOW, batch))
    assert [tag for tag, _ in streamed] == list(range(n))
    np.testing.assert_array_equal([score for _, score in streamed], expected)


def test_stream_holds_at_most_window_plus_batch_frames(run):
    """Instrumented source: count frames pulled and frames still alive while scores come out."""
    models, batch = _models(run), 8
    pulled, refs = [0], []

    def source():
        for i in range(200):
            frame = square_frames(1, (24, 36), seed=i)[0]
            refs.append(weakref.ref(frame))
            pulled[0] += 1
            yield i, frame

    emitted = 0
    for tag, _ in stream_scores(source(), models, WINDOW, batch):
        assert tag == emitted
        emitted += 1
        assert pulled[0] - emitted <= WINDOW - 1 + batch  # never reads further ahead than one batch of windows
        alive = sum(r() is not None for r in refs)
        assert alive <= 2  # it copies each frame into its fixed buffer and keeps no reference to it
    assert emitted == pulled[0] == 200


def test_predict_on_a_video_equals_predict_on_its_frames(run, tmp_path):
    frames = square_frames(57, (48, 72), seed=5)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i + 1:03d}.png")
    lossless = write_video(tmp_path / "clip.mkv", frames, fps=10, lossless=True)  # FFV1 gray: exact
    on_folder = _predict(folder, run, tmp_path / "folder.csv")
    on_video = _predict(lossless, run, tmp_path / "video.csv")
    assert [r["score"] for r in on_video] == [r["score"] for r in on_folder]
    assert list(on_video[0]) == ["frame", "time", "score", "anomalous"] and on_video[1]["time"] == "0.100"
    # a lossy video scores like the frames it decodes to
    lossy = write_video(tmp_path / "clip.mp4", frames, fps=10)
    decoded = tmp_path / "decoded"
    decoded.mkdir()
    for i, (gray, _) in enumerate(iter_gray(lossy)):
        Image.fromarray(gray).save(decoded / f"{i + 1:03d}.png")
    assert len(list(decoded.iterdir())) == 57
    on_lossy = _predict(lossy, run, tmp_path / "lossy.csv")
    assert [r["score"] for r in on_lossy] == [r["score"] for r in _predict(decoded, run, tmp_path / "dec.csv")]


def test_predict_annotates_a_copy_of_the_video(run, tmp_path):
    video = write_video(tmp_path / "street.mp4", square_frames(23, (48, 72), seed=9), fps=12)
    for threshold, red in (("0", True), ("1", False)):
        out = tmp_path / f"annotated-{threshold}.mp4"
        rows = _predict(video, run, tmp_path / "s.csv", "--annotate", str(out), "--threshold", threshold)
        assert len(rows) == 23 and all(int(r["anomalous"]) == red for r in rows)
        copy = list(iter_rgb(out))
        assert len(copy) == 23 and copy[0].shape == (48, 72, 3)
        r, g, b = copy[5][24, 0].astype(int)  # left edge, mid-height: the border when flagged
        assert (r > 150 and g < 90 and b < 90) == red
        assert np.isclose(len(frame_times(out)) / 12, 23 / 12)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_bad_inputs(run, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    short = write_video(tmp_path / "short.mp4", square_frames(6, (48, 72)), fps=10)
    for clip, message in ((tmp_path / "notes.txt", "not a video"), (short, r"short\.mp4 has 6 frames; the model")):
        result = CliRunner().invoke(cli, ["predict", str(clip), "--model", str(run), "--out", str(tmp_path / "x.csv")])
        assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert not list(tmp_path.glob("*x.csv*"))  # no CSV, no temp file left behind


# ------------------------------------------------------------------------------------------- pipeline
@pytest.mark.slow
def test_pipeline_on_synthetic_videos(tmp_path):
    out = tmp_path / "pipe"
    args = ["pipeline", "--out", str(out), "--preset", "tiny", "--methods", "nb", "--format", "videos", "--curve", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (out / "data" / "SynthPed" / "labels.csv").is_file()
    assert load_manifest(out / "shards")["layout"] == "videos"
    assert "| GAN+LRCN |" in (out / "report" / "report.md").read_text()
