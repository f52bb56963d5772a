"""LangDA loss: value, frozen LangAE, gradients reach the denoised image only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_langmamba.errors import ConfigError
from napari_langmamba.models.codebook import load_codebook
from napari_langmamba.models.langae import LangAE, LangAEConfig
from napari_langmamba.models.losses import LangDALoss, pyramid_semantic_loss
from napari_langmamba.models.quantizer import pyramid_semantic_loss as quantizer_semantic_loss

torch.set_num_threads(1)


def _langae() -> LangAE:
    torch.manual_seed(0)
    return LangAE(LangAEConfig.preset("tiny", codebook_dim=16), codebook=load_codebook("random:64x16"))


def test_langda_value_matches_definition():
    langae = _langae()
    loss_fn = LangDALoss(langae, weight=0.5)
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 1, 32, 32, generator=g)
    denoised = (target + 0.1 * torch.randn(2, 1, 32, 32, generator=g)).clamp(0, 1)
    loss, parts = loss_fn(denoised, target)
    with torch.no_grad():
        z_d, z_t = langae.encode(denoised), langae.encode(target)
        zq_d, zq_t = langae.quantize(z_d).z_q, langae.quantize(z_t).z_q
    assert torch.allclose(parts["mse"], F.mse_loss(denoised, target))
    assert torch.allclose(parts["feature"], F.mse_loss(z_d, z_t))
    assert torch.allclose(parts["token"], F.mse_loss(zq_d, zq_t))
    assert torch.allclose(loss, parts["mse"] + 0.5 * (parts["feature"] + parts["token"]))
    assert float(parts["feature"]) > 0 and set(parts) == {"mse", "feature", "token", "total"}
    zero, zero_parts = LangDALoss(langae, weight=0.0)(denoised, target)
    assert torch.allclose(zero, zero_parts["mse"])
    same, same_parts = loss_fn(target, target)
    assert float(same) == 0.0 and float(same_parts["token"]) == 0.0
    assert LangDALoss(langae).weight == 0.1


def test_langda_gradients_reach_denoised_only():
    langae = _langae()
    loss_fn = LangDALoss(langae)
    loss_fn.train()
    assert not langae.training  # frozen LangAE stays in eval mode
    before = {k: v.clone() for k, v in langae.state_dict().items()}

    denoiser = torch.nn.Conv2d(1, 1, 3, padding=1)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-2)
    target = torch.rand(2, 1, 32, 32).requires_grad_(True)
    noisy = (target.detach() + 0.05 * torch.randn_like(target)).clamp(0, 1)
    denoised = denoiser(noisy)
    denoised.retain_grad()
    loss, _ = loss_fn(denoised, target)
    loss.backward()
    optimizer.step()

    assert denoised.grad is not None and denoised.grad.abs().sum() > 0
    assert denoiser.weight.grad is not None
    assert target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in langae.parameters())
    assert all(torch.equal(v, before[k]) for k, v in langae.state_dict().items())

    # the alignment terms add to the image-space gradient (they are not cut off)
    d1 = denoised.detach().clone().requires_grad_(True)
    LangDALoss(langae, weight=0.0)(d1, target.detach())[0].backward()
    d2 = denoised.detach().clone().requires_grad_(True)
    LangDALoss(langae, weight=1.0)(d2, target.detach())[0].backward()
    assert not torch.allclose(d1.grad, d2.grad)


def test_langda_checks_inputs():
    with pytest.raises(ConfigError):
        LangDALoss(_langae(), weight=-1.0)
    with pytest.raises(ConfigError, match="same shape"):
        LangDALoss(_langae())(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 16, 16))


def test_semantic_loss_is_reexported():
    assert pyramid_semantic_loss is quantizer_semantic_loss
