"""``ddp_vad pipeline``: synth (when no --data) -> shards -> pretrain -> transfer (GAN and scratch) -> baselines
-> evaluate, laid out as docs/run-folders.md fixes::

    OUT/data  OUT/shards  OUT/gan  OUT/lrcn-gan  OUT/lrcn-scratch  OUT/lrcn-random  OUT/baselines/<method>
    OUT/report

``lrcn-random`` is the control of the GAN's claim: the same head as GAN+LRCN on a frozen, randomly initialised LRCN.

Every stage resumes: a finished stage is skipped on a re-run, an interrupted one continues from its checkpoints.
Under ``accelerate launch``/``torchrun`` the data stages, baselines and evaluation run on the main process while
the others wait; pretraining and fine-tuning use every process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_vad.config import write_resolved_config
from ddp_vad.data.sources import FORMATS
from ddp_vad.errors import UserError
from ddp_vad.eval.baselines import METHODS
from ddp_vad.motion import MOTION_PRIORS
from ddp_vad.options import option
from ddp_vad.presets import PRESET_NAMES, PRESETS
from ddp_vad.runfiles import metrics_file
from ddp_vad.train.calibration import CALIBRATIONS, EQUAL_SHARE
from ddp_vad.train.classifier import TRAIN_SCOPES
from ddp_vad.train.crossval import PROTOCOL_HELP, PROTOCOLS, check_fraction, check_repeats
from ddp_vad.train.distributed import patient_barrier, print_main, process_state

CURVE = (0.05, 0.1, 0.25, 0.5, 1.0)  # the default label-efficiency curve
LEARNED_RUNS = ("lrcn-gan", "lrcn-scratch", "lrcn-random")


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
    protocol: str = option("leakfree", PROTOCOL_HELP, choices=PROTOCOLS)
    repeats: int | None = option(
        None, "Repeat the cross-validation with this many fold seeds (default: the preset's); mean ± std over all."
    )
    train: str = option("head", "What GAN+LRCN fine-tunes (the scratch LRCN trains everything).", choices=TRAIN_SCOPES)
    steps: int | None = option(None, "GAN steps (default: the preset's).")
    pretraining: str = option(
        "gan",
        "What GAN+LRCN's feature extractor pretrains on: gan (the method's GAN) or pseudo (no generator: the "
        "discriminator learns the train clips' normal windows against pseudo-anomalies made from them, one per "
        "window; `pretrain --objective pseudo --pseudo-anomalies 1`).",
        choices=("gan", "pseudo"),
    )
    calibrate: str = option(
        "normal",
        "Per-fold score calibration of the learned runs (`transfer --calibrate`): normal (on the train clips' "
        "normal windows) or none.",
        choices=CALIBRATIONS,
    )
    motion_prior: str | None = option(
        None,
        "The learned runs' motion prior (`transfer --motion-prior`): energy (the default with --calibrate normal) or "
        "none.",
        choices=MOTION_PRIORS,
    )
    prior_share: str = option(
        str(EQUAL_SHARE),
        "The motion prior's share against the classifier in every learned run (`transfer --prior-share`): a number "
        "in [0, 1] (0.5: the plain sum) or nested (chosen per fold on inner folds of its training clips).",
    )
    input_pool: int | None = option(
        None,
        "The LRCN's frame pooling in every learned run and the GAN's discriminator (`transfer`/`pretrain` "
        "--input-pool; default: the preset's).",
    )
    conv_channels: str | None = option(
        None,
        "The LRCN's conv channels, one per layer, in every learned run and the GAN's discriminator (`transfer`/"
        "`pretrain` --conv-channels; default: the preset's).",
    )
    epochs: int | None = option(None, "Fine-tuning epochs per fold.")
    batch_size: int | None = option(None, "GAN batch size per process.")
    methods: str = option(",".join(METHODS), "Classic ML baselines to run.")
    workers: int | None = option(None, "Shard-building processes.")
    curve: str = option(
        ",".join(f"{f:g}" for f in CURVE),
        "Labelled fractions of the label-efficiency curve, comma-separated (1 = only the runs with all labels).",
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.data is not None and not Path(self.data).exists():
            raise UserError(f"--data folder not found: {self.data}")
        try:
            fractions = sorted({float(f) for f in str(self.curve).split(",") if f.strip()})
        except ValueError:
            raise UserError(f"--curve {self.curve}: give comma-separated fractions such as 0.1,0.5,1") from None
        for f in fractions:
            check_fraction(f)
        self.curve = ",".join(f"{f:g}" for f in sorted({*fractions, 1.0}))  # the contract runs use all labels
        if self.repeats is not None:
            check_repeats(self.repeats)
        for name in ("folds", "steps", "epochs", "batch_size", "workers"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "folds" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be >= {2 if name == 'folds' else 1}, got {value}")
        if self.data is None and self.format not in (None, "ucsd", "videos"):
            raise UserError(f"--format {self.format} needs --data (synthetic data is written as ucsd or videos)")
        builders = stage_configs(self)
        for check_options in builders.values():  # every stage's options, before the first stage runs
            check_options(False)
        if self.input_pool is not None or self.conv_channels is not None:  # the LRCN must fit the shards' frames
            from ddp_vad.architecture_options import parse_conv_channels
            from ddp_vad.models import model_config_for

            shard = builders["shard build"](False)
            frames = {"window": shard.window, "height": shard.height, "width": shard.width}
            channels = parse_conv_channels(self.conv_channels)
            model_config_for(self.preset, frames, input_pool=self.input_pool, conv_channels=channels)

    def plan(self) -> dict:
        """The preset's run sizes with explicit options on top."""
        plan = dict(PRESETS[self.preset].run)
        for name in ("folds", "steps", "epochs", "batch_size", "repeats"):
            if getattr(self, name) is not None:
                plan[name] = getattr(self, name)
        return plan

    @property
    def fractions(self) -> list[float]:
        """The labelled fractions to run, ascending (always ending with 1)."""
        return [float(f) for f in self.curve.split(",")]


def _log(msg: str, main: bool = True) -> None:
    print_main(main, f"[pipeline {time.strftime('%H:%M:%S')}] {msg}")


def layout(out: Path, fractions: list[float]) -> dict[str, Path]:
    """The pipeline's folders. The runs with all labels are where ``OUT/lrcn-gan`` etc. always were; a curve's other
    fractions go to ``OUT/curve/f<fraction>/{lrcn-gan,lrcn-scratch,baselines}``."""
    dirs = {name: out / name for name in ("data", "shards", "gan", "report")}
    for f in fractions:
        root = out if f == 1.0 else out / "curve" / f"f{f:g}"
        for name in LEARNED_RUNS + ("baselines",):
            dirs[f"{name}@{f:g}"] = root / name
    return dirs


def stage_configs(cfg: PipelineConfig) -> dict[str, Callable[[bool], Any]]:
    """A builder of every stage's config, keyed ``synth`` (only without --data), ``shard build``, ``pretrain``,
    ``<run>@<fraction>`` (the learned runs and ``baselines``, as in :func:`layout`) and ``evaluate``. Building a
    config runs its checks; ``builder(False)`` leaves out those of the inputs an earlier stage makes (the shards,
    the GAN run, the runs to evaluate), so that every stage's options can be checked before the first one runs."""
    from ddp_vad.data.shards import ShardConfig
    from ddp_vad.data.synth import SynthConfig
    from ddp_vad.eval.baselines import BaselinesConfig
    from ddp_vad.eval.report import EvaluateConfig
    from ddp_vad.train.pretrain import PretrainConfig
    from ddp_vad.train.transfer import TransferConfig

    plan, dirs = cfg.plan(), layout(Path(cfg.out), cfg.fractions)
    shards, seed, protocol = str(dirs["shards"]), cfg.seed, cfg.protocol
    builders: dict[str, Callable[[bool], Any]] = {}
    if cfg.data is None:
        builders["synth"] = lambda _: SynthConfig(
            out=str(dirs["data"]), train_clips=plan["train_clips"], test_clips=plan["test_clips"],
            frames=plan["frames"], height=plan["synth_height"], width=plan["synth_width"], seed=seed, overwrite=True,
            format=cfg.format or "ucsd",
        )  # fmt: skip
    builders["shard build"] = lambda _: ShardConfig(
        data=str(cfg.data or dirs["data"]), out=shards, dataset=cfg.dataset, format=cfg.format, height=plan["height"],
        width=plan["width"], folds=plan["folds"], shard_size=plan["shard_size"], seed=seed, workers=cfg.workers,
    )  # fmt: skip
    builders["pretrain"] = lambda _: PretrainConfig(
        shards=shards, out=str(dirs["gan"]), preset=cfg.preset, steps=plan["steps"], batch_size=plan["batch_size"],
        seed=seed, resume="auto", similarity_every=plan["similarity_every"], checkpoint_every=plan["checkpoint_every"],
        image_every=plan["checkpoint_every"], protocol=protocol, objective=cfg.pretraining,
        pseudo_anomalies=1.0 if cfg.pretraining == "pseudo" else 0.0, input_pool=cfg.input_pool,
        conv_channels=cfg.conv_channels,
    )  # fmt: skip
    for f in cfg.fractions:
        for name, source, train in learned_runs(cfg, dirs):
            builders[f"{name}@{f:g}"] = lambda check, out=str(dirs[f"{name}@{f:g}"]), s=source, t=train, f=f: (
                TransferConfig(
                    shards=shards, out=out, source=s, train=t, folds=plan["folds"], protocol=protocol,
                    epochs=plan["epochs"], preset=cfg.preset, seed=seed, resume="auto", labelled_fraction=f,
                    repeats=plan["repeats"], calibrate=cfg.calibrate, motion_prior=cfg.motion_prior,
                    prior_share=cfg.prior_share,
                    input_pool=cfg.input_pool, conv_channels=cfg.conv_channels, check_paths=check,
                )
            )  # fmt: skip
        builders[f"baselines@{f:g}"] = lambda check, out=str(dirs[f"baselines@{f:g}"]), f=f: BaselinesConfig(
            shards=shards, out=out, methods=cfg.methods, protocol=protocol, folds=plan["folds"], seed=seed,
            labelled_fraction=f, repeats=plan["repeats"], check_paths=check,
        )  # fmt: skip
    runs = [dirs["gan"]] + [dirs[f"{n}@{f:g}"] for f in cfg.fractions for n in LEARNED_RUNS]
    runs += [dirs[f"baselines@{f:g}"] for f in cfg.fractions]
    builders["evaluate"] = lambda check: EvaluateConfig(
        runs=tuple(str(r) for r in runs), out=str(dirs["report"]), check_paths=check
    )
    return builders


def learned_runs(cfg: PipelineConfig, dirs: dict[str, Path]) -> tuple[tuple[str, str, str], ...]:
    """(run, --from, --train) of the learned runs: GAN+LRCN fine-tunes what --train says, LRCN from scratch trains
    everything and the random-init control the head on a frozen random LRCN, all with the same epochs and batch
    size (a fair budget)."""
    return (("lrcn-gan", str(dirs["gan"]), cfg.train), ("lrcn-scratch", "scratch", "all"),
            ("lrcn-random", "random", "head"))  # fmt: skip


def _prepare_data(cfg: PipelineConfig, dirs: dict[str, Path], build: dict[str, Callable]) -> None:
    """Main process: synthetic data (without --data) and the shards, each reused when already complete."""
    from ddp_vad.data.shards import MANIFEST, build_shards
    from ddp_vad.data.synth import run_synth

    if cfg.data is None:
        data = dirs["data"]
        written = "*/labels.csv" if cfg.format == "videos" else "*/Test/*.m"  # what a finished synth leaves
        if not any(data.glob(written)):
            _log(f"synth -> {data}")
            run_synth(build["synth"](True))
        else:
            _log(f"synth: reusing {data}")
    if (dirs["shards"] / MANIFEST).is_file():
        _log(f"shard build: reusing {dirs['shards']}")
        return
    _log(f"shard build -> {dirs['shards']}")
    build_shards(build["shard build"](True))


def _pretrain(cfg: PipelineConfig, plan: dict, dirs: dict[str, Path], build: dict[str, Callable], main: bool) -> None:
    from ddp_vad.train.pretrain import run_pretrain

    if (dirs["gan"] / "generator.safetensors").is_file():
        _log(f"pretrain: reusing {dirs['gan']}", main)
        return
    _log(f"pretrain ({cfg.preset}, {plan['steps']} steps) -> {dirs['gan']}", main)
    run_pretrain(build["pretrain"](True))


def _transfer(cfg: PipelineConfig, dirs: dict[str, Path], build: dict[str, Callable], f: float, main: bool) -> None:
    """The learned runs (:func:`learned_runs`) at one labelled fraction ``f``."""
    from ddp_vad.train.transfer import run_transfer

    for name, source, train in learned_runs(cfg, dirs):
        run = dirs[f"{name}@{f:g}"]
        if metrics_file(run).is_file():
            _log(f"transfer --from {source} (labelled fraction {f:g}): reusing {run}", main)
        else:
            _log(f"transfer --from {source} --train {train} --labelled-fraction {f:g} -> {run}", main)
            run_transfer(build[f"{name}@{f:g}"](True))
        patient_barrier()


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run (or resume) every stage; returns the report folder."""
    from ddp_vad.eval.baselines import run_baselines
    from ddp_vad.eval.report import run_evaluate

    state = process_state()
    main = state.is_main_process
    out, plan = Path(cfg.out), cfg.plan()
    dirs, build = layout(out, cfg.fractions), stage_configs(cfg)  # their options were checked by PipelineConfig
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_resolved_config(out, cfg, extra={"plan": plan, "layout": {k: str(v) for k, v in dirs.items()}})
        _prepare_data(cfg, dirs, build)
    patient_barrier()
    _pretrain(cfg, plan, dirs, build, main)
    patient_barrier()
    for fraction in reversed(cfg.fractions):  # all labels first: the contract runs are there soonest
        _transfer(cfg, dirs, build, fraction, main)
        if main:
            _log(f"baselines ({cfg.methods}, labelled fraction {fraction:g}) -> {dirs[f'baselines@{fraction:g}']}")
            run_baselines(build[f"baselines@{fraction:g}"](True))
        patient_barrier()
    if main:
        _log(f"evaluate -> {dirs['report']}")
        run_evaluate(build["evaluate"](True))
        _log(f"done: {dirs['report'] / 'report.md'}")
    patient_barrier()
    return dirs["report"]
