"""ddp_vad: distributed training toolkit for video anomaly detection.

The public Python API (docs/api.md) is this package's top level: :class:`Detector` scores frames, videos and live
streams with a trained run; the stage functions (:func:`build_shards`, :func:`pretrain`, :func:`transfer`,
:func:`baselines`, :func:`evaluate`, :func:`run_pipeline`, :func:`predict`, :func:`export_model`, :func:`synth`) take
their config dataclasses (re-exported here) and return what they wrote. The CLI is a thin shell over them.

Names are imported when first used (module ``__getattr__``), so ``import ddp_vad`` does not import torch.

The package follows the data (docs/architecture.md): ``data/`` reads clips (``sources/``), cuts and labels windows
and writes/reads shards; ``train/`` pretrains the GAN and fine-tunes the classifier fold-parallel; ``eval/`` runs the
baselines and the report; ``infer/`` is everything after training (detector, scorers, threshold, export, predict);
``cli.py`` parses options declared once in the stages' configs (``options.py``), ``pipeline.py`` chains the stages,
``models.py`` and ``presets.py`` hold the networks and sizes. Packages import downwards only (tests/test_imports.py).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Detector": "ddp_vad.infer.detector",
    "FrameScore": "ddp_vad.infer.detector",
    "StreamBroken": "ddp_vad.infer.live",
    "Events": "ddp_vad.infer.events",
    "Webhook": "ddp_vad.infer.webhook",
    "synth": "ddp_vad.api",
    "build_shards": "ddp_vad.api",
    "pretrain": "ddp_vad.api",
    "transfer": "ddp_vad.api",
    "baselines": "ddp_vad.api",
    "evaluate": "ddp_vad.api",
    "run_pipeline": "ddp_vad.api",
    "predict": "ddp_vad.api",
    "export_model": "ddp_vad.api",
    "SynthConfig": "ddp_vad.data.synth",
    "ShardConfig": "ddp_vad.data.plan",
    "PretrainConfig": "ddp_vad.train.pretrain",
    "TransferConfig": "ddp_vad.train.transfer",
    "BaselinesConfig": "ddp_vad.eval.baselines",
    "EvaluateConfig": "ddp_vad.eval.report",
    "PipelineConfig": "ddp_vad.pipeline",
    "PredictConfig": "ddp_vad.infer.predict",
    "ExportConfig": "ddp_vad.infer.export",
    "UserError": "ddp_vad.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ddp_vad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
