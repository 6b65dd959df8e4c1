"""The motion prior's share (``transfer --prior-share``): chosen per fold on inner folds of its own training windows
(``nested``, the default), never on the test fold, and the saved model scores with the share chosen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import torch_threads

from ddp_vad.cli import cli
from ddp_vad.data.reader import frames_to_float, load_window_set
from ddp_vad.errors import UserError
from ddp_vad.models import build_lrcn
from ddp_vad.motion import window_energies
from ddp_vad.train import fold as fold_module
from ddp_vad.train import fold_steps
from ddp_vad.train.calibration import TEMPERATURE, Z99
from ddp_vad.train.crossval import CVWindows, fold_split
from ddp_vad.train.metrics import read_oof_scores
from ddp_vad.train.prior_share import PRIOR_SHARES, choose_share, inner_splits, parse_prior_share
from ddp_vad.train.transfer import TransferConfig, run_transfer
from ddp_vad.weights import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prior_share_is_nested_or_a_share_in_0_1():
    assert parse_prior_share("nested") == "nested" and parse_prior_share("NESTED") == "nested"
    assert parse_prior_share("0.25") == 0.25 and parse_prior_share(1) == 1.0
    for bad in ("1.5", "-0.1", "nan", "half", ""):
        with pytest.raises(UserError, match="--prior-share"):
            parse_prior_share(bad)
    common = dict(shards="s", out="o", source="scratch", check_paths=False)
    with pytest.raises(UserError, match="needs --motion-prior energy"):
        TransferConfig(**common, prior_share="0.3", motion_prior="none")
    with pytest.raises(UserError, match="--prior-share nested needs --motion-prior energy"):
        TransferConfig(**common, prior_share="nested", calibrate="none")
    assert TransferConfig(**common, motion_prior="none").prior_share == 0.5  # the default: unused, not refused


def test_a_bad_share_is_a_one_line_error_before_anything_is_written(tiny_shards, tmp_path):
    out = tmp_path / "run"
    args = ["transfer", "--shards", str(tiny_shards), "--out", str(out), "--from", "scratch", "--prior-share", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.output.startswith("error:") and "--prior-share 2" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def _log_odds(model, frames: np.ndarray) -> np.ndarray:
    inputs = lambda idx: frames_to_float(torch.from_numpy(frames[idx]))  # noqa: E731
    return fold_steps.predict(
        model, model, inputs, np.arange(len(frames)), lambda: torch.autocast("cpu", enabled=False)
    )[2]


def _cv(clips: list[str], labels: list[int]) -> CVWindows:
    n = len(clips)
    starts = np.zeros(n, np.int64)
    for i in range(1, n):
        starts[i] = starts[i - 1] + 1 if clips[i] == clips[i - 1] else 0
    keys = [f"{c}_{s:04d}" for c, s in zip(clips, starts.tolist(), strict=True)]
    return CVWindows(labels=np.array(labels), fold_sets=np.zeros(n, np.int64), keys=keys, clips=clips, starts=starts)


def test_inner_folds_split_the_training_clips_whole_with_both_classes_on_each_side():
    clips = [f"Test{c:03d}" for c in range(1, 9) for _ in range(6)]
    labels = [int(c % 2 == 0 and s >= 2) for c in range(1, 9) for s in range(6)]  # even clips anomalous from frame 2
    cv = _cv(clips, labels)
    train_idx = np.arange(6, 48)  # Test001 is the (outer) test fold
    splits = inner_splits(cv, train_idx, seed=0, fold=0)
    assert len(splits) == 2
    scored = np.sort(np.concatenate([s for _, s in splits]))
    np.testing.assert_array_equal(scored, train_idx)  # every training window scored once, nothing else
    for fit, part in splits:
        assert not set(np.asarray(clips)[fit]) & set(np.asarray(clips)[part])  # whole clips
        assert set(cv.labels[fit]) == {0, 1} and set(cv.labels[part]) == {0, 1}
        assert set(fit) | set(part) == set(train_idx)
    # one anomalous clip only: no split gives both sides both classes
    assert inner_splits(cv, np.arange(0, 18), seed=0, fold=0) == []


def test_the_share_that_ranks_the_inner_frames_best_is_chosen():
    clips = [f"Test{c:03d}" for c in range(1, 5) for _ in range(8)]
    labels = np.array([int(c in (2, 3) and s >= 3) for c in range(1, 5) for s in range(8)])
    cv = _cv(clips, labels.tolist())
    frame_labels = labels[:, None]  # 1-frame windows
    scored = np.arange(len(clips))
    signal = labels + 0.01 * np.arange(len(clips)) / len(clips)
    noise = np.random.default_rng(0).normal(size=len(clips))
    share, aurocs = choose_share(cv, scored, noise, signal, frame_labels)
    assert share == 1.0 and aurocs[-1] == 1.0 and len(aurocs) == len(PRIOR_SHARES)
    share, aurocs = choose_share(cv, scored, signal, noise, frame_labels)
    assert share == min(PRIOR_SHARES) and aurocs[0] == max(aurocs)
    share, aurocs = choose_share(cv, scored, signal, signal, frame_labels)  # every share alike: the plain sum
    assert share == 0.5 and len(set(aurocs)) == 1


def test_the_choice_sees_the_folds_labelled_training_windows_only_and_the_model_scores_with_it(
    tiny_shards, tmp_path, monkeypatch
):
    """A share of 1 forced on every fold: the choice was offered only labelled training windows of its fold, and the
    saved model's log-odds are then the prior's part alone, the classifier's weight 0."""
    offered = []

    def choose_one(cv, scored, z_classifier, z_motion, frame_labels):
        offered.append((scored.copy(), len(z_classifier), len(z_motion)))
        return 1.0, [None] * len(PRIOR_SHARES)

    monkeypatch.setattr(fold_module, "choose_share", choose_one)
    cfg = TransferConfig(
        shards=str(tiny_shards), out=str(tmp_path / "run"), source="scratch", preset="tiny", epochs=1, batch_size=8,
        protocol="window", labelled_fraction=0.5, progress=False, prior_share="nested",
    )  # fmt: skip
    with torch_threads(1):
        run = run_transfer(cfg)
    ws = load_window_set(tiny_shards)
    cv = CVWindows.from_window_set(ws, "window")
    assert len(offered) == cv.n_folds
    for k, (scored, n_classifier, n_motion) in enumerate(offered):
        train_idx, test_idx, _ = fold_split(cv, k, fraction=0.5, seed=0)
        assert set(scored.tolist()) == set(train_idx.tolist()) and not set(scored.tolist()) & set(test_idx.tolist())
        assert n_classifier == n_motion == scored.size
        record = json.loads((run / "folds" / f"fold_{k:02d}" / "result.json").read_text())
        motion = record["calibration"]["motion"]
        assert motion["share"] == 1.0 and motion["nested"]["scored_windows"] == scored.size
        assert record["metrics"]["prior_share"] == 1.0
        model = load_model(run / "folds" / f"fold_{k:02d}" / "model.safetensors", build_lrcn)[0].eval()
        expected = motion["weight"] * (window_energies(ws.frames) - motion["mean"]) - Z99 / TEMPERATURE
        np.testing.assert_allclose(_log_odds(model, ws.frames), expected, atol=1e-5)


@pytest.fixture(scope="module")
def nested_run(tiny_shards, tmp_path_factory) -> Path:
    cfg = TransferConfig(
        shards=str(tiny_shards), out=str(tmp_path_factory.mktemp("nested") / "run"), source="scratch", preset="tiny",
        epochs=1, batch_size=8, protocol="window", progress=False, prior_share="nested",
    )  # fmt: skip
    with torch_threads(1):
        return run_transfer(cfg)


def test_a_nested_run_records_the_share_its_inner_folds_ranked_best(nested_run: Path):
    for path in sorted((nested_run / "folds").glob("fold_*/result.json")):
        motion = json.loads(path.read_text())["calibration"]["motion"]
        nested = motion["nested"]
        assert nested["shares"] == pytest.approx(list(PRIOR_SHARES)) and nested["inner_folds"] == 2
        best = max((a, -abs(s - 0.5), s) for a, s in zip(nested["frame_auroc"], PRIOR_SHARES, strict=True)
                   if a is not None)[2]  # fmt: skip
        assert motion["share"] == best
    metrics = json.loads((nested_run / "metrics.json").read_text())
    assert metrics["prior_share"] == "nested" and all(row["prior_share"] in PRIOR_SHARES for row in metrics["folds"])


def test_a_run_killed_while_choosing_resumes_to_the_same_shares_and_scores(
    nested_run: Path, tiny_shards, tmp_path, monkeypatch
):
    """Killed in fold 1's second inner fold (after its last epoch's checkpoint): the rerun trains the inner folds
    again from the same seeds and gives the uninterrupted run's shares and scores, bit for bit."""
    real = fold_module._inner_z_scores

    def crash(run, k, i, fit_idx, scored):
        if k == 1 and i == 1:
            raise RuntimeError("simulated kill")
        return real(run, k, i, fit_idx, scored)

    cfg = dict(source="scratch", preset="tiny", epochs=1, batch_size=8, protocol="window", progress=False,
               prior_share="nested")  # fmt: skip
    monkeypatch.setattr(fold_module, "_inner_z_scores", crash)
    with pytest.raises(RuntimeError, match="simulated kill"), torch_threads(1):
        run_transfer(TransferConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), **cfg))
    monkeypatch.undo()
    with torch_threads(1):
        run = run_transfer(TransferConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), **cfg))

    def motion_records(r: Path) -> list[dict]:
        return [json.loads(p.read_text())["calibration"]["motion"] for p in sorted(r.glob("folds/*/result.json"))]

    assert motion_records(run) == motion_records(nested_run)
    assert (run / "oof_scores.csv").read_text() == (nested_run / "oof_scores.csv").read_text()


def test_the_post_hoc_benchmark_recovers_each_windows_two_z_scores(nested_run: Path, tiny_shards):
    """benchmarks/prior_share.py: recombined with each fold's own share, the recovered z-scores give back the
    calibrated log-odds the run wrote, window by window (so other shares are the same scores weighed otherwise)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prior_share_bench", Path(__file__).parents[1] / "benchmarks" / "prior_share.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ws = load_window_set(tiny_shards)
    energies = dict(zip(ws.keys, window_energies(ws.frames).tolist(), strict=True))
    motion = {int(json.loads(p.read_text())["fold"]): json.loads(p.read_text())["calibration"]["motion"]
              for p in (nested_run / "folds").glob("fold_*/result.json")}  # fmt: skip
    if all(m["share"] == 1.0 for m in motion.values()):
        pytest.skip("every fold chose the energy alone: no classifier part to recover")
    kept = [r for r in read_oof_scores(nested_run) if motion[int(r["fold"])]["share"] < 1]
    zd, ze, _ = bench.z_scores(nested_run, kept, energies)
    shares = np.array([motion[int(r["fold"])]["share"] for r in kept])
    totals = np.array([motion[int(r["fold"])]["sum_spread"] for r in kept])
    p = np.array([r["score"] for r in kept])
    expected = np.log(p) - np.log1p(-p)
    rebuilt = ((2 * (1 - shares) * zd + 2 * shares * ze) / totals - Z99) / TEMPERATURE
    np.testing.assert_allclose(rebuilt, expected, atol=1e-6)


def test_the_folds_frame_auroc_follows_the_reports_rule():
    """train.metrics.frame_auroc (inside a fold) gives what the report's frame_level_auroc gives for the same window
    scores: overlapping windows, a frame's score the max of its windows, clips apart."""
    from ddp_vad.eval.frame_scores import frame_level_auroc
    from ddp_vad.train.metrics import frame_auroc

    rng = np.random.default_rng(3)
    clips = [c for c in ("Test001", "Test002", "Test003") for _ in range(12)]
    starts = np.array([s for _ in range(3) for s in range(12)])
    truth = {c: rng.random(30) < 0.4 for c in ("Test001", "Test002", "Test003")}
    labels = np.stack([truth[c][s : s + 5] for c, s in zip(clips, starts.tolist(), strict=True)]).astype(int)
    scores = rng.normal(size=len(clips)) + labels.mean(axis=1)
    rows = [{"key": f"{c}_{s}", "clip": c, "start": s, "score": float(x)}
            for c, s, x in zip(clips, starts.tolist(), scores.tolist(), strict=True)]  # fmt: skip
    by_key = {r["key"]: lab.tolist() for r, lab in zip(rows, labels, strict=True)}
    expected = frame_level_auroc(rows, by_key)
    assert frame_auroc(clips, starts, labels, scores) == pytest.approx(expected, abs=1e-12)
    assert expected is not None and 0.0 < expected < 1.0 and expected != 0.5
