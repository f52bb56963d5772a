"""LPIPS-style perceptual loss from user-supplied VGG16 weights (stage 1, optional).

taming-transformers adds LPIPS (VGG16 features) to the reconstruction loss. Its weights come
from the internet (torchvision's ImageNet VGG16 and LPIPS' linear heads), which these machines
do not have, and torchvision is not a dependency. So the loss is off unless the user passes
``--perceptual-weights FILE``: a **safetensors** file (never a pickle) holding

- ``features.<i>.weight`` / ``features.<i>.bias`` for the 13 convolutions of VGG16 with
  torchvision's indices (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) -- e.g. written with
  ``safetensors.torch.save_file({k: v for k, v in vgg16().state_dict().items()
  if k.startswith("features.")}, path)`` on a machine that has torchvision;
- optionally LPIPS' linear heads ``lin<k>.model.1.weight`` (k = 0..4, shape (1, C_k, 1, 1)).
  Without them every channel weighs the same (LPIPS' ``lpips=False`` variant).

Layer widths are read from the file, so a thinner network with the same layout also loads.
The loss: the grayscale image in [0, 1] is repeated to 3 channels, mapped to [-1, 1] and
through LPIPS' scaling layer; features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 are
unit-normalised along channels; squared differences are weighted per channel (the heads), and
averaged over space; the five layers are summed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from napari_langmamba.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["VGG16_CONV_INDICES", "PerceptualLoss", "load_perceptual_loss"]

# (conv index in torchvision's vgg16().features, stage) ; a max-pool follows the last conv of stages 0-3
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_POOL_INDICES = (4, 9, 16, 23)
_TAP_INDICES = (3, 8, 15, 22, 29)  # ReLU outputs relu1_2 ... relu5_3
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class PerceptualLoss(nn.Module):
    """Frozen VGG16-layout feature network + optional LPIPS heads; ``forward(x, y) -> scalar``."""

    def __init__(self, widths: dict[int, tuple[int, int]], *, with_heads: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(_TAP_INDICES[-1] + 1):
            if i in widths:
                c_out, c_in = widths[i]
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            elif i in _POOL_INDICES:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)
        tap_channels = [widths[i - 1][0] for i in _TAP_INDICES]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in tap_channels) if with_heads else None
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # frozen feature network: always eval

    def _taps(self, x: Tensor) -> list[Tensor]:
        h = (x.repeat(1, 3, 1, 1) * 2.0 - 1.0 - self.shift) / self.scale  # (b, 3, h, w)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAP_INDICES:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Perceptual distance of two (b, 1, h, w) batches in [0, 1], averaged over the batch."""
        total = x.new_zeros(())
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y), strict=True)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = (fx - fy).pow(2)
            weighted = self.heads[k](diff) if self.heads is not None else diff.sum(1, keepdim=True)
            total = total + weighted.mean()
        return total


def load_perceptual_loss(path: str | os.PathLike) -> PerceptualLoss:
    """Build :class:`PerceptualLoss` from a safetensors file (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise CheckpointError(
            f"--perceptual-weights {path}: expected an existing .safetensors file with VGG16 'features.*' "
            "weights (pickled .pth files are not read)."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"--perceptual-weights {path} is not a readable safetensors file ({exc}).") from exc
    widths: dict[int, tuple[int, int]] = {}
    prev = 3
    for i in VGG16_CONV_INDICES:
        w, b = tensors.get(f"features.{i}.weight"), tensors.get(f"features.{i}.bias")
        if w is None or b is None:
            raise CheckpointError(
                f"--perceptual-weights {path} lacks features.{i}.weight/bias; it must hold the 13 VGG16 "
                f"convolutions with torchvision's indices {VGG16_CONV_INDICES}."
            )
        if w.ndim != 4 or w.shape[1] != prev or w.shape[2:] != (3, 3) or b.shape != (w.shape[0],):
            raise CheckpointError(
                f"--perceptual-weights {path}: features.{i}.weight has shape {tuple(w.shape)}, expected "
                f"(C, {prev}, 3, 3) in the VGG16 layout."
            )
        widths[i] = (int(w.shape[0]), int(w.shape[1]))
        prev = int(w.shape[0])
    head_keys = [f"lin{k}.model.1.weight" for k in range(5)]
    with_heads = all(k in tensors for k in head_keys)
    model = PerceptualLoss(widths, with_heads=with_heads)
    state = {f"features.{i}.{p}": tensors[f"features.{i}.{p}"] for i in VGG16_CONV_INDICES for p in ("weight", "bias")}
    if with_heads:
        state.update({f"heads.{k}.weight": tensors[key] for k, key in enumerate(head_keys)})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"--perceptual-weights {path} does not fit the VGG16 layout ({exc}).") from exc
    for name, t in state.items():
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"--perceptual-weights {path}: {name} contains NaN or inf values.")
    logger.info("perceptual loss: VGG16 features from %s (%s LPIPS heads)", path, "with" if with_heads else "without")
    return model
