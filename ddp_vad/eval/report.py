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

import shutil
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

from ddp_vad.config import write_resolved_config
from ddp_vad.errors import UserError
from ddp_vad.eval.figures import (
    fake_windows,
    fig_accuracy_by_fold,
    fig_confusion,
    fig_label_efficiency,
    fig_real_vs_fake,
    fig_similarity,
    fig_timelines,
    real_windows,
    save_figure,
)
from ddp_vad.eval.findings import (
    LEARNED,
    budgets,
    curve,
    paired_comparisons,
    paired_verdict,
    published_dataset,
    published_frame_auroc,
    published_rows,
    verdict,
)
from ddp_vad.eval.frame_scores import clip_timeline, timeline_clips
from ddp_vad.eval.markdown import markdown_table, report_markdown
from ddp_vad.eval.runs import (
    discover_runs,
    display_labels,
    pretrain_health,
    read_similarity,
    run_shards,
    summarise_run,
)
from ddp_vad.files import read_json_object, staging_folder, swap_in, write_json_atomic, write_text_atomic
from ddp_vad.options import option
from ddp_vad.runfiles import config_file
from ddp_vad.train.metrics import METRICS
from ddp_vad.warn import warn


@dataclass
class EvaluateConfig:
    """Options of ``ddp_vad evaluate``."""

    runs: tuple[str, ...] = option(help="Run folders.", argument=True)
    out: str = option(help="Report folder.")
    allow_mixed_data: bool = option(
        False, "Compare runs made from different shard sets (refused by default: their folds are not comparable)."
    )
    check_paths: InitVar[bool] = True  # False: values only, the runs are made later (the pipeline's up-front check)

    def __post_init__(self, check_paths: bool) -> None:
        if isinstance(self.runs, str):
            self.runs = (self.runs,)
        self.runs = tuple(str(r) for r in self.runs)
        if not self.runs:
            raise UserError("evaluate: give at least one run folder")
        for run in self.runs if check_paths else ():
            if not Path(run).is_dir():
                raise UserError(f"run folder not found: {run}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")


def prior_free(protocols: list[str]) -> bool:
    """Whether the report leads with AUROC and balanced accuracy (clip-grouped folds, whose anomaly rates differ)
    rather than the method's accuracy (the window protocol, which reproduces its Table 5)."""
    return bool(protocols) and all(p != "window" for p in protocols)


def _timelines(entries: list[dict], labels: list[str], frames_of: dict[str, Any]) -> dict[str, dict]:
    """Per-clip score series for figure 5: the learned methods and the best motion baseline, repeat 0."""
    shown = [(e, lab) for e, lab in zip(entries, labels, strict=True) if e["run"] in frames_of]
    motion = [(e, lab) for e, lab in shown if e["method"].startswith("motion-") and e["mean"].get("frame_auroc")]
    keep = [(e, lab) for e, lab in shown if e["method"] in LEARNED]
    if motion:
        keep.append(max(motion, key=lambda p: p[0]["mean"]["frame_auroc"]))
    if not keep:
        return {}
    clips: dict[str, dict] = {}
    for clip in timeline_clips(frames_of[keep[0][0]["run"]]):
        for e, lab in keep:
            series = clip_timeline(frames_of[e["run"]], clip)
            if series is None:
                continue
            frames, scores, truth = series
            data = clips.setdefault(clip, {"frames": frames, "labels": truth, "scores": {}})
            if len(frames) == len(data["frames"]):
                data["scores"][lab] = scores
    return clips


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
            for name in ("window_auroc", "frame_auroc", "balanced_accuracy", "clip_auroc"):
                if e["mean"].get(name) is not None:
                    writer.add_scalar(f"{name}/{label}", e["mean"][name], 0)
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
        infos.append({"run": str(run), "points": len(cols["step"]), "similarity_last": last, "notes": [],
                      **pretrain_health(run)})  # fmt: skip
        curves.append((run.name, cols))
    if curves:
        figures["fig3_similarity"] = fig_similarity(curves)
    for i, (run, info) in enumerate(zip(pretrain_runs, infos, strict=True)):
        shards = run_shards(run)
        real = real_windows(shards, 3, _gan_selection(run, shards)) if shards else []
        if shards is None:
            info["notes"].append(f"{run}: shards not found, figure 4 shows generated windows only")
        name = "fig4_real_vs_fake" if i == 0 else f"fig4_real_vs_fake_{run.name}"
        figures[name] = fig_real_vs_fake(real, fake_windows(run, 3))
    return infos


def _gan_selection(run: Path, shards: Path) -> str:
    """The windows the GAN of ``run`` streamed (figure 4 shows those: under the leak-free protocol the train clips',
    never a test clip it did not see); runs that predate the protocol option streamed the balanced set."""
    from ddp_vad.data.shards import load_manifest
    from ddp_vad.train.pretrain import gan_windows

    protocol = read_json_object(config_file(run), "pretrain run config").get("config", {}).get("protocol", "window")
    return gan_windows(str(protocol), load_manifest(shards), str(shards))


def _data_sets(entries: list[dict]) -> list[dict]:
    """The shard sets the runs were made from (as their config.json recorded them), one entry per set."""
    seen: dict[str, dict] = {}
    for e in entries:
        data = e.get("data")
        key = data and (data.get("identity") or data.get("path"))
        if key and key not in seen:
            seen[key] = {**data, "runs": []}
        if key:
            seen[key]["runs"].append(e["run"])
    return list(seen.values())


def check_one_data_set(sets: list[dict], allow: bool) -> None:
    """Refuse (or, with ``allow``, warn about) runs made from different shard sets: fold 0 of one dataset next to
    fold 0 of another compares nothing."""
    if len(sets) < 2:
        return
    named = "; ".join(f"{d.get('dataset')} at {d.get('path')} (runs: {', '.join(d['runs'])})" for d in sets)
    if not allow:
        raise UserError(
            f"the runs come from {len(sets)} different shard sets: {named}; evaluate each set on its own, or pass "
            "--allow-mixed-data to compare them anyway"
        )
    warn(f"the runs come from {len(sets)} different shard sets: {named}")


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Write the report for ``cfg.runs`` into ``cfg.out``; returns the report.json payload."""
    cv_runs, pretrain_runs = discover_runs(cfg.runs)
    out = Path(cfg.out)
    cache: dict[str, Any] = {}
    frames_of: dict[str, Any] = {}
    every = [summarise_run(run, cache, frames_of) for run in cv_runs]
    data_sets = _data_sets(every)
    check_one_data_set(data_sets, cfg.allow_mixed_data)
    # Table 5 and the per-fold figures show the runs with all labels; the curve shows every fraction.
    entries = [e for e in every if e["labelled_fraction"] == 1.0] or every
    labels = display_labels(entries)
    by_method = curve(every)
    protocols = sorted({e["protocol"] for e in every})
    ranked = prior_free(protocols)
    comparisons = paired_comparisons(by_method, frames_of) if ranked and len(protocols) == 1 else []
    # Published figures are those of the dataset at hand (none for mixed data, synthetic data or a user's videos).
    dataset = data_sets[0].get("dataset") if len(data_sets) == 1 else None
    report: dict[str, Any] = {
        "methods": dict(zip(labels, entries, strict=True)),
        "curve": {
            m: {f"{f:g}": {k: e[k] for k in ("mean", "std", "run", "notes")} for f, e in runs.items()}
            for m, runs in by_method.items()
        },  # fmt: skip
        "verdict": (paired_verdict(comparisons, protocols[0]) if ranked else verdict(by_method, protocols[0]))
        if len(protocols) == 1
        else None,
        "comparisons": comparisons,
        "headline": "frame_auroc" if ranked else "accuracy",
        "published_dataset": published_dataset(dataset),
        "published_frame_auroc": published_frame_auroc(dataset) if ranked else {},
        "protocols": protocols,
        "budgets": budgets(every),
        "published": published_rows(entries, dataset),
        "data": data_sets,
        "mixed_data": len(data_sets) > 1,
        "pretrain": [],
        "figures": [],
        "std_kind": "population (ddof=0) over the folds where the metric is defined",
    }
    figures: dict[str, Any] = {}
    if any(len(runs) > 1 for runs in by_method.values()):
        figures["fig1_label_efficiency"] = fig_label_efficiency(by_method, report["headline"])
    if entries:
        fold_metric = "window_auroc" if ranked else "accuracy"
        figures["fig2_accuracy_by_fold"] = fig_accuracy_by_fold(entries, labels, fold_metric)
        figures["confusion_matrices"] = fig_confusion(entries, labels)
        timelines = _timelines(entries, labels, frames_of) if ranked else {}
        if timelines:
            figures["fig5_timelines"] = fig_timelines(timelines)
    report["pretrain"] = _pretrain_part(pretrain_runs, figures)

    # Everything goes into a staging folder that replaces OUT only once it is whole; a failure removes it.
    stage = staging_folder(out)
    try:
        write_resolved_config(stage, cfg, extra={"cv_runs": cv_runs, "pretrain_runs": pretrain_runs})
        for name, fig in figures.items():
            save_figure(fig, stage / f"{name}.png")
            report["figures"].append(f"{name}.png")
        markdown = report_markdown(report)
        write_text_atomic(stage / "report.md", markdown)
        write_json_atomic(stage / "report.json", report)
        _log_tensorboard(stage / "tb", report, figures, markdown)
        swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone after swap_in; left by a failure (a full disk) otherwise
    if entries:
        print(markdown_table(report))
    print(f"evaluate: report written to {out / 'report.md'}")
    return report
