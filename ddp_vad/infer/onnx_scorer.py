"""Scoring with an exported ONNX model (no PyTorch needed): :class:`OnnxScorer` beside the PyTorch scorer of
:mod:`ddp_vad.infer.scoring`, and the JSON sidecar that says how to use the graph (written by
:mod:`ddp_vad.infer.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object, record_problem
from ddp_vad.warn import warn

FORMAT_TAG = "ddp_vad-onnx-1"
INSTALL_HINT = 'pip install "ddp_vad[export]" (onnx + onnxruntime)'


def sidecar_path(model: str | Path) -> Path:
    """The JSON sidecar of an exported model: the same name with ``.json``."""
    return Path(model).with_suffix(".json")


class OnnxScorer:
    """Scores of windows ``[B, T, H, W]`` (uint8 pixels, or floats in [0, 1]) with an exported model."""

    def __init__(self, session: Any, input_name: str = "pixels"):
        self.session, self.input_name = session, input_name

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        windows = np.asarray(windows)
        pixels = windows.astype(np.float32) if windows.dtype == np.uint8 else (windows * 255.0).astype(np.float32)
        (score,) = self.session.run(["score"], {self.input_name: pixels})
        return score.astype(np.float64)


def load_onnx(path: str | Path, meta: dict | None = None) -> tuple[OnnxScorer, dict]:
    """An :class:`OnnxScorer` for an exported model and its sidecar's contents (``meta`` skips reading it).

    The sidecar must be a ddp_vad export's, bound to this graph (its size and sha256, ``graph``), and the graph's
    input must be the one the sidecar describes; anything else (a truncated or foreign ``.onnx``, a sidecar that is
    not JSON, a graph beside another export's sidecar) is a one-line :class:`UserError`. Sidecars written before the
    binding load with a warning that the pair is unchecked.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"scoring an ONNX model needs onnxruntime: {INSTALL_HINT}") from None
    side = sidecar_path(path)
    if meta is None:
        if not side.is_file():
            raise UserError(f"{path}: its sidecar {side.name} (window, frame size, threshold) is missing")
        meta = read_json_object(side, "ONNX sidecar")
    _check_sidecar(meta, side)
    if "graph" not in meta:
        warn(f"{side}: written before sidecars recorded their graph's sha256: {path.name} is unchecked against it")
    else:
        problem = record_problem(path, meta["graph"])
        if problem is not None:
            raise UserError(f"{path} is not the graph its sidecar {side.name} was written for ({problem}): "
                            "re-export, and keep each .onnx with its own .json")  # fmt: skip
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
        raise UserError(f"{path}: not a loadable ONNX model ({_first_line(exc)})") from None
    name = _check_graph(session, meta, path)
    return OnnxScorer(session, name), meta


def _check_sidecar(meta: dict, side: Path) -> None:
    """The sidecar's keys that scoring relies on: a UserError naming the file when one is missing or wrong."""
    if meta.get("format") != FORMAT_TAG:
        raise UserError(f"{side}: not a ddp_vad export sidecar (format {meta.get('format')!r})")
    for key in ("window", "height", "width"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{side}: {key} must be a positive integer, got {value!r}")
    if not isinstance(meta.get("input"), dict) or not isinstance(meta["input"].get("name"), str):
        raise UserError(f"{side}: no input name (input.name)")
    value = meta.get("threshold", 0.5)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise UserError(f"{side}: threshold must be a number in [0, 1], got {value!r}")


def _check_graph(session: Any, meta: dict, path: Path) -> str:
    """The graph's one input is the sidecar's (name, float32, [batch, window, height, width]) and it has a
    ``score`` output; returns the input name."""
    want = [meta["window"], meta["height"], meta["width"]]
    inputs = session.get_inputs()
    found = ", ".join(f"{i.name} {i.shape}" for i in inputs)
    if len(inputs) != 1 or inputs[0].name != meta["input"]["name"] or list(inputs[0].shape[1:]) != want:
        raise UserError(f"{path}: its input ({found}) is not the sidecar's ({meta['input']['name']} "
                        f"[batch, {', '.join(map(str, want))}]): not this export's graph")  # fmt: skip
    if inputs[0].type != "tensor(float)":
        raise UserError(f"{path}: its input {inputs[0].name} is {inputs[0].type}, not float32 pixels")
    if "score" not in [o.name for o in session.get_outputs()]:
        raise UserError(f"{path}: the graph has no 'score' output: not a ddp_vad export")
    return inputs[0].name


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[0].split())
    return text[:300] or type(exc).__name__
