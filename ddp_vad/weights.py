"""Model files: a module's weights as safetensors with its :class:`~ddp_vad.models.ModelConfig` in the file's
metadata, so weights load without guessing the architecture and without executing a pickle; loading refuses a
file whose weights do not match the stored config or hold NaN/inf.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ddp_vad.errors import UserError
from ddp_vad.files import atomic_path
from ddp_vad.models import (
    DISCRIMINATOR_FILE,
    GENERATOR_FILE,
    LRCN,
    Generator,
    ModelConfig,
    build_generator,
    build_lrcn,
)

_META_KEY = "ddp_vad_model_config"


def save_model(
    module: nn.Module, path: str | Path, cfg: ModelConfig, kind: str | None = None, extra: dict | None = None
) -> Path:
    """Write ``module``'s state dict to ``path`` (safetensors) with ``cfg`` as JSON in the file's metadata (and
    ``extra``, e.g. how a discriminator was pretrained, as JSON under ``extra``: loaders ignore it).

    Written to a temp name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {_META_KEY: json.dumps(cfg.to_dict()), "kind": kind or type(module).__name__.lower()}
    if extra:
        meta["extra"] = json.dumps(extra, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in a safetensors file written by :func:`save_model` (no pickle involved)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"cannot read {path} as safetensors: {exc}") from None
    if _META_KEY not in meta:
        raise UserError(f"{path} holds no ddp_vad model config (not written by ddp_vad?)")
    try:
        data = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: its model config metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: its model config metadata is not a JSON object")
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:  # a value of the wrong type in a hand-edited file
        raise UserError(f"{path}: bad model config metadata: {exc}") from None


def load_model(path: str | Path, build) -> tuple[nn.Module, ModelConfig]:
    """Build a module with ``build(cfg)`` from the config in ``path`` and load its weights (strict), in eval mode."""
    cfg = load_model_config(path)
    module = build(cfg)
    try:
        tensors = load_file(str(path))
        module.load_state_dict(tensors, strict=True)
    except Exception as exc:  # noqa: BLE001 - a mismatch (RuntimeError) or damaged tensors (SafetensorError)
        raise UserError(f"{path}: weights do not match the stored model config: {str(exc).splitlines()[0]}") from None
    # A NaN or inf weight (damaged bytes, a diverged run) would score every input NaN: never "not anomalous".
    bad = next((name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise UserError(f"{path}: weight {bad} holds NaN or inf values (a damaged or diverged model)")
    return module.eval(), cfg


def _model_path(run_or_file: str | Path, name: str) -> Path:
    p = Path(run_or_file)
    return p if p.suffix == ".safetensors" else p / name


def load_generator(run_dir: str | Path) -> tuple[Generator, ModelConfig]:
    """The generator exported by a pretrain run (``RUN/generator.safetensors`` or that file's path)."""
    return load_model(_model_path(run_dir, GENERATOR_FILE), build_generator)


def load_discriminator(run_dir: str | Path) -> tuple[LRCN, ModelConfig]:
    """The discriminator LRCN exported by a pretrain run (``RUN/discriminator.safetensors`` or that file's path)."""
    return load_model(_model_path(run_dir, DISCRIMINATOR_FILE), build_lrcn)
