"""Config files (TOML or YAML, keys = CLI option names), JSON-ready values and resolved-config writing."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ddp_vad.errors import UserError
from ddp_vad.files import write_json_atomic


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML or YAML file into a flat dict with keys normalised to python names (``a-b`` -> ``a_b``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot parse config file {path}: {first_line}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and numpy values -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def hparams_values(config: dict) -> dict:
    """A config as TensorBoard HParams values: numbers, strings and booleans as they are, anything else as text."""
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in config.items()}


def write_resolved_config(run_dir: str | os.PathLike, config: Any, extra: dict | None = None) -> Path:
    """Write ``run_dir/config.json`` holding the resolved config (plus ``extra`` sections)."""
    payload = {"config": to_jsonable(config)}
    if extra:
        payload.update(to_jsonable(extra))
    path = Path(run_dir) / "config.json"
    write_json_atomic(path, payload)
    return path
