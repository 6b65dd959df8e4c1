"""``ddp_vad evaluate``: the comparison report of cross-validated runs (and pretrain runs).

Inputs are run folders: a cross-validated run holds ``metrics.json`` + ``oof_scores.csv`` (``transfer``,
``baselines/<method>``); a pretrain run holds ``similarity.csv`` + ``generator.safetensors``; a folder
holding such runs (``baselines/``, a pipeline folder) is expanded. Outputs in ``REPORT/``:

* ``report.md`` / ``report.json``: the Table 5 comparison (recall, precision, accuracy, F1 as mean +- std over
  folds, population std over the folds where a metric is defined), confusion matrices summed over folds,
  window- and frame-level AUROC of the out-of-fold scores, per-fold numbers and notes on undefined folds;
* ``fig2_accuracy_by_fold.png``, ``confusion_matrices.png``; with a pretrain run ``fig3_similarity.png``
  and ``fig4_real_vs_fake.png``;
* ``tb/``: the same numbers and figures for TensorBoard.

Frame-level AUROC needs each window's frame labels: they are read from the shards recorded in the run's
``config.json`` (``{"config": {"shards": ...}}``), json members only. When the shards are gone, the AUROC is
skipped with a note (everything else still works from the run folder alone).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.config import write_resolved_config
from ddp_vad.errors import UserError
from ddp_vad.eval.metrics import (
    METRICS,
    frame_level_auroc,
    read_cv_results,
    read_oof_scores,
    read_shard_frame_labels,
    summarise_folds,
    window_level_auroc,
)
from ddp_vad.files import atomic_path, write_json_atomic, write_text_atomic

_MAX_DEPTH = 2  # pipeline/ -> baselines/ -> <method>/


@dataclass
class EvaluateConfig:
    """Options of ``ddp_vad evaluate`` (field names = CLI option names)."""

    runs: tuple[str, ...]
    out: str

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


# -------------------------------------------------------------------------------------------- inputs
def is_cv_run(path: Path) -> bool:
    """A cross-validated run (transfer or one baseline method)."""
    return (path / "metrics.json").is_file()


def is_pretrain_run(path: Path) -> bool:
    """A GAN pretrain run with its exported generator and similarity curve."""
    return (path / "similarity.csv").is_file() and (path / "generator.safetensors").is_file()


def _expand(path: Path, depth: int) -> tuple[list[Path], list[Path]]:
    if is_cv_run(path):
        return [path], []
    if is_pretrain_run(path):
        return [], [path]
    cv, pre = [], []
    if depth < _MAX_DEPTH:
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            c, p = _expand(sub, depth + 1)
            cv += c
            pre += p
    return cv, pre


def discover_runs(paths: tuple[str, ...] | list[str]) -> tuple[list[Path], list[Path]]:
    """Split the given folders into (cross-validated runs, pretrain runs); parent folders are expanded."""
    cv_runs: list[Path] = []
    pretrain_runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise UserError(f"run folder not found: {raw}")
        cv, pre = _expand(path, 0)
        if not cv and not pre:
            raise UserError(
                f"{raw}: not a run folder (no metrics.json; not a pretrain run with similarity.csv and "
                "generator.safetensors; no such runs inside)"
            )
        cv_runs += [p for p in cv if p not in cv_runs]
        pretrain_runs += [p for p in pre if p not in pretrain_runs]
    return cv_runs, pretrain_runs


def run_shards(run_dir: Path) -> Path | None:
    """The shard folder recorded in ``RUN/config.json`` (``config.shards``), if it still exists."""
    cfg_path = run_dir / "config.json"
    try:
        shards = json.loads(cfg_path.read_text())["config"]["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    if not shards:
        return None
    for candidate in (Path(shards), run_dir / shards):  # as given (cwd-relative), then run-relative
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


# ------------------------------------------------------------------------------------------ numbers
def _confusion(folds: list[dict], oof: list[dict] | None) -> tuple[dict[str, int] | None, str | None]:
    if folds and all(all(k in f for k in ("tp", "fp", "tn", "fn")) for f in folds):
        return {k: int(sum(int(f[k]) for f in folds)) for k in ("tp", "fp", "tn", "fn")}, "folds"
    if oof:  # older/foreign runs: rebuild from the scores at the argmax threshold
        y = np.array([r["label"] for r in oof])
        p = np.array([r["score"] > 0.5 for r in oof], dtype=np.int64)
        return {
            "tp": int(np.sum((y == 1) & (p == 1))),
            "fp": int(np.sum((y == 0) & (p == 1))),
            "tn": int(np.sum((y == 0) & (p == 0))),
            "fn": int(np.sum((y == 1) & (p == 0))),
        }, "oof scores > 0.5"
    return None, None


def _undefined_notes(folds: list[dict]) -> list[str]:
    notes = []
    n = len(folds)
    for name in METRICS:
        missing = [int(f["fold"]) for f in folds if f.get(name) is None]
        if missing:
            notes.append(
                f"{name} defined in {n - len(missing)} of {n} folds (undefined in fold(s) "
                f"{', '.join(map(str, missing))})"
            )
    reasons = sorted({part for f in folds if f.get("note") for part in str(f["note"]).split("; ")})
    if reasons:
        notes.append("why: " + "; ".join(reasons))
    return notes


def summarise_run(run_dir: Path, frame_label_cache: dict[str, Any]) -> dict[str, Any]:
    """Everything the report says about one cross-validated run."""
    data = read_cv_results(run_dir)
    folds = sorted(data["folds"], key=lambda f: int(f["fold"]))
    # Recomputed from the folds so every method in the table uses the same (population) std.
    mean, std = summarise_folds(folds)
    notes = _undefined_notes(folds)
    oof = None
    if (run_dir / "oof_scores.csv").is_file():
        oof = read_oof_scores(run_dir)
    else:
        notes.append("no oof_scores.csv: AUROC skipped")
    run_notes = data.get("notes")
    if isinstance(run_notes, list):  # notes the writer recorded (e.g. transfer's)
        notes += [str(n) for n in run_notes if n]
    confusion, confusion_source = _confusion(folds, oof)
    window_auc = window_level_auroc(oof) if oof else None
    frame_auc = None
    if oof:
        shards = run_shards(run_dir)
        if shards is None:
            notes.append("shards recorded in config.json not found: frame-level AUROC skipped")
        else:
            cache_key = str(shards.resolve())
            if cache_key not in frame_label_cache:
                frame_label_cache[cache_key] = read_shard_frame_labels(shards)
            try:
                frame_auc = frame_level_auroc(oof, frame_label_cache[cache_key])
                if frame_auc is None:
                    notes.append("frame-level AUROC undefined: scored frames hold one class only")
            except ValueError as exc:
                notes.append(f"frame-level AUROC skipped: {exc}")
        if window_auc is None:
            notes.append("window-level AUROC undefined: one class only")
    return {
        "run": str(run_dir),
        "method": str(data["method"]),
        "protocol": str(data["protocol"]),
        "n_folds": len(folds),
        "mean": mean,
        "std": std,
        "n_defined": {k: sum(f.get(k) is not None for f in folds) for k in METRICS},
        "folds": folds,
        "confusion": confusion,
        "confusion_source": confusion_source,
        "window_auroc": window_auc,
        "frame_auroc": frame_auc,
        "notes": notes,
        # A few writer extras worth carrying into the report (absent keys are left out).
        "extra": {k: data[k] for k in ("source", "train", "holdout", "seconds", "features") if k in data},
    }


def _labels(entries: list[dict]) -> list[str]:
    """Display names: the method, disambiguated (by protocol, then run folder, then path) when names clash."""
    suffixes = (
        lambda e: e["protocol"],
        lambda e: Path(e["run"]).name,
        lambda e: f"{Path(e['run']).parent.name}/{Path(e['run']).name}",
        lambda e: e["run"],
    )
    labels = []
    for e in entries:
        group = [o for o in entries if o["method"] == e["method"]]
        label = e["method"]
        if len(group) > 1:
            for suffix in suffixes:
                if len({suffix(o) for o in group}) == len(group):
                    label = f"{e['method']} ({suffix(e)})"
                    break
            else:
                label = f"{e['method']} ({e['run']} #{group.index(e)})"
        labels.append(label)
    return labels


def read_similarity(run_dir: Path) -> dict[str, list[float]]:
    """``similarity.csv`` (step, cosine, l2) as columns."""
    path = run_dir / "similarity.csv"
    cols: dict[str, list[float]] = {"step": [], "cosine": [], "l2": []}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = {f.strip().lower(): f for f in (reader.fieldnames or [])}
        missing = [k for k in cols if k not in fields]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (expected step,cosine,l2)")
        for row in reader:
            try:
                for k in cols:
                    cols[k].append(float(row[fields[k]]))
            except (TypeError, ValueError):
                raise UserError(f"{path}: bad row {row}") from None
    return cols


# ------------------------------------------------------------------------------------------ figures
def _new_figure(width: float, height: float):
    # A bare Agg Figure: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def fig_accuracy_by_fold(entries: list[dict], labels: list[str]):
    """Figure 2: accuracy per fold, one line per method, chance level dashed."""
    fig = _new_figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    max_fold = -1
    for entry, label in zip(entries, labels, strict=True):
        x = [int(f["fold"]) for f in entry["folds"]]
        y = [math.nan if f.get("accuracy") is None else float(f["accuracy"]) for f in entry["folds"]]
        ax.plot(x, y, marker="o", label=label)
        max_fold = max([max_fold, *x])
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("fold (as numbered in metrics.json)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(range(0, max_fold + 1))
    ax.set_title("Accuracy per fold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def fig_confusion(entries: list[dict], labels: list[str]):
    """2x2 confusion matrix (summed over folds) per method; rows = truth, columns = prediction."""
    shown = [(e, lab) for e, lab in zip(entries, labels, strict=True) if e["confusion"]]
    n = max(1, len(shown))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _new_figure(3.0 * cols, 2.9 * rows)
    for i, (entry, label) in enumerate(shown):
        c = entry["confusion"]
        mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1, mat.max()))
        for (r, k), v in np.ndenumerate(mat):
            ax.text(k, r, str(v), ha="center", va="center", color="black" if v < 0.6 * mat.max() else "white")
        ax.set_xticks([0, 1], ["normal", "anomal."])
        ax.set_yticks([0, 1], ["normal", "anomal."])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label, fontsize=9)
    if not shown:
        fig.text(0.5, 0.5, "no confusion counts", ha="center")
    fig.tight_layout()
    return fig


def fig_similarity(curves: list[tuple[str, dict[str, list[float]]]]):
    """Figure 3: cosine similarity and L2 distance of real vs generated windows over training steps."""
    fig = _new_figure(9.0, 3.6)
    ax_cos = fig.add_subplot(1, 2, 1)
    ax_l2 = fig.add_subplot(1, 2, 2)
    for name, cols in curves:
        ax_cos.plot(cols["step"], cols["cosine"], marker=".", label=name)
        ax_l2.plot(cols["step"], cols["l2"], marker=".", label=name)
    ax_cos.set_title("cosine similarity (real vs fake)")
    ax_l2.set_title("L2 distance (real vs fake)")
    for ax in (ax_cos, ax_l2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def real_windows(shard_dir: Path, n: int) -> list[tuple[str, np.ndarray]]:
    """The first ``n`` windows of a shard set (key, uint8 [T, H, W]), read lazily from the first shards."""
    from ddp_vad.data.reader import load_window_set

    ws = load_window_set(shard_dir, n=n, on_damage="skip")  # figures only: a damaged shard is reported, skipped
    return list(zip(ws.keys, ws.frames, strict=True))


def _latent_dim(generator: Any, model_cfg: Any) -> int:
    for name in ("z_dim", "latent_dim", "noise_dim", "nz", "zdim"):
        value = model_cfg.get(name) if isinstance(model_cfg, dict) else getattr(model_cfg, name, None)
        if value:
            return int(value)
    import torch

    for module in generator.modules():  # the first Linear takes z
        if isinstance(module, torch.nn.Linear):
            return int(module.in_features)
    raise UserError("cannot tell the generator's latent size from its config")


def fake_windows(run_dir: Path, n: int, seed: int = 0) -> np.ndarray:
    """``n`` generated windows (float [n, T, H, W] in [0, 1]) from the run's exported generator."""
    import torch

    from ddp_vad.models import load_generator

    generator, model_cfg = load_generator(run_dir)
    generator.eval()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, _latent_dim(generator, model_cfg), generator=gen)
    with torch.no_grad():
        out = generator(z).float().cpu()
    h, w = out.shape[-2:]
    return out.reshape(n, -1, h, w).clamp_(0, 1).numpy()


def fig_real_vs_fake(real: list[tuple[str, np.ndarray]], fake: np.ndarray, max_frames: int = 10):
    """Figure 4: rows of real windows (from the shards) above rows of generated ones, frames left to right."""
    rows = [(f"real {k}", f.astype(np.float32) / 255.0) for k, f in real]
    rows += [(f"fake {i}", f) for i, f in enumerate(fake)]
    t = min(max_frames, max(r[1].shape[0] for r in rows))
    h, w = rows[0][1].shape[-2:]
    fig = _new_figure(1.1 * t * w / max(h, 1) + 1.2, 1.1 * len(rows) + 0.3)
    for r, (name, window) in enumerate(rows):
        for c in range(t):
            ax = fig.add_subplot(len(rows), t, r * t + c + 1)
            if c < window.shape[0]:
                ax.imshow(window[c], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(f"t={c}", fontsize=7)
    fig.suptitle("Real (top) vs generated (bottom) windows", fontsize=10)
    return fig


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


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Write the report for ``cfg.runs`` into ``cfg.out``; returns the report.json payload."""
    cv_runs, pretrain_runs = discover_runs(cfg.runs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg, extra={"cv_runs": cv_runs, "pretrain_runs": pretrain_runs})

    cache: dict[str, Any] = {}
    entries = [summarise_run(run, cache) for run in cv_runs]
    labels = _labels(entries)
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

    infos = []
    for run in pretrain_runs:
        cols = read_similarity(run)
        infos.append(
            {
                "run": str(run),
                "points": len(cols["step"]),
                "similarity_last": {k: v[-1] for k, v in cols.items()} if cols["step"] else None,
                "notes": [],
                "_cols": cols,
            }
        )
    if infos:
        figures["fig3_similarity"] = fig_similarity([(Path(i["run"]).name, i.pop("_cols")) for i in infos])
    for i, (run, info) in enumerate(zip(pretrain_runs, infos, strict=True)):
        shards = run_shards(run)
        real = real_windows(shards, 3) if shards else []
        if shards is None:
            info["notes"].append(f"{run}: shards not found, figure 4 shows generated windows only")
        name = "fig4_real_vs_fake" if i == 0 else f"fig4_real_vs_fake_{run.name}"
        figures[name] = fig_real_vs_fake(real, fake_windows(run, 3))
        report["pretrain"].append(info)

    for name, fig in figures.items():
        _save(fig, out / f"{name}.png")
        report["figures"].append(f"{name}.png")
    markdown = _markdown(report)
    write_text_atomic(out / "report.md", markdown)
    write_json_atomic(out / "report.json", report)
    _log_tensorboard(out / "tb", report, figures, markdown)
    if entries:
        print(markdown_table(report))
    print(f"evaluate: report written to {out / 'report.md'}")
    return report
