"""Every command-line option is declared once, as a field of its stage's config dataclass.

A field made with :func:`option` carries its help text (and, where the name or kind differs from the field, its
flag); its type and default are the field's own. ``cli.py`` turns the fields into click options with
:func:`click_params`, and the dataclass's ``__post_init__`` is the one place where values are checked. So a
parameter can be followed from the flag to the function that uses it by its name alone::

    @dataclass
    class TransferConfig:
        epochs: int = option(10, "Training epochs per fold.")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

import click

_KEY = "ddp_vad_option"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How a config field appears on the command line."""

    help: str
    flag: str | None = None  # e.g. "--from" for the field ``source``; default: --field-name
    choices: Sequence[str] | None = None
    argument: bool = False  # a positional argument instead of an option
    negatable: bool = False  # booleans: --name/--no-name instead of a plain flag
    envvar: str | None = None


def option(default: Any = dataclasses.MISSING, help: str = "", **spec: Any) -> Any:
    """A dataclass field that is also a command-line option (see :class:`OptionSpec` for ``spec``)."""
    metadata = {_KEY: OptionSpec(help=help, **spec)}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether it repeats) of an annotation such as ``int | None`` or ``tuple[str, ...]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]  # ``str | Path``: the command line gives the first
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def param_specs(config_cls: type) -> list[dict[str, Any]]:
    """JSON-ready description of every :func:`option` field of ``config_cls``, in field order.

    This is all click needs to build the command's parameters; ``cli_spec.json`` holds it for every command so that
    ``--help`` can be answered without importing the stage modules (and torch).
    """
    hints = typing.get_type_hints(config_cls)
    specs = []
    for field in dataclasses.fields(config_cls):
        spec: OptionSpec | None = field.metadata.get(_KEY)
        if spec is None:
            continue
        kind, repeated = _base_type(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        specs.append(
            {
                "name": field.name,
                "kind": kind.__name__,
                "repeated": repeated,
                "required": required,
                "default": None if required else field.default,
                **{k: list(v) if k == "choices" and v is not None else v for k, v in dataclasses.asdict(spec).items()},
            }
        )
    return specs


def params_from_specs(specs: list[dict[str, Any]]) -> list[click.Parameter]:
    """click parameters from :func:`param_specs` output."""
    params: list[click.Parameter] = []
    for s in specs:
        kind = _KINDS[s["kind"]]
        ptype: Any = click.Choice(list(s["choices"])) if s["choices"] else kind
        required, default, name = s["required"], s["default"], s["name"]
        if s["argument"]:
            params.append(click.Argument([name], type=ptype, nargs=-1 if s["repeated"] else 1, required=required))
            continue
        flag = s["flag"] or "--" + name.replace("_", "-")
        decls = [flag, name]
        extra: dict[str, Any] = {}
        if kind is bool:
            decls = [f"{flag}/--no-{flag[2:]}" if s["negatable"] else flag, name]
            extra = {} if s["negatable"] else {"is_flag": True}
        if not required:  # click takes an explicit default=None as a value and would never report it missing
            extra["default"] = default
        params.append(
            click.Option(
                decls,
                type=None if kind is bool else ptype,
                required=required,
                help=s["help"],
                envvar=s["envvar"],
                show_default=not required and default is not None and default is not False,
                **extra,
            )
        )
    return params


def click_params(config_cls: type) -> list[click.Parameter]:
    """click parameters for every :func:`option` field of ``config_cls``, in field order."""
    return params_from_specs(param_specs(config_cls))


def file_value_problem(param: click.Parameter, value: Any) -> str | None:
    """Why ``value`` read from a config file cannot be ``param``'s value, or None when it can.

    Checked strictly against the type the option declares: click would quietly turn ``1.7`` and ``true`` into the
    integer 1 and a number into text. ``None`` (YAML ``null``) only stands for an option whose default is unset.
    """
    if value is None:
        return None if param.default is None and not param.required else "expected a value, got nothing"
    if param.nargs == -1:  # a repeated argument: a list, or one value
        problems = (file_value_problem(_single(param), v) for v in (value if isinstance(value, list) else [value]))
        return next((p for p in problems if p), None)
    ptype = param.type
    if isinstance(param, click.Option) and param.is_flag or isinstance(ptype, click.types.BoolParamType):
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(ptype, click.Choice):
        choices = [str(c) for c in ptype.choices]
        return None if isinstance(value, str) and value in choices else f"expected one of {', '.join(choices)}"
    if isinstance(ptype, click.types.IntParamType):
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if isinstance(ptype, click.types.FloatParamType):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if isinstance(value, str) and _is_number(value):  # YAML 1.1 reads 1e-3 (no dot) as text
            return f"expected a number, got text (in YAML write {float(value)!r})"
        return "expected a number"
    return None if isinstance(value, str) else 'expected text (put it in quotes: "...")'


def _single(param: click.Parameter) -> click.Parameter:
    """A one-value copy of a repeated argument, to check its items one by one."""
    return click.Argument([param.name], type=param.type, required=param.required)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
