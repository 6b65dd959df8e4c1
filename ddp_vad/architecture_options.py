"""Stage options (``pretrain``, ``transfer``, ``pipeline``) that override a preset's LRCN architecture:
``--input-mode``, ``--pooling``, ``--topk``, ``--input-pool``, ``--conv-channels``; None keeps the preset's
(:func:`ddp_vad.models.model_config_for` applies them)."""

from __future__ import annotations

from typing import Any

from ddp_vad.errors import UserError


def parse_conv_channels(text: str | None, flag: str = "--conv-channels") -> tuple[int, ...] | None:
    """``"16,16,16"`` -> ``(16, 16, 16)`` (None stays None); anything but positive integers is a one-line error."""
    if text is None:
        return None
    try:
        channels = tuple(int(c) for c in str(text).split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1:
        raise UserError(f"{flag} {text}: give positive integers separated by commas, one per conv layer (e.g. 8,8,8)")
    return channels


ARCHITECTURE_OPTIONS = ("input_mode", "pooling", "topk", "input_pool", "conv_channels")


def checked_capacity_options(input_pool: int | None, conv_channels: str | None) -> str | None:
    """Checks ``--input-pool`` and ``--conv-channels`` of a stage's options; returns ``--conv-channels`` in its
    canonical form (``"8,8,8"``), which is how the run's config records it."""
    if input_pool is not None and int(input_pool) < 1:
        raise UserError(f"--input-pool must be >= 1, got {input_pool}")
    channels = parse_conv_channels(conv_channels)
    return None if channels is None else ",".join(map(str, channels))


def architecture_overrides(cfg: Any) -> dict[str, Any]:
    """``{field: value}`` of :data:`ARCHITECTURE_OPTIONS` from a stage's options, ready for
    :func:`ddp_vad.models.model_config_for` (``conv_channels`` as a tuple)."""
    overrides = {name: getattr(cfg, name) for name in ARCHITECTURE_OPTIONS}
    overrides["conv_channels"] = parse_conv_channels(overrides["conv_channels"])
    return overrides
