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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ddp_vad.config import hparams_values, write_resolved_config
from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import fold_count, load_manifest
from ddp_vad.errors import UserError
from ddp_vad.models import build_lrcn
from ddp_vad.motion import window_energies
from ddp_vad.train.calibration import reference_windows
from ddp_vad.train.classifier import (
    build_classifier,
    compute_cache,
    discriminator_file,
    frozen_part,
    parameter_counts,
    set_trainable,
)
from ddp_vad.train.crossval import (
    CVWindows,
    finish_cv,
    fmt_metric,
    fold_split,
    window_selection,
)
from ddp_vad.train.distributed import (
    all_gather_objects,
    check_process_group,
    main_lock,
    make_accelerator,
    object_group,
    print_main,
    raise_agreed,
)
from ddp_vad.train.fold import train_fold
from ddp_vad.train.fold_steps import FoldRun
from ddp_vad.train.fold_store import fingerprint, fold_status, run_level_error
from ddp_vad.train.holdout import holdout_mask, holdout_summary
from ddp_vad.train.source import FRESH, resolve_model
from ddp_vad.train.transfer_config import (  # noqa: F401 (public names of ddp_vad.train.transfer)
    METHOD_GAN,
    METHOD_RANDOM,
    METHOD_SCRATCH,
    NORMAL_FOOTAGE,
    TransferConfig,
)


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
    cache, cache_seconds, reference, reference_cache, reference_energies = (None, 0.0, None, None, None)
    if pre["todo_anywhere"]:
        if cfg.calibrate == "normal":  # the same normal windows for every fold (each process draws them alike)
            reference = reference_windows(cfg.shards, cfg.seed)
        cache, cache_seconds = _shared_cache(cfg, model_cfg, features_state, ws.frames, acc, group)
        if cache is not None and reference is not None:
            reference_cache = _shared_cache(cfg, model_cfg, features_state, reference, acc, group)[0]
        if reference is not None and model_cfg.motion_prior:  # the same footage for every fold: its energies once
            reference_energies = window_energies(reference)
    run = FoldRun(
        cfg=cfg, run_dir=run_dir, ws=ws, cv=cv, held_out=held_out, model_cfg=model_cfg, features_state=features_state,
        shared_cache=cache, reference=reference, reference_cache=reference_cache,
        reference_energies=reference_energies, fingerprint=fp, accelerator=acc,
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
            "motion_prior": cfg.motion_prior, "prior_share": cfg.prior_share, "model_preset": model_cfg.preset,
            "world_size": world, "parameters": counts,
            "frozen_feature_seconds": cache_seconds, "seconds": round(time.perf_counter() - t_start, 2),
        }  # fmt: skip
        _write_results(cfg, run_dir, gathered, extra, notes)
    all_gather_objects(None, group, world)  # nobody leaves before the main process has written the results
    return run_dir
