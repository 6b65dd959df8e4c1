"""``ddp_vad evaluate``: the comparison report of cross-validated runs (and pretrain runs).

Outputs in ``REPORT/`` (built in a staging folder and swapped in whole, so a failed evaluate never tears an existing
report):

* ``report.md`` / ``report.json``: the Table 5 comparison (recall, precision, accuracy, F1 as mean +- std over
  folds, population std over the folds where a metric is defined), confusion matrices summed over folds,
  window- and frame-level AUROC of the out-of-fold scores, per-fold numbers and notes on undefined folds;
* ``fig2_accuracy_by_fold.png``, ``confusion_matrices.png``; with a pretrain run ``fig3_similarity.png``
  and ``fig4_real_vs_fake.png``;
* ``tb/``: the same numbers and figures for TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_vad.config import write_resolved_config
from ddp_vad.errors import UserError
from ddp_vad.eval.figures import (
    fake_windows,
    fig_accuracy_by_fold,
    fig_confusion,
    fig_real_vs_fake,
    fig_similarity,
    real_windows,
    save_figure,
)
from ddp_vad.eval.metrics import METRICS
from ddp_vad.eval.runs import discover_runs, display_labels, read_similarity, run_shards, summarise_run
from ddp_vad.files import staging_folder, swap_in, write_json_atomic, write_text_atomic
from ddp_vad.options import option


@dataclass
class EvaluateConfig:
    """Options of ``ddp_vad evaluate``."""

    runs: tuple[str, ...] = option(help="Run folders.", argument=True)
    out: str = option(help="Report folder.")

    def __post_init__(self) -> None:
        if isinstance(self.runs, str):
            self.runs = (self.runs,)
        self.runs = tuple(str(r) for r in self.runs)
        if not self.runs:
            raise UserError("evaluate: give at least one run folder")
        for run in self.runs:
            if not Path(run).is_dir():
                raise UserError(f"run folder not found: {run}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")


# ------------------------------------------------------------------------------------------ report
def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The Table 5 comparison as a markdown table."""
    lines = [
        "| Method | Protocol | Folds | Recall | Precision | Accuracy | F1 | Window AUROC | Frame AUROC |",
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
            f"{_num(e['window_auroc'])} | {_num(e['frame_auroc'])} |"
        )
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    out = ["# ddp_vad evaluation report", ""]
    methods = report["methods"]
    if methods:
        out += [
            "## Table 5: block-level cross-validation (mean ± std over folds)",
            "",
            markdown_table(report),
            "",
            "Std is the population std (ddof=0) over the folds where a metric is defined; (k/n folds) marks",
            "a mean over fewer than all folds (see the notes); n/a = undefined.",
            "Frame AUROC: a frame's score is the max over the out-of-fold scores of the windows covering it.",
            "",
        ]
        noted = [(label, e["notes"]) for label, e in methods.items() if e["notes"]]
        if noted:
            out += ["Notes:", ""]
            out += [f"- {label}: {'; '.join(notes)}" for label, notes in noted]
            out.append("")
        out += [
            "## Confusion matrices (summed over folds)",
            "",
            "| Method | TP | FN | FP | TN |",
            "|---|---|---|---|---|",
        ]
        for label, e in methods.items():
            c = e["confusion"]
            out.append(
                f"| {label} | " + (" | ".join(str(c[k]) for k in ("tp", "fn", "fp", "tn")) if c else "n/a") + " |"
            )
        out.append("")
        n_max = max(e["n_folds"] for e in methods.values())
        out += ["## Accuracy per fold", "", "| Fold | " + " | ".join(methods) + " |"]
        out.append("|---" * (len(methods) + 1) + "|")
        for k in range(n_max):
            cells = []
            for e in methods.values():
                row = next((f for f in e["folds"] if int(f["fold"]) == k), None)
                cells.append(_num(row.get("accuracy")) if row else "")
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        out.append("")
    if report["pretrain"]:
        out += [
            "## Pretrain runs",
            "",
            "| Run | Steps logged | Last step | Cosine | L2 |",
            "|---|---|---|---|---|",
        ]
        for p in report["pretrain"]:
            last = p["similarity_last"]
            if last:
                step, cos, l2 = int(last["step"]), last["cosine"], last["l2"]
                out.append(f"| {p['run']} | {p['points']} | {step} | {cos:.4f} | {l2:.4f} |")
            else:
                out.append(f"| {p['run']} | 0 | n/a | n/a | n/a |")
        out += [f"- {n}" for p in report["pretrain"] for n in p["notes"]]
        out.append("")
    if report["figures"]:
        out += ["## Figures", ""]
        out += [f"![{name}]({name})" for name in report["figures"]]
        out.append("")
    return "\n".join(out)


def _log_tensorboard(tb_dir: Path, report: dict[str, Any], figures: dict[str, Any], markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for label, e in report["methods"].items():
            for k in METRICS:
                if e["mean"][k] is not None:
                    writer.add_scalar(f"{k}_mean/{label}", e["mean"][k], 0)
                    writer.add_scalar(f"{k}_std/{label}", e["std"][k], 0)
            for f in e["folds"]:
                if f.get("accuracy") is not None:
                    writer.add_scalar(f"accuracy_by_fold/{label}", f["accuracy"], int(f["fold"]))
            for name in ("window_auroc", "frame_auroc"):
                if e[name] is not None:
                    writer.add_scalar(f"{name}/{label}", e[name], 0)
        for name, fig in figures.items():
            writer.add_figure(name, fig, 0, close=False)
        writer.add_text("report", markdown, 0)
    finally:
        writer.close()


def _pretrain_part(pretrain_runs: list[Path], figures: dict[str, Any]) -> list[dict]:
    """Similarity summary per pretrain run, plus figures 3 and 4 into ``figures``."""
    infos, curves = [], []
    for run in pretrain_runs:
        cols = read_similarity(run)
        last = {k: v[-1] for k, v in cols.items()} if cols["step"] else None
        infos.append({"run": str(run), "points": len(cols["step"]), "similarity_last": last, "notes": []})
        curves.append((run.name, cols))
    if curves:
        figures["fig3_similarity"] = fig_similarity(curves)
    for i, (run, info) in enumerate(zip(pretrain_runs, infos, strict=True)):
        shards = run_shards(run)
        real = real_windows(shards, 3) if shards else []
        if shards is None:
            info["notes"].append(f"{run}: shards not found, figure 4 shows generated windows only")
        name = "fig4_real_vs_fake" if i == 0 else f"fig4_real_vs_fake_{run.name}"
        figures[name] = fig_real_vs_fake(real, fake_windows(run, 3))
    return infos


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Write the report for ``cfg.runs`` into ``cfg.out``; returns the report.json payload."""
    cv_runs, pretrain_runs = discover_runs(cfg.runs)
    out = Path(cfg.out)
    cache: dict[str, Any] = {}
    entries = [summarise_run(run, cache) for run in cv_runs]
    labels = display_labels(entries)
    report: dict[str, Any] = {
        "methods": dict(zip(labels, entries, strict=True)),
        "pretrain": [],
        "figures": [],
        "std_kind": "population (ddof=0) over the folds where the metric is defined",
    }
    figures: dict[str, Any] = {}
    if entries:
        figures["fig2_accuracy_by_fold"] = fig_accuracy_by_fold(entries, labels)
        figures["confusion_matrices"] = fig_confusion(entries, labels)
    report["pretrain"] = _pretrain_part(pretrain_runs, figures)

    # Everything goes into a staging folder that replaces OUT only once it is whole.
    stage = staging_folder(out)
    write_resolved_config(stage, cfg, extra={"cv_runs": cv_runs, "pretrain_runs": pretrain_runs})
    for name, fig in figures.items():
        save_figure(fig, stage / f"{name}.png")
        report["figures"].append(f"{name}.png")
    markdown = _markdown(report)
    write_text_atomic(stage / "report.md", markdown)
    write_json_atomic(stage / "report.json", report)
    _log_tensorboard(stage / "tb", report, figures, markdown)
    swap_in(stage, out)
    if entries:
        print(markdown_table(report))
    print(f"evaluate: report written to {out / 'report.md'}")
    return report
