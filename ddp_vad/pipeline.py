"""``ddp_vad pipeline``: synth (when no --data) -> shards -> pretrain -> transfer (GAN and scratch) -> baselines
-> evaluate, laid out as DESIGN.md section 3 fixes::

    OUT/data  OUT/shards  OUT/gan  OUT/lrcn-gan  OUT/lrcn-scratch  OUT/baselines/<method>  OUT/report

Every stage resumes: a finished stage is skipped on a re-run, an interrupted one continues from its checkpoints.
Under ``accelerate launch``/``torchrun`` the data stages, baselines and evaluation run on the main process while
the others wait; pretraining and fine-tuning use every process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ddp_vad.config import write_resolved_config
from ddp_vad.errors import UserError
from ddp_vad.train.distributed import patient_barrier, print_main, process_state

# Per preset: how big the synthetic data, the shards and the training runs are. ``demo`` finishes in minutes on
# 2 CPU cores; ``paper`` is the method at full size (GPU work); ``tiny`` is for tests.
PRESET_PLAN: dict[str, dict] = {
    "tiny": dict(
        train_clips=2,
        test_clips=4,
        frames=30,
        synth_height=48,
        synth_width=72,
        height=24,
        width=36,
        shard_size=8,
        folds=3,
        steps=20,
        batch_size=8,
        epochs=2,
        scratch_epochs=2,
        similarity_every=10,
        checkpoint_every=10,
    ),
    "demo": dict(
        train_clips=4,
        test_clips=10,
        frames=80,
        synth_height=158,
        synth_width=238,
        height=120,
        width=182,
        shard_size=200,
        folds=5,
        steps=300,
        batch_size=16,
        epochs=15,
        scratch_epochs=6,
        similarity_every=50,
        checkpoint_every=100,
    ),
    "paper": dict(
        train_clips=34,
        test_clips=36,
        frames=200,
        synth_height=158,
        synth_width=238,
        height=120,
        width=182,
        shard_size=200,
        folds=10,
        steps=5000,
        batch_size=32,
        epochs=30,
        scratch_epochs=30,
        similarity_every=100,
        checkpoint_every=500,
    ),
}


@dataclass
class PipelineConfig:
    """Options of ``ddp_vad pipeline``; unset sizes come from ``PRESET_PLAN[preset]``."""

    out: str
    data: str | None = None
    dataset: str | None = None
    format: str | None = None  # layout of --data (None: detected); without --data: what synth writes
    preset: str = "demo"
    seed: int = 0
    folds: int | None = None
    protocol: str = "window"
    train: str = "head"
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    methods: str = "logreg,svm,rf,knn,nb"
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESET_PLAN:
            raise UserError(f"--preset must be one of {', '.join(PRESET_PLAN)}, got {self.preset!r}")
        if self.protocol not in ("window", "clip"):
            raise UserError(f"--protocol must be window or clip, got {self.protocol!r}")
        if self.data is not None and not Path(self.data).exists():
            raise UserError(f"--data folder not found: {self.data}")
        if self.data is None and self.format not in (None, "ucsd", "videos"):
            raise UserError(f"--format {self.format} needs --data (synthetic data is written as ucsd or videos)")

    def plan(self) -> dict:
        """The preset's sizes with explicit options on top."""
        plan = dict(PRESET_PLAN[self.preset])
        for name in ("folds", "steps", "epochs", "batch_size"):
            if getattr(self, name) is not None:
                plan[name] = getattr(self, name)
        if self.epochs is not None:
            plan["scratch_epochs"] = self.epochs
        return plan


def _log(msg: str, main: bool = True) -> None:
    print_main(main, f"[pipeline {time.strftime('%H:%M:%S')}] {msg}")


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every stage; returns the report folder."""
    from ddp_vad.data.shards import MANIFEST, ShardConfig, build_shards
    from ddp_vad.data.synth import SynthConfig, run_synth
    from ddp_vad.eval.baselines import BaselinesConfig, run_baselines
    from ddp_vad.eval.report import EvaluateConfig, run_evaluate
    from ddp_vad.train.pretrain import PretrainConfig, run_pretrain
    from ddp_vad.train.transfer import TransferConfig, run_transfer

    state = process_state()
    main = state.is_main_process
    out = Path(cfg.out)
    plan = cfg.plan()
    dirs = {name: out / name for name in ("data", "shards", "gan", "lrcn-gan", "lrcn-scratch", "baselines", "report")}

    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_resolved_config(out, cfg, extra={"plan": plan, "layout": {k: str(v) for k, v in dirs.items()}})
        data = cfg.data
        if data is None:
            data = dirs["data"]
            written = "*/labels.csv" if cfg.format == "videos" else "*/Test/*.m"  # what a finished synth leaves
            if not any(data.glob(written)):
                _log(f"synth -> {data}")
                run_synth(
                    SynthConfig(
                        out=str(data),
                        train_clips=plan["train_clips"],
                        test_clips=plan["test_clips"],
                        frames=plan["frames"],
                        height=plan["synth_height"],
                        width=plan["synth_width"],
                        seed=cfg.seed,
                        overwrite=True,
                        format=cfg.format or "ucsd",
                    )
                )
            else:
                _log(f"synth: reusing {data}")
        if not (dirs["shards"] / MANIFEST).is_file():
            _log(f"shard build -> {dirs['shards']}")
            build_shards(
                ShardConfig(
                    data=str(data),
                    out=str(dirs["shards"]),
                    dataset=cfg.dataset,
                    format=cfg.format,
                    height=plan["height"],
                    width=plan["width"],
                    folds=plan["folds"],
                    shard_size=plan["shard_size"],
                    seed=cfg.seed,
                    workers=cfg.workers,
                )
            )
        else:
            _log(f"shard build: reusing {dirs['shards']}")
    patient_barrier()

    shards = str(dirs["shards"])
    if not (dirs["gan"] / "generator.safetensors").is_file():
        _log(f"pretrain ({cfg.preset}, {plan['steps']} steps) -> {dirs['gan']}", main)
        run_pretrain(
            PretrainConfig(
                shards=shards,
                out=str(dirs["gan"]),
                preset=cfg.preset,
                steps=plan["steps"],
                batch_size=plan["batch_size"],
                seed=cfg.seed,
                resume="auto",
                similarity_every=plan["similarity_every"],
                checkpoint_every=plan["checkpoint_every"],
                image_every=plan["checkpoint_every"],
            )
        )
    elif main:
        _log(f"pretrain: reusing {dirs['gan']}")
    patient_barrier()

    # The GAN-initialised classifier fine-tunes what --train says; the scratch LRCN has nothing to keep frozen.
    # Training everything costs far more per epoch than a head on cached features: the demo preset gives the
    # scratch LRCN fewer epochs (PRESET_PLAN["demo"]["scratch_epochs"]) to stay within minutes on a CPU.
    stages = (
        ("lrcn-gan", str(dirs["gan"]), cfg.train, plan["epochs"]),
        ("lrcn-scratch", "scratch", "all", plan["scratch_epochs"]),
    )
    for name, source, train, epochs in stages:
        if not (dirs[name] / "metrics.json").is_file():
            _log(f"transfer --from {source} --train {train} -> {dirs[name]}", main)
            run_transfer(
                TransferConfig(
                    shards=shards,
                    out=str(dirs[name]),
                    source=source,
                    train=train,
                    folds=plan["folds"],
                    protocol=cfg.protocol,
                    epochs=epochs,
                    preset=cfg.preset,
                    seed=cfg.seed,
                    resume="auto",
                )
            )
        elif main:
            _log(f"transfer --from {source}: reusing {dirs[name]}")
        patient_barrier()

    if main:
        _log(f"baselines ({cfg.methods}) -> {dirs['baselines']}")
        run_baselines(
            BaselinesConfig(
                shards=shards,
                out=str(dirs["baselines"]),
                methods=cfg.methods,
                protocol=cfg.protocol,
                folds=plan["folds"],
                seed=cfg.seed,
            )
        )
        _log(f"evaluate -> {dirs['report']}")
        runs = (dirs["lrcn-gan"], dirs["lrcn-scratch"], dirs["baselines"], dirs["gan"])
        run_evaluate(EvaluateConfig(runs=tuple(str(r) for r in runs), out=str(dirs["report"])))
        _log(f"done: {dirs['report'] / 'report.md'}")
    patient_barrier()
    return dirs["report"]
