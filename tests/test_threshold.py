"""The decision threshold (infer/threshold.py): chosen on training folds only, one per (repeat, fold) model without
its test clips in any repeat, recorded in threshold.json and checked when read or given (finite, in [0, 1])."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fake_transfer_run

from ddp_vad.cli import cli
from ddp_vad.errors import UserError
from ddp_vad.infer.detector import Detector
from ddp_vad.infer.threshold import VERSION, best_threshold, check_threshold, compute_thresholds, run_threshold
from ddp_vad.models import ModelConfig
from ddp_vad.presets import PRESETS
from ddp_vad.train.transfer import TransferConfig, run_transfer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend on shared cores
N_FOLDS, CLIPS = 3, [f"c{i}" for i in range(6)]


def test_the_threshold_is_chosen_on_training_folds_only(tmp_path):
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    assert best_threshold(scores, labels) == 0.3  # a tie with 0.7 (balanced accuracy 0.833 both): the lowest
    assert best_threshold(np.array([0.1, 0.4, 0.35, 0.8, 0.9]), np.array([0, 0, 1, 1, 1])) == 0.8
    assert best_threshold(scores, np.zeros(6)) is None
    # fold k's threshold ignores fold k's own rows: changing them changes the others' thresholds, not fold k's
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 2
    folds = np.arange(60) % 3
    scores = rng.random(60) * 0.7 + 0.3 * labels
    changed = np.where(folds == 1, rng.random(60), scores)
    found = []
    for values in (np.round(scores, 6), np.round(changed, 6)):
        folder = tmp_path / f"run{len(found)}"
        folder.mkdir()
        rows = [f"k{i},c,{i},{labels[i]},{values[i]:.6f},{folds[i]}" for i in range(60)]
        (folder / "oof_scores.csv").write_text("key,clip,start,label,score,fold\n" + "\n".join(rows) + "\n")
        found.append(thresholds := compute_thresholds(folder)["thresholds"])
        assert thresholds["all"] == best_threshold(values, labels)
        for k in range(3):
            assert thresholds[f"fold_{k:02d}"] == best_threshold(values[folds != k], labels[folds != k])
    assert found[0]["fold_01"] == found[1]["fold_01"] and found[0]["all"] != found[1]["all"]
    # recorded in the run, and redone when the out-of-fold scores change (a re-run transfer)
    folder = tmp_path / "run0"
    value, how = run_threshold(folder)
    assert value == found[0]["all"] and "balanced accuracy" in how
    assert (folder / "threshold.json").is_file()
    shutil.copy(tmp_path / "run1" / "oof_scores.csv", folder / "oof_scores.csv")
    assert run_threshold(folder, fold=0)[0] == found[1]["fold_00"]
    assert run_threshold(tmp_path, None)[0] == 0.5  # no out-of-fold scores: the default, said so
    assert "default 0.5" in run_threshold(tmp_path, None)[1]


def _oof(rng: np.random.Generator, deal: list[list[int]], shift: dict | None = None) -> tuple[str, list[dict]]:
    """oof_scores.csv text of six clips x 6 windows, one repeat per row of ``deal`` (fold of each clip), scores
    random with anomalous windows higher; ``shift``: {(repeat, clip): added score} to perturb some rows."""
    rows = []
    for repeat, folds in enumerate(deal):
        for c, clip in enumerate(CLIPS):
            for w in range(6):
                label = int((w + c) % 3 == 0)
                score = rng.random() * 0.6 + 0.3 * label + (shift or {}).get((repeat, clip), 0.0)
                rows.append({"key": f"{clip}_{w:04d}", "clip": clip, "start": w, "label": label,
                             "score": round(min(score, 1.0), 6), "fold": folds[c], "repeat": repeat})  # fmt: skip
    text = "key,clip,start,label,score,fold,repeat\n" + "".join(
        f"{r['key']},{r['clip']},{r['start']},{r['label']},{r['score']},{r['fold']},{r['repeat']}\n" for r in rows
    )
    return text, rows


DEAL = [[0, 1, 2, 0, 1, 2], [1, 1, 0, 2, 2, 0]]  # repeat 1 deals the clips to other folds


def _run(folder: Path, text: str, models: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "oof_scores.csv").write_text(text)
    if models:  # recorded fold models, as transfer leaves them (loading checks them); the run has repeats
        cfg = ModelConfig(preset="tiny", window=10, height=24, width=36, **PRESETS["tiny"].model)
        fake_transfer_run(folder, cfg, N_FOLDS * len(DEAL))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "n_folds": N_FOLDS, "repeats": len(DEAL)}))
    return folder


def _expected(rows: list[dict], repeat: int, fold: int) -> float:
    """Balanced-accuracy threshold over the rows whose clip is outside unit (repeat, fold)'s test clips."""
    test = {r["clip"] for r in rows if (r["repeat"], r["fold"]) == (repeat, fold)}
    kept = [r for r in rows if r["clip"] not in test]
    return best_threshold(np.array([r["score"] for r in kept]), np.array([r["label"] for r in kept]))


def test_every_repeat_fold_model_gets_its_own_threshold_without_its_test_clips_in_any_repeat(tmp_path):
    text, rows = _oof(np.random.default_rng(3), DEAL)
    record = compute_thresholds(_run(tmp_path / "a", text))
    units = {f"fold_{r * N_FOLDS + f:02d}": (r, f) for r in range(len(DEAL)) for f in range(N_FOLDS)}
    assert set(record["thresholds"]) == {"all", *units}  # one per model folder, repeat 1's included
    assert record["held_out"] == "test clips"
    for key, (repeat, fold) in units.items():
        assert record["thresholds"][key] == _expected(rows, repeat, fold), key
    # Unit 0 (repeat 0, fold 0) tests clips c0 and c3. Moving their scores in repeat 1, where other folds test them,
    # moves every threshold that sees them, and not unit 0's: its test clips are left out in every repeat.
    text2, _ = _oof(np.random.default_rng(3), DEAL, shift={(1, "c0"): 0.35, (1, "c3"): -0.3})
    moved = compute_thresholds(_run(tmp_path / "b", text2))["thresholds"]
    assert moved["fold_00"] == record["thresholds"]["fold_00"]
    assert moved["all"] != record["thresholds"]["all"]


def test_folds_that_split_clips_leave_out_their_test_windows(tmp_path):
    # the window protocol: each clip's windows in every fold, so leaving out whole clips would leave nothing
    rows = [f"c{i % 2}_{i:04d},c{i % 2},{i},{i % 2 ^ (i % 5 == 0)},{(i * 37 % 100) / 100:.2f},{i % 3},{i // 30}"
            for i in range(60)]  # fmt: skip
    folder = _run(tmp_path / "w", "key,clip,start,label,score,fold,repeat\n" + "\n".join(rows) + "\n")
    record = compute_thresholds(folder)
    assert record["held_out"] == "test windows" and len(record["thresholds"]) == 1 + 6


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory) -> tuple[Path, dict]:
    """A 2-repeat x 3-fold run folder: six tiny fold models (random weights) and hand-written out-of-fold scores."""
    text, _ = _oof(np.random.default_rng(3), DEAL)
    folder = _run(tmp_path_factory.mktemp("hand") / "run", text, models=True)
    return folder, compute_thresholds(folder)["thresholds"]


def test_a_fold_model_is_flagged_at_its_own_threshold_not_the_ensemble_s(hand_run):
    run, thresholds = hand_run
    assert any(thresholds[f"fold_{u:02d}"] != thresholds["all"] for u in range(6))  # else this test sees nothing
    for unit in range(6):
        assert Detector.load(run, fold=unit).threshold == thresholds[f"fold_{unit:02d}"], unit
    model = run / "folds" / "fold_04" / "model.safetensors"  # a fold model file inside its run: the same
    assert Detector.load(model).threshold == thresholds["fold_04"]
    assert Detector.load(run).threshold == thresholds["all"]


def test_a_tiny_two_repeat_run_has_a_threshold_for_every_model(tiny_shards, tmp_path):
    run = run_transfer(TransferConfig(shards=str(tiny_shards), out=str(tmp_path / "r"), source="scratch",
                                      preset="tiny", epochs=1, batch_size=16, repeats=2, protocol="clip",
                                      progress=False))  # fmt: skip
    models = sorted(p.parent.name for p in run.glob("folds/fold_*/model.safetensors"))
    assert len(models) == 8
    value, how = run_threshold(run, fold=7)  # repeat 1, fold 3
    record = json.loads((run / "threshold.json").read_text())
    assert set(record["thresholds"]) == {"all", *models} and record["version"] == VERSION
    assert value == record["thresholds"]["fold_07"] and "balanced accuracy" in how
    assert Detector.load(run, fold=7).threshold == value


def test_given_thresholds_are_finite_numbers_in_0_1(hand_run):
    run, thresholds = hand_run
    assert check_threshold(0) == 0.0 and check_threshold(np.float32(0.25)) == 0.25
    with pytest.raises(UserError, match="--threshold must be a finite number"):
        check_threshold(None)
    for bad in (math.nan, math.inf, -0.1, 1.5, "0.5", True, [0.5]):
        with pytest.raises(UserError, match="--threshold must"):
            check_threshold(bad)
        with pytest.raises(UserError, match="^threshold must"):  # None is no threshold: the run's
            Detector.load(run, threshold=bad)
    assert Detector.load(run, threshold=0.25).threshold == 0.25


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: {**r, "thresholds": {**r["thresholds"], "all": math.nan}},  # NaN: nothing would ever be flagged
        lambda r: {**r, "thresholds": {**r["thresholds"], "fold_01": "high"}},
        lambda r: {**r, "thresholds": [0.3, 0.4]},
        lambda r: {**r, "thresholds": {**r["thresholds"], "all": [0.3]}},
        lambda r: {**r, "notes": "none"},
        lambda r: [r],
    ],
)
def test_a_damaged_threshold_json_is_one_line_naming_it(hand_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(hand_run[0], run)
    run_threshold(run)  # writes threshold.json
    path = run / "threshold.json"
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    with pytest.raises(UserError, match=f"threshold file {path}"):
        Detector.load(run)
    frames = tmp_path / "clip"
    frames.mkdir()
    result = CliRunner().invoke(cli, ["predict", str(frames), "--model", str(run), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert str(path) in result.stderr and not (tmp_path / "s.csv").exists()


def test_a_record_of_the_older_rule_is_redone(hand_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hand_run[0], run)
    run_threshold(run)
    path = run / "threshold.json"
    old = json.loads(path.read_text())
    del old["version"]
    old["thresholds"] = {"all": 0.123, "fold_00": 0.123}  # version 1 had no fold_03..fold_05
    path.write_text(json.dumps(old))
    assert run_threshold(run, fold=5)[0] == hand_run[1]["fold_05"]
    assert json.loads(path.read_text())["version"] == VERSION
