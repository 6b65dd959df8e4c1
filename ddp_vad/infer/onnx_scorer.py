"""Scoring with an exported ONNX model (no PyTorch needed): :class:`OnnxScorer` beside the PyTorch scorer of
:mod:`ddp_vad.infer.scoring`, and the JSON sidecar that says how to use the graph (written by
:mod:`ddp_vad.infer.export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.errors import UserError

FORMAT_TAG = "ddp_vad-onnx-1"
INSTALL_HINT = 'pip install "ddp_vad[export]" (onnx + onnxruntime)'


def sidecar_path(model: str | Path) -> Path:
    """The JSON sidecar of an exported model: the same name with ``.json``."""
    return Path(model).with_suffix(".json")


class OnnxScorer:
    """Scores of windows ``[B, T, H, W]`` (uint8 pixels, or floats in [0, 1]) with an exported model."""

    def __init__(self, session: Any):
        self.session = session

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        windows = np.asarray(windows)
        pixels = windows.astype(np.float32) if windows.dtype == np.uint8 else (windows * 255.0).astype(np.float32)
        (score,) = self.session.run(["score"], {"pixels": pixels})
        return score.astype(np.float64)


def load_onnx(path: str | Path, meta: dict | None = None) -> tuple[OnnxScorer, dict]:
    """An :class:`OnnxScorer` for an exported model and its sidecar's contents (``meta`` skips reading it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"scoring an ONNX model needs onnxruntime: {INSTALL_HINT}") from None
    if meta is None:
        side = sidecar_path(path)
        if not side.is_file():
            raise UserError(f"{path}: its sidecar {side.name} (window, frame size, threshold) is missing")
        meta = json.loads(side.read_text())
        if meta.get("format") != FORMAT_TAG:
            raise UserError(f"{side}: not a ddp_vad export sidecar (format {meta.get('format')!r})")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return OnnxScorer(session), meta
