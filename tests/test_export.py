"""ONNX export: onnxruntime scores real Ped1 windows like PyTorch (within 1e-4), the sidecar says how to use the
model, predict --onnx gives predict --model's rows. Skipped where onnxruntime is absent (pip install ".[export]")."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import fake_transfer_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from PIL import Image  # noqa: E402

from ddp_vad import Detector, UserError  # noqa: E402
from ddp_vad.cli import cli  # noqa: E402
from ddp_vad.data.sources.frames import frame_files, read_frame, resize_frame  # noqa: E402
from ddp_vad.models import ModelConfig, build_lrcn  # noqa: E402
from ddp_vad.presets import PRESETS  # noqa: E402
from ddp_vad.weights import load_model

WINDOW, HEIGHT, WIDTH = 10, 120, 182  # the demo preset at the shards' default frame size
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend on shared cores


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A transfer-run folder with two demo-preset fold models (random weights) and out-of-fold scores."""
    root = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(preset="demo", window=WINDOW, height=HEIGHT, width=WIDTH, **PRESETS["demo"].model)
    fake_transfer_run(root, cfg, folds=2, seed=10)
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


# ------------------------------------------------------------------------- parity: a check that can fail
@pytest.fixture(scope="module")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """The tiny transfer run (recorded fold models, 24x36) exported."""
    out = tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx"
    result = CliRunner().invoke(cli, ["export", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _export(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["export", str(run), "--out", str(out), *extra])


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_onnx_and_pytorch_detectors_score_the_same_frames_alike(tiny_run, tiny_export):
    torch_det, onnx_det = Detector.load(tiny_run), Detector.load(tiny_export)
    frames = np.random.default_rng(5).integers(0, 256, (16, 24, 36), dtype=np.uint8)
    want = torch_det.score_frames(frames)
    for same in (frames, frames.astype(np.int64), frames.tolist(), frames / 255.0, (frames / 255.0).astype(np.float32)):
        # 1e-6: a graph scaling pixels by 1/256 instead of 1/255 is off by more than 1e-5 here
        np.testing.assert_allclose(onnx_det.score_frames(same), want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(torch_det.score_frames(same), want, atol=1e-6, rtol=0)
    big = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # another size: both resize the same way
    np.testing.assert_allclose(onnx_det.score_frames(big), torch_det.score_frames(big), atol=1e-6, rtol=0)
    for det in (torch_det, onnx_det):
        with pytest.raises(UserError, match=r"float frames must lie in \[0, 1\]"):
            det.score_frames(frames.astype(np.float32))
        with pytest.raises(UserError, match="NaN or inf pixel values"):
            det.score_frames(np.full((16, 24, 36), np.nan))


def test_the_sidecar_records_a_tight_parity_check_that_can_see_a_scale_slip(tiny_export):
    check = json.loads(tiny_export.with_suffix(".json").read_text())["check"]
    # 1e-6, or 1% of the slip's effect for calibrated models, whose log-odds (and float32 rounding) are amplified
    assert check["tolerance"] == max(1e-6, 0.01 * check["scale_sensitivity"])
    assert check["max_abs_diff_vs_pytorch"] <= check["tolerance"]
    assert check["scale_sensitivity"] > 10 * check["tolerance"]  # 1/256 for 1/255 would be seen


def _nan_outputs(module: torch.nn.Module) -> torch.nn.Module:
    class NaNOut(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            score, per_fold = self.inner(pixels)
            return score * float("nan"), per_fold * float("nan")

    return NaNOut().eval()


@pytest.mark.parametrize("graph", ["scale 1/256", "NaN out"])
def test_a_graph_that_scores_unlike_pytorch_is_refused_and_nothing_written(
    tiny_run, tiny_export, tmp_path, monkeypatch, graph
):
    from ddp_vad.infer import export

    out = tmp_path / "model.onnx"
    shutil.copy(tiny_export, out)  # a good earlier export at the same name must survive
    shutil.copy(tiny_export.with_suffix(".json"), out.with_suffix(".json"))
    real = export._ensemble
    if graph == "scale 1/256":  # moves these scores by ~2e-5: only a tight check against PyTorch sees it
        monkeypatch.setattr(export, "_ensemble", lambda models: real(models, scale=256.0))
        match = r"largest difference \d"
    else:
        monkeypatch.setattr(export, "_ensemble", lambda models: _nan_outputs(real(models)))
        match = "largest difference nan"
    line = _error_line(_export(tiny_run, out))
    assert "does not score like PyTorch" in line and re.search(match, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]  # no temp files left
    assert out.read_bytes() == tiny_export.read_bytes()
    Detector.load(out)  # the earlier pair still loads


# ------------------------------------------------------------------------- the graph and its sidecar, bound
def test_a_graph_beside_another_exports_sidecar_is_refused(tiny_run, tiny_export, tmp_path):
    fold0 = tmp_path / "fold0.onnx"
    assert _export(tiny_run, fold0, "--fold", "0").exit_code == 0
    shutil.copy(tiny_export.with_suffix(".json"), fold0.with_suffix(".json"))  # same input, other graph
    with pytest.raises(UserError, match=r"fold0.onnx is not the graph its sidecar fold0.json was written for"):
        Detector.load(fold0)


def test_broken_pairs_are_one_line_errors(tiny_export, exported, tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    for i, frame in enumerate(np.random.default_rng(0).integers(0, 256, (12, 24, 36), dtype=np.uint8)):
        Image.fromarray(frame).save(clip / f"{i:03d}.png")
    meta = json.loads(tiny_export.with_suffix(".json").read_text())
    legacy = {k: v for k, v in meta.items() if k != "graph"}  # a sidecar written before the binding
    cases = {
        "truncated": (tiny_export.read_bytes()[:4000], meta, r"truncated.onnx is not the graph .*4000 bytes"),
        "truncated_legacy": (tiny_export.read_bytes()[:4000], legacy, "not a loadable ONNX model"),
        "foreign": (exported.read_bytes(), meta, "is not the graph its sidecar"),
        "foreign_legacy": (exported.read_bytes(), legacy, r"its input \(pixels \['batch', 10, 120, 182\]\) is not"),
        "notjson": (tiny_export.read_bytes(), None, "not valid JSON"),
        "nan_threshold": (tiny_export.read_bytes(), {**meta, "threshold": float("nan")}, "threshold must be"),
        "no_window": (tiny_export.read_bytes(), {k: v for k, v in meta.items() if k != "window"}, "window must be"),
    }
    for name, (graph, sidecar, match) in cases.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(graph)
        side = path.with_suffix(".json")
        side.write_text("{not json" if sidecar is None else json.dumps(sidecar))
        with pytest.raises(UserError, match=match):
            Detector.load(path)
        out = tmp_path / f"{name}.csv"
        line = _error_line(CliRunner().invoke(cli, ["predict", str(clip), "--onnx", str(path), "--out", str(out)]))
        assert re.search(match, line), (name, line)
        assert not out.exists()


def test_a_legacy_sidecar_loads_with_one_warning(tiny_export, tmp_path, capsys):
    path = tmp_path / "old.onnx"
    shutil.copy(tiny_export, path)
    meta = json.loads(tiny_export.with_suffix(".json").read_text())
    del meta["graph"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    capsys.readouterr()
    Detector.load(path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "unchecked" in err[0]


def test_a_fold_of_an_exported_model_is_refused(tiny_export, tmp_path):
    with pytest.raises(UserError, match="fold=1 .* is an exported model"):
        Detector.load(tiny_export, fold=1)
    out = tmp_path / "x.csv"
    result = CliRunner().invoke(cli, ["predict", "-", "--onnx", str(tiny_export), "--fold", "1", "--out", str(out)])
    assert "is an exported model" in _error_line(result) and not out.exists()


@pytest.mark.parametrize(("opset", "match"), [("99", r"--opset 99: this installation exports opsets 17\.\.\d+"),
                                              ("16", "--opset must be >= 17")])  # fmt: skip
def test_an_opset_out_of_range_is_refused_up_front(tiny_run, tmp_path, opset, match):
    line = _error_line(_export(tiny_run, tmp_path / "m.onnx", "--opset", opset))
    assert re.search(match, line) and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------- an export that fails or is interrupted
def test_a_failed_export_keeps_the_earlier_pair(tiny_run, tiny_export, tmp_path, monkeypatch):
    import errno

    from ddp_vad.infer import export

    out = tmp_path / "model.onnx"
    shutil.copy(tiny_export, out)
    shutil.copy(tiny_export.with_suffix(".json"), out.with_suffix(".json"))

    def full_disk(module, mcfg, path, opset):
        path.write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_write_graph", full_disk)
    line = _error_line(_export(tiny_run, out))
    assert f"{out}: No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]
    assert out.read_bytes() == tiny_export.read_bytes()
    Detector.load(out)


@pytest.mark.parametrize("stop_at", [1, 2])  # Ctrl-C at the graph's rename, or between the graph's and the sidecar's
def test_an_interrupted_reexport_never_leaves_a_graph_beside_another_exports_sidecar(
    tiny_run, tiny_export, tmp_path, monkeypatch, stop_at
):
    from ddp_vad import files
    from ddp_vad.infer import export

    out = tmp_path / "model.onnx"
    shutil.copy(tiny_export, out)
    shutil.copy(tiny_export.with_suffix(".json"), out.with_suffix(".json"))
    side = out.with_suffix(".json")
    real_replace, calls = files.os.replace, []

    def replace(src, dst):  # os.replace is the module's: count only the pair's two renames
        if Path(dst) in (out, side):
            calls.append(dst)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export.run_export(export.ExportConfig(run=str(tiny_run), out=str(out), fold=0))  # another graph
    monkeypatch.undo()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left
    # The old sidecar went first: the graph left (old or new) has none, rather than one describing another graph.
    assert out.is_file() and not side.exists()
    with pytest.raises(UserError, match="sidecar model.json .* is missing"):
        Detector.load(out)
