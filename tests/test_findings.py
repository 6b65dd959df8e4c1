"""The report's findings: label-efficiency grouping, the computed verdict, budgets, published rows, and the report
sections they feed (through ``evaluate`` on hand-written runs at two labelled fractions)."""

from __future__ import annotations

import json

import pytest

from ddp_vad.eval.findings import (
    budgets,
    curve,
    curve_table,
    published_dataset,
    published_frame_auroc,
    published_rows,
    verdict,
)
from ddp_vad.eval.report import EvaluateConfig, run_evaluate


def _entry(method, fraction, acc, std, protocol="leakfree"):
    mean = {"recall": acc, "precision": acc, "accuracy": acc, "f1": acc}
    extra = {"epochs": 5, "batch_size": 8, "train": "all"}
    return {"method": method, "labelled_fraction": fraction, "protocol": protocol, "run": f"{method}-{fraction}",
            "mean": mean, "std": {k: std for k in mean}, "extra": extra}  # fmt: skip


def test_verdict_compares_gan_and_lrcn_at_each_fraction_against_the_fold_spread():
    entries = [
        _entry("GAN+LRCN", 0.1, 0.80, 0.02), _entry("LRCN", 0.1, 0.70, 0.03),  # +0.10, beyond the spread
        _entry("GAN+LRCN", 1.0, 0.84, 0.05), _entry("LRCN", 1.0, 0.86, 0.04),  # -0.02, within the spread
        _entry("motion-gb", 1.0, 0.90, 0.01), _entry("logreg", 1.0, 0.75, 0.02),
    ]  # fmt: skip
    by_method = curve(entries)
    assert sorted(by_method["GAN+LRCN"]) == [0.1, 1.0]
    text = verdict(by_method, "leakfree")
    assert "helps at 1 of 2 labelled fractions" in text and "exceeds the fold spread at 1 of them" in text
    assert "at 0.1 of the labels GAN+LRCN is 0.100 above LRCN" in text
    assert "with all labels GAN+LRCN is 0.020 below LRCN" in text
    assert "does not beat the best motion baseline (motion-gb, 0.900)" in text
    assert "beats the best classic pixel baseline (logreg, 0.750)" in text
    assert "leaks" not in text
    assert "read these numbers as an upper bound" in verdict(
        curve([_entry("GAN+LRCN", 1.0, 0.8, 0, "window"), _entry("LRCN", 1.0, 0.7, 0, "window")]), "window"
    )
    table = curve_table(by_method)
    assert table[0] == "| Method | 0.1 | 1 |" and "| GAN+LRCN | 0.800 ± 0.020 | 0.840 ± 0.050 |" in table


def test_published_rows_only_beside_window_protocol_runs_on_ped1():
    assert published_rows([_entry("LRCN", 1.0, 0.8, 0.0, "leakfree")], "UCSDped1") == []
    rows = published_rows([_entry("LRCN", 1.0, 0.8, 0.0, "window")], "UCSDped1")
    assert {r["method"]: r["accuracy"] for r in rows} == {"LRCN (published)": 0.846, "GAN+LRCN (published)": 0.855}
    for other in ("UCSDped2", "SynthPed", None):  # the method's Table 5 is a Ped1 table
        assert published_rows([_entry("LRCN", 1.0, 0.8, 0.0, "window")], other) == []


def test_published_frame_aurocs_are_those_of_the_dataset_at_hand():
    ped1 = {"MDT (Mahadevan et al., 2010)": 0.818, "future frame prediction (Liu et al., 2018)": 0.831}
    ped2 = {"future frame prediction (Liu et al., 2018)": 0.954, "MNAD (Park et al., 2020)": 0.970}
    for name in ("UCSDped1", "ucsd-ped1"):  # the UCSD layout's folder name, or a videos folder named after it
        assert published_dataset(name) == "UCSD Ped1" and published_frame_auroc(name) == ped1
    for name in ("UCSDped2", "ucsd-ped2-videos"):
        assert published_dataset(name) == "UCSD Ped2" and published_frame_auroc(name) == ped2
    for name in ("SynthPed", "my-videos", "", None):  # the synthetic data, a user's videos: no figures
        assert published_dataset(name) is None and published_frame_auroc(name) == {}


def _write_run(run, method, fraction, accs, **extra):
    run.mkdir(parents=True)
    folds = [{"fold": k, "recall": a, "precision": a, "accuracy": a, "f1": a, "n_test": 4} for k, a in enumerate(accs)]
    payload = {"method": method, "protocol": "window", "folds": folds, "mean": {}, "std": {},
               "labelled_fraction": fraction, "epochs": 3, "batch_size": 8, "train": "head", **extra}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(payload))


def test_report_has_the_curve_figure_table_verdict_and_budgets(tmp_path):
    runs = []
    for fraction, (gan, lrcn) in {0.25: ([0.9, 0.8], [0.6, 0.7]), 1.0: ([0.9, 0.9], [0.8, 0.9])}.items():
        for method, accs in (("GAN+LRCN", gan), ("LRCN", lrcn)):
            run = tmp_path / f"f{fraction}" / method
            scored = (
                {"calibrate": "normal", "motion_prior": "energy", "prior_share": "nested"} if method == "LRCN" else {}
            )
            _write_run(run, method, fraction, accs, **scored)
            runs.append(str(run))
    report = run_evaluate(EvaluateConfig(runs=tuple(runs), out=str(tmp_path / "report")))
    assert set(report["methods"]) == {"GAN+LRCN", "LRCN"}  # Table 5: the runs with all labels
    assert report["curve"]["GAN+LRCN"]["0.25"]["mean"]["accuracy"] == pytest.approx(0.85)
    assert "helps at 2 of 2 labelled fractions" in report["verdict"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("## Label efficiency") < md.index("## Verdict") < md.index("## Table 5")
    assert "LEAKY" in md and "- GAN+LRCN: 3 epochs, batch 8, trains head (labelled fractions 0.25, 1)" in md
    calibrated = (
        "- LRCN: 3 epochs, batch 8, trains head, each fold's scores calibrated on normal footage with the motion prior "
        "(`--calibrate normal --motion-prior energy`), its share chosen per fold on inner folds of the training clips "
        "(`--prior-share nested`) (labelled fractions 0.25, 1)"
    )
    assert calibrated in md
    assert (tmp_path / "report" / "fig1_label_efficiency.png").read_bytes()[:4] == b"\x89PNG"


def test_budget_lines_name_a_prior_share_other_than_the_plain_sum():
    extra = {"epochs": 4, "batch_size": 32, "train": "all", "calibrate": "normal", "motion_prior": "energy"}
    entry = {"method": "LRCN", "labelled_fraction": 1.0, "extra": extra}
    plain = budgets([entry])[0]
    assert "share" not in plain and plain == budgets([{**entry, "extra": {**entry["extra"], "prior_share": 0.5}}])[0]
    energy_alone = budgets([{**entry, "extra": {**entry["extra"], "prior_share": 1.0}}])[0]
    assert energy_alone.endswith("its share 1 (`--prior-share 1`) (labelled fractions 1)")
