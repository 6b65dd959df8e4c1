"""Which fold model files a transfer run's detector is made of, each checked against what the run recorded.

A transfer run writes, per fold, ``folds/fold_XX/model.safetensors`` and then ``result.json`` holding the model's
size and sha256 (:data:`ddp_vad.runfiles.MODEL_RECORD`) and the run's fingerprint; ``config.json`` says how many
fold models the run has (``n_folds`` x ``repeats``). Loading a run therefore refuses, naming the file:

* a model whose size or sha256 differs from its record (changed, truncated, swapped for another run's);
* a fold without its model, or without its ``result.json`` (an unfinished fold): the ensemble would silently
  be one model short;
* a fold folder the run does not have (``fold_05`` of a 3-fold run), or a fold whose ``result.json`` carries
  another run's fingerprint (copied in).

Runs written before the record (``result.json`` without it) load with one warning line saying their models are
unchecked; so does a folder without ``config.json`` (not written by ``ddp_vad transfer``).
"""

from __future__ import annotations

from pathlib import Path

from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object, record_problem
from ddp_vad.runfiles import (
    CONFIG_FILE,
    FOLD_MODEL_PATTERN,
    MODEL_RECORD,
    RESULT_FILE,
    config_file,
    fold_model_file,
    fold_models,
    fold_name,
    fold_number,
    fold_result_file,
    run_of_fold_model,
)
from ddp_vad.warn import warn


def model_files(run: str | Path, fold: int | None = None) -> list[Path]:
    """The per-fold classifier weights of a transfer run (``RUN/folds/fold_XX/model.safetensors``, see
    :mod:`ddp_vad.runfiles`; ``fold`` keeps one), or the one ``.safetensors`` file given, each checked against the
    run's records (see the module docstring); a mismatch is a :class:`UserError` naming the file."""
    run = Path(run)
    if run.suffix == ".safetensors":
        return [_one_file(run, fold)]
    if not run.is_dir():
        raise UserError(f"model run folder not found: {run}")
    found = fold_models(run)
    if not config_file(run).is_file() or not found:
        files = found if fold is None else [f for f in found if f == fold_model_file(run, fold)]
        if not files:
            which = f"fold {fold} " if fold is not None else ""
            raise UserError(
                f"no {which}classifier weights ({FOLD_MODEL_PATTERN}) in {run}; give a finished `ddp_vad transfer` run"
            )
        warn(f"{run}: no {CONFIG_FILE} (not written by `ddp_vad transfer`?): {len(files)} fold model(s) unchecked")
        return files
    units, fingerprint = _run_shape(run)
    for f in found:
        k = fold_number(f.parent.name)
        if k is None or k >= units:
            raise UserError(f"{f}: not one of this run's {units} fold models (fold_00..{fold_name(units - 1)}, "
                            f"{CONFIG_FILE}): copied in from another run?")  # fmt: skip
    if fold is not None and not 0 <= fold < units:
        raise UserError(f"no fold {fold} in {run}: it has fold models 0..{units - 1}")
    wanted = range(units) if fold is None else [fold]
    unchecked = [k for k in wanted if not _check_fold(run, k, fingerprint)]
    if unchecked:
        warn(f"{run}: fold model(s) {', '.join(map(str, unchecked))} have no size/sha256 record (a run written "
             "before ddp_vad recorded them): loaded unchecked")  # fmt: skip
    return [fold_model_file(run, k) for k in wanted]


def _one_file(path: Path, fold: int | None) -> Path:
    """A ``.safetensors`` file: checked against its run's record when it is a fold model inside a run."""
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    owner = run_of_fold_model(path)
    if owner is None or path.name != fold_model_file(*owner).name or not config_file(owner[0]).is_file():
        if fold is not None:
            raise UserError(f"fold={fold}: {path} is one model file, not a run folder; give the run to pick a fold")
        return path  # a lone model file: no record to check it against
    run, k = owner
    if fold is not None and fold != k:
        raise UserError(f"fold={fold}: {path} is fold {k}'s model")
    units, fingerprint = _run_shape(run)
    if k >= units:
        raise UserError(f"{path}: not one of this run's {units} fold models ({CONFIG_FILE})")
    if not _check_fold(run, k, fingerprint):
        warn(f"{path}: no size/sha256 record (a run written before ddp_vad recorded them): loaded unchecked")
    return path


def _run_shape(run: Path) -> tuple[int, dict | None]:
    """(number of fold models, fingerprint) from the run's ``config.json``."""
    path = config_file(run)
    config = read_json_object(path, "run config")
    n_folds, repeats = config.get("n_folds"), config.get("repeats", 1)
    if config.get("stage") != "transfer" or not isinstance(n_folds, int) or not isinstance(repeats, int):
        raise UserError(f"{path}: not a transfer run's config (no stage 'transfer' with n_folds and repeats)")
    fingerprint = config.get("fingerprint")
    return n_folds * repeats, fingerprint if isinstance(fingerprint, dict) else None


def _check_fold(run: Path, k: int, fingerprint: dict | None) -> bool:
    """Check fold ``k``'s model against its ``result.json``: True when its record matched, False when the result
    has no record (an older run); a mismatch, a missing model or result is a UserError naming the file."""
    model, result_path = fold_model_file(run, k), fold_result_file(run, k)
    if not result_path.is_file():
        if model.is_file():
            raise UserError(f"{model}: fold {k} has no {RESULT_FILE} (an unfinished fold, or a model copied in); "
                            "finish the run with `ddp_vad transfer --resume auto`")  # fmt: skip
        raise UserError(f"{run}: fold {k}'s model is missing ({model} and its {RESULT_FILE}); the ensemble needs "
                        "every fold's: finish the run with `ddp_vad transfer --resume auto`")  # fmt: skip
    result = read_json_object(result_path, "fold result")
    if not model.is_file():
        raise UserError(f"{model} is missing (fold {k} finished, see {result_path}); the ensemble needs every fold's")
    if fingerprint is not None and result.get("fingerprint") != fingerprint:
        raise UserError(f"{result_path}: made with other settings than {config_file(run)} (copied in from "
                        "another run?)")  # fmt: skip
    if MODEL_RECORD not in result:
        return False
    problem = record_problem(model, result[MODEL_RECORD])
    if problem is not None:
        raise UserError(f"{model} is not the model this run wrote ({problem}; see {result_path})")
    return True
