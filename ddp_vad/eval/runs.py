"""The runs a report is made of: finding them, and summarising each cross-validated run's numbers.

A cross-validated run holds ``metrics.json`` + ``oof_scores.csv`` (``transfer``, ``baselines/<method>``); a pretrain
run holds ``similarity.csv`` + ``generator.safetensors``; a folder holding such runs (``baselines/``, a pipeline
folder) is expanded. Frame-level AUROC needs each window's frame labels: they are read from the shards recorded in
the run's ``config.json``; when the shards are gone, the AUROC is skipped with a note.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from ddp_vad.errors import UserError
from ddp_vad.eval.frame_scores import frame_summary, frames_by_repeat, read_shard_frame_labels
from ddp_vad.files import read_json_object
from ddp_vad.runfiles import config_file, metrics_file, oof_file
from ddp_vad.train.metrics import (
    FOLD_METRICS,
    binary_metrics,
    read_cv_results,
    read_oof_scores,
    summarise_folds,
    window_level_auroc,
)

MAX_DEPTH = 2  # pipeline/ -> baselines/ -> <method>/
# Writer extras the report carries over from a run's metrics.json (absent keys are left out).
REPORTED_EXTRAS = ("source", "train", "holdout", "seconds", "features", "epochs", "batch_size", "model_preset",
                   "calibrate", "motion_prior", "prior_share")  # fmt: skip


def is_cv_run(path: Path) -> bool:
    """A cross-validated run (transfer or one baseline method)."""
    return metrics_file(path).is_file()


def is_pretrain_run(path: Path) -> bool:
    """A GAN pretrain run with its exported generator and similarity curve."""
    return (path / "similarity.csv").is_file() and (path / "generator.safetensors").is_file()


def _expand(path: Path, depth: int) -> tuple[list[Path], list[Path]]:
    if is_cv_run(path):
        return [path], []
    if is_pretrain_run(path):
        return [], [path]
    cv, pre = [], []
    if depth < MAX_DEPTH:
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
    cfg_path = config_file(run_dir)
    try:
        shards = read_json_object(cfg_path, "run config")["config"]["shards"]
    except (OSError, UserError, KeyError, TypeError):
        return None
    if not shards:
        return None
    for candidate in (Path(shards), run_dir / shards):  # as given (cwd-relative), then run-relative
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def run_data(run_dir: Path) -> dict | None:
    """The shard set a run was made from: its resolved path, dataset name and counts (None when it is gone)."""
    shards = run_shards(run_dir)
    if shards is None:
        return None
    try:
        manifest = read_json_object(shards / "manifest.json", "shard manifest")
    except UserError:
        return None
    # The shard set's identity is its content (two copies of one set are the same data), else its path.
    hashes = [s.get("sha256") for s in manifest.get("shards") or [] if isinstance(s, dict)]
    content = f"{manifest.get('dataset')}|" + "".join(map(str, hashes))
    identity = hashlib.sha256(content.encode()).hexdigest() if hashes and all(hashes) else None
    return {
        "path": str(shards.resolve()),
        "dataset": manifest.get("dataset"),
        "counts": manifest.get("counts"),
        "identity": identity or str(shards.resolve()),
    }


def _confusion(folds: list[dict], oof: list[dict] | None) -> tuple[dict[str, int] | None, str | None]:
    if folds and all(all(k in f for k in ("tp", "fp", "tn", "fn")) for f in folds):
        return {k: int(sum(int(f[k]) for f in folds)) for k in ("tp", "fp", "tn", "fn")}, "folds"
    if oof:  # older/foreign runs: rebuild from the scores at the argmax threshold
        counts = binary_metrics([r["label"] for r in oof], [int(r["score"] > 0.5) for r in oof])
        return {k: counts[k] for k in ("tp", "fp", "tn", "fn")}, "oof scores > 0.5"
    return None, None


def _undefined_notes(folds: list[dict]) -> list[str]:
    notes = []
    n = len(folds)
    for name in FOLD_METRICS:
        missing = [_unit_name(f) for f in folds if f.get(name) is None]
        if missing:
            notes.append(
                f"{name} defined in {n - len(missing)} of {n} folds (undefined in fold(s) {', '.join(missing)})"
            )
    reasons = sorted({part for f in folds if f.get("note") for part in str(f["note"]).split("; ")})
    if reasons:
        notes.append("why: " + "; ".join(reasons))
    return notes


def _unit_name(row: dict) -> str:
    """A fold row's name: ``3``, or ``1.3`` (repeat 1, fold 3) in a run with repeats."""
    repeat = int(row.get("repeat", 0))
    return f"{repeat}.{int(row['fold'])}" if repeat else str(int(row["fold"]))


def labelled_frames(shards: Path, select: str) -> dict[str, int]:
    """``{clip: frames}``: how many frames the shards hold of each clip that has ``select`` windows (the clips the
    protocol labels; at stride 1 every frame of a clip at least one window long), from the block metadata."""
    from ddp_vad.data.reader import iter_blocks

    held: dict[str, set[int]] = {}
    labelled: set[str] = set()
    for block in iter_blocks(shards, frames=False):
        held.setdefault(block.clip, set()).update(range(block.first, block.first + len(block.frame_labels)))
        if block.positions(select).size:
            labelled.add(block.clip)
    return {clip: len(held[clip]) for clip in sorted(labelled)}


def _frame_part(
    run_dir: Path, protocol: str, oof: list[dict], cache: dict, frames_of: dict[str, Any], notes: list[str]
) -> dict[str, Any] | None:
    """Frame-level numbers of a run (:func:`ddp_vad.eval.frame_scores.frame_summary`) and how many of the labelled
    clips' frames they cover; its frames go into ``frames_of[run]`` for the paired comparisons and timelines. None
    (with a note) without the shards."""
    shards = run_shards(run_dir)
    if shards is None:
        notes.append("shards recorded in config.json not found: frame-level AUROC skipped")
        return None
    # Under leakfree the labelled set is every window of the test clips, not the balanced (kept) set: reading the
    # kept windows' labels only would drop the frames (and the windows' scores) outside the balanced set.
    select = "leakfree" if protocol == "leakfree" else "kept"
    key = (str(shards.resolve()), select)
    if key not in cache:
        cache[key] = (read_shard_frame_labels(shards, select), labelled_frames(shards, select))
    window_labels, clip_frames = cache[key]
    try:
        by_repeat = frames_by_repeat(oof, window_labels)
    except ValueError as exc:
        notes.append(f"frame-level AUROC skipped: {exc}")
        return None
    frames_of[str(run_dir)] = by_repeat
    summary = frame_summary(by_repeat)
    summary["n_frames_labelled"] = sum(clip_frames.values())
    summary["n_clips_labelled"] = len(clip_frames)
    if summary["frame_auroc"] is None:
        notes.append("frame-level AUROC undefined: scored frames hold one class only")
    if summary["n_frames"] < summary["n_frames_labelled"]:
        n, total = summary["n_frames"], summary["n_frames_labelled"]
        notes.append(f"frame-level numbers cover {n} of the {total} frames of the {len(clip_frames)} labelled clips "
                     "(frames that no scored window covers are left out)")  # fmt: skip
    return summary


def _fold_rates(oof: list[dict]) -> list[list[float]]:
    """Anomalous share of each fold's test windows, per repeat (how alike the folds are)."""
    counts: dict[tuple[int, int], list[int]] = {}
    for r in oof:
        c = counts.setdefault((int(r.get("repeat", 0)), int(r["fold"])), [0, 0])
        c[0] += int(r["label"])
        c[1] += 1
    repeats = sorted({rep for rep, _ in counts})
    return [[round(a / n, 3) for (rep, _), (a, n) in sorted(counts.items()) if rep == r] for r in repeats]


def _oof_and_notes(run_dir: Path, data: dict, folds: list[dict]) -> tuple[list[dict] | None, list[str]]:
    """The run's out-of-fold rows (None without ``oof_scores.csv``) and the notes so far: undefined fold metrics, a
    missing OOF file, and the notes the run's writer recorded (e.g. transfer's)."""
    notes = _undefined_notes(folds)
    oof = read_oof_scores(run_dir) if oof_file(run_dir).is_file() else None
    if oof is None:
        notes.append("no oof_scores.csv: AUROC skipped")
    run_notes = data.get("notes")
    if isinstance(run_notes, list):
        notes += [str(n) for n in run_notes if n]
    return oof, notes


def summarise_run(
    run_dir: Path, frame_label_cache: dict[str, Any], frames_of: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything the report says about one cross-validated run. ``frame_label_cache``: frame labels per shard set,
    shared between runs; ``frames_of``: receives the run's frame scores (run folder -> frames per repeat)."""
    data = read_cv_results(run_dir)
    folds = sorted(data["folds"], key=lambda f: (int(f.get("repeat", 0)), int(f["fold"])))
    # Recomputed from the folds so every method in the table uses the same (population) std.
    mean, std = summarise_folds(folds)
    oof, notes = _oof_and_notes(run_dir, data, folds)
    confusion, confusion_source = _confusion(folds, oof)
    # Pooled over every out-of-fold window of repeat 0 (folds' scores on one scale): not the "window AUROC" of the
    # tables, which is the mean over folds, so it carries its own name.
    window_auc = window_level_auroc([r for r in oof if r.get("repeat", 0) == 0]) if oof else None
    fold_rates = _fold_rates(oof) if oof else []
    frames = None
    if oof:
        frames = _frame_part(
            run_dir, str(data["protocol"]), oof, frame_label_cache, {} if frames_of is None else frames_of, notes
        )
        if window_auc is None:
            notes.append("window-level AUROC undefined: one class only")
    # The frame-level numbers sit beside the per-fold means, so tables and curves read every metric alike: the
    # pooled frame AUROC (mean over repeats) with the spread of the per-fold frame AUROCs.
    mean["frame_auroc"] = frames["frame_auroc"] if frames else None
    std["frame_auroc"] = frames["fold_frame_auroc_std"] if frames else None
    mean["clip_auroc"], std["clip_auroc"] = (frames["clip_auroc"] if frames else None), None
    return {
        "run": str(run_dir),
        "method": str(data["method"]),
        "protocol": str(data["protocol"]),
        "n_folds": len(folds),
        "folds_per_repeat": int(data.get("n_folds") or len({int(f["fold"]) for f in folds})),
        "repeats": int(data.get("repeats", 1)),
        "mean": mean,
        "std": std,
        "n_defined": {k: sum(f.get(k) is not None for f in folds) for k in FOLD_METRICS},
        "folds": folds,
        "confusion": confusion,
        "confusion_source": confusion_source,
        "window_auroc_pooled": window_auc,
        "fold_rates": fold_rates,
        "frame_auroc": mean["frame_auroc"],
        "frames": frames,
        "notes": notes,
        "labelled_fraction": float(data.get("labelled_fraction", 1.0)),
        "data": run_data(run_dir),
        "extra": {k: data[k] for k in REPORTED_EXTRAS if k in data},
    }


def display_labels(entries: list[dict]) -> list[str]:
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


def pretrain_health(run_dir: Path) -> dict:
    """``{"health": gan_health.json, "stabilisers": "...", "pretraining": "..."}`` of a pretrain run (the
    pretraining variant: :func:`ddp_vad.train.pretrain_config.describe_pretraining`); empty when it has no health
    file."""
    from ddp_vad.train.pretrain_config import PLAIN_GAN, describe_pretraining

    path = run_dir / "gan_health.json"
    if not path.is_file():
        return {}
    health = read_json_object(path, "GAN health file")
    try:
        cfg = read_json_object(config_file(run_dir), "run config").get("config", {})
    except (OSError, UserError):
        cfg = {}
    used = [f"{k.replace('_', ' ')} {cfg[k]:g}" for k in ("label_smoothing", "instance_noise") if cfg.get(k)]
    variant = describe_pretraining(cfg)
    stabilisers = ", ".join(used) or ("none (the method's plain GAN)" if variant == PLAIN_GAN else "none")
    return {"health": health, "stabilisers": stabilisers, "pretraining": variant}
