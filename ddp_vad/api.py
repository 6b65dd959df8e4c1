"""The stages as Python functions: each takes its config dataclass and returns what it wrote.

These are what the CLI commands call (``ddp_vad <command>`` = ``ddp_vad.<function>(<Config>(...))``), with the
same folder locks and, under a launcher with several processes, the same division of work: ``pretrain``,
``transfer`` and ``run_pipeline`` are distributed (call them on every process); the others run on the main process
while the rest wait. See docs/api.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddp_vad.data.plan import ShardConfig
    from ddp_vad.data.synth import SynthConfig
    from ddp_vad.eval.baselines import BaselinesConfig
    from ddp_vad.eval.report import EvaluateConfig
    from ddp_vad.infer.export import ExportConfig
    from ddp_vad.infer.predict import PredictConfig
    from ddp_vad.pipeline import PipelineConfig
    from ddp_vad.train.pretrain import PretrainConfig
    from ddp_vad.train.transfer import TransferConfig


def synth(cfg: SynthConfig) -> Path:
    """Write a synthetic UCSD-layout dataset; returns its folder (``cfg.out/SynthPed``, or ``cfg.out`` for videos)."""
    from ddp_vad.data.synth import run_synth
    from ddp_vad.train.distributed import main_process_only

    return main_process_only(lambda: run_synth(cfg), "synth")


def build_shards(cfg: ShardConfig) -> Path:
    """Cut the dataset into labelled windows and write shards + ``manifest.json``; returns the shard folder."""
    from ddp_vad.data.writer import build_shards as write_shards
    from ddp_vad.runlock import run_lock
    from ddp_vad.train.distributed import main_process_only

    def build() -> Path:
        with run_lock(cfg.out, what="shard build"):  # one writer per shard folder (a lock file beside it)
            return write_shards(cfg)

    return main_process_only(build, "shard build")


def pretrain(cfg: PretrainConfig) -> Path:
    """Pretrain the GAN; returns the run folder (``generator.safetensors``, ``discriminator.safetensors``, ...)."""
    from ddp_vad.train.pretrain import run_pretrain

    return run_pretrain(cfg)


def transfer(cfg: TransferConfig) -> Path:
    """Cross-validate the classifier fold-parallel; returns the run folder (``folds/fold_XX/model.safetensors``,
    ``metrics.json``, ``oof_scores.csv``)."""
    from ddp_vad.train.transfer import run_transfer

    return run_transfer(cfg)


def baselines(cfg: BaselinesConfig) -> dict[str, Path]:
    """Cross-validate the classic baselines; returns {method: its folder}."""
    from ddp_vad.eval.baselines import run_baselines
    from ddp_vad.runlock import run_lock
    from ddp_vad.train.distributed import main_process_only

    def run() -> dict[str, Path]:
        with run_lock(cfg.out, what="baselines"):
            return run_baselines(cfg)

    return main_process_only(run, "baselines")


def evaluate(cfg: EvaluateConfig) -> Path:
    """Write the comparison report; returns the report folder (``report.md``, ``report.json``, figures)."""
    from ddp_vad.eval.report import run_evaluate
    from ddp_vad.runlock import run_lock
    from ddp_vad.train.distributed import main_process_only

    def run() -> Path:
        with run_lock(cfg.out, what="evaluate"):
            run_evaluate(cfg)
        return Path(cfg.out)

    return main_process_only(run, "evaluate")


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every stage into ``cfg.out``; returns the report folder."""
    from ddp_vad.pipeline import run_pipeline as run_all
    from ddp_vad.train.distributed import main_lock, object_group, process_state

    state = process_state()  # the same process group run_pipeline uses
    world = state.num_processes
    # One lock for the whole folder; the stages' own locks inside it are this process's, so they pass.
    with main_lock(cfg.out, "pipeline", state.is_main_process, object_group(world), world):
        return run_all(cfg)


def predict(cfg: PredictConfig) -> Path:
    """Score every frame of a clip, video or stream; returns the CSV (a PNG, and optional events, beside it)."""
    from ddp_vad.infer.predict import run_predict

    return run_predict(cfg)


def export_model(cfg: ExportConfig) -> Path:
    """Export a transfer run's classifier (ONNX + JSON sidecar); returns the model file."""
    from ddp_vad.infer.export import run_export

    return run_export(cfg)
