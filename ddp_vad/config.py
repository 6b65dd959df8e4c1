"""Config files (TOML or YAML, keys = CLI option names), TensorBoard HParams values and resolved-config writing."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import yaml

from ddp_vad.errors import UserError
from ddp_vad.files import to_jsonable, write_json_atomic
from ddp_vad.runfiles import config_file


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


def hparams_values(config: dict) -> dict:
    """A config as TensorBoard HParams values: numbers, strings and booleans as they are, anything else as text."""
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in config.items()}


def write_resolved_config(run_dir: str | os.PathLike, config: Any, extra: dict | None = None) -> Path:
    """Write ``run_dir/config.json`` holding the resolved config (plus ``extra`` sections)."""
    payload = {"config": to_jsonable(config)}
    if extra:
        payload.update(to_jsonable(extra))
    path = config_file(run_dir)
    write_json_atomic(path, payload)
    return path
