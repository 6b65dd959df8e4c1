"""One fold of ``transfer``: build the classifier, train it on the other folds' windows, score its own, save it.

A fold trains alone on the process that owns it (never DDP-wrapped: ranks train different folds). Its seed, initial
weights, labelled subset and data order depend only on ``(seed, fold)``, so its numbers do not depend on how many
processes share the folds. Files: ``RUN/tb/fold_XX/`` (per epoch: loss/train, lr, and the test fold's accuracy under
a tag that says it is for watching only: no epoch, threshold or rate is chosen on a test fold),
``RUN/checkpoints/fold_XX/`` (the latest epoch), and when the fold finishes ``RUN/folds/fold_XX/model.safetensors`` +
``result.json`` (metrics and out-of-fold scores; written last, so its presence marks the fold finished).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from ddp_vad.data.reader import frames_to_float
from ddp_vad.errors import UserError
from ddp_vad.models import LRCN
from ddp_vad.runfiles import fold_checkpoint_dir, fold_tb_dir
from ddp_vad.train.calibration import (
    EQUAL_SHARE,
    REFERENCE_WINDOWS,
    calibrate_from_log_odds,
    calibrated_log_odds,
    calibration_record,
)
from ddp_vad.train.checkpoint import save_fold_checkpoint
from ddp_vad.train.classifier import fold_seed, fold_standardization_into_head, trainable_forward
from ddp_vad.train.crossval import CVWindows, fold_split, labelled_subset, score_fold
from ddp_vad.train.fold_steps import (
    FoldRun,
    input_fn,
    loss_weight,
    new_model,
    outputs_of_log_odds,
    predict,
    train_epoch,
)
from ddp_vad.train.fold_store import save_finished_fold
from ddp_vad.train.holdout import holdout_part
from ddp_vad.train.metrics import auroc
from ddp_vad.train.prior_share import INNER_FOLDS, NESTED, PRIOR_SHARES, choose_share, inner_splits

TEST_CURVE_TAG = "test_fold_not_for_selection/accuracy"
INNER_SEED_BASE = 1000  # inner fold i of fold k is seeded as fold 1000 (i + 1) + k: never an outer fold's seed


def inner_validation_split(
    cv: CVWindows, train_idx: np.ndarray, n_clips: int, seed: int, fold: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) windows of a fold's training windows: ``n_clips`` whole training clips, drawn by a
    permutation seeded by ``(seed, fold)``, are held out for model selection (never the test fold). When the drawn
    clips hold one class only, the last one is swapped for the next clip of the permutation that brings the other
    class, so the validation AUROC is defined where it can be. ``n_clips`` 0 (or too few clips) -> (train_idx, [])."""
    clips = np.asarray(cv.clips, dtype=object)[train_idx]
    names = sorted(set(clips.tolist()))
    if n_clips < 1 or len(names) <= n_clips:
        return train_idx, np.zeros(0, np.int64)
    order = [names[i] for i in np.random.default_rng([abs(int(seed)), int(fold), 0x5A1]).permutation(len(names))]
    chosen = order[:n_clips]
    classes = set(cv.labels[train_idx[np.isin(clips, chosen)]].tolist())
    if len(classes) < 2:
        for name in order[n_clips:]:
            if set(cv.labels[train_idx[clips == name]].tolist()) - classes:
                chosen = [*chosen[:-1], name]
                break
    val = np.isin(clips, chosen)
    return train_idx[~val], train_idx[val]


def _restore(resume_state: dict, model, optimizer, scaler, device) -> tuple[int, list]:
    """Load a fold checkpoint into the live objects; returns (epochs done, history)."""
    model.load_state_dict(resume_state["model"])
    optimizer.load_state_dict(resume_state["optimizer"])
    if scaler is not None and resume_state.get("scaler"):
        scaler.load_state_dict(resume_state["scaler"])
    torch.set_rng_state(resume_state["rng_cpu"])
    if device.type == "cuda" and resume_state.get("rng_device") is not None:
        torch.cuda.set_rng_state(resume_state["rng_device"], device)
    return int(resume_state["epoch"]), json.loads(resume_state["history"])


def _checkpoint_state(
    run: FoldRun, k: int, epoch: int, model, optimizer, scaler, history: list, best: dict | None = None
) -> dict:
    device = run.accelerator.device
    return {
        "best": best or {},
        "fold": k,
        "epoch": epoch,
        "fingerprint": json.dumps(run.fingerprint, sort_keys=True),
        "model": {n: t.detach().cpu() for n, t in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "history": json.dumps(history),
    }


def train_fold(run: FoldRun, k: int, resume_state: dict | None = None, pbar=None) -> dict:
    """Train and score fold ``k`` on this process; writes the fold's files and returns its result.

    ``resume_state``: the fold's latest checkpoint, to continue from.
    """
    from torch.utils.tensorboard import SummaryWriter

    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    train_idx, test_idx, excluded, notes = _fold_windows(run, k)

    # Model selection (--val-clips): whole training clips held out; the test fold is never looked at.
    fit_idx, val_idx = inner_validation_split(run.cv, train_idx, int(getattr(cfg, "val_clips", 0)), cfg.seed, k)
    weight = loss_weight(run, fit_idx)
    model, optimizer, scaler, (start_epoch, history, best) = _fold_model(run, k, resume_state)
    get_inputs, norm = input_fn(run, model, fit_idx)
    forward = trainable_forward(model, cfg.train)

    writer = SummaryWriter(str(fold_tb_dir(run.run_dir, k)), purge_step=start_epoch + 1 if start_epoch else None)
    last = None
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            order = fit_idx[np.random.default_rng([abs(cfg.seed), k, epoch]).permutation(fit_idx.size)]
            loss = train_epoch(run, k, epoch, order, model, forward, get_inputs, optimizer, scaler, weight)
            record, best = _validate(run, model, forward, get_inputs, val_idx, epoch, best, writer)
            last = predict(model, forward, get_inputs, test_idx, acc.autocast)
            test_acc = float((last[1] == run.cv.labels[test_idx]).mean()) if test_idx.size else float("nan")
            # Logged for watching only: nothing (epoch, threshold) is chosen on the test fold; the tag says so.
            writer.add_scalar("loss/train", loss, epoch)
            writer.add_scalar(TEST_CURVE_TAG, test_acc, epoch)
            writer.add_scalar("lr", optimizer.param_groups[0]["lr"], epoch)
            history.append({"epoch": epoch, "loss": loss, "test_accuracy": test_acc, **record})
            state = _checkpoint_state(run, k, epoch, model, optimizer, scaler, history, best)
            save_fold_checkpoint(fold_checkpoint_dir(run.run_dir, k), epoch, state)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(fold=k, loss=f"{loss:.3f}", acc=f"{test_acc:.3f}")
    finally:
        writer.close()
    if best:  # keep the epoch chosen on the validation clips, not the last one
        model.load_state_dict(best["model"])
        last = None
    if last is None:  # resumed from the final epoch's checkpoint, or the chosen epoch's weights
        last = predict(model, forward, get_inputs, test_idx, acc.autocast)
    export = model if norm is None else fold_standardization_into_head(model, *norm)
    calibration = None
    if getattr(cfg, "calibrate", "none") == "normal":
        export, calibration, last = _calibrated(run, k, model, export, forward, norm, fit_idx, test_idx, last, notes)
    scores, preds, _ = last
    extra = {"n_train": int(fit_idx.size)}
    if calibration is not None and "motion" in calibration:
        extra["prior_share"] = calibration["motion"]["share"]
    if best:
        extra.update(n_validation=int(val_idx.size), chosen_epoch=int(best["epoch"]), validation_auroc=best["auroc"])
    row, oof = score_fold(run.cv, k, test_idx, scores, preds, **extra)
    if "note" in row:
        notes.append(f"fold {k}: {row['note']}")
    result = {
        "fold": k,
        "fingerprint": run.fingerprint,
        "metrics": row,
        "oof": oof,
        "holdout": holdout_part(cfg.holdout_type, run.held_out, run.cv.labels, test_idx, preds, int(excluded.size)),
        "history": history,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
        "rank": int(acc.process_index),
    }
    if calibration is not None:
        result["calibration"] = calibration
    return save_finished_fold(run.run_dir, k, export, run.model_cfg, result)


def _fold_windows(run: FoldRun, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Fold ``k``'s (training, test, held-out-type excluded) windows, with ``--normal-footage`` windows added to its
    training ones, and the notes they call for; a fold without training windows is a UserError."""
    cfg = run.cfg
    train_idx, test_idx, excluded = fold_split(run.cv, k, run.held_out, cfg.labelled_fraction, cfg.seed)
    if run.extra_normal is not None and run.extra_normal.size:  # the labelled fraction of them, drawn per fold
        extra = labelled_subset(run.extra_normal, run.cv.labels, cfg.labelled_fraction, cfg.seed, k)
        train_idx = np.sort(np.concatenate([train_idx, extra]))
    if train_idx.size == 0:
        raise UserError(f"fold {k} has no training windows (too few windows, or --holdout-type removed them all)")
    one_class = np.unique(run.cv.labels[train_idx]).size < 2
    return train_idx, test_idx, excluded, [f"training windows of fold {k} hold one class only"] if one_class else []


def _calibrated(
    run: FoldRun, k: int, model: LRCN, export: LRCN, forward, norm, fit_idx: np.ndarray, test_idx: np.ndarray,
    last: tuple, notes: list[str],
) -> tuple[LRCN, dict, tuple]:  # fmt: skip
    """(calibrated ``export``, the calibration record, the test windows' outputs ``last`` as the calibrated model
    gives them), the prior's share chosen first where ``--prior-share nested`` asks."""
    share, nested = _prior_share(run, k, fit_idx, notes)
    export, calibration = _calibrate(run, model, export, forward, norm, fit_idx, notes, share)
    if nested is not None and "motion" in calibration:
        calibration["motion"]["nested"] = nested
    if "gain" in calibration:  # the saved (calibrated) model's own scores: the same map of the log-odds
        energies = run.energies(test_idx) if "motion" in calibration else None
        last = outputs_of_log_odds(calibrated_log_odds(last[2], calibration, energies))
    return export, calibration, last


def _calibrate(
    run: FoldRun, model: LRCN, export: LRCN, forward, norm, fit_idx: np.ndarray, notes: list[str],
    share: float = EQUAL_SHARE,
) -> tuple[LRCN, dict]:  # fmt: skip
    """``export`` calibrated on the normal footage of :func:`_normal_log_odds` (see
    :mod:`ddp_vad.train.calibration`), and the record of it."""
    found = _normal_log_odds(run, model, export, forward, norm, fit_idx, notes)
    if found is None:
        notes.append("not calibrated: no normal window to calibrate on")
        return export, {"source": "none"}
    return calibrate_from_log_odds(export, *found, share)


def _normal_log_odds(
    run: FoldRun, model: LRCN, export: LRCN, forward, norm, fit_idx: np.ndarray, notes: list[str]
) -> tuple[np.ndarray, str, np.ndarray | None] | None:
    """(log-odds, source, log motion energies or None without a prior) of the normal windows a fold model is
    calibrated on: the run's normal footage, or, for shards without train clips, up to REFERENCE_WINDOWS of the
    fold's own normal training windows (noted). None when there is none. Where the frozen part's output of the
    footage was computed once for every fold (``reference_cache``), only the trained part runs on it."""
    acc = run.accelerator
    if run.reference_cache is not None:
        x = run.reference_cache if norm is None else (run.reference_cache.to(norm[0].device) - norm[0]) / norm[1]
        d = predict(model, forward, lambda idx: x[torch.from_numpy(idx).to(x.device)].to(acc.device),
                    np.arange(len(x)), acc.autocast)[2]  # fmt: skip
        return d, "train clips", run.reference_energies
    reference, source, energies = run.reference, "train clips", run.reference_energies
    if reference is None:
        normal = fit_idx[run.cv.labels[fit_idx] == 0]
        pick = np.sort(np.random.default_rng([abs(run.cfg.seed), 0xCA1B]).permutation(normal)[:REFERENCE_WINDOWS])
        reference, source = run.ws.frames[pick], "the fold's normal training windows"
        energies = run.energies(pick) if export.prior is not None else None  # cached: other folds score them too
        notes.append(f"calibrated on {source}: the shards hold no train clips")
    if not len(reference):
        return None
    frames_in = lambda idx: frames_to_float(torch.from_numpy(reference[idx]).to(acc.device))  # noqa: E731
    d = predict(export, export, frames_in, np.arange(len(reference)), acc.autocast)[2]
    return d, source, energies


def _fold_model(run: FoldRun, k: int, resume_state: dict | None) -> tuple:
    """Fold ``k``'s classifier, optimizer and GradScaler (or None), and (first epoch, history, best epoch) where a
    checkpoint left them."""
    cfg, device = run.cfg, run.accelerator.device
    model, optimizer, scaler = new_model(run, fold_seed(cfg.seed, k))
    start = (0, [], {})
    if resume_state is not None:
        start = (*_restore(resume_state, model, optimizer, scaler, device), resume_state.get("best") or {})
    return model, optimizer, scaler, start


def _validate(run: FoldRun, model, forward, get_inputs, val_idx, epoch: int, best: dict, writer) -> tuple[dict, dict]:
    """Model selection (--val-clips): AUROC on the inner validation clips after ``epoch`` (the history record) and
    the best epoch so far, with its weights. Strictly better only: ties keep the earlier epoch; an undefined AUROC
    never replaces one."""
    if not val_idx.size:
        return {}, best
    val_scores = predict(model, forward, get_inputs, val_idx, run.accelerator.autocast)[0]
    val_auroc = auroc(run.cv.labels[val_idx], val_scores)
    writer.add_scalar("validation/auroc", math.nan if val_auroc is None else val_auroc, epoch)
    if not best or (val_auroc is not None and (best["auroc"] is None or val_auroc > best["auroc"])):
        best = {"epoch": epoch, "auroc": val_auroc,
                "model": {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}}  # fmt: skip
    return {"val_auroc": val_auroc}, best


def _prior_share(run: FoldRun, k: int, fit_idx: np.ndarray, notes: list[str]) -> tuple[float, dict | None]:
    """The motion prior's share for fold ``k`` (:mod:`ddp_vad.train.prior_share`): the asked number, or with
    ``--prior-share nested`` the one chosen on inner folds of its training windows ``fit_idx`` (and the record of
    the choice). Without a prior on the model the share is unused."""
    asked = getattr(run.cfg, "prior_share", EQUAL_SHARE)
    if asked != NESTED or not run.model_cfg.motion_prior:
        return (EQUAL_SHARE if asked == NESTED else float(asked)), None
    splits = inner_splits(run.cv, fit_idx, run.cfg.seed, k)
    if not splits:
        notes.append(f"fold {k}: prior share {EQUAL_SHARE}: its training clips cannot make {INNER_FOLDS} inner folds "
                     "with both classes")  # fmt: skip
        return EQUAL_SHARE, None
    parts = [_inner_z_scores(run, k, i, fit, scored) for i, (fit, scored) in enumerate(splits)]
    if any(p is None for p in parts):
        notes.append(f"fold {k}: prior share {EQUAL_SHARE}: no normal window to standardise the inner folds on")
        return EQUAL_SHARE, None
    scored = np.concatenate([s for _, s in splits])
    z_classifier, z_motion = (np.concatenate([p[j] for p in parts]) for j in (0, 1))
    share, aurocs = choose_share(run.cv, scored, z_classifier, z_motion, run.ws.frame_labels[scored])
    return share, {"inner_folds": INNER_FOLDS, "scored_windows": int(scored.size), "shares": list(PRIOR_SHARES),
                   "frame_auroc": aurocs}  # fmt: skip


def _inner_z_scores(run: FoldRun, k: int, i: int, fit_idx: np.ndarray, scored: np.ndarray) -> tuple | None:
    """Inner fold ``i`` of fold ``k``: a model trained the fold's way (same epochs, batch, class weights, options) on
    ``fit_idx``, then the classifier's and the motion energy's normal-footage z-scores of the windows ``scored``
    (None without normal footage to standardise on)."""
    cfg = run.cfg
    model, optimizer, scaler = new_model(run, fold_seed(cfg.seed, INNER_SEED_BASE * (i + 1) + k))
    get_inputs, norm = input_fn(run, model, fit_idx)
    forward = trainable_forward(model, cfg.train)
    weight = loss_weight(run, fit_idx)
    for epoch in range(1, cfg.epochs + 1):
        order = fit_idx[np.random.default_rng([abs(cfg.seed), k, epoch, INNER_SEED_BASE + i]).permutation(fit_idx.size)]
        train_epoch(run, k, epoch, order, model, forward, get_inputs, optimizer, scaler, weight)
    export = model if norm is None else fold_standardization_into_head(model, *norm)
    found = _normal_log_odds(run, model, export, forward, norm, fit_idx, [])
    if found is None or found[2] is None:
        return None
    record = calibration_record(*found)  # only the normal mean and spreads: no calibrated copy of the model
    d = predict(model, forward, get_inputs, scored, run.accelerator.autocast)[2]
    motion = record["motion"]
    energies = run.energies(scored)
    return (d - record["mean"]) / record["spread"], (energies - motion["mean"]) / motion["spread"]
