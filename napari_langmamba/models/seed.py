"""SEED: the LangMamba denoiser, a U-shaped network on the frozen LangAE encoder.

Encoder: the LangAE encoder's five feature scales (full, 1/2, 1/4, 1/8, 1/16 resolution),
frozen: no gradients, kept in eval mode, never re-initialised. Decoder: an EMA block at the
bottleneck (1/16), then four Up stages (bilinear x2, concatenate the skip feature, EMA block)
back to full resolution, and a 3x3 conv to one channel. For the ``paper`` encoder
(feature channels 64, 64, 64, 128, 128) the stages are 256 -> 128 (1/8), 192 -> 64 (1/4),
128 -> 64 (1/2) and 128 -> 64 (full).

Heads (1, 2, 4, 8) set the scan state size (4 x heads) from the full-resolution stage to the
1/8 stage; the bottleneck uses the last one. The output is ``x + conv(decoder)``, a global
residual: the network learns the noise to remove, and its output conv starts at zero, so an
untrained SEED returns its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_langmamba.errors import ConfigError
from napari_langmamba.models._config import config_from_dict, config_to_dict, positive_ints
from napari_langmamba.models.ema import EMABlock

PRESETS = ("paper", "lite", "tiny")


@dataclass(frozen=True)
class SEEDConfig:
    """Hyper-parameters of SEED.

    Parameters
    ----------
    feature_channels
        Channels of the encoder's five scales, full -> 1/16 (``LangAEConfig.feature_channels``).
    decoder_channels
        Output channels of the four Up stages, 1/8 -> full.
    heads
        Heads of the stages at full, 1/2, 1/4 and 1/8 resolution; the bottleneck uses
        ``heads[3]``. The scan state size is ``state_per_head * heads``.
    state_per_head
        4 in the paper.
    step
        ES2D step p (2: four sub-grids; 1: VMamba's full cross-scan, as an ablation).
    expand
        ESSM inner width factor (2).
    compress, squeeze
        Reductions of the EMA block's conv branch and attention gates.
    residual
        Output ``x + conv(decoder)`` (True) or ``conv(decoder)``.
    name
        The preset this config came from, or "custom".
    """

    feature_channels: tuple[int, int, int, int, int]
    decoder_channels: tuple[int, int, int, int]
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    state_per_head: int = 4
    step: int = 2
    expand: int = 2
    compress: int = 4
    squeeze: int = 16
    residual: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        for field, length in (("feature_channels", 5), ("decoder_channels", 4), ("heads", 4)):
            object.__setattr__(self, field, positive_ints(getattr(self, field), length, what=f"SEED {field}"))
        for field in ("state_per_head", "expand", "compress", "squeeze"):
            if int(getattr(self, field)) < 1:
                raise ConfigError(f"SEED {field} must be a positive integer; got {getattr(self, field)}.")
        if self.step not in (1, 2):
            raise ConfigError(f"SEED step must be 2 (ES2D) or 1 (full cross-scan); got {self.step}.")

    @classmethod
    def preset(cls, name: str, *, feature_channels: tuple[int, ...]) -> SEEDConfig:
        """The ``paper``, ``lite`` or ``tiny`` SEED for an encoder with these feature channels.

        Decoder channels follow the encoder: the Up stages output the channels of the
        skip feature one scale further down (paper: 128, 64, 64, 64), so ``lite`` and
        ``tiny`` shrink with their encoders. ``tiny`` also uses fewer heads.
        """
        key = name.lower()
        if key not in PRESETS:
            raise ConfigError(f"Unknown SEED preset {name!r}; choose one of {', '.join(PRESETS)}.")
        f = tuple(int(c) for c in feature_channels)
        if len(f) != 5:
            raise ConfigError(f"SEED needs the encoder's 5 feature channels; got {f}.")
        heads = (1, 1, 1, 2) if key == "tiny" else (1, 2, 4, 8)
        return cls(feature_channels=f, decoder_channels=(f[3], f[2], f[1], f[0]), heads=heads, name=key)

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples as lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SEEDConfig:
        """Rebuild from :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError`."""
        return config_from_dict(cls, data, what="SEED")


def _ema_block(in_channels: int, out_channels: int, *, config: SEEDConfig, heads: int) -> EMABlock:
    return EMABlock(
        in_channels,
        out_channels,
        d_state=config.state_per_head * heads,
        step=config.step,
        expand=config.expand,
        compress=config.compress,
        squeeze=config.squeeze,
    )


class UpStage(nn.Module):
    """Bilinear x2, concatenate [skip, upsampled], EMA block."""

    def __init__(self, in_channels: int, out_channels: int, *, config: SEEDConfig, heads: int) -> None:
        super().__init__()
        self.block = _ema_block(in_channels, out_channels, config=config, heads=heads)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x (b, c, h, w), skip (b, s, 2h, 2w) -> (b, out, 2h, 2w)."""
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([skip, up], dim=1)  # (b, s + c, 2h, 2w)
        return self.block(x.contiguous(memory_format=torch.channels_last))


class SEED(nn.Module):
    """The SEED denoiser on a frozen encoder.

    Parameters
    ----------
    config
        The decoder's hyper-parameters.
    encoder
        A module whose ``forward(x)`` returns ``(h, features)`` with the five feature
        scales (the LangAE :class:`~napari_langmamba.models.langae.Encoder`); if it has
        ``forward_features(x)`` that is used instead (it skips the unused latent). It is
        frozen in place: parameters get ``requires_grad=False`` and the module stays in
        eval mode whatever ``train()`` is called with. Like the decoder, its weights are
        put in channels-last memory format (same values, faster on CPU).
    """

    def __init__(self, config: SEEDConfig, *, encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        f, c, heads = config.feature_channels, config.decoder_channels, config.heads
        self.bottleneck = _ema_block(f[4], f[4], config=config, heads=heads[3])
        stages = []
        prev = f[4]
        for i in range(4):  # 1/8, 1/4, 1/2, full resolution
            stages.append(UpStage(prev + f[3 - i], c[i], config=config, heads=heads[3 - i]))
            prev = c[i]
        self.up = nn.ModuleList(stages)
        self.head = nn.Conv2d(prev, 1, 3, padding=1)
        self.reset_parameters()
        # Convolutions run 25-40 % faster on CPU with channels-last weights and activations
        # (oneDNN's native layout); values are unchanged, and ESSM's (b, h, w, c) views of
        # channels-last activations are free.
        self.to(memory_format=torch.channels_last)

    def decoder_modules(self) -> list[nn.Module]:
        """The trainable parts (everything but the encoder)."""
        return [self.bottleneck, self.up, self.head]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the decoder; the encoder is never touched.

        Linear layers: truncated normal (std 0.02), zero bias; convolutions keep PyTorch's
        default; the scan parameters keep Mamba's initialisation; the output conv is zero,
        so with the global residual the untrained network is the identity.
        """
        for part in self.decoder_modules():
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> SEED:
        """Set the decoder's mode; the frozen encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():  # frozen: no graph through the encoder, no gradients into it
            if hasattr(self.encoder, "forward_features"):
                features = self.encoder.forward_features(x)
            else:
                _, features = self.encoder(x)
        if len(features) != 5:
            raise ValueError(f"SEED needs 5 encoder feature scales; the encoder returned {len(features)}")
        return [t.contiguous(memory_format=torch.channels_last) for t in features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1, h, w) in [0, 1], h and w multiples of 16 -> (b, 1, h, w)."""
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"SEED expects (b, 1, h, w) with h and w multiples of 16; got {tuple(x.shape)}")
        features = self._features(x)  # [full, 1/2, 1/4, 1/8, 1/16]
        y = self.bottleneck(features[4])
        for i, stage in enumerate(self.up):
            y = stage(y, features[3 - i])
        y = self.head(y).contiguous()  # (b, 1, h, w)
        return x + y if self.config.residual else y

    def num_parameters(self, *, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


__all__ = ["PRESETS", "SEED", "SEEDConfig", "UpStage"]
