"""``ddp_vad transfer``: fine-tune the LRCN classifier with fold-parallel k-fold cross-validation.

With ``--from GANRUN`` the classifier's ``features`` are an exact copy of the pretrained discriminator's and the head
is new; with ``--from scratch`` everything is freshly initialised (:mod:`ddp_vad.train.classifier`). Cross-entropy,
Adam. One fold is trained by :func:`ddp_vad.train.fold.train_fold`; this module runs the folds.

**Repeats.** ``--repeats N`` re-deals the folds with N seeds (repeat 0: the shards' folds); each (repeat, fold) pair
is a *unit* ``k = repeat * folds + fold`` trained like a fold (below), so "fold k" reads "unit k" with repeats.
``--from random`` is the control of the GAN's claim: the same head on a frozen, randomly initialised LRCN.

**Fold-parallel.** With P processes fold k runs on process ``k % P`` as an independent model: never DDP-wrapped
(ranks train different folds; DDP would average their gradients), never passed to ``accelerator.prepare``. Every
process holds every window (``load_window_set``) and selects by fold. A fold's numbers depend only on ``(seed, fold)``
and feature chunks have fixed boundaries, so per-fold results do not depend on P. With a GAN source the frozen part is
the same for every fold and is computed once per run (for ``head`` split over the processes and gathered). The main
process gathers the fold results and writes ``RUN/metrics.json``, ``RUN/oof_scores.csv`` and ``RUN/config.json``.

**Resume.** Per-fold files are written by the fold's owner (several nodes need RUN on a shared filesystem for a later
run with another process count to see them). ``--resume auto`` skips folds whose ``result.json`` exists and continues
an unfinished fold from its checkpoint (on CPU to the same numbers as an uninterrupted run); ``--resume none`` refuses
a non-empty RUN. Files of a run with other settings are refused, never mixed in (:mod:`ddp_vad.train.fold_store`).

**Leave-one-anomaly-type-out** (``--holdout-type TYPE``): windows whose ``anomaly_types`` include TYPE are removed
from every training fold; they stay in the test folds and are scored like every other window. ``metrics.json``
reports how the held-out windows were classified (``"holdout"``).
"""

from __future__ import annotations

import math
import time
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ddp_vad.config import hparams_values, write_resolved_config
from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import fold_count, load_manifest
from ddp_vad.errors import UserError
from ddp_vad.models import INPUT_MODES, POOLINGS, build_lrcn
from ddp_vad.options import option
from ddp_vad.presets import PRESET_NAMES
from ddp_vad.train.augment import parse_augment
from ddp_vad.train.calibration import CALIBRATIONS, reference_windows
from ddp_vad.train.classifier import (
    RANDOM,
    SCRATCH,
    TRAIN_SCOPES,
    build_classifier,
    compute_cache,
    discriminator_file,
    frozen_part,
    parameter_counts,
    set_trainable,
)
from ddp_vad.train.crossval import (
    PROTOCOL_HELP,
    PROTOCOLS,
    CVWindows,
    check_fraction,
    check_repeats,
    finish_cv,
    fmt_metric,
    fold_split,
    window_selection,
)
from ddp_vad.train.distributed import (
    PRECISIONS,
    all_gather_objects,
    check_process_group,
    main_lock,
    make_accelerator,
    object_group,
    print_main,
    raise_agreed,
)
from ddp_vad.train.fold import FoldRun, train_fold
from ddp_vad.train.fold_store import fingerprint, fold_status, run_level_error
from ddp_vad.train.holdout import holdout_mask, holdout_summary
from ddp_vad.train.source import FRESH, resolve_model

METHOD_GAN, METHOD_SCRATCH, METHOD_RANDOM = "GAN+LRCN", "LRCN", "Random+LRCN"
NORMAL_FOOTAGE = ("none", "train")  # --normal-footage


@dataclass
class TransferConfig:
    """Options of ``ddp_vad transfer``. ``batch_size`` is per fold (each fold trains alone on its process)."""

    shards: str = option(help="Shard folder (with manifest.json).")
    out: str = option(help="Run folder (RUN).")
    source: str = option(
        help="A pretrain run folder (GAN+LRCN: its discriminator's features), 'scratch' (LRCN, trains everything) "
        "or 'random' (the control: the same head on a frozen, randomly initialised LRCN).",
        flag="--from",
    )
    train: str | None = option(
        None,
        "What is fine-tuned: the head (features frozen, computed once), head + LSTM, or all. "
        "Default: head with a GAN run, all from scratch (a random frozen extractor would be a straw man).",
        choices=TRAIN_SCOPES,
    )
    folds: int | None = option(None, "Must match the shards' fold count (default: the shards').")
    protocol: str = option("leakfree", PROTOCOL_HELP, choices=PROTOCOLS)
    repeats: int = option(
        1, "Repeat the cross-validation with this many fold seeds (repeat 0: the shards' folds); mean ± std over all."
    )
    epochs: int = option(10, "Training epochs per fold.")
    preset: str | None = option(
        None,
        "Architecture for --from scratch (default: paper). A GAN run brings its own; a different one is an error.",
        choices=PRESET_NAMES,
    )
    batch_size: int = option(32, "Windows per step (each fold alone).")
    lr: float = option(1e-3, "Adam learning rate.")
    seed: int = option(0, "Seed of heads, dropout and data order (per fold).")
    resume: str = option(
        "auto",
        "auto: skip finished folds, continue unfinished ones; none: refuse a non-empty --out.",
        choices=("auto", "none"),
    )
    holdout_type: str | None = option(
        None, "Leave this anomaly type out of every training fold and report accuracy on it."
    )
    mixed_precision: str | None = option(None, "Override accelerate's mixed-precision setting.", choices=PRECISIONS)
    method: str | None = option(None, "Name in metrics.json (default: GAN+LRCN, or LRCN from scratch).")
    standardize: bool = option(
        True, "--train head: standardise the frozen features per fold (folded into the saved head).", negatable=True
    )
    labelled_fraction: float = option(
        1.0,
        "Train each fold on this stratified, seeded share of its labelled windows (nested across fractions; at least "
        "one window per class).",
    )
    progress: bool = option(True, "Progress bar on the main process.", negatable=True)
    # Levers (docs/models.md): model options override the preset's for --from scratch (a GAN run brings its own
    # architecture); training options apply to either source.
    input_mode: str | None = option(
        None,
        "LRCN input: frames (the method), diff (|x_t - x_t-1|) or both (default: the preset's).",
        choices=INPUT_MODES,
    )
    pooling: str | None = option(
        None,
        "How a frame's conv map enters the LSTM: flatten (the method), max or topk (default: the preset's).",
        choices=POOLINGS,
    )
    topk: int | None = option(None, "--pooling topk: positions averaged per channel (default: the preset's).")
    dropout: float | None = option(None, "Dropout of the LRCN before its LSTM and head (default: the preset's, 0.5).")
    augment: str = option(
        "none",
        "Comma list of flip, shift, jitter applied to training windows (seeded per seed, fold, epoch); "
        "--train all only (head and head+lstm train on a cached output of the plain windows).",
    )
    class_weight: str = option(
        "balanced",
        "Cross-entropy class weights: balanced (n / (2 n_class) from the fold's training labels: the leak-free set is "
        "every window of the labelled clips, not a balanced subset) or none (the method's plain loss).",
        choices=("none", "balanced"),
    )
    val_clips: int = option(
        0,
        "Hold out this many training clips per fold (seeded) and keep the epoch with the best validation AUROC "
        "(0 = train on every training clip, keep the last epoch). Never the test fold.",
    )
    weight_decay: float = option(0.0, "Decoupled weight decay (AdamW); 0 = the method's plain Adam.")
    normal_footage: str = option(
        "none",
        "train: add the shards' train clips (normal-only footage, never tested on) to every fold's training windows as "
        "normal, the labelled fraction of them (seeded); leakfree protocol only. none: the labelled clips only.",
        choices=NORMAL_FOOTAGE,
    )
    calibrate: str = option(
        "normal",
        "Per-fold score calibration: normal (each fold's log-odds standardised on the same normal footage, the train "
        "clips' windows, so fold models share one scale; folded into the saved model) or none (the method's raw "
        "scores).",
        choices=CALIBRATIONS,
    )
    # False: check the values only, not that --shards and a GAN --from exist (the pipeline checks every stage's
    # options before an earlier stage has made them).
    check_paths: InitVar[bool] = True

    def __post_init__(self, check_paths: bool) -> None:
        if check_paths and not (Path(self.shards) / "manifest.json").is_file():
            raise UserError(f"--shards {self.shards}: no manifest.json there (build shards with `ddp_vad shard build`)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")
        self.source = str(self.source)
        if check_paths and self.source not in FRESH:
            discriminator_file(self.source)  # raises with the path when it is not a finished pretrain run
        if self.train is None:
            self.train = "all" if self.source == SCRATCH else "head"
        if self.source == RANDOM and self.train != "head":
            raise UserError(f"--from random --train {self.train}: the control trains the head only (--train head)")
        check_repeats(self.repeats)
        if self.train not in TRAIN_SCOPES:
            raise UserError(f"--train {self.train}: choose one of {', '.join(TRAIN_SCOPES)}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol {self.protocol}: choose one of {', '.join(PROTOCOLS)}")
        if self.folds is not None and int(self.folds) < 2:
            raise UserError(f"--folds {self.folds}: need at least 2")
        if int(self.epochs) < 1:
            raise UserError(f"--epochs must be >= 1, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise UserError(f"--preset {self.preset}: choose one of {', '.join(PRESET_NAMES)}")
        if self.resume not in ("auto", "none"):
            raise UserError(f"--resume {self.resume}: choose auto or none")
        if self.mixed_precision not in (None, *PRECISIONS):
            raise UserError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.holdout_type is not None and not str(self.holdout_type).strip():
            raise UserError("--holdout-type: give an anomaly type name")
        check_fraction(self.labelled_fraction)
        self.augment = ",".join(parse_augment(self.augment)) or "none"
        if self.augment != "none" and self.train != "all":
            raise UserError(
                f"--augment {self.augment} needs --train all: --train {self.train} trains on the frozen part's output, "
                "computed once from the plain windows"
            )
        if self.class_weight not in ("none", "balanced"):
            raise UserError(f"--class-weight {self.class_weight}: choose none or balanced")
        if self.normal_footage not in NORMAL_FOOTAGE:
            raise UserError(f"--normal-footage {self.normal_footage}: choose {' or '.join(NORMAL_FOOTAGE)}")
        if self.normal_footage == "train" and self.protocol != "leakfree":
            raise UserError(f"--normal-footage train needs --protocol leakfree (the {self.protocol} protocol's set "
                            "already holds the train clips' windows)")  # fmt: skip
        if self.calibrate not in CALIBRATIONS:
            raise UserError(f"--calibrate {self.calibrate}: choose {' or '.join(CALIBRATIONS)}")
        if int(self.val_clips) < 0:
            raise UserError(f"--val-clips must be >= 0, got {self.val_clips}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.method is None:
            self.method = {SCRATCH: METHOD_SCRATCH, RANDOM: METHOD_RANDOM}.get(self.source, METHOD_GAN)
        if not str(self.method).strip():
            raise UserError("--method: give a non-empty name")


def _preflight(cfg: TransferConfig, run_dir: Path, n_folds: int, fp: dict, acc, group) -> dict[int, tuple]:
    """Which of this process's folds are finished / resumable; any problem anywhere stops every process."""
    rank, world = acc.process_index, acc.num_processes
    mine = [k for k in range(n_folds * cfg.repeats) if k % world == rank]
    status = {k: fold_status(run_dir, k, fp) for k in mine}
    error = next((s[2] for s in status.values() if s[2]), None)
    if acc.is_main_process:
        error = run_level_error(cfg.resume, run_dir, fp) or error
    raise_agreed(error, group, world)
    parts = all_gather_objects({k: s[0] for k, s in status.items()}, group, world)
    kinds = {k: v for part in parts for k, v in part.items()}
    for kind, what in (("done", "finished earlier, skipped"), ("resume", "resumed from their checkpoints")):
        folds = [str(k) for k in sorted(kinds) if kinds[k] == kind]
        if folds:
            print_main(acc.is_main_process, f"transfer: fold(s) {', '.join(folds)} {what}")
    if world > n_folds * cfg.repeats:
        print_main(acc.is_main_process, f"transfer: note: {world} processes for {n_folds * cfg.repeats} folds: "
                   "some stay idle")  # fmt: skip
    return {"mine": status, "todo_anywhere": any(v != "done" for v in kinds.values())}


def _write_run_config(cfg, run_dir, model_cfg, manifest, n_folds, world, acc, counts, fp) -> None:
    cache_kind = {"head": "feature-extractor output (eval mode)", "head+lstm": "conv-stack output", "all": None}
    if cfg.train == "head" and cfg.standardize:
        cache_kind["head"] += ", standardised per fold (training windows), folded into the exported head"
    write_resolved_config(run_dir, cfg, extra={
        "stage": "transfer",
        "method": cfg.method,
        "model": model_cfg.to_dict(),
        "source": cfg.source if cfg.source in FRESH else str(discriminator_file(cfg.source).resolve()),
        "protocol": cfg.protocol,
        "train": cfg.train,
        "n_folds": n_folds,
        "repeats": cfg.repeats,
        "world_size": world,
        "fold_owner": "unit k (fold k % n_folds of repeat k // n_folds) runs on process k % world_size",
        "mixed_precision": str(acc.mixed_precision),
        "parameters": counts,
        "cached_frozen_output": cache_kind[cfg.train],
        "manifest": {"path": str(Path(cfg.shards).resolve()),
                     **{k: manifest.get(k) for k in ("dataset", "window", "height", "width", "folds", "counts")}},
        "fingerprint": fp,
    })  # fmt: skip


def _shared_cache(cfg, model_cfg, features_state, frames: np.ndarray, acc, group) -> tuple[torch.Tensor | None, float]:
    """The GAN's frozen output of every window of ``frames`` (the same for every fold: computed once), or None."""
    if features_state is None or cfg.train == "all":
        return None, 0.0
    t0 = time.perf_counter()
    encoder = build_classifier(model_cfg, cfg.train, 0, features_state).to(acc.device).eval()
    split = cfg.train == "head"  # small features: split the work; conv maps are big, each process computes its own
    rank, world = (acc.process_index, acc.num_processes) if split else (0, 1)
    cache = compute_cache(frozen_part(encoder, cfg.train), frames, acc.device, acc.autocast, group, rank, world)
    seconds = round(time.perf_counter() - t0, 3)
    print_main(acc.is_main_process, f"transfer: frozen features of {len(frames)} windows in {seconds:.1f}s")
    return cache, seconds


def _write_results(cfg, run_dir: Path, gathered: list[dict], extra: dict[str, Any], notes: list[str]) -> None:
    """Main process: the run's metrics.json / oof_scores.csv from every fold's result, and the summary lines."""
    gathered.sort(key=lambda r: r["fold"])
    all_notes = notes + [n for r in gathered for n in r.get("notes", [])]
    extra = {**extra, "fold_seconds": [r["seconds"] for r in gathered], "notes": all_notes}
    if cfg.holdout_type is not None:
        extra["holdout"] = holdout_summary(cfg.holdout_type, gathered)
    for note in all_notes:
        print(f"transfer: note: {note}")
    rows, oof = [r["metrics"] for r in gathered], [row for r in gathered for row in r["oof"]]
    mean = finish_cv(run_dir, cfg.method, cfg.protocol, rows, oof, extra, extra["seconds"], "transfer")
    _log_hparams(cfg, run_dir, mean)
    if cfg.holdout_type is not None:
        h = extra["holdout"]
        print(f"transfer: held-out type {cfg.holdout_type}: {h['n']} windows, accuracy {fmt_metric(h['accuracy'])}, "
              f"anomalous detected {fmt_metric(h['detection_rate'])}", flush=True)  # fmt: skip


def _log_hparams(cfg: TransferConfig, run_dir: Path, mean: dict) -> None:
    """The run's hyperparameters with its mean metrics, for TensorBoard's HParams dashboard (``RUN/tb/hparams``)."""
    from torch.utils.tensorboard import SummaryWriter

    keys = ("method", "source", "train", "protocol", "epochs", "batch_size", "lr", "seed", "labelled_fraction",
            "holdout_type", "preset", "mixed_precision")  # fmt: skip
    metrics = {f"hparams/{k}": math.nan if v is None else float(v) for k, v in mean.items()}
    with SummaryWriter(str(run_dir / "tb")) as writer:
        writer.add_hparams(hparams_values({k: getattr(cfg, k) for k in keys}), metrics, run_name="hparams")


def run_transfer(cfg: TransferConfig) -> Path:
    """Cross-validate the classifier described by ``cfg`` fold-parallel; returns the run folder.

    Every process must call this (under ``accelerate launch``/``torchrun`` or alone). See the module docstring.
    """
    t_start = time.perf_counter()
    run_dir = Path(cfg.out)
    manifest = load_manifest(cfg.shards)
    n_folds = fold_count(manifest, cfg.folds, cfg.shards)
    model_cfg, features_state, notes = resolve_model(cfg, manifest)

    acc = make_accelerator(cfg.mixed_precision, project_dir=str(run_dir))
    check_process_group(acc.num_processes)
    world = acc.num_processes
    with main_lock(run_dir, "transfer", acc.is_main_process, object_group(world), world):
        return _cross_validate(cfg, acc, manifest, n_folds, (model_cfg, features_state, notes), t_start)


def _check_val_clips(cfg: TransferConfig, cv: CVWindows, held_out) -> None:
    """``--val-clips`` must leave every fold a clip to fit on (else the fold would quietly validate on nothing)."""
    for k in range(cv.n_units if cfg.val_clips > 0 else 0):
        train_idx = fold_split(cv, k, held_out, cfg.labelled_fraction, cfg.seed)[0]
        n = len(set(np.asarray(cv.clips, dtype=object)[train_idx].tolist()))
        if cfg.val_clips >= n:
            raise UserError(f"--val-clips {cfg.val_clips}: fold {k} trains on {n} clip(s) and needs one left to fit "
                            f"on; give --val-clips {max(n - 1, 0)} or less (0 = no validation)")  # fmt: skip


def _cross_validate(cfg: TransferConfig, acc, manifest: dict, n_folds: int, model: tuple, t_start: float) -> Path:
    """The folds of one run, under the run folder's lock (``model``: config, GAN feature weights, notes)."""
    run_dir = Path(cfg.out)
    model_cfg, features_state, notes = model
    is_main, world = acc.is_main_process, acc.num_processes
    group = object_group(world)
    for note in notes:
        print_main(is_main, f"transfer: note: {note}")

    select = "leakfree+train" if cfg.normal_footage == "train" else window_selection(cfg.protocol)
    ws = load_window_set(cfg.shards, show_progress=is_main and cfg.progress, select=select)
    if len(ws) == 0:
        raise UserError(f"--shards {cfg.shards}: no windows")
    cv, held_out = CVWindows.from_window_set(ws, cfg.protocol, n_folds, cfg.repeats), holdout_mask(ws, cfg.holdout_type)
    _check_val_clips(cfg, cv, held_out)
    fp = fingerprint(cfg, manifest, model_cfg, str(acc.mixed_precision))
    pre = _preflight(cfg, run_dir, n_folds, fp, acc, group)
    counts = parameter_counts(set_trainable(build_lrcn(model_cfg), cfg.train))
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_config(cfg, run_dir, model_cfg, manifest, n_folds, world, acc, counts, fp)
        print(
            f"transfer: {cfg.method} ({cfg.source}), train {cfg.train} ({counts['trainable']:,} of {counts['total']:,} "
            f"parameters), {len(ws)} windows, {n_folds} folds x {cfg.repeats} repeat(s) ({cfg.protocol}) over "
            f"{world} process(es), "
            f"{cfg.epochs} epochs",
            flush=True,
        )
    # Train-clip windows (--normal-footage train): fold -1 under leakfree, so never tested; added to every fold's
    # training windows as normal.
    extra_normal = np.flatnonzero(np.asarray(ws.splits) == "train") if select == "leakfree+train" else None
    cache, cache_seconds, reference, reference_cache = (None, 0.0, None, None)
    if pre["todo_anywhere"]:
        if cfg.calibrate == "normal":  # the same normal windows for every fold (each process draws them alike)
            reference = reference_windows(cfg.shards, cfg.seed)
        cache, cache_seconds = _shared_cache(cfg, model_cfg, features_state, ws.frames, acc, group)
        if cache is not None and reference is not None:
            reference_cache = _shared_cache(cfg, model_cfg, features_state, reference, acc, group)[0]
    run = FoldRun(
        cfg=cfg, run_dir=run_dir, ws=ws, cv=cv, held_out=held_out, model_cfg=model_cfg, features_state=features_state,
        shared_cache=cache, reference=reference, reference_cache=reference_cache, fingerprint=fp, accelerator=acc,
        extra_normal=extra_normal,
        scaler_needed=str(acc.mixed_precision) == "fp16",
    )  # fmt: skip
    pbar = tqdm(
        total=len(pre["mine"]) * cfg.epochs, desc="transfer (main process's folds)" if world > 1 else "transfer",
        unit="epoch", disable=not (is_main and cfg.progress), dynamic_ncols=True,
    )  # fmt: skip
    results = []
    for k, (kind, payload, _) in pre["mine"].items():
        pbar.update(cfg.epochs if kind == "done" else int(payload["epoch"]) if kind == "resume" else 0)
        results.append(payload if kind == "done" else train_fold(run, k, payload if kind == "resume" else None, pbar))
    pbar.close()

    gathered = [r for part in all_gather_objects(results, group, world) for r in part]
    if is_main:
        extra = {
            "source": cfg.source, "train": cfg.train, "n_folds": n_folds, "repeats": cfg.repeats, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "labelled_fraction": float(cfg.labelled_fraction), "calibrate": cfg.calibrate,
            "model_preset": model_cfg.preset, "world_size": world, "parameters": counts,
            "frozen_feature_seconds": cache_seconds, "seconds": round(time.perf_counter() - t_start, 2),
        }  # fmt: skip
        _write_results(cfg, run_dir, gathered, extra, notes)
    all_gather_objects(None, group, world)  # nobody leaves before the main process has written the results
    return run_dir
