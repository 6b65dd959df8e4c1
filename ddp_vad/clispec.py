"""Which config dataclass declares each stage command's options, and a cached copy of those declarations.

Building the CLI must not import the stages: they import torch (1-2 s) and scikit-learn. ``cli.py`` therefore
answers ``--help`` from ``cli_spec.json``, the :func:`ddp_vad.options.param_specs` of every stage config, and
imports the stage (and builds the options from its live dataclass) only when a command runs. A test checks that
the file equals the live declarations; after changing a config's options regenerate it with
``python -m ddp_vad.clispec``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

SPEC_FILE = Path(__file__).with_name("cli_spec.json")

# command path -> "module:ConfigClass" declaring its options
STAGE_CONFIGS: dict[str, str] = {
    "synth": "ddp_vad.data.synth:SynthConfig",
    "shard build": "ddp_vad.data.plan:ShardConfig",
    "baselines": "ddp_vad.eval.baselines:BaselinesConfig",
    "evaluate": "ddp_vad.eval.report:EvaluateConfig",
    "pretrain": "ddp_vad.train.pretrain:PretrainConfig",
    "predict": "ddp_vad.infer.predict:PredictConfig",
    "export": "ddp_vad.infer.export:ExportConfig",
    "pipeline": "ddp_vad.pipeline:PipelineConfig",
    "transfer": "ddp_vad.train.transfer:TransferConfig",
}


def config_class(command: str) -> type:
    """Import and return the config dataclass of ``command`` (this imports its stage module)."""
    module, name = STAGE_CONFIGS[command].split(":")
    return getattr(importlib.import_module(module), name)


def live_specs() -> dict[str, list[dict[str, Any]]]:
    """The option declarations of every stage command, read from the imported config dataclasses."""
    from ddp_vad.options import param_specs

    return {command: param_specs(config_class(command)) for command in STAGE_CONFIGS}


def cached_specs() -> dict[str, list[dict[str, Any]]]:
    """The declarations stored in ``cli_spec.json`` ({} when the file is missing or unreadable)."""
    try:
        return json.loads(SPEC_FILE.read_text())
    except (OSError, ValueError):
        return {}


def write_spec() -> Path:
    """Regenerate ``cli_spec.json`` from the live config dataclasses."""
    from ddp_vad.files import write_text_atomic

    return write_text_atomic(SPEC_FILE, json.dumps(live_specs(), indent=1) + "\n")


if __name__ == "__main__":
    print(f"wrote {write_spec()}")
