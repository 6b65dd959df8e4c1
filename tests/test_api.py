"""The public Python API, through public names only: the docs' example runs, the detector's ways of scoring agree,
and ``import ddp_vad`` stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddp_vad

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend on shared cores


def test_import_ddp_vad_does_not_import_torch():
    code = (
        "import ddp_vad, sys; assert 'torch' not in sys.modules; "
        "ddp_vad.TransferConfig; assert 'torch' in sys.modules"  # imported once a name needs it
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_every_public_name_resolves_and_others_do_not():
    for name in ddp_vad.__all__:
        assert getattr(ddp_vad, name) is not None, name
    assert set(ddp_vad.__all__) <= set(dir(ddp_vad))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ddp_vad.nope  # noqa: B018


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict:
    """docs/api.md's example, executed as written in an empty folder; its variables for the tests below."""
    text = (REPO / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    folder = tmp_path_factory.mktemp("example")
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        exec(compile(code, "docs/api.md", "exec"), namespace)
    namespace["folder"] = folder
    return namespace


def _clip_frames(clip: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("L")) for p in sorted(clip.glob("*.tif"))])


def test_the_example_writes_what_the_stage_functions_return(example):
    folder = example["folder"]
    assert example["run"] == Path("demo/run") and (folder / "demo/run/metrics.json").is_file()
    assert (folder / example["shards"] / "manifest.json").is_file()
    assert len(list((folder / "demo/run/folds").glob("fold_*/model.safetensors"))) == 3
    # the threshold was chosen on the training folds and recorded in the run
    assert (folder / "demo/run/threshold.json").is_file()
    assert "balanced accuracy" in example["detector"].threshold_note


def test_frames_video_and_stream_give_the_same_scores(example):
    detector, clip = example["detector"], example["folder"] / example["clip"]
    frames = _clip_frames(clip)
    from_video = detector.score_video(clip)
    assert len(from_video) == len(frames) == 40
    np.testing.assert_array_equal(detector.score_frames(frames), from_video)  # same batches: bitwise
    streamed = list(detector.stream(clip))  # batch 1: the same numbers up to float rounding
    assert [s.frame for s in streamed] == list(range(1, 41))
    assert [s.name for s in streamed] == [p.name for p in sorted(clip.glob("*.tif"))]
    # 1e-5: calibrated fold models (the default) multiply float32 rounding, which differs with the batch size, by
    # 1 / (4 x their spread on normal footage): 2e-6 seen here
    np.testing.assert_allclose([s.score for s in streamed], from_video, atol=1e-5)
    assert [s.anomalous for s in streamed] == [s.score >= detector.threshold for s in streamed]
    # floats in [0, 1] are the model's scale: the same frames (at the model's size) give the same scores
    small = np.stack([np.asarray(Image.fromarray(f).resize((detector.width, detector.height))) for f in frames])
    np.testing.assert_allclose(detector.score_frames(small / 255.0), detector.score_frames(small), atol=1e-6)
    assert not np.allclose(from_video, from_video[0])  # not a constant: the comparisons above could fail


def test_one_fold_and_a_given_threshold(example):
    run = example["folder"] / "demo/run"
    whole = ddp_vad.Detector.load(run)
    one = ddp_vad.Detector.load(run, fold=1)
    frames = _clip_frames(example["folder"] / example["clip"])
    assert not np.allclose(one.score_frames(frames), whole.score_frames(frames))
    assert ddp_vad.Detector.load(run, threshold=0.25).threshold == 0.25
    with pytest.raises(ddp_vad.UserError, match="no fold 7"):
        ddp_vad.Detector.load(run, fold=7)
    with pytest.raises(ddp_vad.UserError, match="at least 10"):
        whole.score_frames(frames[:5])


# ------------------------------------------------------------------ score_frames: one contract for dtype and range
def test_integer_frames_of_any_type_score_as_uint8(example):
    detector = example["detector"]
    frames = np.random.default_rng(1).integers(0, 256, (14, 48, 72), dtype=np.uint8)
    want = detector.score_frames(frames)
    for other in (frames.astype(np.int64), frames.astype(np.uint16), frames.astype(np.int32).tolist()):
        np.testing.assert_array_equal(detector.score_frames(other), want)
    small = frames[:, ::2, ::2]  # at the model's size: no resizing, so floats in [0, 1] match uint8 / 255
    np.testing.assert_allclose(detector.score_frames(small / 255.0), detector.score_frames(small), atol=1e-6)
    np.testing.assert_allclose(detector.score_frames((small / 255.0).tolist()), detector.score_frames(small),
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.full((14, 24, 36), 200.0, np.float32), r"float frames must lie in \[0, 1\].*got 200..200"),
        (np.full((14, 24, 36), 0.5), None),  # fine: the model's scale
        (np.full((14, 24, 36), -1, np.int64), "integer frames must hold pixel values 0..255, got -1..-1"),
        (np.full((14, 24, 36), 256, np.int64), "0..255, got 256..256"),
        (np.full((14, 24, 36), True), "dtype bool"),
        (np.zeros((14, 0, 36), np.uint8), "frames of size 0x36"),
        (np.zeros((14, 24), np.uint8), r"\[N, H, W\]"),
        ([[[1, 2], [3]]], "array"),
    ],
)
def test_frames_outside_the_contract_are_refused(example, frames, match):
    detector = example["detector"]
    if match is None:
        assert detector.score_frames(frames).shape == (14,)
        return
    with pytest.raises(ddp_vad.UserError, match=match):
        detector.score_frames(frames)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_pixels_are_refused(example, bad):
    frames = np.full((14, 24, 36), 0.5, np.float32)
    frames[3, 5, 7] = bad
    with pytest.raises(ddp_vad.UserError, match="NaN or inf pixel values"):
        example["detector"].score_frames(frames)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_batch_size_below_one_is_refused(example, batch_size):
    frames = np.zeros((14, 24, 36), np.uint8)
    with pytest.raises(ddp_vad.UserError, match="batch_size must be an integer >= 1"):
        example["detector"].score_frames(frames, batch_size=batch_size)
    with pytest.raises(ddp_vad.UserError, match="batch_size must be an integer >= 1"):
        list(example["detector"].stream(example["folder"] / example["clip"], batch_size=batch_size))
