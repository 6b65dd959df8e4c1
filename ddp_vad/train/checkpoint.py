"""Resumable training state: GAN steps (accelerate ``save_state`` folders that appear atomically, retention, resume
lookup) and transfer folds (one file per fold and epoch, see the bottom of this module).

A checkpoint is ``RUN/checkpoints/step_0001000/``: accelerate's files (models, optimizer and RNG states, all loaded
with ``weights_only=True``) plus ``train_state.json`` (step, per-rank data-stream positions, model config).

Models are written with ``torch.save`` (``pytorch_model*.bin``), not safetensors: on CUDA, cuDNN packs an LSTM's
weights into one flat buffer and the parameters become views of it. safetensors refuses views of a shared storage:
accelerate's save drops all but one of them (with a warning) and its load fails ("None is covering the entire
storage"), so a GPU run could not resume. ``torch.save`` stores the shared buffer once and ``load_state_dict`` copies
into the packed parameters; accelerate loads the file with ``weights_only=True``, so no pickled code runs. Exported
weights (``generator.safetensors`` ...) stay safetensors: :func:`ddp_vad.models.save_model` writes each tensor on its
own and they load into a freshly built (not yet packed) model.

Every process writes into a hidden ``.tmp-step_...`` folder; once all are done the main process adds
``train_state.json`` and renames the folder. A ``kill -9`` mid-save therefore leaves only a hidden temp folder, which
resume ignores and the next run removes. No custom pickled objects are used (accelerate would load those with
``weights_only=False``). Several nodes need RUN on a shared filesystem (as accelerate's own checkpoints do).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ddp_vad.errors import UserError
from ddp_vad.files import atomic_path, write_json_atomic

STATE_FILE = "train_state.json"
_NAME = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:07d}"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first (temp folders are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_partial(ckpt_dir: str | Path) -> list[Path]:
    """Delete temp folders left by an interrupted save (main process only); returns what was removed."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """Which checkpoint to load for ``--resume``: ``auto`` (latest if any, else none), ``latest`` (must exist),
    ``none`` (fresh start; refused when ``ckpt_dir`` already holds checkpoints, so nothing is overwritten),
    or the path of a checkpoint folder."""
    existing = list_checkpoints(ckpt_dir)
    if resume == "auto":
        return existing[-1][1] if existing else None
    if resume == "latest":
        if not existing:
            raise UserError(f"--resume latest: no checkpoint in {ckpt_dir}")
        return existing[-1][1]
    if resume == "none":
        if existing:
            raise UserError(
                f"{ckpt_dir} already holds checkpoints (latest {existing[-1][1].name}); use --resume auto to "
                "continue that run or choose another --out"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume: checkpoint folder not found: {path}")
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume: {path} is not a complete ddp_vad checkpoint (no {STATE_FILE})")
    return path


def read_train_state(path: str | Path) -> dict:
    """The ``train_state.json`` of a checkpoint folder."""
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {file}: {exc}") from None


def save_checkpoint(accelerator, ckpt_dir: str | Path, step: int, train_state: dict, keep: int) -> Path:
    """Save accelerate's state plus ``train_state`` as ``ckpt_dir/step_XXXXXXX`` atomically; keep the newest
    ``keep`` checkpoints. Every process must call this (each writes its RNG state)."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)  # see the module docstring (cuDNN-packed LSTM)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, {"step": step, **train_state})
        if final.exists():  # e.g. a run resumed from an earlier checkpoint re-reaches this step
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------- fold checkpoints
# A fold of ``transfer`` trains alone on one process, outside accelerate's state: its checkpoint is one file,
# ``RUN/checkpoints/fold_XX/epoch_XXXX.pt`` (model, optimizer, RNG state, history), holding plain tensors and types
# only so that it loads with ``weights_only=True``.
FOLD_CHECKPOINT_FORMAT = "ddp_vad-transfer-checkpoint/1"


def list_fold_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Fold checkpoints in ``ckpt_dir`` as (epoch, path), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.glob("epoch_*.pt"):
        stem = p.stem.removeprefix("epoch_")
        if stem.isdigit():
            found.append((int(stem), p))
    return sorted(found)


def save_fold_checkpoint(ckpt_dir: str | Path, epoch: int, state: dict) -> Path:
    """Write ``ckpt_dir/epoch_XXXX.pt`` atomically and remove the older ones."""
    path = Path(ckpt_dir) / f"epoch_{epoch:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"format": FOLD_CHECKPOINT_FORMAT, **state}, tmp)
    for e, old in list_fold_checkpoints(ckpt_dir):
        if e < epoch:
            old.unlink(missing_ok=True)
    return path


def load_fold_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_fold_checkpoint` (no pickled objects: ``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: say which one
        raise UserError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FOLD_CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a ddp_vad transfer checkpoint")
    return state


def remove_partial_fold_saves(ckpt_dir: str | Path) -> None:
    """Delete temp files left by a kill during a fold checkpoint save."""
    ckpt_dir = Path(ckpt_dir)
    for tmp in ckpt_dir.glob(".*.tmp.pt") if ckpt_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)
