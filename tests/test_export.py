"""ONNX export: onnxruntime scores real Ped1 windows like PyTorch (within 1e-4), the sidecar says how to use the
model, predict --onnx gives predict --model's rows. Skipped where onnxruntime is absent (pip install ".[export]")."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ddp_vad import Detector  # noqa: E402
from ddp_vad.cli import cli  # noqa: E402
from ddp_vad.data.sources.frames import frame_files, read_frame, resize_frame  # noqa: E402
from ddp_vad.models import ModelConfig, build_lrcn, load_model, save_model  # noqa: E402
from ddp_vad.presets import PRESETS  # noqa: E402

WINDOW, HEIGHT, WIDTH = 10, 120, 182  # the demo preset at the shards' default frame size
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend on shared cores


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A transfer-run folder with two demo-preset fold models (random weights) and out-of-fold scores."""
    root = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(preset="demo", window=WINDOW, height=HEIGHT, width=WIDTH, **PRESETS["demo"].model)
    for fold in range(2):
        torch.manual_seed(10 + fold)
        save_model(build_lrcn(cfg), root / "folds" / f"fold_{fold:02d}" / "model.safetensors", cfg)
    rng = np.random.default_rng(0)
    rows = [f"k{i},c,{i},{i % 2},{rng.random() * 0.8 + 0.2 * (i % 2):.5f},{i % 2}" for i in range(40)]
    (root / "oof_scores.csv").write_text("key,clip,start,label,score,fold\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "ped1.onnx"
    result = CliRunner().invoke(cli, ["export", str(run), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def real_windows(sample_dir) -> np.ndarray:
    """24 real Ped1 windows (Test003, with its anomaly), gray, resized to the model's size as predict does."""
    paths = frame_files(sample_dir / "UCSDped1" / "Test" / "Test003")[50:83]
    frames = np.stack([resize_frame(read_frame(p), HEIGHT, WIDTH) for p in paths])
    return frames[np.arange(24)[:, None] + np.arange(WINDOW)]


def test_onnxruntime_matches_pytorch_on_real_windows(run, exported, real_windows):
    torch_det, onnx_det = Detector.load(run), Detector.load(exported)
    expected, got = torch_det.scorer(real_windows), onnx_det.scorer(real_windows)
    assert np.abs(got - expected).max() < 1e-4
    assert np.ptp(expected) > 1e-4  # the windows differ in score: a constant output would not pass by chance
    # each fold's output is that fold model's probability
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    score, per_fold = session.run(None, {"pixels": real_windows.astype(np.float32)})
    assert per_fold.shape == (24, 2)
    for k, path in enumerate(sorted(run.glob("folds/fold_*/model.safetensors"))):
        model, _ = load_model(path, build_lrcn)
        with torch.no_grad():
            x = torch.from_numpy(real_windows).unsqueeze(2).float() / 255.0
            np.testing.assert_allclose(per_fold[:, k], torch.softmax(model(x), 1)[:, 1].numpy(), atol=1e-4)
    np.testing.assert_allclose(score, per_fold.mean(1), atol=1e-6)


def test_the_sidecar_says_how_to_use_the_model(run, exported):
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert (meta["window"], meta["height"], meta["width"]) == (WINDOW, HEIGHT, WIDTH)
    assert meta["labels"] == ["normal", "anomalous"]
    assert meta["threshold"] == Detector.load(run).threshold != 0.5  # the run's, chosen on its training folds
    assert meta["folds"] == ["fold_00", "fold_01"] and meta["opset"] >= 17
    assert meta["input"]["shape"] == ["batch", WINDOW, HEIGHT, WIDTH]
    assert meta["check"]["max_abs_diff_vs_pytorch"] < 1e-4


def test_predict_with_onnx_gives_the_rows_of_predict_with_the_run(run, exported, sample_dir, tmp_path):
    clip = tmp_path / "Test003"
    clip.mkdir()
    for path in frame_files(sample_dir / "UCSDped1" / "Test" / "Test003")[:24]:
        shutil.copy(path, clip / path.name)
    rows = {}
    for name, flag, model in (("torch", "--model", run), ("onnx", "--onnx", exported)):
        out = tmp_path / f"{name}.csv"
        result = CliRunner().invoke(cli, ["predict", str(clip), flag, str(model), "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows[name] = list(csv.DictReader(out.open()))
    assert len(rows["torch"]) == len(rows["onnx"]) == 24
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert (a["frame"], a["file"], a["anomalous"]) == (b["frame"], b["file"], b["anomalous"])
        assert abs(float(a["score"]) - float(b["score"])) < 1e-4


def test_one_fold_exports_alone(run, tmp_path):
    out = tmp_path / "fold1.onnx"
    result = CliRunner().invoke(cli, ["export", str(run), "--fold", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["folds"] == ["fold_01"] and meta["threshold"] == Detector.load(run, fold=1).threshold
    windows = np.random.default_rng(3).integers(0, 256, (3, WINDOW, HEIGHT, WIDTH), dtype=np.uint8)
    np.testing.assert_allclose(Detector.load(out).scorer(windows), Detector.load(run, fold=1).scorer(windows),
                               atol=1e-4)  # fmt: skip


def test_scoring_with_the_onnx_model_does_not_import_torch(exported, tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from ddp_vad import Detector\n"
        f"d = Detector.load({str(exported)!r})\n"
        "s = d.score_frames(np.random.default_rng(0).integers(0, 256, (12, 60, 90), dtype=np.uint8))\n"
        "assert s.shape == (12,) and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
