"""Command-line interface. This layer only parses options and calls one public function per command
(:mod:`ddp_vad.api`).

Nothing heavy is imported to build it: a stage command's options come from ``cli_spec.json`` when only ``--help``
is asked (see :mod:`ddp_vad.clispec`), and its stage module (and torch) is imported when the command runs.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import click

from ddp_vad.clispec import cached_specs, config_class
from ddp_vad.errors import UserError, error_message
from ddp_vad.options import file_value_problem, param_specs, params_from_specs


def _apply_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: file values become defaults, so explicit flags still win."""
    if value is None:
        return None
    from ddp_vad.config import load_config_file  # numpy + yaml: only when a config file is given

    values = load_config_file(value)
    # Keys may be written as the flag ("from", "min-anomalous") or as the parameter name ("source").
    params = {p.name: p for p in ctx.command.params}
    for param in ctx.command.params:
        for opt in param.opts:
            params[opt.lstrip("-").replace("-", "_")] = param
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise UserError(f"config file {value}: unknown option(s) {', '.join(unknown)} for '{ctx.info_name}'")
    for key, item in values.items():
        problem = file_value_problem(params[key], item)
        if problem:
            raise UserError(f"config file {value}: {key} = {json.dumps(item, default=str)}: {problem}")
    ctx.default_map = {**(ctx.default_map or {}), **{params[k].name: v for k, v in values.items()}}
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
    ``error: <message>`` and exit 2, as does a missing required option (``error: missing option --out``); Ctrl-C
    prints ``interrupted`` and exits 130 (128 + SIGINT, as a shell reports it) from every command; anything else
    prints one line and a hint, and exits 1.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.MissingParameter as exc:
            sys.exit(_missing(exc))
        except (KeyboardInterrupt, click.exceptions.Abort):  # Abort: click's own Ctrl-C (at a prompt)
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo("interrupted", err=True)
            _exit_interrupted()
        except (click.exceptions.ClickException, click.exceptions.Exit):
            raise  # click's own usage errors already print one line
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {error_message(exc)}", err=True)
            if not isinstance(exc, UserError | OSError):
                click.echo("rerun with --debug for the traceback", err=True)
                sys.exit(1)
            sys.exit(2)


def _exit_interrupted() -> NoReturn:
    """Exit 130 after a caught Ctrl-C. Under ``python -m`` CPython marks a Ctrl-C as uncaught when it was raised
    inside code run by ``exec``/``eval`` of a string (dataclass and namedtuple creation during a lazy import), even
    though it was caught, and kills itself with SIGINT at exit instead; each new string ``eval`` clears the mark."""
    eval("None")
    sys.exit(130)


def _missing(exc: click.exceptions.MissingParameter) -> int:
    """Print ``error: missing option --out`` (or ``argument OUT``) on one line; returns click's usage status, 2."""
    param, command = exc.param, exc.ctx.command_path if exc.ctx else "ddp_vad"
    if isinstance(param, click.Option):
        what = f"option {param.opts[0]}"
    else:
        what = f"argument {param.name.upper() if param else exc.param_hint}"
    click.echo(f"error: missing {what} (see `{command} --help`)", err=True)
    return exc.exit_code


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


def _asks_help(args: list[str]) -> bool:
    """Whether the command line asks for ``--help`` (before a ``--``)."""
    args = args[: args.index("--")] if "--" in args else args
    return any(a in ("-h", "--help") for a in args)


class StageCommand(click.Command):
    """A command whose options are the fields of a stage's config dataclass, declared there once.

    The options are attached when the command is about to parse its arguments: from the cached declarations when
    only ``--help`` is asked (fast, no torch), else from the live dataclass (importing its stage module).
    """

    def __init__(self, name: str, path: str, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.stage_path = path  # key in clispec.STAGE_CONFIGS
        self._base_params = list(self.params)  # --config
        self._source: str | None = None

    def load_params(self, cached: bool) -> None:
        """Attach the stage options (``cached``: from cli_spec.json when it has them)."""
        if self._source == "live" or (self._source == "cached" and cached):
            return
        specs = cached_specs().get(self.stage_path) if cached else None
        if specs is None:
            specs, self._source = param_specs(config_class(self.stage_path)), "live"
        else:
            self._source = "cached"
        self.params = self._base_params + params_from_specs(specs)

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        self.load_params(cached=_asks_help(list(args)) or extra.get("resilient_parsing", False))
        return super().make_context(info_name, args, parent=parent, **extra)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._source is None:
            self.load_params(cached=False)
        return super().get_params(ctx)


def stage_command(group: click.Group, name: str, path: str | None = None) -> Callable:
    """A :class:`StageCommand` of ``group`` (``path``: its key in clispec.STAGE_CONFIGS, default ``name``)."""

    def decorate(func: Callable) -> click.Command:
        return group.command(name, cls=StageCommand, path=path or name)(with_config(func))

    return decorate


def _stage(func_name: str) -> Callable:
    """The public stage function ``ddp_vad.api.<func_name>`` (imported when a command runs)."""
    from ddp_vad import api

    return getattr(api, func_name)


def _config(path: str, kwargs: dict):
    return config_class(path)(**kwargs)


# ----------------------------------------------------------------------------------------- synth
@stage_command(cli, "synth")
def synth_cmd(**kwargs) -> None:
    """Write a synthetic dataset (walkway scenes with five anomaly types) to OUT, as UCSD frames or as videos."""
    _stage("synth")(_config("synth", kwargs))


# ----------------------------------------------------------------------------------------- shard
@cli.group("shard", cls=_Group)
def shard_group() -> None:
    """Build and inspect webdataset shards of labelled 10-frame windows."""


@stage_command(shard_group, "build", "shard build")
def shard_build_cmd(**kwargs) -> None:
    """Cut clips in DATA (UCSD, Avenue, ShanghaiTech, or videos + labels.csv) into labelled windows and write tar
    shards + manifest.json."""
    _stage("build_shards")(_config("shard build", kwargs))


@command(shard_group, "info")
@click.argument("directory", type=click.Path())
@click.option("--verify", is_flag=True, help="Re-read every shard; check sample counts and sha256.")
def shard_info_cmd(directory: str, verify: bool) -> None:
    """Print counts and class balance of a shard set; --verify checks every shard against the manifest."""
    from ddp_vad.data.shards import print_info

    print_info(directory, verify=verify)


# ------------------------------------------------------------------------------------- baselines
@stage_command(cli, "baselines")
def baselines_cmd(**kwargs) -> None:
    """Cross-validate classic ML baselines (60x90 pixels, frame-difference motion) on the same folds as transfer.

    A method whose OUT/<method>/metrics.json exists is skipped, so a re-run resumes.
    """
    _stage("baselines")(_config("baselines", kwargs))


# -------------------------------------------------------------------------------------- evaluate
@stage_command(cli, "evaluate")
def evaluate_cmd(**kwargs) -> None:
    """Report (Table 5, per-fold accuracy, confusion matrices, AUROC, GAN figures) for RUN folders.

    RUN may be a transfer run, a baselines folder (its methods are expanded) or a pretrain run.
    """
    _stage("evaluate")(_config("evaluate", kwargs))


# -------------------------------------------------------------------------------------- pretrain
@stage_command(cli, "pretrain")
def pretrain_cmd(**kwargs) -> None:
    """Pretrain the GAN (generator vs LRCN discriminator) on shards; also under `accelerate launch`/`torchrun`."""
    _stage("pretrain")(_config("pretrain", kwargs))


# ---------------------------------------------------------------------------------------- predict
@stage_command(cli, "predict")
def predict_cmd(**kwargs) -> None:
    """Per-frame anomaly scores (CSV + score-over-time PNG) for SOURCE: a folder of frames, a video file, a stream
    URL (rtsp://, http://...), a capture device (/dev/video0) or - (a video stream on stdin).

    Rows are written as scores become final; Ctrl-C finishes the files for the frames read so far and exits 130.
    """
    try:
        _stage("predict")(_config("predict", kwargs))
    except KeyboardInterrupt:
        _exit_interrupted()  # predict already printed its one line (the group would print a second)


# ----------------------------------------------------------------------------------------- export
@stage_command(cli, "export")
def export_cmd(**kwargs) -> None:
    """Export a transfer run's classifier for use outside PyTorch (ONNX + a JSON sidecar)."""
    _stage("export_model")(_config("export", kwargs))


# --------------------------------------------------------------------------------------- pipeline
@stage_command(cli, "pipeline")
def pipeline_cmd(**kwargs) -> None:
    """Everything: synth (no --data) -> shards -> pretrain -> transfer (GAN and scratch) -> baselines -> evaluate."""
    _stage("run_pipeline")(_config("pipeline", kwargs))


# -------------------------------------------------------------------------------------- transfer
@stage_command(cli, "transfer")
def transfer_cmd(**kwargs) -> None:
    """Fine-tune the LRCN classifier with k-fold CV, folds spread over processes (fold k on process k % P).

    Also under `accelerate launch -m ddp_vad transfer ...` / `torchrun -m ddp_vad transfer ...`.
    """
    _stage("transfer")(_config("transfer", kwargs))


def main() -> None:
    """Console-script entry point."""
    clean = False
    try:
        cli(prog_name="ddp_vad")
    except SystemExit as exc:
        clean = exc.code in (None, 0)
        raise
    finally:
        if "torch" in sys.modules:  # only a command that ran a stage can have joined a process group
            from ddp_vad.train.distributed import shutdown_process_group

            shutdown_process_group(clean)


if __name__ == "__main__":
    main()
