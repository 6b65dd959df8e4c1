"""``ddp_vad export``: a transfer run's classifier as one ONNX model plus a JSON sidecar, scored without PyTorch.

The ONNX graph is the run's ensemble, exactly what ``predict`` and :class:`ddp_vad.Detector` compute: input
``pixels`` float32 ``[batch, window, height, width]`` gray pixel values 0..255 (the /255 scaling and the model's own
centring are inside the graph); outputs ``score`` ``[batch]`` = the mean anomaly probability over the fold models
and ``fold_scores`` ``[batch, folds]`` = each fold model's probability. One file for all folds keeps the
deployment to one session call per batch; ``--fold k`` exports fold k's model alone.

The graph comes from ``torch.onnx.export`` of the modules as loaded from their safetensors configs (TorchScript
exporter, ``dynamo=False``: the dynamo exporter needs onnxscript), so any architecture option stored in the config
exports. The sidecar ``<name>.json`` records window, frame size, the run's threshold and how it was chosen, the
labels, the model config, the folds, and the largest difference to PyTorch measured at export time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad import __version__
from ddp_vad.errors import UserError
from ddp_vad.files import atomic_path, sha256_file, write_json_atomic
from ddp_vad.infer.detector import Detector, model_files
from ddp_vad.infer.onnx_scorer import FORMAT_TAG, INSTALL_HINT, load_onnx, sidecar_path
from ddp_vad.options import option
from ddp_vad.runfiles import run_of_fold_model

LABELS = ["normal", "anomalous"]


@dataclass
class ExportConfig:
    """Options of ``ddp_vad export``."""

    run: str = option(help="A transfer run folder (or one model.safetensors).", argument=True)
    format: str = option("onnx", "Export format.", choices=("onnx",))
    out: str | None = option(None, "Model file (default: RUN/export/model.onnx); the sidecar .json goes beside it.")
    fold: int | None = option(None, "Export only this fold's model (default: the mean of every fold's).")
    opset: int = option(17, "ONNX opset version (>= 17).")

    def __post_init__(self) -> None:
        if not Path(self.run).exists():
            raise UserError(f"run folder or model file not found: {self.run}")
        if self.opset < 17:
            raise UserError(f"--opset must be >= 17, got {self.opset}")
        if self.out is not None and Path(self.out).suffix != ".onnx":
            raise UserError(f"--out {self.out}: give a .onnx file name")


def _ensemble(models: list) -> Any:
    import torch

    class Ensemble(torch.nn.Module):
        """uint8-range pixels [B, T, H, W] -> (mean P(anomalous) [B], per-model P(anomalous) [B, K])."""

        def __init__(self) -> None:
            super().__init__()
            self.models = torch.nn.ModuleList(models)

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = pixels.unsqueeze(2) / 255.0
            probs = torch.stack([torch.softmax(m(x), dim=1)[:, 1] for m in self.models], dim=1)
            return probs.mean(dim=1), probs

    return Ensemble().eval()


def run_export(cfg: ExportConfig) -> Path:
    """Export ``cfg.run`` as ONNX + sidecar; returns the model file."""
    import torch

    from ddp_vad.models import build_lrcn, load_model

    run = Path(cfg.run)
    files = model_files(run, cfg.fold)
    loaded = [load_model(f, build_lrcn) for f in files]
    mcfg = loaded[0][1]
    detector = Detector.load(run, fold=cfg.fold)  # for its threshold
    out = Path(cfg.out) if cfg.out else (run if run.is_dir() else run.parent) / "export" / "model.onnx"
    module = _ensemble([m for m, _ in loaded])
    example = torch.randint(0, 256, (2, mcfg.window, mcfg.height, mcfg.width)).float()
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (which needs onnxscript), warns that it traces
        # the LSTM's size checks as constants (they are, for a fixed model) and that an LSTM exported at batch 2
        # may fail at other batch sizes (it does not here: the check below scores 4 windows).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=["pixels"],
            output_names=["score", "fold_scores"],
            dynamic_axes={"pixels": {0: "batch"}, "score": {0: "batch"}, "fold_scores": {0: "batch"}},
            opset_version=cfg.opset,
            dynamo=False,
        )
    meta = {
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
    try:
        scorer, _ = load_onnx(out, meta)
    except UserError:
        meta["check"] = f"not checked: onnxruntime is not installed ({INSTALL_HINT})"
    else:
        windows = np.random.default_rng(0).integers(0, 256, (4, mcfg.window, mcfg.height, mcfg.width), np.uint8)
        diff = np.abs(scorer(windows) - detector.scorer(windows)).max()
        meta["check"] = {"max_abs_diff_vs_pytorch": float(diff), "windows": len(windows)}
    write_json_atomic(sidecar_path(out), meta)
    print(f"exported {len(files)} fold model(s) of {run} to {out} (+ {sidecar_path(out).name}); "
          f"threshold {detector.threshold:.4f}")  # fmt: skip
    return out
