"""Every model file checked: a transfer run records each fold model's size and sha256, and loading (``Detector``,
``predict``, ``export``) refuses a changed, missing or extra model, or non-finite weights or scores, naming the
file; runs written before the record load with one warning."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import square_frames

from ddp_vad import Detector, UserError
from ddp_vad.cli import cli
from ddp_vad.files import sha256_file
from ddp_vad.runfiles import MODEL_RECORD, fold_model_file, fold_result_file, metrics_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend on shared cores
FOLDS = 4  # tiny_shards' folds


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny transfer run that a test may damage."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture
def clip(tmp_path) -> Path:
    """A 14-frame clip folder at the model's size."""
    from PIL import Image

    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(square_frames(14, (24, 36))):
        Image.fromarray(frame).save(folder / f"{i + 1:03d}.png")
    return folder


def _unrecord(run: Path) -> None:
    """Make ``run`` look written before the record: result.json without it."""
    for k in range(FOLDS):
        path = fold_result_file(run, k)
        result = json.loads(path.read_text())
        result.pop(MODEL_RECORD)
        path.write_text(json.dumps(result))


def _refused_everywhere(run: Path, clip: Path, tmp_path: Path, match: str) -> None:
    """Detector.load, predict and export all refuse ``run`` with a one-line error matching ``match``; predict
    writes nothing."""
    with pytest.raises(UserError, match=match):
        Detector.load(run)
    out = tmp_path / "scores.csv"
    for args in (["predict", str(clip), "--model", str(run), "--out", str(out)], ["export", str(run)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and __import__("re").search(match, lines[0]), result.output
    assert not out.exists() and not (run / "export").exists()


def test_each_fold_records_its_model_and_a_recorded_run_loads_without_a_word(tiny_run, capsys):
    for k in range(FOLDS):
        record = json.loads(fold_result_file(tiny_run, k).read_text())[MODEL_RECORD]
        model = fold_model_file(tiny_run, k)
        assert record == {"bytes": model.stat().st_size, "sha256": sha256_file(model)}
    capsys.readouterr()
    detector = Detector.load(tiny_run)
    assert detector.files == [fold_model_file(tiny_run, k) for k in range(FOLDS)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["bytes", "swapped"])
def test_a_changed_model_is_refused_naming_it(run, clip, tmp_path, damage):
    model = fold_model_file(run, 1)
    if damage == "bytes":  # a flipped byte inside a weight: same size, other content
        data = bytearray(model.read_bytes())
        data[-20] ^= 0x01
        model.write_bytes(bytes(data))
    else:  # another fold's model of the same architecture (the same size): only the sha256 tells
        shutil.copy(fold_model_file(run, 0), model)
        assert model.stat().st_size == fold_model_file(run, 0).stat().st_size
    _refused_everywhere(run, clip, tmp_path, r"fold_01/model.safetensors is not the model this run wrote")
    with pytest.raises(UserError, match="is not the model this run wrote"):
        Detector.load(model)  # the fold model alone, inside its run: checked too
    with pytest.raises(UserError, match="is not the model this run wrote"):
        Detector.load(run, fold=1)
    Detector.load(run, fold=0)  # the others are fine


def test_a_model_from_another_run_is_refused_by_size(run, clip, tmp_path):
    from ddp_vad.models import build_lrcn
    from ddp_vad.weights import load_model_config, save_model

    other = dataclasses.replace(load_model_config(fold_model_file(run, 2)), lstm_hidden=32)
    save_model(build_lrcn(other), fold_model_file(run, 2), other)
    _refused_everywhere(run, clip, tmp_path, r"fold_02/model.safetensors is not the model .* bytes, \d+ recorded")


@pytest.mark.parametrize("gone", ["model", "fold folder"])
def test_a_missing_fold_model_is_refused_never_a_smaller_ensemble(run, clip, tmp_path, gone):
    if gone == "model":
        fold_model_file(run, 3).unlink()
        match = r"fold_03/model.safetensors is missing"
    else:
        shutil.rmtree(fold_model_file(run, 3).parent)
        match = r"fold 3's model is missing"
    _refused_everywhere(run, clip, tmp_path, match)
    assert len(Detector.load(run, fold=2).files) == 1  # one present fold is still usable alone


def test_an_extra_or_foreign_model_is_refused(run, clip, tmp_path):
    extra = run / "folds" / "fold_04"
    shutil.copytree(fold_model_file(run, 0).parent, extra)
    _refused_everywhere(run, clip, tmp_path, r"fold_04/model.safetensors: not one of this run's 4 fold models")
    shutil.rmtree(extra)
    result = json.loads(fold_result_file(run, 2).read_text())  # a whole fold folder of a run with other settings
    result["fingerprint"]["seed"] += 1
    fold_result_file(run, 2).write_text(json.dumps(result))
    _refused_everywhere(run, clip, tmp_path, r"fold_02/result.json: made with other settings")


def test_an_unfinished_fold_is_refused(run, clip, tmp_path):
    fold_result_file(run, 1).unlink()  # killed between writing the model and its result
    _refused_everywhere(run, clip, tmp_path, r"fold_01/model.safetensors: fold 1 has no result.json")


def test_a_run_without_records_loads_with_one_warning(run, tiny_run, capsys):
    _unrecord(run)
    capsys.readouterr()
    frames = square_frames(14, (24, 36))
    np.testing.assert_array_equal(Detector.load(run).score_frames(frames), Detector.load(tiny_run).score_frames(frames))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {run}: fold model(s) 0, 1, 2, 3 have no size/sha256")


def test_a_folder_without_config_loads_with_one_warning(run, capsys):
    (run / "config.json").unlink()  # fold models put together by hand: nothing to check them against
    capsys.readouterr()
    assert len(Detector.load(run).files) == FOLDS
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1 and err[0].startswith(f"warning: {run}: no config.json") and "4 fold model(s) unchecked" in err[0]
    )


def _poison(model: Path) -> None:
    """16 bytes of 0xFF over the first weights of a safetensors file (NaN in float32)."""
    data = bytearray(model.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after the header
    data[start + 16 : start + 32] = b"\xff" * 16
    model.write_bytes(bytes(data))


def test_nonfinite_weights_are_refused_naming_the_file(run, clip, tmp_path):
    _unrecord(run)  # without a record only the weights themselves can tell
    _poison(fold_model_file(run, 1))
    _refused_everywhere(run, clip, tmp_path, r"fold_01/model.safetensors: weight .* holds NaN or inf")


def test_nonfinite_scores_are_refused_never_not_anomalous(tiny_run, clip):
    detector = Detector.load(tiny_run)
    real = detector.scorer
    detector.scorer = lambda windows: np.where(np.arange(len(windows)) == 1, np.nan, real(windows))
    with pytest.raises(UserError, match=r"window\(s\) 1\.\.5 NaN or inf"):
        detector.score_frames(square_frames(14, (24, 36)))
    with pytest.raises(UserError, match="NaN or inf"):
        list(detector.stream(clip, batch_size=2))


def test_a_run_resumed_fold_by_fold_keeps_every_record(run, tiny_shards, capsys):
    from ddp_vad.train.transfer import TransferConfig, run_transfer

    shutil.rmtree(fold_model_file(run, 2).parent)  # as if killed before fold 2 finished
    metrics_file(run).unlink()
    cfg = TransferConfig(shards=str(tiny_shards), out=str(run), source="scratch", preset="tiny", epochs=1,
                         batch_size=8, protocol="window", progress=False)  # fmt: skip
    run_transfer(cfg)
    capsys.readouterr()
    assert len(Detector.load(run).files) == FOLDS
    assert "warning" not in capsys.readouterr().err
