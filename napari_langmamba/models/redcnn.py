"""RED-CNN (Chen et al., "Low-dose CT with a residual encoder-decoder convolutional neural
network", IEEE TMI 2017): the CNN baseline of the LangMamba paper.

Five unpadded convolutions (each shrinks the image by ``kernel_size - 1``) and five
transposed convolutions that grow it back, 96 channels, 5x5 kernels, ReLU, and three
residual shortcuts (conv 4's output to deconv 1's, conv 2's to deconv 3's, the input to
deconv 5's), as in the paper's Fig. 1 and its public reference code::

    x0 = x
    e2 = relu(conv2(relu(conv1(x0))))
    e4 = relu(conv4(relu(conv3(e2))))
    y = deconv1(relu(conv5(e4))) + e4
    y = deconv3(relu(deconv2(relu(y)))) + e2
    y = deconv5(relu(deconv4(relu(y)))) + x0
    out = relu(y)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_langmamba.errors import ConfigError
from napari_langmamba.models._config import config_from_dict, config_to_dict

_PRESETS: dict[str, dict] = {
    "paper": dict(channels=96, kernel_size=5),
    "lite": dict(channels=48, kernel_size=5),
    "tiny": dict(channels=8, kernel_size=3),
}
N_LAYERS = 5  # convolutions (and transposed convolutions)


@dataclass(frozen=True)
class REDCNNConfig:
    """Hyper-parameters of RED-CNN.

    Parameters
    ----------
    channels
        Feature channels of every hidden layer (96 in the paper).
    kernel_size
        Square kernel of every layer (5 in the paper).
    name
        The preset this config came from, or "custom".
    """

    channels: int = 96
    kernel_size: int = 5
    name: str = "custom"

    def __post_init__(self) -> None:
        if int(self.channels) < 1:
            raise ConfigError(f"RED-CNN channels must be a positive integer; got {self.channels}.")
        if int(self.kernel_size) < 1 or int(self.kernel_size) % 2 == 0:
            raise ConfigError(f"RED-CNN kernel_size must be a positive odd integer; got {self.kernel_size}.")

    @property
    def min_size(self) -> int:
        """Smallest image side the five unpadded convolutions accept."""
        return N_LAYERS * (self.kernel_size - 1) + 1

    @classmethod
    def preset(cls, name: str) -> REDCNNConfig:
        """``paper`` (96 channels, 5x5), ``lite`` (48 channels) or ``tiny`` (8 channels, 3x3)."""
        key = name.lower()
        if key not in _PRESETS:
            raise ConfigError(f"Unknown RED-CNN preset {name!r}; choose one of {', '.join(_PRESETS)}.")
        return cls(**_PRESETS[key], name=key)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> REDCNNConfig:
        """Rebuild from :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return config_from_dict(cls, data, what="RED-CNN")


class REDCNN(nn.Module):
    """Residual encoder-decoder CNN: (b, 1, h, w) -> (b, 1, h, w), h and w >= ``config.min_size``."""

    def __init__(self, config: REDCNNConfig) -> None:
        super().__init__()
        self.config = config
        c, k = config.channels, config.kernel_size
        self.conv = nn.ModuleList(nn.Conv2d(1 if i == 0 else c, c, k) for i in range(N_LAYERS))
        self.deconv = nn.ModuleList(
            nn.ConvTranspose2d(c, 1 if i == N_LAYERS - 1 else c, k) for i in range(N_LAYERS)
        )
        # Channels-last weights make oneDNN run the hidden layers in its native layout,
        # about 25 % faster on CPU; the values are unchanged.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1, h, w) -> (b, 1, h, w)."""
        if x.dim() != 4 or x.shape[1] != 1 or min(x.shape[-2:]) < self.config.min_size:
            raise ValueError(
                f"RED-CNN expects (b, 1, h, w) with h, w >= {self.config.min_size}; got {tuple(x.shape)}"
            )
        conv, deconv = self.conv, self.deconv
        x0 = x
        e2 = F.relu(conv[1](F.relu(conv[0](x0))))  # (b, c, h - 2(k-1), w - 2(k-1))
        e4 = F.relu(conv[3](F.relu(conv[2](e2))))  # (b, c, h - 4(k-1), ...)
        y = deconv[0](F.relu(conv[4](e4))) + e4  # conv5 shrinks once more, deconv1 grows back
        y = deconv[2](F.relu(deconv[1](F.relu(y)))) + e2
        y = deconv[4](F.relu(deconv[3](F.relu(y)))) + x0  # (b, 1, h, w)
        return F.relu(y)


__all__ = ["REDCNN", "REDCNNConfig"]
