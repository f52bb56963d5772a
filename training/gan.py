"""PatchGAN discriminator, hinge losses and taming-transformers' adaptive GAN weight (stage 1).

The discriminator follows pix2pix / taming's ``NLayerDiscriminator`` (4x4 convolutions,
LeakyReLU 0.2, ``n_layers`` stride-2 stages, a 1-channel patch-logit map) with one change:
per-sample normalisation (InstanceNorm) instead of BatchNorm, so that real and fake images can
go through *one* forward pass (needed with DistributedDataParallel, which allows one forward per
backward) with exactly the statistics separate passes would give.

Adaptive weight (taming's ``calculate_adaptive_weight``): the GAN term is scaled by
``|grad_last nll| / (|grad_last g| + 1e-4)``, clamped to ``[0, 1e4]`` and detached, where
``last`` is the decoder's output convolution weight, so that the GAN gradient reaching the
image has the size of the reconstruction gradient. The stage multiplies it by ``gamma``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchDiscriminator", "adaptive_gan_weight", "hinge_d_loss", "hinge_g_loss"]


class PatchDiscriminator(nn.Module):
    """(b, in_channels, h, w) image -> (b, 1, h', w') patch logits (70x70 receptive field for 3 layers)."""

    def __init__(self, *, in_channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"n_layers and ndf must be positive; got {n_layers}, {ndf}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last stage keeps the resolution (pix2pix)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.InstanceNorm2d(ndf * mult, affine=True),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    # taming/pix2pix: conv weights N(0, 0.02), norm scales N(1, 0.02)
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.InstanceNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss ``(mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator loss ``-mean D(G(z))``."""
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, *, max_weight: float = 1e4) -> Tensor:
    """taming's adaptive weight ``|d nll / d last| / (|d g / d last| + 1e-4)`` (detached).

    Both losses must still have their graphs (``retain_graph`` is used).
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach()
