"""Window augmentation for fine-tuning: the same random transform for every frame of a window.

Three cheap transforms of ``[B, T, 1, H, W]`` windows in ``[0, 1]``, chosen per window:

- ``flip``: horizontal flip with probability 1/2 (a walkway seen in a mirror is still a walkway);
- ``shift``: translate by up to ``max_shift`` pixels in each direction, the uncovered border repeating the edge
  (a small crop-and-resize without the resize: the window keeps its size and the model its input);
- ``jitter``: brightness and contrast, ``x' = clamp((x - m) * c + m + b)`` with m the window's mean,
  c in [1 - 0.2, 1 + 0.2] and b in [-0.05, 0.05] (lighting changes from clip to clip).

Randomness comes from a ``torch.Generator`` seeded by (seed, fold, epoch) (:func:`epoch_generator`), never from the
global RNG, so an epoch's transforms do not depend on what ran before it and a resumed fold (which restarts at an
epoch boundary) sees exactly the transforms of an uninterrupted one. Used on frames only: with ``--train head`` or
``head+lstm`` the frozen part's output is cached once from the plain windows, so those scopes cannot augment.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ddp_vad.errors import UserError

AUGMENTATIONS = ("flip", "shift", "jitter")
MAX_SHIFT = 4  # pixels, at the shards' frame size
CONTRAST, BRIGHTNESS = 0.2, 0.05


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """``"flip,shift"`` -> ("flip", "shift"); ``none``/empty -> (); unknown names are a UserError."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise UserError(f"--augment: unknown {', '.join(unknown)} (choose from none, {', '.join(AUGMENTATIONS)})")
    return names


def epoch_generator(seed: int, fold: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's augmentations: a function of (seed, fold, epoch) only."""
    state = int(np.random.SeedSequence([abs(int(seed)), int(fold), int(epoch), 0xA6]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each window by its own (dy, dx) integer offset, replicating the edges."""
    b, t, c, h, w = x.shape
    padded = F.pad(x.reshape(b, t * c, h, w), (pad, pad, pad, pad), mode="replicate")
    top, left = (pad + dy).tolist(), (pad + dx).tolist()
    out = torch.stack([padded[i, :, top[i] : top[i] + h, left[i] : left[i] + w] for i in range(b)])
    return out.reshape(b, t, c, h, w)


def augment_windows(x: torch.Tensor, names: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """``x`` [B, T, C, H, W] in [0, 1] with ``names``' transforms applied per window (draws from ``gen``).

    Every transform draws its random numbers even for windows it leaves alone, so the stream of draws (and with it
    every later batch) does not depend on the data.
    """
    if not names:
        return x
    b = x.shape[0]
    if "flip" in names:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.to(x.device).view(b, 1, 1, 1, 1), x.flip(-1), x)
    if "shift" in names:
        offsets = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (2, b), generator=gen)
        x = _shift(x, offsets[0], offsets[1], MAX_SHIFT)
    if "jitter" in names:
        c = (1 + CONTRAST * (2 * torch.rand(b, generator=gen) - 1)).to(x.device).view(b, 1, 1, 1, 1)
        bright = (BRIGHTNESS * (2 * torch.rand(b, generator=gen) - 1)).to(x.device).view(b, 1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        x = ((x - mean) * c + mean + bright).clamp(0, 1)
    return x
