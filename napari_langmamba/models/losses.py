"""Training losses: LangDA (language-engaged dual-space alignment) and the pyramid semantic loss.

``LangDALoss`` aligns a denoised image with its normal-dose reference in the frozen LangAE's two
spaces: the continuous latent after ``quant_conv`` and the quantized (language-token) latent:

    L = MSE(denoised, target) + weight * (MSE(z(denoised), z(target)) + MSE(z_q(denoised), z_q(target)))

``weight`` is 0.1 in LangMamba and 0.5 in LEDA. The LangAE is frozen (eval mode, no gradients);
the target side runs under ``no_grad``; gradients reach ``denoised`` only (the quantized term
through the quantizer's straight-through estimator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_langmamba.errors import ConfigError
from napari_langmamba.models.langae import LangAE
from napari_langmamba.models.quantizer import pyramid_semantic_loss

__all__ = ["LangDALoss", "pyramid_semantic_loss"]


class LangDALoss(nn.Module):
    """LangDA loss with a frozen LangAE.

    Parameters
    ----------
    langae
        A trained LangAE; it is put in eval mode, its parameters stop requiring gradients, and
        it stays in eval mode when this module's ``train()`` is called.
    weight
        lambda, the weight of the two alignment terms (0.1 LangMamba, 0.5 LEDA).
    """

    def __init__(self, langae: LangAE, *, weight: float = 0.1) -> None:
        super().__init__()
        if not float(weight) >= 0.0:
            raise ConfigError(f"The LangDA weight must be >= 0; got {weight}.")
        self.weight = float(weight)
        self.langae = langae
        self.langae.requires_grad_(False)
        self.langae.eval()

    def train(self, mode: bool = True) -> LangDALoss:
        super().train(mode)
        self.langae.eval()  # frozen: dropout/normalisation behaviour never switches to training
        return self

    def forward(self, denoised: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and its detached parts ``{"mse", "feature", "token", "total"}`` for logging.

        Both inputs are (b, 1, h, w) in the model's [0, 1] scale with h, w multiples of 16.
        """
        if denoised.shape != target.shape:
            raise ConfigError(
                f"Denoised and target images must have the same shape; got {tuple(denoised.shape)} "
                f"and {tuple(target.shape)}."
            )
        target = target.detach()  # the reference is data, never a path for gradients
        mse = F.mse_loss(denoised, target)
        with torch.no_grad():
            z_target = self.langae.encode(target)
            zq_target = self.langae.quantize(z_target, target).z_q
        z_denoised = self.langae.encode(denoised)
        zq_denoised = self.langae.quantize(z_denoised, denoised).z_q  # straight-through: gradient reaches z
        feature = F.mse_loss(z_denoised, z_target)
        token = F.mse_loss(zq_denoised, zq_target)
        total = mse + self.weight * (feature + token)
        parts = {"mse": mse.detach(), "feature": feature.detach(), "token": token.detach(), "total": total.detach()}
        return total, parts
