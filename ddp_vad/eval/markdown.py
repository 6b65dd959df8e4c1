"""The report as markdown, laid out like a paper's results section: setup (data, protocol and its guarantee,
budgets), the label-efficiency curve and a verdict computed from it, the Table 5 comparison beside the method's
published numbers, GAN health, then the details (notes, confusion matrices, per-fold accuracy, figures)."""

from __future__ import annotations

from typing import Any

from ddp_vad.eval.findings import PROTOCOL_GUARANTEES, curve_table, pooled_only
from ddp_vad.train.metrics import METRICS

FRAME_AUROC_SCOPE = (
    "Frame AUROC: a frame's score is the max over the out-of-fold scores of the windows covering it, scored by the "
    "model of the fold that held its clip out; every frame covered by a window of the protocol's labelled set counts "
    "(under leakfree: every frame of the labelled clips), pooled over frames and averaged over repeats."
)
HEADLINE_NOTE = (
    "Frame AUROC (pooled) is over every frame of the labelled clips, each scored out of fold by the model of the "
    "fold that held its clip out (the field's micro AUROC), the mean over repeats; ± is the std of the per-fold frame "
    "AUROCs. Per clip: the mean AUROC over the clips that hold both classes. Window AUROC and balanced accuracy: mean "
    "± std over every fold of every repeat (each fold's AUROC of its test windows' scores). These are supervised, "
    "cross-validated numbers: the models saw labelled anomalies of the other folds' clips."
)
PUBLISHED_NOTE = (
    "Published results on {dataset} are unsupervised (trained on normal clips only, scored on the full official "
    "test set) and are shown for orientation only: {figures}."
)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The Table 5 comparison (all labels) as a markdown table, with the method's published rows beside it."""
    lines = [
        "| Method | Protocol | Folds | Recall | Precision | Accuracy | F1 | Window AUROC | Frame AUROC (pooled) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, e in report["methods"].items():
        cells = []
        for k in METRICS:
            cell = _pm(e["mean"][k], e["std"][k])
            if e["mean"][k] is not None and e["n_defined"][k] < e["n_folds"]:
                cell += f" ({e['n_defined'][k]}/{e['n_folds']} folds)"
            cells.append(cell)
        lines.append(
            f"| {label} | {e['protocol']} | {e['n_folds']} | {' | '.join(cells)} | "
            f"{_pm(e['mean'].get('window_auroc'), e['std'].get('window_auroc'))} | {_num(e['frame_auroc'])} |"
        )
    for row in report.get("published", []):
        cells = " | ".join(f"{row[k]:.3f}" for k in METRICS)
        lines.append(f"| {row['method']} | window (Ped1, 10 folds) | 10 | {cells} | | |")
    return "\n".join(lines)


def _setup(report: dict[str, Any]) -> list[str]:
    out = ["## Setup", ""]
    for data in report.get("data", []):
        raw = data.get("counts") or {}
        c = {k: f"{v:,}" if isinstance(v, int) else v for k, v in raw.items()}  # 2,292 as the headline writes it
        line = (f"- Data: `{data.get('path')}` ({data.get('dataset')}): {c.get('clips', '?')} clips "
                f"({c.get('train_clips', '?')} train, {c.get('test_clips', '?')} test), {c.get('windows', '?')} "
                f"windows; the method's balanced set {c.get('kept', '?')} windows")  # fmt: skip
        if "leakfree_kept" in c:
            line += (f"; leak-free labelled set: every one of the {c['leakfree_kept']} windows of the test clips "
                     f"({c.get('leakfree_anomalous', '?')} anomalous), the GAN's "
                     f"{c.get('train_windows', '?')} windows of the train clips")  # fmt: skip
        out.append(line + ".")
    for protocol in report.get("protocols", []):
        out.append(f"- Protocol `{protocol}`: {PROTOCOL_GUARANTEES.get(protocol, 'unknown protocol')}")
    first = next(iter(report["methods"].values()), None)
    if first and first.get("fold_rates"):
        rates = "; ".join(", ".join(f"{x:.2f}" for x in row) for row in first["fold_rates"])
        out.append(f"- Anomalous share of each fold's test windows ({len(first['fold_rates'])} repeat(s), "
                   f"separated by ';'): {rates}.")  # fmt: skip
    if report.get("budgets"):
        out += [
            "- Budgets (the same for GAN+LRCN and LRCN unless set otherwise):",
            *[f"  {b}" for b in report["budgets"]],
        ]
    return [*out, ""]


def headline_table(report: dict[str, Any]) -> list[str]:
    """The prior-free headline (all labels): frame AUROC pooled and per clip, window AUROC, balanced accuracy."""
    lines = ["| Method | Frame AUROC (pooled) | Frame AUROC (per clip) | Window AUROC | Balanced accuracy | Folds |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    order = sorted(report["methods"].items(), key=lambda kv: -(kv[1]["mean"].get("frame_auroc") or -1.0))
    for label, e in order:
        m, s = e["mean"], e["std"]
        folds = f"{e.get('repeats', 1)} x {e.get('folds_per_repeat', e['n_folds'])}"
        lines.append(f"| {label} | {_pm(m.get('frame_auroc'), s.get('frame_auroc'))} | {_num(m.get('clip_auroc'))} | "
                     f"{_pm(m.get('window_auroc'), s.get('window_auroc'))} | "
                     f"{_pm(m.get('balanced_accuracy'), s.get('balanced_accuracy'))} | {folds} |")  # fmt: skip
    return lines


def coverage(report: dict[str, Any]) -> str:
    """How many frames of the labelled clips the frame AUROCs count, e.g. "2,400 of the 2,400 frames (...)"."""
    counts = {}
    for label, e in report["methods"].items():
        f = e.get("frames") or {}
        if "n_frames_labelled" in f:
            counts[label] = (f["n_frames"], f["n_frames_labelled"], f["n_clips_labelled"], f["n_anomalous_frames"])
    if not counts:
        return ""
    if len(set(counts.values())) == 1:
        n, total, clips, anomalous = next(iter(counts.values()))
        share = f"every one of the {total:,}" if n == total else f"{n:,} of the {total:,}"
        return (f"Frame AUROC counts {share} frames of the {clips} labelled clips ({anomalous:,} anomalous), for "
                "every method.")  # fmt: skip
    parts = [f"{label} {n:,} of {total:,}" for label, (n, total, _, _) in counts.items()]
    return "Frames of the labelled clips that frame AUROC counts: " + "; ".join(parts) + "."


def _published_note(report: dict[str, Any]) -> str:
    figures = report.get("published_frame_auroc") or {}
    if not figures:
        return "No published figures are shown: none exist for this data."
    text = "; ".join(f"{k} {v:.3f}" for k, v in figures.items())
    return PUBLISHED_NOTE.format(dataset=report.get("published_dataset"), figures=text)


def _headline(report: dict[str, Any]) -> list[str]:
    if report.get("headline") != "frame_auroc":
        return []
    return ["## Headline: every frame of the labelled clips, all labels", "", *headline_table(report), "",
            " ".join(t for t in (coverage(report), HEADLINE_NOTE, _published_note(report)) if t), ""]  # fmt: skip


def _comparisons(report: dict[str, Any]) -> list[str]:
    rows = report.get("comparisons") or []
    if not rows:
        return []
    out = ["## Paired comparisons (frame AUROC)", "",
           "| A | B | Labelled fraction | A | B | A - B [95% interval over clips] | Per-fold A - B | Verdict |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in rows:
        verdict = "A better" if c["low"] > 0 else "A worse" if c["high"] < 0 else "no detectable difference"
        if c.get("borderline"):  # another set of resamples could move an interval end across zero
            verdict = "borderline (an interval end within bootstrap noise of zero)"
        if pooled_only(c):
            verdict += " (pooled only: not fold by fold)"
        m, sd = c.get("per_fold_mean"), c.get("per_fold_std")
        per_fold = "n/a" if m is None else f"{m:+.3f} ± {sd:.3f}"  # a difference: signed, as the interval
        out.append(f"| {c['a']} | {c['b']} | {c['fraction']:g} | {_num(c.get('a_value'))} | {_num(c.get('b_value'))} "
                   f"| {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | {per_fold} | {verdict} |")  # fmt: skip
    return [*out, ""]


def _curve(report: dict[str, Any]) -> list[str]:
    # report.json keys fractions as text ("0.25"); the table sorts them as numbers.
    by_method = {m: {float(f): e for f, e in runs.items()} for m, runs in (report.get("curve") or {}).items()}
    if not any(len(runs) > 1 for runs in by_method.values()):
        return []
    if report.get("headline") == "frame_auroc":
        return [
            "## Label efficiency",
            "",
            "Each fold trains on a stratified, seeded share of its labelled windows (the smaller shares are subsets",
            "of the larger ones) and is tested on its whole test fold. Frame AUROC, pooled (± std over the folds):",
            "",
            *curve_table(by_method, "frame_auroc"),
            "",
            "Window AUROC, mean ± std over folds:",
            "",
            *curve_table(by_method, "window_auroc"),
            "",
            "Balanced accuracy, mean ± std over folds:",
            "",
            *curve_table(by_method, "balanced_accuracy"),
            "",
            "![label efficiency](fig1_label_efficiency.png)",
            "",
            *_curve_notes(by_method),
        ]
    return [
        "## Label efficiency",
        "",
        "Each fold trains on a stratified, seeded share of its labelled windows (the smaller shares are subsets of",
        "the larger ones) and is tested on its whole test fold. Accuracy, mean ± std over folds:",
        "",
        *curve_table(by_method, "accuracy"),
        "",
        "F1, mean ± std over folds:",
        "",
        *curve_table(by_method, "f1"),
        "",
        "![label efficiency](fig1_label_efficiency.png)",
        "",
        *_curve_notes(by_method),
    ]


def _curve_notes(by_method: dict[str, dict[float, Any]]) -> list[str]:
    """Notes of the smaller shares' runs (what a tiny training set could not do as configured); the runs with all
    labels have theirs under the main table."""
    noted = [
        f"- {method} at {f:g}: {'; '.join(e['notes'])}"
        for method, runs in sorted(by_method.items())
        for f, e in sorted(runs.items())
        if f < 1 and e.get("notes")
    ]
    return ["Notes on the smaller shares:", "", *noted, ""] if noted else []


def _gan_health(report: dict[str, Any]) -> list[str]:
    rows = [p for p in report["pretrain"] if p.get("health")]
    if not rows:
        return []
    out = ["## GAN health", "", "| Run | Pretraining | Stabilisers | Last D(real) | Last D(fake) "
           "| Steps D won outright | Warnings |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in rows:
        h = p["health"]
        last = h.get("last") or {}
        warn = "; ".join(h.get("warnings") or []) or "none"
        variant = p.get("pretraining", "the method's plain GAN")
        out.append(f"| {p['run']} | {variant} | {p.get('stabilisers', 'none')} | {_num(last.get('d_real'))} "
                   f"| {_num(last.get('d_fake'))} | {h.get('win_steps', 0)} | {warn} |")  # fmt: skip
    return [*out, ""]


def _details(report: dict[str, Any]) -> list[str]:
    methods = report["methods"]
    out: list[str] = []
    noted = [(label, e["notes"]) for label, e in methods.items() if e["notes"]]
    if noted:
        out += ["Notes:", "", *[f"- {label}: {'; '.join(notes)}" for label, notes in noted], ""]
    out += ["## Confusion matrices (summed over folds)", "", "| Method | TP | FN | FP | TN |", "|---|---|---|---|---|"]
    for label, e in methods.items():
        c = e["confusion"]
        out.append(f"| {label} | " + (" | ".join(str(c[k]) for k in ("tp", "fn", "fp", "tn")) if c else "n/a") + " |")
    n_max = max(e["n_folds"] for e in methods.values())
    out += ["", "## Accuracy per fold", "", "| Fold | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for k in range(n_max):
        cells = []
        for e in methods.values():
            row = next((f for f in e["folds"] if int(f["fold"]) == k), None)
            cells.append(_num(row.get("accuracy")) if row else "")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _pretrain(report: dict[str, Any]) -> list[str]:
    out = ["## Pretrain runs", "", "| Run | Steps logged | Last step | Cosine | L2 |", "|---|---|---|---|---|"]
    for p in report["pretrain"]:
        last = p["similarity_last"]
        if last:
            step, cos, l2 = int(last["step"]), last["cosine"], last["l2"]
            out.append(f"| {p['run']} | {p['points']} | {step} | {cos:.4f} | {l2:.4f} |")
        else:
            out.append(f"| {p['run']} | 0 | n/a | n/a | n/a |")
    return [*out, *[f"- {n}" for p in report["pretrain"] for n in p["notes"]], ""]


def report_markdown(report: dict[str, Any]) -> str:
    """The whole report.md."""
    out = ["# ddp_vad evaluation report", ""]
    methods = report["methods"]
    if methods:
        out += _setup(report) + _headline(report) + _curve(report)
        if report.get("verdict"):
            out += ["## Verdict", "", report["verdict"], ""]
        out += _comparisons(report)
        out += [
            "## Table 5: block-level cross-validation with all labels (mean ± std over folds)",
            "",
            markdown_table(report),
            "",
            "Std is the population std (ddof=0) over the folds where a metric is defined; (k/n folds) marks",
            "a mean over fewer than all folds (see the notes); n/a = undefined. Window AUROC: each fold's AUROC of",
            "its test windows' scores, mean ± std over folds (as in the headline).",
            *(
                [
                    "(published) rows are the method's own numbers on full UCSD Ped1 under the window protocol, for "
                    "reference only."
                ]
                if report.get("published")
                else []
            ),  # fmt: skip
            FRAME_AUROC_SCOPE,
            *([coverage(report)] if report.get("headline") != "frame_auroc" else []),  # else said in the headline
            "",
        ]
        out += _details(report)
    out += _gan_health(report)
    if report["pretrain"]:
        out += _pretrain(report)
    if report["figures"]:
        out += ["## Figures", "", *[f"![{name}]({name})" for name in report["figures"]], ""]
    return "\n".join(out)
