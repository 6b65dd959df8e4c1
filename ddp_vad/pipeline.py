"""``ddp_vad pipeline``: synth (when no --data) -> shards -> pretrain -> transfer (GAN and scratch) -> baselines
-> evaluate, laid out as docs/run-folders.md fixes::

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
from ddp_vad.data.sources import FORMATS
from ddp_vad.errors import UserError
from ddp_vad.eval.baselines import METHODS
from ddp_vad.options import option
from ddp_vad.presets import PRESET_NAMES, PRESETS
from ddp_vad.train.classifier import TRAIN_SCOPES
from ddp_vad.train.crossval import PROTOCOLS
from ddp_vad.train.distributed import patient_barrier, print_main, process_state


@dataclass
class PipelineConfig:
    """Options of ``ddp_vad pipeline``; unset sizes come from the preset's run sizes (:mod:`ddp_vad.presets`)."""

    out: str = option(help="Pipeline folder (resumable).")
    data: str | None = option(
        None, "A dataset (any layout `shard build` reads); without it synthetic data is generated into OUT/data."
    )
    dataset: str | None = option(None, "UCSDped1 or UCSDped2 when --data holds both.")
    format: str | None = option(
        None,
        "Layout of --data (default: detected); without --data, ucsd or videos chooses what synth writes.",
        choices=FORMATS,
    )
    preset: str = option(
        "demo",
        "Model size and run lengths: demo runs on 2 CPU cores in minutes; paper is the full method.",
        choices=PRESET_NAMES,
    )
    seed: int = option(0, "Seed of every stage.")
    folds: int | None = option(None, "CV folds (default: the preset's).")
    protocol: str = option("window", "Fold protocol.", choices=PROTOCOLS)
    train: str = option("head", "What transfer fine-tunes.", choices=TRAIN_SCOPES)
    steps: int | None = option(None, "GAN steps (default: the preset's).")
    epochs: int | None = option(None, "Fine-tuning epochs per fold.")
    batch_size: int | None = option(None, "GAN batch size per process.")
    methods: str = option(",".join(METHODS), "Classic ML baselines to run.")
    workers: int | None = option(None, "Shard-building processes.")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.data is not None and not Path(self.data).exists():
            raise UserError(f"--data folder not found: {self.data}")
        for name in ("folds", "steps", "epochs", "batch_size", "workers"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "folds" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be >= {2 if name == 'folds' else 1}, got {value}")
        if self.data is None and self.format not in (None, "ucsd", "videos"):
            raise UserError(f"--format {self.format} needs --data (synthetic data is written as ucsd or videos)")

    def plan(self) -> dict:
        """The preset's run sizes with explicit options on top."""
        plan = dict(PRESETS[self.preset].run)
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
    # scratch LRCN fewer epochs (the preset's "scratch_epochs") to stay within minutes on a CPU.
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
