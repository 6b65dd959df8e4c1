"""``ddp_vad export``: a transfer run's classifier as one ONNX model plus a JSON sidecar, scored without PyTorch.

The ONNX graph is the run's ensemble, exactly what ``predict`` and :class:`ddp_vad.Detector` compute: input
``pixels`` float32 ``[batch, window, height, width]`` gray pixel values 0..255 (the /255 scaling and the model's own
centring are inside the graph); outputs ``score`` ``[batch]`` = the mean anomaly probability over the fold models
and ``fold_scores`` ``[batch, folds]`` = each fold model's probability. One file for all folds keeps the
deployment to one session call per batch; ``--fold k`` exports fold k's model alone.

The graph comes from ``torch.onnx.export`` of the modules as loaded from their safetensors configs (TorchScript
exporter, ``dynamo=False``: the dynamo exporter needs onnxscript), so any architecture option stored in the config
exports. The sidecar ``<name>.json`` records window, frame size, the run's threshold and how it was chosen, the
labels, the model config, the folds, the graph's size and sha256 (checked on load) and the parity check.

**Parity.** Before anything is written under the real names, onnxruntime scores a few windows (random pixels and
flat black / white ones) with the graph and PyTorch scores them with the run's models as ``predict`` does
(:class:`ddp_vad.infer.scoring.TorchScorer`, never the module that was exported); every ``score`` and
``fold_scores`` value must agree within :data:`PARITY_TOLERANCE`, and NaN fails. Float32 rounding leaves about
6e-8; a graph scaling pixels by 1/256 instead of 1/255 moves untrained test models' scores by 2e-5 or more (the
sidecar records this ``scale_sensitivity``, the size of slip the check would see). A calibrated model
(``transfer --calibrate normal``) multiplies its log-odds by 1 / (the spread of its scores on normal footage), up to
thousands for a barely trained fold, and float32 rounding grows with it (1e-5 on the test suite's tiny runs); so does
the slip, so the tolerance is the larger of 1e-6 and :data:`SLIP_FRACTION` of the slip's effect.

**The pair.** Graph and sidecar are written to hidden temp names, checked, then the old sidecar is removed, the
graph renamed into place and the sidecar last: an interrupted or failed export leaves the previous pair whole, or
(interrupted between the renames) a graph without a sidecar, never a graph beside another export's sidecar; and
the sidecar's sha256 of the graph makes any mixed pair fail to load.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad import __version__
from ddp_vad.errors import UserError
from ddp_vad.files import atomic_pair, file_record, naming, sha256_file, to_jsonable
from ddp_vad.infer.detector import Detector
from ddp_vad.infer.onnx_scorer import FORMAT_TAG, INSTALL_HINT, load_onnx, sidecar_path
from ddp_vad.infer.scoring import TorchScorer
from ddp_vad.options import option
from ddp_vad.runfiles import run_of_fold_model

LABELS = ["normal", "anomalous"]


MIN_OPSET = 17
PARITY_TOLERANCE = 1e-6  # largest |onnxruntime - PyTorch| accepted per score; float32 rounding leaves 2e-8..6e-8
SLIP_FRACTION = 0.01  # ... or this share of a 1/256 pixel-scale slip's effect, where that is larger (calibrated models)


def max_opset() -> int:
    """The highest opset this installation exports: the TorchScript exporter's and onnx's, whichever is lower."""
    import torch.onnx

    top = getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    try:
        import onnx
    except ImportError:
        return top
    return min(top, onnx.defs.onnx_opset_version())


@dataclass
class ExportConfig:
    """Options of ``ddp_vad export``."""

    run: str = option(help="A transfer run folder (or one model.safetensors).", argument=True)
    format: str = option("onnx", "Export format.", choices=("onnx",))
    out: str | None = option(None, "Model file (default: RUN/export/model.onnx); the sidecar .json goes beside it.")
    fold: int | None = option(None, "Export only this fold's model (default: the mean of every fold's).")
    opset: int = option(MIN_OPSET, "ONNX opset version (17 up to what the installed torch and onnx export, 20).")

    def __post_init__(self) -> None:
        if not Path(self.run).exists():
            raise UserError(f"run folder or model file not found: {self.run}")
        if Path(self.run).is_file() and Path(self.run).suffix != ".safetensors":
            raise UserError(f"{self.run}: give a transfer run folder or a model.safetensors file")
        if self.fold is not None and self.fold < 0:
            raise UserError(f"--fold must be >= 0, got {self.fold}")
        if self.opset < MIN_OPSET:
            raise UserError(f"--opset must be >= {MIN_OPSET}, got {self.opset}")
        if self.opset > MIN_OPSET and self.opset > (top := max_opset()):
            raise UserError(f"--opset {self.opset}: this installation exports opsets {MIN_OPSET}..{top}")
        if self.out is not None and Path(self.out).suffix != ".onnx":
            raise UserError(f"--out {self.out}: give a .onnx file name")


def _ensemble(models: list, scale: float = 255.0) -> Any:
    import torch

    class Ensemble(torch.nn.Module):
        """uint8-range pixels [B, T, H, W] -> (mean P(anomalous) [B], per-model P(anomalous) [B, K])."""

        def __init__(self) -> None:
            super().__init__()
            self.models = torch.nn.ModuleList(models)

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = pixels.unsqueeze(2) / scale
            probs = torch.stack([torch.softmax(m(x), dim=1)[:, 1] for m in self.models], dim=1)
            return probs.mean(dim=1), probs

    return Ensemble().eval()


def run_export(cfg: ExportConfig) -> Path:
    """Export ``cfg.run`` as ONNX + sidecar; returns the model file. Every fold model is checked first
    (:mod:`ddp_vad.infer.model_files`), and the graph must score like PyTorch (see the module docstring)."""
    run = Path(cfg.run)
    detector = Detector.load(run, fold=cfg.fold)  # the checked fold models and the run's threshold
    files, models = detector.files, detector.scorer.models
    out = Path(cfg.out) if cfg.out else (run if run.is_dir() else run.parent) / "export" / "model.onnx"
    side = sidecar_path(out)
    with atomic_pair(out, side) as (graph_tmp, side_tmp):  # the sidecar goes in last, the old one out first
        _write_graph(_ensemble(models), models[0].cfg, graph_tmp, cfg.opset)
        meta = _sidecar(cfg, run, files, models[0].cfg, detector)
        meta["graph"] = {"file": out.name, **file_record(graph_tmp)}
        meta["check"] = _parity(graph_tmp, meta, detector, out)
        with naming(side):
            side_tmp.write_text(json.dumps(to_jsonable(meta), indent=2) + "\n")
    print(f"exported {len(files)} fold model(s) of {run} to {out} (+ {side.name}); "
          f"threshold {detector.threshold:.4f}")  # fmt: skip
    return out


def _write_graph(module: Any, mcfg: Any, path: Path, opset: int) -> None:
    import torch

    example = torch.randint(0, 256, (2, mcfg.window, mcfg.height, mcfg.width)).float()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript), warns that it traces
        # the LSTM's size checks as constants (they are, for a fixed model) and that an LSTM exported at batch 2
        # may fail at other batch sizes (it does not here: the parity check scores 6 windows).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["score", "fold_scores"],
            dynamic_axes={"pixels": {0: "batch"}, "score": {0: "batch"}, "fold_scores": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def _sidecar(cfg: ExportConfig, run: Path, files: list[Path], mcfg: Any, detector: Detector) -> dict:
    return {
        "format": FORMAT_TAG,
        "ddp_vad_version": __version__,
        "input": {"name": "pixels", "dtype": "float32", "shape": ["batch", mcfg.window, mcfg.height, mcfg.width],
                  "values": "gray pixel values 0..255, frames resized (bilinear) to height x width",
                  "normalisation": "inside the graph: x / 255, then the model's (x - input_mean) / input_std"},
        "outputs": {"score": "[batch] mean P(anomalous) over the fold models",
                    "fold_scores": "[batch, folds] each fold model's P(anomalous)"},
        "window": mcfg.window,
        "height": mcfg.height,
        "width": mcfg.width,
        "labels": LABELS,
        "threshold": detector.threshold,
        "threshold_rule": detector.threshold_note,
        "frame_rule": "a frame's score is the max over the scores of the stride-1 windows covering it",
        "folds": [f.parent.name if run_of_fold_model(f) else f.name for f in files],
        "source": {"run": str(run.resolve()), "sha256": {str(f): sha256_file(f) for f in files}},
        "model_config": mcfg.to_dict(),
        "opset": cfg.opset,
    }  # fmt: skip


def _check_windows(window: int, height: int, width: int) -> np.ndarray:
    """Random pixels (4 windows) and flat black and white ones: uint8 [6, window, height, width]."""
    rng = np.random.default_rng(0)
    flat = np.stack([np.zeros((window, height, width), np.uint8), np.full((window, height, width), 255, np.uint8)])
    return np.concatenate([rng.integers(0, 256, (4, window, height, width), np.uint8), flat])


def _parity(graph: Path, meta: dict, detector: Detector, out: Path) -> dict | str:
    """onnxruntime's ``score`` and ``fold_scores`` of the graph against PyTorch's (the run's models as predict
    scores them); a difference above :data:`PARITY_TOLERANCE`, or NaN, is a UserError (nothing is written)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return f"not checked: onnxruntime is not installed ({INSTALL_HINT})"
    scorer, _ = load_onnx(graph, meta)
    windows = _check_windows(meta["window"], meta["height"], meta["width"])
    score, per_fold = scorer.session.run(["score", "fold_scores"], {scorer.input_name: windows.astype(np.float32)})
    models = detector.scorer.models
    want_per_fold = np.stack([TorchScorer([m])(windows) for m in models], axis=1)
    want = detector.scorer(windows)
    # How far a 1/256-for-1/255 slip would move the scores: the smallest kind of error this check can see.
    slipped = np.stack([TorchScorer([m])(windows.astype(np.float32) / 256.0) for m in models], axis=1)
    sensitivity = max(np.abs(slipped.mean(1) - want).max(), np.abs(slipped - want_per_fold).max())
    tolerance = max(PARITY_TOLERANCE, SLIP_FRACTION * float(sensitivity))
    diff = max(np.abs(score - want).max(), np.abs(per_fold - want_per_fold).max())
    if not np.isfinite(diff) or diff > tolerance:
        raise UserError(f"{out}: the exported graph does not score like PyTorch (largest difference {diff:.3g} > "
                        f"{tolerance:.3g} on {len(windows)} windows); nothing was written")  # fmt: skip
    return {"max_abs_diff_vs_pytorch": float(diff), "tolerance": tolerance, "windows": len(windows),
            "scale_sensitivity": float(sensitivity)}  # fmt: skip
