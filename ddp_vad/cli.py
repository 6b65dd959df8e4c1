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
    _call("data.synth", "run_synth", "SynthConfig", **kwargs)


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
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Decoding processes (default: cores).")
@click.option(
    "--shard-size", default=200, type=click.IntRange(min=1), help="Windows per tar shard (whole blocks, at most this)."
)
@click.option(
    "--block-windows",
    default=64,
    type=click.IntRange(min=1),
    help="Windows per block: a block stores its frames once; consecutive blocks of a clip share window-1 frames.",
)
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
    _call("data.shards", "build_shards", "ShardConfig", **kwargs)


@command(shard_group, "info")
@click.argument("directory", type=click.Path())
@click.option("--verify", is_flag=True, help="Re-read every shard; check sample counts and sha256.")
def shard_info_cmd(directory: str, verify: bool) -> None:
    """Print counts and class balance of a shard set; --verify checks every shard against the manifest."""
    _call("data.shards", "print_info", directory=directory, verify=verify)


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
    _call("eval.baselines", "run_baselines", "BaselinesConfig", **kwargs)


# -------------------------------------------------------------------------------------- evaluate
@command(cli, "evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
def evaluate_cmd(runs: tuple[str, ...], out: str) -> None:
    """Report (Table 5, per-fold accuracy, confusion matrices, AUROC, GAN figures) for RUN folders.

    RUN may be a transfer run, a baselines folder (its methods are expanded) or a pretrain run.
    """
    _call("eval.report", "run_evaluate", "EvaluateConfig", runs=runs, out=out)


# -------------------------------------------------------------------------------------- pretrain
@command(cli, "pretrain")
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Shard folder (with manifest.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (RUN).")
@click.option(
    "--preset",
    default="paper",
    type=click.Choice(["paper", "demo", "tiny"]),
    help="Model size: paper (GPU), demo (CPU in minutes), tiny (tests).",
)
@click.option("--steps", default=2000, type=click.IntRange(min=1), help="Total optimizer steps (G and D each).")
@click.option("--batch-size", default=32, type=click.IntRange(min=1), help="Real windows per step per process.")
@click.option("--lr", default=2e-4, type=float, help="Adam learning rate (generator; also D unless --lr-d).")
@click.option("--lr-d", default=None, type=float, help="Discriminator learning rate (default: --lr).")
@click.option("--beta1", default=0.5, type=float, help="Adam beta1 (DCGAN's 0.5).")
@click.option(
    "--checkpoint-every",
    default=500,
    type=click.IntRange(min=0),
    help="Save a resumable checkpoint every N steps (and at the end); 0 = only at the end.",
)
@click.option("--keep-checkpoints", default=3, type=click.IntRange(min=0), help="Newest checkpoints kept; 0 = all.")
@click.option(
    "--similarity-every",
    default=100,
    type=click.IntRange(min=0),
    help="Cosine/L2 of generated vs real windows every N steps (similarity.csv); 0 = off.",
)
@click.option("--similarity-samples", default=30, type=click.IntRange(min=1), help="Window pairs per similarity.")
@click.option(
    "--image-every",
    default=500,
    type=click.IntRange(min=0),
    help="TensorBoard image of real vs generated windows every N steps; 0 = off.",
)
@click.option(
    "--log-every",
    default=10,
    type=click.IntRange(min=1),
    help="Reduce and log losses every N steps (also when NaN/inf is checked).",
)
@click.option("--resume", default="auto", help="auto (latest checkpoint if any) | latest | none | PATH.")
@click.option("--seed", default=0, type=int, help="Seed for weights, noise and data order.")
@click.option("--workers", default=1, type=click.IntRange(min=0), help="Shard-reading workers per process.")
@click.option("--shuffle-buffer", default=1000, type=click.IntRange(min=1), help="Sample shuffle buffer.")
@click.option("--cache/--no-cache", default=False, help="Keep decoded shards in memory across epochs.")
@click.option(
    "--mixed-precision",
    default=None,
    type=click.Choice(["no", "bf16", "fp16"]),
    help="Override accelerate's mixed-precision setting.",
)
@click.option(
    "--debug-keys",
    is_flag=True,
    envvar="DDP_VAD_DEBUG_KEYS",
    help="Write RUN/debug/keys_rank*.txt and weight hashes per rank (for checks).",
)
@click.option("--progress/--no-progress", default=True, help="Progress bar on the main process.")
def pretrain_cmd(**kwargs) -> None:
    """Pretrain the GAN (generator vs LRCN discriminator) on shards; also under `accelerate launch`/`torchrun`."""
    _call("train.pretrain", "run_pretrain", "PretrainConfig", **kwargs)


# ---------------------------------------------------------------------------------------- predict
@command(cli, "predict")
@click.argument("clip_dir", type=click.Path())
@click.option(
    "--model",
    required=True,
    type=click.Path(),
    help="A transfer run folder (its fold models are averaged) or one model.safetensors.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="CSV of per-frame scores (default: <clip>_scores.csv beside CLIP_DIR); a PNG goes beside it.",
)
@click.option("--fold", default=None, type=click.IntRange(min=0), help="Use only this fold's model.")
@click.option("--batch-size", default=64, type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--threshold", default=0.5, type=click.FloatRange(0, 1), help="Score at which a frame is flagged.")
def predict_cmd(**kwargs) -> None:
    """Per-frame anomaly scores (CSV + score-over-time PNG) for CLIP_DIR, a folder of numbered frames."""
    _call("eval.predict", "run_predict", "PredictConfig", **kwargs)


# --------------------------------------------------------------------------------------- pipeline
@command(cli, "pipeline")
@click.option(
    "--data",
    default=None,
    type=click.Path(),
    help="A UCSD-style dataset; without it synthetic data is generated into OUT/data.",
)
@click.option("--dataset", default=None, help="UCSDped1 or UCSDped2 when --data holds both.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Pipeline folder (resumable).")
@click.option(
    "--preset",
    default="demo",
    type=click.Choice(["tiny", "demo", "paper"]),
    help="Model size and run lengths: demo runs on 2 CPU cores in minutes; paper is the full method.",
)
@click.option("--seed", default=0, type=int, help="Seed of every stage.")
@click.option("--folds", default=None, type=click.IntRange(min=2), help="CV folds (default: the preset's).")
@click.option("--protocol", default="window", type=click.Choice(["window", "clip"]), help="Fold protocol.")
@click.option(
    "--train", default="head", type=click.Choice(["head", "head+lstm", "all"]), help="What transfer fine-tunes."
)
@click.option("--steps", default=None, type=click.IntRange(min=1), help="GAN steps (default: the preset's).")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Fine-tuning epochs per fold.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="GAN batch size per process.")
@click.option("--methods", default="logreg,svm,rf,knn,nb", help="Classic ML baselines to run.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Shard-building processes.")
def pipeline_cmd(**kwargs) -> None:
    """Everything: synth (no --data) -> shards -> pretrain -> transfer (GAN and scratch) -> baselines -> evaluate."""
    _call("pipeline", "run_pipeline", "PipelineConfig", **kwargs)


# -------------------------------------------------------------------------------------- transfer
@command(cli, "transfer")
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Shard folder (with manifest.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (RUN).")
@click.option(
    "--from",
    "source",
    required=True,
    help="A pretrain run folder (GAN+LRCN: its discriminator's features) or 'scratch' (LRCN).",
)
@click.option(
    "--train",
    default="head",
    type=click.Choice(["head", "head+lstm", "all"]),
    help="What is fine-tuned: the head (features frozen, computed once), head + LSTM, or all.",
)
@click.option(
    "--folds",
    default=None,
    type=click.IntRange(min=2),
    help="Must match the shards' fold count (default: the shards').",
)
@click.option(
    "--protocol",
    default="window",
    type=click.Choice(["window", "clip"]),
    help="Folds over windows (the method's) or grouped by clip (no leakage).",
)
@click.option("--epochs", default=10, type=click.IntRange(min=1), help="Training epochs per fold.")
@click.option(
    "--preset",
    default=None,
    type=click.Choice(["paper", "demo", "tiny"]),
    help="Architecture for --from scratch (default: paper); a GAN run brings its own.",
)
@click.option("--batch-size", default=32, type=click.IntRange(min=1), help="Windows per step (each fold alone).")
@click.option("--lr", default=1e-3, type=click.FloatRange(min=0, min_open=True), help="Adam learning rate.")
@click.option("--seed", default=0, type=int, help="Seed of heads, dropout and data order (per fold).")
@click.option(
    "--resume",
    default="auto",
    type=click.Choice(["auto", "none"]),
    help="auto: skip finished folds, continue unfinished ones; none: refuse a non-empty --out.",
)
@click.option(
    "--holdout-type", default=None, help="Leave this anomaly type out of every training fold and report accuracy on it."
)
@click.option(
    "--mixed-precision",
    default=None,
    type=click.Choice(["no", "bf16", "fp16"]),
    help="Override accelerate's mixed-precision setting.",
)
@click.option("--method", default=None, help="Name in metrics.json (default: GAN+LRCN, or LRCN from scratch).")
@click.option(
    "--standardize/--no-standardize",
    default=True,
    help="--train head: standardise the frozen features per fold (folded into the saved head).",
)
@click.option("--progress/--no-progress", default=True, help="Progress bar on the main process.")
def transfer_cmd(**kwargs) -> None:
    """Fine-tune the LRCN classifier with k-fold CV, folds spread over processes (fold k on process k % P).

    Also under `accelerate launch -m ddp_vad transfer ...` / `torchrun -m ddp_vad transfer ...`.
    """
    _call("train.transfer", "run_transfer", "TransferConfig", **kwargs)


def main() -> None:
    """Console-script entry point."""
    # Keep thread oversubscription in check when several processes share a CPU box.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
