"""Resumable training state: GAN steps (accelerate ``save_state`` folders that appear atomically, retention, resume
lookup) and transfer folds (one file per fold and epoch, see the bottom of this module).

A checkpoint is ``RUN/checkpoints/step_0001000/``: accelerate's files (models, optimizer and RNG states, all loaded
with ``weights_only=True``) plus ``train_state.json`` (step, per-rank data-stream positions, model config).

Models are written with ``torch.save`` (``pytorch_model*.bin``), not safetensors: on CUDA, cuDNN packs an LSTM's
weights into one flat buffer and the parameters become views of it. safetensors refuses views of a shared storage:
accelerate's save drops all but one of them (with a warning) and its load fails ("None is covering the entire
storage"), so a GPU run could not resume. ``torch.save`` stores the shared buffer once and ``load_state_dict`` copies
into the packed parameters; accelerate loads the file with ``weights_only=True``, so no pickled code runs. Exported
weights (``generator.safetensors`` ...) stay safetensors: :func:`ddp_vad.weights.save_model` writes each tensor on its
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

from ddp_vad.errors import UserError, os_error_message
from ddp_vad.files import atomic_path, sha256_file, swap_in, write_json_atomic
from ddp_vad.train.distributed import all_gather_objects, object_group
from ddp_vad.warn import warn

STATE_FILE = "train_state.json"
_NAME = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_LEGACY_FILES = ("pytorch_model.bin", "pytorch_model_1.bin", "optimizer.bin", "optimizer_1.bin")  # G, D and their Adams


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
    """Which checkpoint to load for ``--resume`` (call on the main process only):

    ``auto`` (the newest intact one, if any), ``latest`` (the newest intact one; must exist), ``none`` (fresh start;
    refused when ``ckpt_dir`` already holds checkpoints, so nothing is overwritten), or the path of a checkpoint
    folder. A damaged newer checkpoint is set aside as ``step_XXXXXXX.damaged`` with a warning and the next older one
    is tried; when none is usable nothing is moved and the run stops (exit 2).
    """
    existing = list_checkpoints(ckpt_dir)
    if resume in ("auto", "latest"):
        if not existing:
            if resume == "latest":
                raise UserError(f"--resume latest: no checkpoint in {ckpt_dir}")
            return None
        problems = [(path, checkpoint_problem(path)) for _, path in reversed(existing)]
        usable = next((i for i, (_, problem) in enumerate(problems) if problem is None), None)
        if usable is None:
            listing = "; ".join(f"{p.name}: {problem}" for p, problem in problems)
            raise UserError(
                f"no usable checkpoint in {ckpt_dir} ({listing}); move them away to start afresh, or choose "
                "another --out"
            )
        for path, problem in problems[:usable]:  # set aside so retention never keeps them over intact ones
            aside = path.with_name(path.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            warn(
                f"{path}: damaged checkpoint ({problem}); moved to {aside.name}, resuming from the older "
                f"{problems[usable][0].name}"
            )
        return problems[usable][0]
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
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"--resume: checkpoint {path} is damaged ({problem})")
    return path


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing, truncated or changed file), or None.

    Checkpoints list their files with size and sha256 in ``train_state.json``; older ones (without the list) need
    their model and optimizer files, each of which must load (``weights_only``).
    """
    path = Path(path)
    try:
        state = read_train_state(path)
    except UserError as exc:
        return str(exc)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} holds no step"
    files = state.get("files")
    if isinstance(files, dict):
        for name, meta in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != meta.get("bytes") or sha256_file(file) != meta.get("sha256"):
                return f"{name} is truncated or changed (size or sha256 differs from {STATE_FILE})"
        return None
    for name in _LEGACY_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        try:
            torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
            return f"{name} cannot be read ({type(exc).__name__})"
    return None


def read_train_state(path: str | Path) -> dict:
    """The ``train_state.json`` of a checkpoint folder."""
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {file}: {exc}") from None


def _file_list(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file accelerate wrote (what :func:`checkpoint_problem` checks on resume)."""
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }


def _agree_or_clean(accelerator, error: str | None, tmp: Path, step: int, ckpt_dir: Path) -> None:
    """Stop every process when any failed to write its part; the main process first removes the staging folder,
    so a full disk is not filled further and the previous checkpoints stay as they were."""
    world = accelerator.num_processes
    errors = [e for e in all_gather_objects(error, object_group(world), world) if e]
    if not errors:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = list_checkpoints(ckpt_dir)
    previous = f"{kept[-1][1].name} is kept" if kept else "no earlier checkpoint exists"
    raise UserError(f"checkpoint of step {step} not written: {errors[0]}; its staging folder was removed, {previous}")


def save_checkpoint(accelerator, ckpt_dir: str | Path, step: int, train_state: dict, keep: int) -> Path:
    """Save accelerate's state plus ``train_state`` as ``ckpt_dir/step_XXXXXXX`` atomically; keep the newest
    ``keep`` checkpoints. Every process must call this (each writes its RNG state). A failed write (disk full)
    removes the staging folder and stops every process with one message."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f"{_TMP_PREFIX}{final.name}"
    error = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = os_error_message(exc)
    _agree_or_clean(accelerator, error, tmp, step, ckpt_dir)
    try:
        accelerator.save_state(str(tmp), safe_serialization=False)  # see the module docstring (cuDNN-packed LSTM)
    except OSError as exc:
        error = os_error_message(exc)
    _agree_or_clean(accelerator, error, tmp, step, ckpt_dir)
    if accelerator.is_main_process:
        try:
            write_json_atomic(tmp / STATE_FILE, {"step": step, **train_state, "files": _file_list(tmp)})
            swap_in(tmp, final)  # an existing one (a resumed run re-reaches this step) goes once the new one is in
        except OSError as exc:
            error = os_error_message(exc)
    _agree_or_clean(accelerator, error, tmp, step, ckpt_dir)
    if accelerator.is_main_process:
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
