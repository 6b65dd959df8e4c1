"""Where a run folder keeps its files: the one place their names are spelled (docs/run-folders.md).

A cross-validated run (``transfer``, ``baselines/<method>``) holds ``config.json`` (the resolved config),
``oof_scores.csv`` (every window's out-of-fold score), ``metrics.json`` (written last: its presence marks the run
complete) and, for ``transfer``, per fold ``folds/fold_XX/model.safetensors`` + ``result.json`` (resumable epochs
in ``checkpoints/fold_XX/``, curves in ``tb/fold_XX/``) and the decision threshold ``threshold.json``. A fold's
``result.json`` records its model's size and sha256 under :data:`MODEL_RECORD` (written by the process that wrote
the model, so a run resumed fold by fold keeps every record); loading checks them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
OOF_FILE = "oof_scores.csv"
THRESHOLD_FILE = "threshold.json"
MODEL_FILE = "model.safetensors"
RESULT_FILE = "result.json"
FOLDS_DIR = "folds"
CHECKPOINTS_DIR = "checkpoints"
TB_DIR = "tb"
MODEL_RECORD = "model_file"  # result.json key: {"bytes", "sha256"} of the fold's model.safetensors
FOLD_MODEL_PATTERN = f"{FOLDS_DIR}/fold_XX/{MODEL_FILE}"  # how messages name a fold model
_FOLD_NAME = re.compile(r"fold_(\d+)")


def fold_name(fold: int) -> str:
    """``fold_XX`` (the per-fold folder name under tb/, checkpoints/ and folds/)."""
    return f"fold_{fold:02d}"


def fold_number(name: str) -> int | None:
    """The fold of a ``fold_XX`` folder name; None for any other name."""
    match = _FOLD_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def config_file(run: str | os.PathLike) -> Path:
    """``RUN/config.json``: the resolved config the run was made with."""
    return Path(run) / CONFIG_FILE


def metrics_file(run: str | os.PathLike) -> Path:
    """``RUN/metrics.json``: per-fold metrics and their summary (a complete cross-validated run has one)."""
    return Path(run) / METRICS_FILE


def oof_file(run: str | os.PathLike) -> Path:
    """``RUN/oof_scores.csv``: every labelled window's out-of-fold score."""
    return Path(run) / OOF_FILE


def threshold_file(run: str | os.PathLike) -> Path:
    """``RUN/threshold.json``: the decision thresholds chosen on the out-of-fold scores."""
    return Path(run) / THRESHOLD_FILE


def fold_dir(run: str | os.PathLike, fold: int) -> Path:
    """``RUN/folds/fold_XX/``: a finished fold's model and result."""
    return Path(run) / FOLDS_DIR / fold_name(fold)


def fold_model_file(run: str | os.PathLike, fold: int) -> Path:
    """``RUN/folds/fold_XX/model.safetensors``: a finished fold's classifier."""
    return fold_dir(run, fold) / MODEL_FILE


def fold_result_file(run: str | os.PathLike, fold: int) -> Path:
    """``RUN/folds/fold_XX/result.json``: a finished fold's metrics, scores and model record (written last)."""
    return fold_dir(run, fold) / RESULT_FILE


def fold_checkpoint_dir(run: str | os.PathLike, fold: int) -> Path:
    """``RUN/checkpoints/fold_XX/``: a fold's resumable epochs."""
    return Path(run) / CHECKPOINTS_DIR / fold_name(fold)


def fold_tb_dir(run: str | os.PathLike, fold: int) -> Path:
    """``RUN/tb/fold_XX/``: a fold's TensorBoard curves."""
    return Path(run) / TB_DIR / fold_name(fold)


def fold_models(run: str | os.PathLike) -> list[Path]:
    """Every ``RUN/folds/fold_XX/model.safetensors`` there is, in fold order."""
    return sorted(Path(run).glob(f"{FOLDS_DIR}/fold_*/{MODEL_FILE}"))


def run_of_fold_model(model: str | os.PathLike) -> tuple[Path, int] | None:
    """(run folder, fold) of a path ``RUN/folds/fold_XX/<file>``; None for a file elsewhere."""
    model = Path(model)
    fold = fold_number(model.parent.name)
    if fold is None or len(model.parents) < 3:
        return None
    return model.parents[2], fold
