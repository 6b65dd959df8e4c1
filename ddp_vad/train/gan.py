"""One GAN training step and the generator's sampling, shared by ``pretrain`` and the GPU benchmark.

Each step: D step on real vs detached fake windows (BCE-with-logits on the LRCN's real/fake logit), then the G step
through the *updated* D with the non-saturating loss. D is frozen with ``requires_grad_(False)`` (never ``eval()``:
cuDNN LSTM backward needs train mode) and called under ``no_sync`` (its gradients are not wanted, so DDP must not
wait for them). G and D are separate DDP-wrapped modules (``accelerator.prepare(G, D, opt_g, opt_d)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddp_vad.models import real_fake_logit

STAT_NAMES = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g")


def _grad_norm(module: torch.nn.Module, accelerator) -> torch.Tensor:
    """L2 norm of a module's gradients (unscaled under fp16), without a host sync."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=accelerator.device)
    scaler = accelerator.scaler
    return total / scaler._get_scale_async() if scaler is not None and scaler.is_enabled() else total


def gan_step(
    accelerator,
    gen,
    disc,
    opt_g,
    opt_d,
    real: torch.Tensor,
    z_dim: int,
    label_smoothing: float = 0.0,
    instance_noise: float = 0.0,
    feature_matching: float = 0.0,
    pseudo: torch.Tensor | None = None,
) -> torch.Tensor:
    """One D step then one G step; returns detached ``STAT_NAMES``: the two losses, mean p(real) of real and of fake
    windows, and the gradient norms of D and G.

    The method's plain GAN is the default. Stabilisers (both off by default): ``label_smoothing`` s makes D's targets
    for real windows 1 - s (one-sided: fake targets stay 0); ``instance_noise`` is the std of Gaussian noise added to
    every window D sees (real and fake, in the D and the G step). ``feature_matching`` w adds
    ``w * ||mean f(real) - mean f(fake)||^2`` to the G loss, f = D's ``features`` (conv stack + LSTM, the part
    transfer keeps): G is asked to match the statistics of the features the classifier will reuse, not only to fool
    the head (Salimans et al. 2016). ``pseudo``: pseudo-anomalous windows (:mod:`ddp_vad.train.pseudo`) that join
    the generated ones on D's negative side (target 0) in the D step; None (the default) is the method's D step.
    """
    b = real.shape[0]
    ones = torch.ones(b, device=real.device)
    zeros = torch.zeros(b, device=real.device)
    fake = gen(torch.randn(b, z_dim, device=real.device))

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x + instance_noise * torch.randn_like(x) if instance_noise > 0 else x

    # D step: real -> 1 - s, fake -> 0; one forward over both halves (D has no batch norm: equals two calls).
    extra = [] if pseudo is None else [pseudo]
    logit = real_fake_logit(disc(noisy(torch.cat([real, fake.detach(), *extra])))).float()
    targets = [ones * (1.0 - label_smoothing), zeros, *(torch.zeros(len(x), device=real.device) for x in extra)]
    loss_d = F.binary_cross_entropy_with_logits(logit, torch.cat(targets))
    opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    grad_d = _grad_norm(disc, accelerator)
    opt_d.step()

    # G step through the updated D, non-saturating loss -log D(G(z)). D frozen (not eval) and out of DDP sync.
    disc.requires_grad_(False)
    try:
        with accelerator.no_sync(disc):
            loss_g = F.binary_cross_entropy_with_logits(real_fake_logit(disc(noisy(fake))).float(), ones)
            if feature_matching > 0:
                feats = accelerator.unwrap_model(disc).features  # the same weights, outside DDP's forward
                with torch.no_grad():
                    target = feats(noisy(real)).float().mean(0)
                loss_g = loss_g + feature_matching * (feats(noisy(fake)).float().mean(0) - target).pow(2).sum()
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            grad_g = _grad_norm(gen, accelerator)
            opt_g.step()
    finally:
        disc.requires_grad_(True)
    probs = torch.sigmoid(logit.detach())
    return torch.stack([loss_d.detach(), loss_g.detach(), probs[:b].mean(), probs[b : 2 * b].mean(), grad_d, grad_g])


@torch.no_grad()
def generate_windows(generator: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Windows from an unwrapped generator in eval mode (BN running statistics; training state untouched)."""
    was_training = generator.training
    generator.eval()
    try:
        return generator(z).float()
    finally:
        generator.train(was_training)
