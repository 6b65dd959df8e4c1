"""Command-line interface. This layer only parses options and calls one library function per command."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from ddp_vad.config import load_config_file
from ddp_vad.data.synth import SynthConfig, run_synth
from ddp_vad.errors import UserError, error_message
from ddp_vad.eval.baselines import BaselinesConfig, run_baselines
from ddp_vad.eval.predict import PredictConfig, run_predict
from ddp_vad.eval.report import EvaluateConfig, run_evaluate
from ddp_vad.options import click_params
from ddp_vad.pipeline import PipelineConfig, run_pipeline
from ddp_vad.runlock import run_lock
from ddp_vad.train.distributed import main_lock, main_process_only, object_group, process_state
from ddp_vad.train.pretrain import PretrainConfig, run_pretrain
from ddp_vad.train.transfer import TransferConfig, run_transfer

DEFAULT_SHARDS = Path("shards")  # relative to the working directory, never inside an installed package


def _apply_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: file values become defaults, so explicit flags still win."""
    if value is None:
        return None
    values = load_config_file(value)
    # Keys may be written as the flag ("from", "min-anomalous") or as the parameter name ("source").
    names = {p.name: p.name for p in ctx.command.params}
    for param in ctx.command.params:
        for opt in param.opts:
            names[opt.lstrip("-").replace("-", "_")] = param.name
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"config file {value}: unknown option(s) {', '.join(unknown)} for '{ctx.info_name}'")
    ctx.default_map = {**(ctx.default_map or {}), **{names[k]: v for k, v in values.items()}}
    return value


def with_config(func: Callable) -> Callable:
    """Add ``--config FILE`` (TOML/YAML with option names as keys) to a command."""
    option = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_apply_config_file,
        help="TOML or YAML file whose keys are this command's option names; flags override it.",
    )
    return option(func)


class _Group(click.Group):
    """The one guard around every command: a traceback only with --debug.

    UserError (bad input) and OSError (a path: not a folder, disk full, permission denied) print
    ``error: <message>`` and exit 2; anything else prints one line and a hint, and exits 1.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise  # click's own usage errors already print one line
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {error_message(exc)}", err=True)
            if not isinstance(exc, UserError | OSError):
                click.echo("rerun with --debug for the traceback", err=True)
                sys.exit(1)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, envvar="DDP_VAD_DEBUG", help="Show full tracebacks on errors.")
@click.version_option(package_name="ddp_vad")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """ddp_vad: GAN-pretrained LRCN video anomaly detection on 1..N GPUs.

    Typical flow: synth (or real UCSD data) -> shard build -> pretrain -> transfer -> baselines ->
    evaluate, or all of it at once with `ddp_vad pipeline`.
    """
    ctx.obj = {"debug": debug}


def _call(module: str, function: str, config_class: str | None = None, **kwargs):
    """Import the stage lazily (keeps `--help` fast) and run it."""
    import importlib

    mod = importlib.import_module(f"ddp_vad.{module}")
    if config_class is None:
        return getattr(mod, function)(**kwargs)
    return getattr(mod, function)(getattr(mod, config_class)(**kwargs))


def command(group: click.Group, name: str, **settings) -> Callable:
    """``group.command`` plus ``--config``."""

    def decorate(func: Callable) -> Callable:
        return group.command(name, **settings)(with_config(func))

    return decorate


def stage_command(group: click.Group, name: str, config_cls: type) -> Callable:
    """A command whose options are the fields of ``config_cls`` (declared there once, see ddp_vad.options)."""

    def decorate(func: Callable) -> click.Command:
        cmd = command(group, name)(func)
        cmd.params.extend(click_params(config_cls))
        return cmd

    return decorate


# ----------------------------------------------------------------------------------------- synth
@stage_command(cli, "synth", SynthConfig)
def synth_cmd(**kwargs) -> None:
    """Write a synthetic dataset (walkway scenes with five anomaly types) to OUT, as UCSD frames or as videos."""
    cfg = SynthConfig(**kwargs)
    main_process_only(lambda: run_synth(cfg), "synth")


# ----------------------------------------------------------------------------------------- shard
@cli.group("shard", cls=_Group)
def shard_group() -> None:
    """Build and inspect webdataset shards of labelled 10-frame windows."""


@command(shard_group, "build")
@click.argument("data", type=click.Path())
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder. Default: shards/<dataset-name> in the working directory.",
)
@click.option("--dataset", default=None, help="UCSDped1 or UCSDped2 when DATA holds both.")
@click.option("--window", default=10, type=click.IntRange(min=1), help="Frames per window.")
@click.option("--stride", default=1, type=click.IntRange(min=1), help="Step between window starts.")
@click.option("--height", default=120, type=click.IntRange(min=8), help="Resize frames to this height.")
@click.option("--width", default=182, type=click.IntRange(min=8), help="Resize frames to this width.")
@click.option(
    "--min-anomalous",
    default=5,
    type=click.IntRange(min=1),
    help="A window is anomalous when at least this many of its frames are.",
)
@click.option(
    "--balance",
    default="undersample",
    type=click.Choice(["undersample", "none"]),
    help="Under-sample the majority class to the minority count (seeded).",
)
@click.option("--folds", default=10, type=click.IntRange(min=2), help="Number of CV folds to assign.")
@click.option("--seed", default=0, type=int, help="Seed for balancing and fold assignment.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Decoding processes (default: cores).")
@click.option("--shard-size", default=200, type=click.IntRange(min=1), help="Samples per tar shard.")
@click.option(
    "--anomaly-types",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON {clip: [types]} for real data (synthetic data brings anomaly_types.json).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing shard set in --out.")
@click.option(
    "--format",
    default=None,
    type=click.Choice(["ucsd", "avenue", "shanghaitech", "videos"]),
    help="Layout of DATA (default: detected). videos = train/ and test/ (videos or frame folders) + labels.csv.",
)
@click.option(
    "--fps",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Resample videos to this frame rate by their timestamps (default: every decoded frame).",
)
def shard_build_cmd(**kwargs) -> None:
    """Cut clips in DATA (UCSD, Avenue, ShanghaiTech, or videos + labels.csv) into labelled windows and write tar
    shards + manifest.json."""
    if kwargs["out"] is None:
        kwargs["out"] = str(DEFAULT_SHARDS / (kwargs["dataset"] or Path(kwargs["data"]).resolve().name))

    def build() -> None:
        with run_lock(kwargs["out"], what="shard build"):  # one writer per shard folder (a lock file beside it)
            _call("data.shards", "build_shards", "ShardConfig", **kwargs)

    main_process_only(build, "shard build")


@command(shard_group, "info")
@click.argument("directory", type=click.Path())
@click.option("--verify", is_flag=True, help="Re-read every shard; check sample counts and sha256.")
def shard_info_cmd(directory: str, verify: bool) -> None:
    """Print counts and class balance of a shard set; --verify checks every shard against the manifest."""
    _call("data.shards", "print_info", directory=directory, verify=verify)


# ------------------------------------------------------------------------------------- baselines
@stage_command(cli, "baselines", BaselinesConfig)
def baselines_cmd(**kwargs) -> None:
    """Cross-validate classic ML baselines on flattened 60x90 windows (same folds as transfer).

    A method whose OUT/<method>/metrics.json exists is skipped, so a re-run resumes.
    """
    cfg = BaselinesConfig(**kwargs)

    def run() -> None:
        with run_lock(cfg.out, what="baselines"):
            run_baselines(cfg)

    main_process_only(run, "baselines")


# -------------------------------------------------------------------------------------- evaluate
@stage_command(cli, "evaluate", EvaluateConfig)
def evaluate_cmd(**kwargs) -> None:
    """Report (Table 5, per-fold accuracy, confusion matrices, AUROC, GAN figures) for RUN folders.

    RUN may be a transfer run, a baselines folder (its methods are expanded) or a pretrain run.
    """
    cfg = EvaluateConfig(**kwargs)

    def run() -> None:
        with run_lock(cfg.out, what="evaluate"):
            run_evaluate(cfg)

    main_process_only(run, "evaluate")


# -------------------------------------------------------------------------------------- pretrain
@stage_command(cli, "pretrain", PretrainConfig)
def pretrain_cmd(**kwargs) -> None:
    """Pretrain the GAN (generator vs LRCN discriminator) on shards; also under `accelerate launch`/`torchrun`."""
    run_pretrain(PretrainConfig(**kwargs))


# ---------------------------------------------------------------------------------------- predict
@stage_command(cli, "predict", PredictConfig)
def predict_cmd(**kwargs) -> None:
    """Per-frame anomaly scores (CSV + score-over-time PNG) for CLIP_DIR, a folder of numbered frames or a video."""
    run_predict(PredictConfig(**kwargs))


# --------------------------------------------------------------------------------------- pipeline
@stage_command(cli, "pipeline", PipelineConfig)
def pipeline_cmd(**kwargs) -> None:
    """Everything: synth (no --data) -> shards -> pretrain -> transfer (GAN and scratch) -> baselines -> evaluate."""
    cfg = PipelineConfig(**kwargs)
    state = process_state()  # the same process group run_pipeline uses
    world = state.num_processes
    # One lock for the whole folder; the stages' own locks inside it are this process's, so they pass.
    with main_lock(cfg.out, "pipeline", state.is_main_process, object_group(world), world):
        run_pipeline(cfg)


# -------------------------------------------------------------------------------------- transfer
@stage_command(cli, "transfer", TransferConfig)
def transfer_cmd(**kwargs) -> None:
    """Fine-tune the LRCN classifier with k-fold CV, folds spread over processes (fold k on process k % P).

    Also under `accelerate launch -m ddp_vad transfer ...` / `torchrun -m ddp_vad transfer ...`.
    """
    run_transfer(TransferConfig(**kwargs))


def main() -> None:
    """Console-script entry point."""
    clean = False
    try:
        cli(prog_name="ddp_vad")
    except SystemExit as exc:
        clean = exc.code in (None, 0)
        raise
    finally:
        from ddp_vad.train.distributed import shutdown_process_group

        shutdown_process_group(clean)


if __name__ == "__main__":
    main()
