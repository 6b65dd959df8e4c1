"""The classifier: an LRCN whose feature extractor comes from the GAN's discriminator (or from scratch), frozen
per ``--train``, and the frozen part's output computed once instead of every epoch.

``--train`` picks what is fine-tuned (the method's Table 2 scenarios): ``head`` (features frozen), ``head+lstm`` (conv
stack frozen) or ``all``. With ``head`` the frozen feature extractor's output (eval mode: the dropout before the LSTM is
off) is computed once for every window and the head trains on it -- far cheaper than re-running the CNN + LSTM each
epoch. With ``head+lstm`` only the conv stack is frozen; it has no mode-dependent layers, so caching its per-frame
output and running dropout + LSTM + head on the cache is *exactly* the full forward pass.

**Standardised head inputs** (``--train head``): a discriminator's LSTM outputs vary little between windows around a
large offset (on the Ped1 sample after 100 demo GAN steps: std 0.01 per feature around |mean| 0.6), so the dropout
before the head's first Linear buries the signal and the head stays at chance. Each fold standardises the cached
features with the mean/std of its training windows; at export this is folded into the head's first Linear, so the
exported ``model.safetensors`` is a plain LRCN that maps frames to the same scores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ddp_vad.data.reader import frames_to_float
from ddp_vad.errors import UserError
from ddp_vad.models import DISCRIMINATOR_FILE, LRCN, FeatureExtractor, ModelConfig, build_lrcn
from ddp_vad.train.distributed import all_gather_objects
from ddp_vad.weights import load_model, load_model_config

SCRATCH = "scratch"
RANDOM = "random"  # the control of GAN+LRCN: the same head on a frozen, randomly initialised LRCN
TRAIN_SCOPES = ("head", "head+lstm", "all")
CHUNK = 64  # windows per forward pass for frozen features and scoring: fixed, so numbers do not depend on P


def discriminator_file(source: str | Path) -> Path:
    """The discriminator weights of a pretrain run (a run folder or the ``.safetensors`` file itself)."""
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"--from {source}: GAN run not found (give a pretrain run folder holding {DISCRIMINATOR_FILE}, "
            f"or '{SCRATCH}')"
        )
    if path.is_dir():
        path = path / DISCRIMINATOR_FILE
        if not path.is_file():
            raise UserError(f"--from {source}: no {DISCRIMINATOR_FILE} there (is the pretrain run finished?)")
    return path


def gan_features(source: str | Path, manifest: dict) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The architecture and feature-extractor weights of a pretrain run's discriminator.

    The GAN must have been trained on windows of the shards' length and frame size.
    """
    path = discriminator_file(source)
    model_cfg = load_model_config(path)
    got = (model_cfg.window, model_cfg.height, model_cfg.width)
    want = (int(manifest["window"]), int(manifest["height"]), int(manifest["width"]))
    if got != want:
        raise UserError(
            f"GAN run {source} was trained on windows of {got[0]} frames of {got[1]}x{got[2]} (HxW) but the shards "
            f"hold {want[0]} frames of {want[1]}x{want[2]}: pretrain on these shards or use shards of the GAN's size"
        )
    disc, _ = load_model(path, build_lrcn)  # checks every tensor against the stored config (a UserError naming path)
    return model_cfg, {k: v.detach().clone() for k, v in disc.features.state_dict().items()}


def fold_seed(seed: int, fold: int) -> int:
    """The seed of one fold: a function of (seed, fold) only, never of the process that runs it."""
    return int(np.random.SeedSequence([abs(int(seed)), int(fold), 0x7F]).generate_state(1)[0])


def set_trainable(model: LRCN, train: str) -> LRCN:
    """Freeze what ``train`` keeps fixed: ``head`` -> all of ``features``; ``head+lstm`` -> the conv stack."""
    if train not in TRAIN_SCOPES:
        raise UserError(f"--train {train}: choose one of {', '.join(TRAIN_SCOPES)}")
    model.requires_grad_(True)
    if train == "head":
        model.features.requires_grad_(False)
    elif train == "head+lstm":
        model.features.convs.requires_grad_(False)
    return model


def build_classifier(
    model_cfg: ModelConfig, train: str, seed: int, features_state: dict[str, torch.Tensor] | None = None
) -> LRCN:
    """A classifier LRCN seeded with ``seed`` (the fold's): features copied from ``features_state`` when given
    (exactly), head new, parameters frozen per ``train``. Also seeds torch's global RNG (dropout) with ``seed``."""
    torch.manual_seed(seed)
    model = build_lrcn(model_cfg)
    if features_state is not None:
        model.features.load_state_dict(features_state, strict=True)
    return set_trainable(model, train)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable, frozen and total parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def lstm_from_frame_features(features: FeatureExtractor, y: torch.Tensor) -> torch.Tensor:
    """``features.forward`` after the conv stack (and its spatial pooling): dropout -> LSTM (fp32, autocast off) ->
    last step.

    ``features(x) == lstm_from_frame_features(features, features.frame_features(x))``: both run
    ``FeatureExtractor.temporal`` (a test checks that they agree for every input mode and pooling).
    """
    return features.temporal(y)


def frozen_part(model: LRCN, train: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The frozen prefix whose output is cached: the whole feature extractor (``head``), the conv stack
    (``head+lstm``) or nothing (``all``)."""
    if train == "head":
        return model.features
    if train == "head+lstm":
        return model.features.frame_features
    return None


def trainable_forward(model: LRCN, train: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits from the cached frozen output (or from frames when nothing is cached)."""
    if train == "head":
        return model.head
    if train == "head+lstm":
        return lambda y: model.head(lstm_from_frame_features(model.features, y))
    return model


def feature_standardization(cache: torch.Tensor, train_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature over the fold's training windows (constant features keep std 1)."""
    x = cache[torch.from_numpy(train_idx).to(cache.device)].double()
    x = x.reshape(-1, x.shape[-1])  # per-cell features ([N, n, F], pooling cells): one mean/std over every cell
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean.float(), std.float()


def fold_standardization_into_head(model: LRCN, mean: torch.Tensor, std: torch.Tensor) -> LRCN:
    """A copy of ``model`` whose head takes raw features: ``(x - mean) / std`` is folded into the head's first Linear
    (``W' = W / std``, ``b' = b - W' mean``). Exact in eval mode, where the dropout before that Linear is the
    identity, so the exported LRCN maps frames to the same scores without any extra layer."""
    out = copy.deepcopy(model)
    linear = out.head.net[1]
    with torch.no_grad():
        w = linear.weight.double() / std.double().to(linear.weight.device)
        linear.bias.copy_((linear.bias.double() - w @ mean.double().to(w.device)).to(linear.bias.dtype))
        linear.weight.copy_(w.to(linear.weight.dtype))
    return out


def train_mode(model: LRCN, train: str) -> None:
    """Training mode for what is trained; with ``head`` the cached features came from eval mode."""
    model.train()
    if train == "head":  # the cached features came from eval mode; only the head's own dropout is active
        model.features.eval()


# ----------------------------------------------------------------------------------- frozen features
def _chunks(n: int) -> list[np.ndarray]:
    return [np.arange(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)]


@torch.no_grad()
def encode_windows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    frames: np.ndarray,
    chunks: list[np.ndarray],
    device: torch.device,
    autocast: Callable,
) -> list[torch.Tensor]:
    """``fn`` of the given chunks of uint8 windows, as float32 CPU tensors (one per chunk)."""
    out = []
    for idx in chunks:
        x = frames_to_float(torch.from_numpy(frames[idx]).to(device))
        with autocast():
            out.append(fn(x).float().cpu())
    return out


def compute_cache(
    fn: Callable[[torch.Tensor], torch.Tensor],
    frames: np.ndarray,
    device: torch.device,
    autocast: Callable,
    group=None,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """``fn`` of every window, computed in fixed chunks; with ``world > 1`` chunk i is computed by process
    ``i % world`` and the chunks are gathered (every process must call this). Identical numbers for any ``world``."""
    chunks = _chunks(len(frames))
    if world == 1:
        return torch.cat(encode_windows(fn, frames, chunks, device, autocast))
    mine = list(range(rank, len(chunks), world))
    parts = encode_windows(fn, frames, [chunks[i] for i in mine], device, autocast)
    everything = all_gather_objects(list(zip(mine, parts, strict=True)), group, world)
    by_index = dict(item for part in everything for item in part)
    return torch.cat([by_index[i] for i in range(len(chunks))])
