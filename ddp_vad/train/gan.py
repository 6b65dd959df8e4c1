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


def gan_step(accelerator, gen, disc, opt_g, opt_d, real: torch.Tensor, z_dim: int) -> torch.Tensor:
    """One D step then one G step; returns detached [loss_d, loss_g, mean p(real|real), mean p(real|fake)]."""
    b = real.shape[0]
    ones = torch.ones(b, device=real.device)
    zeros = torch.zeros(b, device=real.device)
    fake = gen(torch.randn(b, z_dim, device=real.device))

    # D step: real -> 1, fake -> 0; one forward over both halves (D has no batch norm, so this equals two calls).
    logit = real_fake_logit(disc(torch.cat([real, fake.detach()]))).float()
    loss_d = F.binary_cross_entropy_with_logits(logit, torch.cat([ones, zeros]))
    opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    opt_d.step()

    # G step through the updated D, non-saturating loss -log D(G(z)). D frozen (not eval) and out of DDP sync.
    disc.requires_grad_(False)
    try:
        with accelerator.no_sync(disc):
            loss_g = F.binary_cross_entropy_with_logits(real_fake_logit(disc(fake)).float(), ones)
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            opt_g.step()
    finally:
        disc.requires_grad_(True)
    probs = torch.sigmoid(logit.detach())
    return torch.stack([loss_d.detach(), loss_g.detach(), probs[:b].mean(), probs[b:].mean()])


@torch.no_grad()
def generate_windows(generator: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Windows from an unwrapped generator in eval mode (BN running statistics; training state untouched)."""
    was_training = generator.training
    generator.eval()
    try:
        return generator(z).float()
    finally:
        generator.train(was_training)
