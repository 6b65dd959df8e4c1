"""What a transfer run folder already holds, and whether it may be reused.

Per fold: ``RUN/folds/fold_XX/result.json`` (finished) or ``RUN/checkpoints/fold_XX/epoch_*.pt`` (resumable). Every
file carries the run's *fingerprint* (everything a fold's numbers depend on); files of a run with another
fingerprint are refused with the differing settings named, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ddp_vad.errors import UserError
from ddp_vad.files import file_record, read_json_object, sha256_file, write_json_atomic
from ddp_vad.models import ModelConfig
from ddp_vad.runfiles import (
    MODEL_RECORD,
    RESULT_FILE,
    config_file,
    fold_checkpoint_dir,
    fold_dir,
    fold_model_file,
    fold_result_file,
)
from ddp_vad.train.checkpoint import list_fold_checkpoints, load_fold_checkpoint, remove_partial_fold_saves
from ddp_vad.train.classifier import RANDOM, SCRATCH, discriminator_file
from ddp_vad.warn import warn
from ddp_vad.weights import save_model

FINGERPRINT_KEYS = ("train", "protocol", "epochs", "batch_size", "lr", "seed", "holdout_type", "labelled_fraction")
# Training levers: in a fingerprint only where they differ from training before the levers existed (plain CE, no
# augmentation, ...), so such runs still resume, and runs that differ in them are refused.
LEVER_DEFAULTS = {
    "augment": "none",
    "class_weight": "none",
    "val_clips": 0,
    "weight_decay": 0.0,
    "calibrate": "none",
    "normal_footage": "none",
}


def fingerprint(cfg: Any, manifest: dict, model_cfg: ModelConfig, mixed_precision: str) -> dict:
    """Everything a fold's numbers depend on (``cfg`` is the transfer config)."""
    shards = hashlib.sha256("".join(s.get("sha256", s["name"]) for s in manifest["shards"]).encode()).hexdigest()
    source = cfg.source if cfg.source in (SCRATCH, RANDOM) else f"sha256:{sha256_file(discriminator_file(cfg.source))}"
    return {
        "shards": shards,
        "source": source,
        "model": model_cfg.to_dict(),
        **{k: getattr(cfg, k) for k in FINGERPRINT_KEYS},
        **{k: getattr(cfg, k, d) for k, d in LEVER_DEFAULTS.items() if getattr(cfg, k, d) != d},
        "standardize": bool(cfg.standardize and cfg.train == "head"),
        "mixed_precision": mixed_precision,
    }


def differences(new: dict, old: dict) -> str:
    """The settings in which two fingerprints differ, as ``key: old -> new`` (long values only named)."""
    keys = [k for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)]
    brief = ("model", "shards", "source")
    return ", ".join(k if k in brief else f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def fold_status(run_dir: Path, k: int, fp: dict) -> tuple[str, Any, str | None]:
    """("done", result) / ("resume", checkpoint state) / ("new", None) for fold ``k``, plus an error message."""
    result_path = fold_dir(run_dir, k) / RESULT_FILE
    if result_path.is_file():
        try:
            result = read_json_object(result_path, "fold result")
        except UserError as exc:
            return "new", None, str(exc)
        if result.get("fingerprint") != fp:
            diff = differences(fp, result.get("fingerprint") or {})
            return "new", None, f"{result_path} was made with other settings ({diff}); use another --out"
        return "done", result, None
    ckpt_dir = fold_checkpoint_dir(run_dir, k)
    remove_partial_fold_saves(ckpt_dir)
    ckpts = list_fold_checkpoints(ckpt_dir)
    if not ckpts:
        return "new", None, None
    try:
        state = load_fold_checkpoint(ckpts[-1][1])
        old = json.loads(state["fingerprint"])
    except (UserError, KeyError, TypeError, ValueError) as exc:
        # Only the newest epoch is kept, so there is nothing older to fall back to: the fold starts again.
        aside = ckpts[-1][1].with_name(ckpts[-1][1].name + ".damaged")
        ckpts[-1][1].replace(aside)
        reason = str(exc) if isinstance(exc, UserError) else f"no fingerprint ({type(exc).__name__})"
        warn(
            f"{ckpts[-1][1]}: fold {k}: damaged checkpoint ({reason}); moved to {aside.name}, the fold restarts "
            "from epoch 0"
        )
        return "new", None, None
    if old != fp:
        diff = differences(fp, old)
        return "new", None, f"{ckpts[-1][1]} was made with other settings ({diff}); use another --out"
    return "resume", state, None


def save_finished_fold(run_dir: Path, k: int, module: Any, model_cfg: ModelConfig, result: dict) -> dict:
    """Write fold ``k``'s model, then its ``result.json`` with the model's size and sha256 (what loading checks,
    :mod:`ddp_vad.infer.model_files`); the result file goes last: its presence marks the fold finished. Returns the
    result as written."""
    model = save_model(module, fold_model_file(run_dir, k), model_cfg, kind="classifier")
    result = {**result, MODEL_RECORD: file_record(model)}
    write_json_atomic(fold_result_file(run_dir, k), result)
    return result


def run_level_error(resume: str, run_dir: Path, fp: dict) -> str | None:
    """Why ``run_dir`` may not take this run (another stage's or another setting's files), or None."""
    if resume == "none" and run_dir.is_dir() and any(run_dir.iterdir()):
        return f"--out {run_dir} is not empty: use --resume auto to continue that run, or choose another --out"
    config_path = config_file(run_dir)
    if config_path.is_file():
        try:
            old = read_json_object(config_path, "run config")
        except UserError:
            return f"cannot parse {config_path}: choose another --out"
        if old.get("stage") != "transfer":
            return f"--out {run_dir} holds another kind of run ({config_path}); choose another --out"
        if old.get("fingerprint") != fp:
            diff = differences(fp, old.get("fingerprint") or {})
            return f"--out {run_dir} holds a transfer run with other settings ({diff}); choose another --out"
    return None
