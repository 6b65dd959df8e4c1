"""The paired verdict (eval/findings.py, eval/markdown.py) rests on the 95% interval, never on the sign of the point
difference: a +0.050 [-0.020, +0.120] is "no detectable difference" in the verdict text, in the report's table and
in the "better at N, worse at M" counts."""

from __future__ import annotations

import re

from ddp_vad.eval.findings import GAN, RANDOM, SCRATCH, paired_verdict
from ddp_vad.eval.markdown import _comparisons


def _pair(a: str, b: str, fraction: float, diff: float, low: float, high: float) -> dict:
    return {"a": a, "b": b, "fraction": fraction, "a_value": 0.7, "b_value": 0.7 - diff, "diff": diff, "low": low,
            "high": high, "n_clips": 12, "repeats": 2}  # fmt: skip


# point difference and interval: above zero, straddling zero on either side, below zero
ROWS = [
    _pair(GAN, SCRATCH, 0.1, +0.050, -0.020, +0.120),  # positive point, interval holds 0: no difference
    _pair(GAN, SCRATCH, 0.25, +0.080, +0.010, +0.150),  # better
    _pair(GAN, SCRATCH, 0.5, -0.030, -0.090, +0.020),  # negative point, interval holds 0: no difference
    _pair(GAN, SCRATCH, 1.0, -0.040, -0.100, -0.005),  # worse
]
RIVALS = [_pair(GAN, "motion-energy", 1.0, +0.050, -0.020, +0.120), _pair(GAN, "pixels-svm", 1.0, +0.09, +0.02, +0.16)]


def test_the_verdict_text_calls_each_difference_by_its_interval():
    text = paired_verdict(ROWS + RIVALS, "leakfree")
    assert "at 0.1 of the labels +0.050 [-0.020, +0.120] (no detectable difference)" in text
    assert "at 0.25 of the labels +0.080 [+0.010, +0.150] (better)" in text
    assert "at 0.5 of the labels -0.030 [-0.090, +0.020] (no detectable difference)" in text
    assert "with all labels -0.040 [-0.100, -0.005] (worse)" in text
    assert "motion-energy (0.650): +0.050 [-0.020, +0.120] (no detectable difference)" in text
    assert "pixels-svm (0.610): +0.090 [+0.020, +0.160] (better)" in text


def test_the_better_and_worse_counts_follow_the_intervals():
    text = paired_verdict(ROWS + [_pair(GAN, RANDOM, 1.0, +0.050, -0.020, +0.120)], "leakfree")
    assert (
        "vs LRCN from scratch: better at 1, worse at 1, no detectable difference at 2 of 4 labelled fractions" in text
    )
    assert "Random+LRCN): better at 0, worse at 0, no detectable difference at 1 of 1 labelled fractions" in text


def test_the_report_table_calls_each_difference_by_its_interval():
    lines = _comparisons({"comparisons": ROWS + RIVALS})
    verdicts = [re.split(r"\s*\|\s*", line.strip("| "))[-1] for line in lines if line.startswith(f"| {GAN} ")]
    assert verdicts == ["no detectable difference", "A better", "no detectable difference", "A worse",
                        "no detectable difference", "A better"]  # fmt: skip
