"""Where a transfer run's classifier starts: the architecture and the feature-extractor weights of ``--from``.

``--from GANRUN``: the pretrained discriminator's architecture and features (a GAN that saw every clip is refused
under the leak-free protocol); ``--from scratch``: the preset's architecture, freshly initialised per fold;
``--from random``: the same, but one random LRCN (seeded once) frozen for every fold, as one GAN serves every fold,
the control of the GAN's claim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ddp_vad.architecture_options import architecture_overrides
from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object
from ddp_vad.models import ModelConfig, build_lrcn, model_config_for
from ddp_vad.runfiles import config_file
from ddp_vad.train.classifier import RANDOM, SCRATCH, discriminator_file, fold_seed, gan_features

FRESH = (SCRATCH, RANDOM)  # sources without a GAN: freshly initialised weights
DEFAULT_PRESET = "paper"


def resolve_model(cfg: Any, manifest: dict) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, list]:
    """The classifier's architecture, the feature-extractor weights to start from (None from scratch) and notes;
    ``cfg`` is the run's :class:`ddp_vad.train.transfer.TransferConfig`."""
    if cfg.source in FRESH:
        notes = []
        if cfg.source == SCRATCH and cfg.train != "all":
            notes.append(
                f"--from scratch with --train {cfg.train}: the frozen part keeps its random initial weights "
                "(the method's LRCN baseline trains everything: --train all)"
            )
        model_cfg = model_config_for(
            cfg.preset or DEFAULT_PRESET, manifest, dropout=cfg.dropout, **architecture_overrides(cfg)
        )
        model_cfg = with_prior(model_cfg, cfg)
        if cfg.source == RANDOM:  # one random LRCN serves every fold, as one GAN does: its output is computed once
            state = build_lrcn_seeded(model_cfg, fold_seed(cfg.seed, RANDOM_INIT_FOLD)).features.state_dict()
            return model_cfg, {k: v.detach().clone() for k, v in state.items()}, notes
        return model_cfg, None, notes
    model_cfg, state = gan_features(cfg.source, manifest)
    notes = check_gan_protocol(cfg.source, cfg.protocol)
    if cfg.preset is not None and cfg.preset != model_cfg.preset:
        raise UserError(
            f"--preset {cfg.preset}: the GAN run {cfg.source} brings its own architecture ({model_cfg.preset}); "
            "leave --preset out (it only picks the architecture for --from scratch)"
        )
    for name, asked in architecture_overrides(cfg).items():
        have = getattr(model_cfg, name)
        if asked is not None and asked != have:
            shown = ",".join(map(str, have)) if isinstance(have, tuple) else have  # as the option spells it
            raise UserError(
                f"--{name.replace('_', '-')} {getattr(cfg, name)}: the GAN run {cfg.source} was pretrained with "
                f"{name} {shown} and brings its own architecture; pretrain with the option instead"
            )
    if cfg.dropout is not None:  # not an architecture change: the same weights, another dropout rate
        model_cfg = dataclasses.replace(model_cfg, dropout=cfg.dropout)
    return with_prior(model_cfg, cfg), state, notes


def with_prior(model_cfg: ModelConfig, cfg: Any) -> ModelConfig:
    """The classifier's architecture with the motion prior asked (``--motion-prior``; a GAN's discriminator has none:
    the prior's buffers sit outside the features it hands over)."""
    return dataclasses.replace(model_cfg, motion_prior=getattr(cfg, "motion_prior", "none") == "energy")


RANDOM_INIT_FOLD = 0x5A4D  # the random control's seed stream: no real fold has this index


def build_lrcn_seeded(model_cfg: ModelConfig, seed: int):
    """A freshly initialised LRCN under ``torch.manual_seed(seed)`` (the random control's frozen extractor)."""
    torch.manual_seed(seed)
    return build_lrcn(model_cfg)


def check_gan_protocol(source: str, protocol: str) -> list[str]:
    """Under the leak-free protocol the GAN must have pretrained on the train clips only (``pretrain --protocol
    leakfree``): a GAN that saw every window has seen each fold's test clips. Returns notes."""
    if protocol != "leakfree":
        return []
    config = config_file(discriminator_file(source).parent)
    if not config.is_file():
        return [f"cannot check what the GAN {source} was pretrained on (no {config}): the leak-free guarantee "
                "assumes it saw the train clips only"]  # fmt: skip
    gan_protocol = read_json_object(config, "pretrain run config").get("config", {}).get("protocol", "window")
    if gan_protocol != "leakfree":
        raise UserError(
            f"--protocol leakfree: the GAN run {source} was pretrained with --protocol {gan_protocol} (windows of "
            "every clip, the test clips included), which breaks the guarantee; pretrain it with --protocol leakfree, "
            "or use --protocol window/clip here"
        )
    return []
