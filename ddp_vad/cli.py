"""Command-line interface. This layer only parses options and calls one library function per command."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ddp_vad.config import load_config_file
from ddp_vad.errors import UserError

DEFAULT_SHARDS = Path(__file__).resolve().parent.parent / "shards"


def _apply_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: file values become defaults, so explicit flags still win."""
    if value is None:
        return None
    values = load_config_file(value)
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config file {value}: unknown option(s) {', '.join(unknown)} for '{ctx.info_name}'")
    ctx.default_map = {**(ctx.default_map or {}), **values}
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
    """Turns UserError into a one-line message and exit status 2 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
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


# ----------------------------------------------------------------------------------------- synth
@command(cli, "synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--train-clips", default=34, type=click.IntRange(min=0), help="Normal-only training clips.")
@click.option("--test-clips", default=36, type=click.IntRange(min=1), help="Test clips with anomalies.")
@click.option("--frames", default=200, type=click.IntRange(min=10), help="Frames per clip.")
@click.option("--height", default=158, type=click.IntRange(min=16), help="Frame height (Ped1: 158).")
@click.option("--width", default=238, type=click.IntRange(min=16), help="Frame width (Ped1: 238).")
@click.option("--seed", default=0, type=int, help="Everything is deterministic from this seed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset in OUT.")
def synth_cmd(**kwargs) -> None:
    """Write a synthetic UCSD-style dataset (walkway scenes with five anomaly types) to OUT."""
    _call("synth", "run_synth", "SynthConfig", **kwargs)


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
    help="Output folder. Default: shards/<dataset-name> in the repository.",
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
@click.option(
    "--workers", default=None, type=click.IntRange(min=1), help="Decoding processes (default: cores)."
)
@click.option("--shard-size", default=200, type=click.IntRange(min=1), help="Samples per tar shard.")
@click.option(
    "--anomaly-types",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON {clip: [types]} for real data (synthetic data brings anomaly_types.json).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing shard set in --out.")
def shard_build_cmd(**kwargs) -> None:
    """Cut clips in DATA (UCSD layout) into labelled windows and write tar shards + manifest.json."""
    if kwargs["out"] is None:
        kwargs["out"] = str(DEFAULT_SHARDS / (kwargs["dataset"] or Path(kwargs["data"]).resolve().name))
    _call("shards", "build_shards", "ShardConfig", **kwargs)


@command(shard_group, "info")
@click.argument("directory", type=click.Path())
@click.option("--verify", is_flag=True, help="Re-read every shard; check sample counts and sha256.")
def shard_info_cmd(directory: str, verify: bool) -> None:
    """Print counts and class balance of a shard set; --verify checks every shard against the manifest."""
    _call("shards", "print_info", directory=directory, verify=verify)


# ------------------------------------------------------------------------------------- baselines
@command(cli, "baselines")
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Shard folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Writes OUT/<method>/ files.")
@click.option("--methods", default="logreg,svm,rf,knn,nb", help="Comma-separated: logreg,svm,rf,knn,nb.")
@click.option(
    "--protocol",
    default="window",
    type=click.Choice(["window", "clip"]),
    help="Folds over windows (the method's) or grouped by clip (no leakage).",
)
@click.option(
    "--folds",
    default=None,
    type=click.IntRange(min=2),
    help="Must match the shards' fold count (default: the shards').",
)
@click.option("--seed", default=0, type=int, help="Seed of the estimators.")
@click.option("--height", default=60, type=click.IntRange(min=1), help="Feature height (no upsampling).")
@click.option("--width", default=90, type=click.IntRange(min=1), help="Feature width (no upsampling).")
@click.option("--n-jobs", default=None, type=int, help="Parallel jobs for rf/knn (default: all cores).")
@click.option("--rf-trees", default=100, type=click.IntRange(min=1), help="Random-forest trees.")
@click.option("--rf-max-depth", default=20, type=click.IntRange(min=1), help="Random-forest depth limit.")
def baselines_cmd(**kwargs) -> None:
    """Cross-validate classic ML baselines on flattened 60x90 windows (same folds as transfer).

    A method whose OUT/<method>/metrics.json exists is skipped, so a re-run resumes.
    """
    _call("baselines", "run_baselines", "BaselinesConfig", **kwargs)


# -------------------------------------------------------------------------------------- evaluate
@command(cli, "evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
def evaluate_cmd(runs: tuple[str, ...], out: str) -> None:
    """Report (Table 5, per-fold accuracy, confusion matrices, AUROC, GAN figures) for RUN folders.

    RUN may be a transfer run, a baselines folder (its methods are expanded) or a pretrain run.
    """
    _call("evaluate", "run_evaluate", "EvaluateConfig", runs=runs, out=out)


def main() -> None:
    """Console-script entry point."""
    # Keep thread oversubscription in check when several processes share a CPU box.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli(prog_name="ddp_vad")


if __name__ == "__main__":
    main()
