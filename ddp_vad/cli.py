"""Command-line interface. This layer only parses options and calls one library function per command."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from ddp_vad.config import load_config_file
from ddp_vad.data.shards import ShardConfig, build_shards, print_info
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


@stage_command(shard_group, "build", ShardConfig)
def shard_build_cmd(**kwargs) -> None:
    """Cut clips in DATA (UCSD, Avenue, ShanghaiTech, or videos + labels.csv) into labelled windows and write tar
    shards + manifest.json."""
    cfg = ShardConfig(**kwargs)

    def build() -> None:
        with run_lock(cfg.out, what="shard build"):  # one writer per shard folder (a lock file beside it)
            build_shards(cfg)

    main_process_only(build, "shard build")


@command(shard_group, "info")
@click.argument("directory", type=click.Path())
@click.option("--verify", is_flag=True, help="Re-read every shard; check sample counts and sha256.")
def shard_info_cmd(directory: str, verify: bool) -> None:
    """Print counts and class balance of a shard set; --verify checks every shard against the manifest."""
    print_info(directory, verify=verify)


# ------------------------------------------------------------------------------------- baselines
@stage_command(cli, "baselines", BaselinesConfig)
def baselines_cmd(**kwargs) -> None:
    """Cross-validate classic ML baselines (60x90 pixels, frame-difference motion) on the same folds as transfer.

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
