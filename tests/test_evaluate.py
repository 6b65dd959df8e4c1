"""``evaluate`` on fixed, hand-written run folders: known numbers, real PNGs, errors with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddp_vad.cli import cli
from ddp_vad.errors import UserError
from ddp_vad.eval.report import EvaluateConfig, run_evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = "key,clip,start,label,score,fold\n"

# Window length 2. Frame labels of every window (as the shards' json holds them).
FRAME_LABELS = {
    "C1_0000": [1, 1],
    "C1_0001": [1, 1],
    "C2_0000": [0, 0],
    "C2_0002": [0, 0],
    "C3_0000": [1, 1],
    "C3_0002": [1, 1],
    "C4_0000": [0, 0],
    "C4_0002": [0, 0],
}


def _fold(fold, tp, fp, tn, fn, recall, precision, accuracy, f1, counts=True):
    row = {"fold": fold, "recall": recall, "precision": precision, "accuracy": accuracy, "f1": f1}
    row["n_test"] = tp + fp + tn + fn
    if counts:
        row.update(tp=tp, fp=fp, tn=tn, fn=fn)
    return row


def _write_run(run, method, folds, oof_lines, shards):
    run.mkdir(parents=True)
    payload = {"method": method, "protocol": "window", "folds": folds, "mean": {}, "std": {}}
    (run / "metrics.json").write_text(json.dumps(payload))
    (run / "oof_scores.csv").write_text(HEADER + "".join(line + "\n" for line in oof_lines))
    (run / "config.json").write_text(json.dumps({"config": {"shards": str(shards)}}))


def _write_label_shards(path):
    """A minimal shard set: one tar with one block per clip (window 2, 4x4 frames) and its manifest."""
    from ddp_vad.data.format import FORMAT, Block
    from ddp_vad.data.writer import write_shard

    path.mkdir()
    blocks = []
    for clip in sorted({key[:2] for key in FRAME_LABELS}):
        starts = sorted(int(key[3:]) for key in FRAME_LABELS if key[:2] == clip)
        labels = np.zeros(starts[-1] + 2, np.uint8)
        for s in starts:
            labels[s : s + 2] = FRAME_LABELS[f"{clip}_{s:04d}"]
        n = len(starts)
        blocks.append(Block(key=f"{clip}_0000", clip=clip, split="test", anomaly_types=[], first=0, window=2,
                            frames=np.zeros((len(labels), 4, 4), np.uint8), frame_labels=labels,
                            start=np.array(starts), label=labels[starts], kept=np.ones(n, bool),
                            fold_window=np.zeros(n, np.int64), fold_clip=np.zeros(n, np.int64),
                            fold_leakfree=np.zeros(n, np.int64)))  # fmt: skip
    entry = write_shard(path / "s-000000.tar", blocks)
    counts = dict(clips=4, train_clips=0, test_clips=4, windows=8, anomalous=4, normal=4, kept=8, kept_anomalous=4,
                  kept_normal=4)  # fmt: skip
    manifest = {"format": FORMAT, "dataset": "s", "source": str(path), "balance": "none", "window": 2, "stride": 1,
                "height": 4, "width": 4, "min_anomalous": 1, "folds": 2, "seed": 0, "counts": counts,
                "shards": [entry]}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture()
def runs(tmp_path):
    shards = tmp_path / "shards"
    _write_label_shards(shards)
    # LRCN: fold 0 TP2 FP1 TN1 FN0, fold 1 TP1 FP0 TN2 FN1.
    lrcn = tmp_path / "lrcn"
    _write_run(
        lrcn,
        "LRCN",
        [_fold(0, 2, 1, 1, 0, 1.0, 2 / 3, 0.75, 0.8), _fold(1, 1, 0, 2, 1, 0.5, 1.0, 0.75, 2 / 3)],
        [
            "C1_0000,C1,0,1,0.9,0",
            "C1_0001,C1,1,1,0.8,0",
            "C2_0000,C2,0,0,0.6,0",
            "C2_0002,C2,2,0,0.1,0",
            "C3_0000,C3,0,1,0.7,1",
            "C3_0002,C3,2,1,0.3,1",
            "C4_0000,C4,0,0,0.2,1",
            "C4_0002,C4,2,0,0.4,1",
        ],
        shards,
    )
    # logreg (inside a baselines parent folder; its shards are gone; no confusion counts in the folds):
    # fold 0 predicts nothing anomalous (precision undefined), fold 1 holds no anomaly (recall/F1 undefined).
    base = tmp_path / "baselines"
    _write_run(
        base / "logreg",
        "logreg",
        [
            _fold(0, 0, 0, 2, 2, 0.0, None, 0.5, 0.0, counts=False),
            _fold(1, 0, 1, 3, 0, None, 0.0, 0.75, None, counts=False),
        ],
        [
            "C1_0000,C1,0,1,0.4,0",
            "C1_0001,C1,1,1,0.3,0",
            "C2_0000,C2,0,0,0.2,0",
            "C2_0002,C2,2,0,0.1,0",
            "C4_0000,C4,0,0,0.6,1",
            "C4_0002,C4,2,0,0.1,1",
            "C2_0004,C2,4,0,0.2,1",
            "C4_0004,C4,4,0,0.3,1",
        ],
        tmp_path / "deleted-shards",
    )
    return lrcn, base


def test_report_numbers(runs, tmp_path):
    lrcn, base = runs
    out = tmp_path / "report"
    run_evaluate(EvaluateConfig(runs=(str(lrcn), str(base)), out=str(out)))
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["LRCN", "logreg"]

    a = report["methods"]["LRCN"]
    assert a["mean"]["recall"] == pytest.approx(0.75) and a["std"]["recall"] == pytest.approx(0.25)
    assert a["mean"]["precision"] == pytest.approx(5 / 6) and a["std"]["precision"] == pytest.approx(1 / 6)
    assert a["mean"]["accuracy"] == pytest.approx(0.75) and a["std"]["accuracy"] == pytest.approx(0.0)
    assert a["mean"]["f1"] == pytest.approx(11 / 15) and a["std"]["f1"] == pytest.approx(1 / 15)
    assert a["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert a["window_auroc_pooled"] == pytest.approx(14 / 16)
    # Frame scores (max over covering windows): pos .9 .9 .8 .7 .7 .3 .3, neg .6 .6 .1 .1 .2 .2 .4 .4
    # -> 5 * 8 + 2 * 4 = 48 of 56 pairs ranked right.
    assert a["frame_auroc"] == pytest.approx(48 / 56)

    b = report["methods"]["logreg"]
    assert b["mean"]["accuracy"] == pytest.approx(0.625) and b["std"]["accuracy"] == pytest.approx(0.125)
    assert b["mean"]["recall"] == 0.0 and b["n_defined"]["recall"] == 1
    assert b["mean"]["precision"] == 0.0 and b["n_defined"]["precision"] == 1
    assert b["confusion"] == {"tp": 0, "fp": 1, "tn": 5, "fn": 2}  # rebuilt from the oof scores
    assert b["window_auroc_pooled"] == pytest.approx(9.5 / 12)
    assert b["frame_auroc"] is None
    assert any("frame-level AUROC skipped" in n for n in b["notes"])

    md = (out / "report.md").read_text()
    assert "| LRCN | window | 2 | 0.750 ± 0.250 | 0.833 ± 0.167 | 0.750 ± 0.000 | 0.733 ± 0.067 |" in md
    assert "recall defined in 1 of 2 folds" in md
    assert "| logreg | 0 | 2 | 1 | 5 |" in md  # TP FN FP TN

    for name in ("fig2_accuracy_by_fold.png", "confusion_matrices.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_bad_inputs(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        run_evaluate(EvaluateConfig(runs=(str(empty),), out=str(tmp_path / "r")))
    with pytest.raises(UserError, match="run folder not found"):
        EvaluateConfig(runs=(str(tmp_path / "missing"),), out=str(tmp_path / "r"))


def test_cli_missing_run_exits_2(tmp_path):
    missing = tmp_path / "no-such-run"
    result = CliRunner().invoke(cli, ["evaluate", str(missing), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0]
    assert "Traceback" not in result.output


def test_pretrain_run_figures(tiny_shards, tmp_path):
    from ddp_vad.data.shards import load_manifest
    from ddp_vad.models import build_generator, model_config_for
    from ddp_vad.weights import save_model

    gan = tmp_path / "gan"
    gan.mkdir()
    model_cfg = model_config_for("tiny", load_manifest(tiny_shards))
    save_model(build_generator(model_cfg), gan / "generator.safetensors", model_cfg)
    (gan / "similarity.csv").write_text("step,cosine,l2\n0,0.5,9.0\n10,0.7,6.5\n20,0.9,4.25\n")
    (gan / "config.json").write_text(json.dumps({"config": {"shards": str(tiny_shards)}}))
    out = tmp_path / "report"
    run_evaluate(EvaluateConfig(runs=(str(gan),), out=str(out)))
    report = json.loads((out / "report.json").read_text())
    assert report["methods"] == {}
    assert report["pretrain"][0]["similarity_last"] == {"step": 20.0, "cosine": 0.9, "l2": 4.25}
    assert report["pretrain"][0]["points"] == 3
    for name in ("fig3_similarity.png", "fig4_real_vs_fake.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert "| 3 | 20 | 0.9000 | 4.2500 |" in (out / "report.md").read_text()


def _drawn(monkeypatch) -> dict:
    """The figures evaluate draws, by name (their PNGs are still written)."""
    import ddp_vad.eval.report as report_module

    drawn, save = {}, report_module.save_figure
    monkeypatch.setattr(
        report_module, "save_figure", lambda fig, path: drawn.setdefault(path.stem, fig) and save(fig, path)
    )
    return drawn


@pytest.mark.parametrize("protocol", ["leakfree", "window"])
def test_figures_3_and_4_draw_the_run_s_curve_and_the_windows_its_gan_streamed(tiny_shards, tmp_path, monkeypatch,
                                                                              protocol):  # fmt: skip
    from itertools import islice

    from ddp_vad.data.reader import load_window_set
    from ddp_vad.data.shards import load_manifest
    from ddp_vad.data.stream import stream_windows
    from ddp_vad.models import build_generator, model_config_for
    from ddp_vad.weights import save_model

    gan = tmp_path / "gan"
    gan.mkdir()
    model_cfg = model_config_for("tiny", load_manifest(tiny_shards))
    save_model(build_generator(model_cfg), gan / "generator.safetensors", model_cfg)
    (gan / "similarity.csv").write_text("step,cosine,l2\n0,0.5,9.0\n10,0.7,6.5\n20,0.9,4.25\n")
    (gan / "config.json").write_text(json.dumps({"config": {"shards": str(tiny_shards), "protocol": protocol}}))
    drawn = _drawn(monkeypatch)
    run_evaluate(EvaluateConfig(runs=(str(gan),), out=str(tmp_path / "report")))
    cos, l2 = drawn["fig3_similarity"].axes
    assert cos.get_title() == "cosine similarity (real vs fake)" and l2.get_title() == "L2 distance (real vs fake)"
    assert cos.get_xlabel() == "step" and list(cos.lines[0].get_xdata()) == [0, 10, 20]
    assert list(cos.lines[0].get_ydata()) == [0.5, 0.7, 0.9] and list(l2.lines[0].get_ydata()) == [9.0, 6.5, 4.25]
    fig4 = drawn["fig4_real_vs_fake"]
    rows = [ax.get_ylabel() for ax in fig4.axes if ax.get_ylabel()]
    # The GAN's own data, in the order it is stored: under leakfree the windows of the train clips (it never saw a
    # test clip), else the method's balanced windows.
    gan_data = stream_windows(
        tiny_shards, split="all", shuffle=False, select="train" if protocol == "leakfree" else "kept"
    )
    first = list(islice(gan_data, 3))
    assert all(w["key"].startswith("Train") for w in first) or protocol == "window"
    assert rows == [f"real {w['key']}" for w in first] + ["fake 0", "fake 1", "fake 2"]
    if protocol == "window":
        assert [w["key"] for w in first] == load_window_set(tiny_shards, n=3).keys
    assert fig4.axes[0].get_title() == "t=0" and len(fig4.axes) == 6 * 10
    np.testing.assert_allclose(fig4.axes[0].images[0].get_array(), first[0]["frames"][0] / 255, atol=1e-6)


def test_figure_2_plots_each_run_s_fold_accuracies(runs, tmp_path, monkeypatch):
    drawn = _drawn(monkeypatch)
    report = run_evaluate(EvaluateConfig(runs=tuple(str(r) for r in runs), out=str(tmp_path / "report")))
    (ax,) = drawn["fig2_accuracy_by_fold"].axes
    assert ax.get_title() == "Accuracy per fold" and ax.get_ylabel() == "accuracy"
    plotted = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    for label, entry in report["methods"].items():
        want = [np.nan if f["accuracy"] is None else f["accuracy"] for f in entry["folds"]]
        np.testing.assert_array_equal(plotted[label], want)
    assert list(plotted["chance"]) == [0.5, 0.5]


def test_a_failing_evaluate_leaves_the_existing_report_whole(runs, tmp_path, monkeypatch):
    """A full disk while the new report is written: exit 2 naming the file, the old report untouched, no staging
    folder left behind."""
    import errno
    import os

    import ddp_vad.eval.report as report_module

    lrcn, base = runs
    out = tmp_path / "report"
    run_evaluate(EvaluateConfig(runs=(str(lrcn),), out=str(out)))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(fig, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report_module, "save_figure", disk_full)
    result = CliRunner().invoke(cli, ["evaluate", str(lrcn), str(base), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {tmp_path / '.report.partial'}/") and "No space left" in result.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".report")) == []


def test_runs_from_different_shard_sets_are_refused_naming_both(runs, tmp_path):
    lrcn, _ = runs
    other_shards = tmp_path / "synth-shards"
    _write_label_shards(other_shards)
    manifest = json.loads((other_shards / "manifest.json").read_text())
    (other_shards / "manifest.json").write_text(json.dumps({**manifest, "dataset": "SynthPed"}))
    synth_run = tmp_path / "synth-lrcn"
    _write_run(synth_run, "LRCN", [_fold(0, 1, 0, 1, 0, 1.0, 1.0, 1.0, 1.0)], [], other_shards)
    out = tmp_path / "mixed"
    result = CliRunner().invoke(cli, ["evaluate", str(lrcn), str(synth_run), "--out", str(out)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("error: the runs come from 2 different shard sets") and "\n" not in line
    for needle in (str((tmp_path / "shards").resolve()), str(other_shards.resolve()), "SynthPed", str(synth_run)):
        assert needle in line
    assert not out.exists()
    result = CliRunner().invoke(cli, ["evaluate", str(lrcn), str(synth_run), "--out", str(out), "--allow-mixed-data"])
    assert result.exit_code == 0 and "warning: the runs come from 2 different shard sets" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["mixed_data"] is True and {d["dataset"] for d in report["data"]} == {"s", "SynthPed"}
