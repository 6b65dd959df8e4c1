"""The pretraining variants beyond the method's GAN step (docs/models.md, "Pretraining variants"): where a step's
pseudo-anomalies come from, the discriminator-only step, and the early generator snapshot of the two-phase schedule.

- ``--pseudo-anomalies RATE``: each GAN step's D step also sees ``round(RATE x batch)`` pseudo-anomalous windows
  (made from the train clips by :mod:`ddp_vad.train.pseudo`) on its negative side;
- ``--phase2-steps N`` (Old is Gold, OGNet): after the GAN steps, N steps train only D, with real windows and the
  current generator's outputs as "good" and an early snapshot of the generator (taken at ``EARLY_FRACTION`` of the
  GAN steps) plus pseudo-anomalies as "bad";
- ``--objective pseudo``: no generator at all; D learns normal train windows ("good") against pseudo-anomalies.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from ddp_vad.data.reader import frames_to_float, load_train_clips
from ddp_vad.errors import UserError
from ddp_vad.models import ModelConfig, real_fake_logit
from ddp_vad.train.gan import _grad_norm, generate_windows
from ddp_vad.train.pseudo import parse_kinds, pseudo_count, sample_pseudo, step_rng
from ddp_vad.weights import load_generator, save_model

EARLY_GENERATOR_FILE = "generator_early.safetensors"
EARLY_FRACTION = 0.1  # the "old" generator of phase 2: a snapshot after this share of the GAN steps


class PseudoSource:
    """One process's pseudo-anomalous windows per step, from the train clips in memory (seeded by seed, rank and
    step, so a resumed run draws the same windows)."""

    def __init__(self, shards: str | Path, rate: float, kinds: str, window: int, seed: int, rank: int):
        self.rate, self.kinds, self.window, self.seed, self.rank = rate, parse_kinds(kinds), window, seed, rank
        self.clips = load_train_clips(shards)
        if not self.clips:
            raise UserError(f"pseudo-anomalies are made from train clips (normal footage); {shards} holds none")

    def windows(self, step: int, batch: int, device: torch.device, n: int | None = None) -> torch.Tensor | None:
        """Step ``step``'s pseudo-anomalies as float windows on ``device`` ([n, T, 1, H, W]); None when there are
        none (rate 0: the batch is left as it is)."""
        n = pseudo_count(self.rate, batch) if n is None else n
        if n == 0:
            return None
        frames, _ = sample_pseudo(self.clips, n, self.kinds, self.window, step_rng(self.seed, self.rank, step))
        return frames_to_float(torch.from_numpy(frames).to(device, non_blocking=True))


def disc_step(accelerator, disc, opt_d, good: torch.Tensor, bad: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """One step of D alone: ``good`` windows -> 1, ``bad`` ones -> 0 (one forward over both). Returns the
    ``STAT_NAMES`` row of :func:`ddp_vad.train.gan.gan_step` with D(real)/D(fake) read as mean p(good)/p(bad) and
    the generator's loss and gradient norm 0 (it does not train)."""
    x = torch.cat([good, bad])
    if noise > 0:
        x = x + noise * torch.randn_like(x)
    logit = real_fake_logit(disc(x)).float()
    target = torch.cat([torch.ones(len(good), device=x.device), torch.zeros(len(bad), device=x.device)])
    loss = F.binary_cross_entropy_with_logits(logit, target)
    opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad = _grad_norm(disc, accelerator)
    opt_d.step()
    probs = torch.sigmoid(logit.detach())
    zero = torch.zeros((), device=x.device)
    return torch.stack([loss.detach(), zero, probs[: len(good)].mean(), probs[len(good) :].mean(), grad, zero])


def phase2_windows(gen, early, real: torch.Tensor, z_dim: int, pseudo: torch.Tensor | None):
    """Phase 2's (good, bad): real windows + the current generator's, against the early generator's + pseudo-
    anomalies. Both generators in eval mode, without gradients (neither trains)."""
    z = torch.randn(2 * len(real), z_dim, device=real.device)
    good = torch.cat([real, generate_windows(gen, z[: len(real)])])
    bad = [generate_windows(early, z[len(real) :])] + ([] if pseudo is None else [pseudo])
    return good, torch.cat(bad)


def early_step(gan_steps: int) -> int:
    """The GAN step after which the early generator is kept (at least 1)."""
    return max(1, int(round(EARLY_FRACTION * gan_steps)))


def keep_early(gen: torch.nn.Module, run_dir: Path, model_cfg: ModelConfig, is_main: bool) -> torch.nn.Module:
    """A frozen copy of the generator now (every rank), written to ``RUN/generator_early.safetensors`` by the main
    process so that a resumed run finds it."""
    early = copy.deepcopy(gen).eval().requires_grad_(False)
    if is_main:
        save_model(early, run_dir / EARLY_GENERATOR_FILE, model_cfg, kind="generator")
    return early


def load_early(run_dir: Path, device: torch.device) -> torch.nn.Module:
    """The early generator a run kept before it was interrupted."""
    path = run_dir / EARLY_GENERATOR_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the run resumes past its early generator snapshot (--phase2-steps)")
    with torch.random.fork_rng(devices=[]):  # building the module draws initial weights: keep the resumed RNG state
        return load_generator(path)[0].to(device).requires_grad_(False)
