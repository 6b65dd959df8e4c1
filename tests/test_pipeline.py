"""The whole chain end to end (tiny preset), its resume, and predict on its output."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddp_vad.cli import cli
from ddp_vad.data.sources.frames import read_frame, resize_frame
from ddp_vad.eval.baselines import METHODS
from ddp_vad.models import build_lrcn
from ddp_vad.pipeline import PipelineConfig, run_pipeline
from ddp_vad.weights import load_model


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "run"
    # The default pipeline of the tiny preset (every baseline, the whole curve): its smallest labelled shares give
    # k-NN fewer training windows than neighbours, which used to crash the chain.
    args = ["pipeline", "--out", str(out), "--preset", "tiny"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def test_layout_and_report(pipeline_dir):
    for name in ("data", "shards", "gan", "lrcn-gan", "lrcn-scratch", "lrcn-random", "baselines/logreg",
                 "baselines/nb", "report"):  # fmt: skip
        assert (pipeline_dir / name).is_dir(), name
    assert (pipeline_dir / "gan" / "generator.safetensors").is_file()
    methods = {
        json.loads((pipeline_dir / r / "metrics.json").read_text())["method"]
        for r in ("lrcn-gan", "lrcn-scratch", "lrcn-random", "baselines/logreg", "baselines/nb")
    }
    assert methods == {"GAN+LRCN", "LRCN", "Random+LRCN", "logreg", "nb"}
    for fraction in ("0.05", "0.1", "0.25", "0.5"):
        for method in METHODS:
            assert (pipeline_dir / "curve" / f"f{fraction}" / "baselines" / method / "metrics.json").is_file()
    report = (pipeline_dir / "report" / "report.md").read_text()
    for method in ("GAN+LRCN", "LRCN", "logreg", "nb"):
        assert f"| {method} |" in report
    for name in ("lrcn-gan", "lrcn-scratch", "baselines/logreg"):  # the curve's other fraction
        metrics = json.loads((pipeline_dir / "curve" / "f0.5" / name / "metrics.json").read_text())
        assert metrics["labelled_fraction"] == 0.5
    assert "## Label efficiency" in report and "## Verdict" in report and "## Headline" in report
    assert "GAN+LRCN vs LRCN from scratch" in report and "random-init control" in report
    assert re.search(r"- knn at 0\.05: .*fold \d: \d training windows < 5 neighbours: k = \d", report)
    # report.json carries each run's own numbers (fold by fold) and means over those folds.
    data = json.loads((pipeline_dir / "report" / "report.json").read_text())
    for label, entry in data["methods"].items():
        own = json.loads((Path(entry["run"]) / "metrics.json").read_text())
        assert label.startswith(own["method"])
        assert [f["accuracy"] for f in entry["folds"]] == [f["accuracy"] for f in own["folds"]]
        for metric in ("recall", "precision", "accuracy", "f1"):
            values = [f[metric] for f in own["folds"] if f[metric] is not None]
            if not values:  # undefined in every fold: None, never a made-up number
                assert entry["mean"][metric] is None and entry["std"][metric] is None, (label, metric)
                continue
            assert entry["mean"][metric] == pytest.approx(np.mean(values)), (label, metric)
            assert entry["std"][metric] == pytest.approx(np.std(values)), (label, metric)
        recall = "n/a" if entry["mean"]["recall"] is None else f"{entry['mean']['recall']:.3f} ± "
        row = f"| {label} | {own['protocol']} | {len(own['folds'])} | {recall}"
        assert row in report, row
    for fig in (
        "fig1_label_efficiency.png",
        "fig2_accuracy_by_fold.png",
        "fig3_similarity.png",
        "fig4_real_vs_fake.png",
        "fig5_timelines.png",
    ):
        assert (pipeline_dir / "report" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((pipeline_dir / "config.json").read_text())
    assert config["config"]["preset"] == "tiny" and config["plan"]["folds"] == 3


def test_rerun_resumes_instead_of_starting_over(pipeline_dir, capsys):
    before = {
        p: p.stat().st_mtime_ns
        for p in (
            pipeline_dir / "gan" / "generator.safetensors",
            pipeline_dir / "lrcn-gan" / "metrics.json",
            pipeline_dir / "shards" / "manifest.json",
        )
    }
    run_pipeline(PipelineConfig(out=str(pipeline_dir), preset="tiny"))
    log = capsys.readouterr().out
    assert "reusing" in log and "pretrain:" in log
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_predict_scores_every_frame_and_draws_a_plot(pipeline_dir, tmp_path):
    clip = next((pipeline_dir / "data").glob("*/Test/Test001"))
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(
        cli, ["predict", str(clip), "--model", str(pipeline_dir / "lrcn-gan"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(clip.glob("*.tif")))
    assert [int(r["frame"]) for r in rows] == list(range(1, len(rows) + 1))
    # Recomputed here: every stride-1 window scored by every fold model (mean probability), a frame's score the
    # max over the windows that cover it, flagged at the run's threshold (chosen on its training folds, recorded).
    models = [
        load_model(f, build_lrcn)[0] for f in sorted((pipeline_dir / "lrcn-gan").glob("folds/*/model.safetensors"))
    ]
    cfg = load_model(next((pipeline_dir / "lrcn-gan").glob("folds/*/model.safetensors")), build_lrcn)[1]
    frames = np.stack([resize_frame(read_frame(p), cfg.height, cfg.width) for p in sorted(clip.glob("*.tif"))])
    starts = range(len(frames) - cfg.window + 1)
    x = torch.from_numpy(np.stack([frames[s : s + cfg.window] for s in starts])).unsqueeze(2).float() / 255
    with torch.no_grad():
        win = torch.stack([torch.softmax(m(x), dim=1)[:, 1] for m in models]).mean(0).double().numpy()
    expected = [max(win[max(0, i - cfg.window + 1) : i + 1]) for i in range(len(frames))]
    got = [float(r["score"]) for r in rows]
    np.testing.assert_allclose(got, expected, atol=2e-6)
    record = json.loads((pipeline_dir / "lrcn-gan" / "threshold.json").read_text())
    threshold = record["thresholds"].get("all", 0.5)
    assert [int(r["anomalous"]) for r in rows] == [int(s >= threshold) for s in got]
    assert np.ptp(got) > 0  # not a constant
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_predict_without_a_model_is_a_one_line_error(pipeline_dir, tmp_path):
    clip = next((pipeline_dir / "data").glob("*/Test/Test001"))
    result = CliRunner().invoke(cli, ["predict", str(clip), "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "nope" in result.output


def test_pretraining_calibration_and_prior_reach_their_stages(tmp_path):
    from ddp_vad.pipeline import stage_configs

    default = stage_configs(PipelineConfig(out=str(tmp_path / "a"), preset="tiny"))
    assert default["pretrain"](False).objective == "gan" and default["pretrain"](False).pseudo_anomalies == 0
    runs = ("lrcn-gan", "lrcn-scratch", "lrcn-random")
    assert {(default[f"{run}@1"](False).calibrate, default[f"{run}@1"](False).motion_prior) for run in runs} == {
        ("normal", "energy")
    }
    no_prior = stage_configs(PipelineConfig(out=str(tmp_path / "c"), preset="tiny", motion_prior="none"))
    assert {no_prior[f"{run}@1"](False).motion_prior for run in runs} == {"none"}
    chosen = stage_configs(
        PipelineConfig(out=str(tmp_path / "b"), preset="tiny", pretraining="pseudo", calibrate="none")
    )
    pretrain = chosen["pretrain"](False)
    assert pretrain.objective == "pseudo" and pretrain.pseudo_anomalies == 1.0
    assert {(chosen[f"{run}@0.1"](False).calibrate, chosen[f"{run}@0.1"](False).motion_prior) for run in runs} == {
        ("none", "none")
    }


def test_input_pool_and_conv_channels_reach_the_gan_and_every_learned_run(tmp_path):
    from ddp_vad.errors import UserError
    from ddp_vad.pipeline import stage_configs

    wide = stage_configs(PipelineConfig(out=str(tmp_path / "a"), preset="demo", input_pool=2, conv_channels="16,16,16"))
    stages = ["pretrain"] + [f"{run}@{f}" for run in ("lrcn-gan", "lrcn-scratch", "lrcn-random") for f in ("0.1", "1")]
    assert {(wide[s](False).input_pool, wide[s](False).conv_channels) for s in stages} == {(2, "16,16,16")}
    default = stage_configs(PipelineConfig(out=str(tmp_path / "b"), preset="demo"))
    assert {(default[s](False).input_pool, default[s](False).conv_channels) for s in stages} == {(None, None)}
    # checked against the shards' frame size before any stage: tiny's 24x36 frames pooled 2x are too small
    with pytest.raises(UserError, match="pooled 2x are too small"):
        PipelineConfig(out=str(tmp_path / "c"), preset="tiny", input_pool=2)
    with pytest.raises(UserError, match="--conv-channels 8,8: the 'tiny' preset has 3 conv layers"):
        PipelineConfig(out=str(tmp_path / "c"), preset="tiny", conv_channels="8,8")
    assert not (tmp_path / "c").exists()


def test_prior_share_reaches_every_learned_run_and_is_checked_up_front(tmp_path):
    from ddp_vad.errors import UserError
    from ddp_vad.pipeline import stage_configs

    stages = [f"{run}@{f}" for run in ("lrcn-gan", "lrcn-scratch", "lrcn-random") for f in ("0.1", "1")]
    nested = stage_configs(PipelineConfig(out=str(tmp_path / "a"), preset="demo", prior_share="nested"))
    assert {nested[s](False).prior_share for s in stages} == {"nested"}
    default = stage_configs(PipelineConfig(out=str(tmp_path / "b"), preset="demo"))
    assert {default[s](False).prior_share for s in stages} == {0.5}
    with pytest.raises(UserError, match="--prior-share 1.5"):
        PipelineConfig(out=str(tmp_path / "c"), preset="demo", prior_share="1.5")
    assert not (tmp_path / "c").exists()
