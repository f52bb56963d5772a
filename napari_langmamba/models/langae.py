"""LangAE: the taming-transformers style autoencoder whose codebook is a language model's vocabulary.

The encoder/decoder follow taming-transformers' ``diffusionmodules/model.py`` layout (small named
blocks so state-dict keys read ``encoder.down.2.block.0.conv1.weight``): ResNet blocks, strided
convolutions to downsample, nearest-neighbour + conv to upsample, single-head attention at the
lowest resolution and in the mid block, GroupNorm + Swish. With ``ch_mult`` of five entries there
are four downsamplings (factor 16): a 512 x 512 slice gives a 32 x 32 latent.

The encoder also returns the five feature scales the SEED denoiser uses as its frozen encoder:
the ``conv_in`` output and the outputs of the four downsampling steps. In taming's layout a
downsampling step keeps the channels of its level, so for ``paper`` these are
64@512, 64@256, 64@128, 128@64, 128@32 (:attr:`LangAEConfig.feature_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_langmamba.anatomy import (
    BLOOD_HU,
    BONE_HU,
    FAT_HU,
    TISSUE_CLASSES,
    class_pool_table,
    class_token_ids,
    region_class_sets,
)
from napari_langmamba.errors import ConfigError
from napari_langmamba.models._config import config_from_dict, config_to_dict
from napari_langmamba.models.quantizer import PositionPools, PyramidOutput, PyramidQuantizer
from napari_langmamba.windowing import MODEL_NORMALIZATION

if TYPE_CHECKING:
    from napari_langmamba.models.codebook import Codebook

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "LangAE",
    "LangAEConfig",
    "REGION_HEADS",
    "WORD_CHOICES",
    "RegionCNN",
    "RegionPixels",
    "ResnetBlock",
    "Upsample",
    "group_norm",
]

NUM_LEVELS = 5  # ch_mult entries: four downsamplings, five feature scales for SEED
REGION_HEADS = ("mlp", "cnn")
WORD_CHOICES = ("nearest", "tissue")
# word_choice "tissue": a class's words are candidates of a pyramid token when the head predicts the
# class on this share of the token's latent positions (the anatomy scorer's default share)
WORD_MIN_SHARE = 0.25


@dataclass(frozen=True, kw_only=True)
class LangAEConfig:
    """Architecture of a LangAE (and of the frozen SEED encoder built from it).

    Parameters
    ----------
    ch
        Channels after ``conv_in``; level ``i`` has ``ch * ch_mult[i]`` channels.
    ch_mult
        Five channel multipliers, one per resolution level (four downsamplings).
    num_res_blocks
        ResNet blocks per encoder level (the decoder uses one more, as in taming).
    attn_resolutions
        Nominal feature-map sizes (for an input of ``resolution`` pixels) whose levels get
        attention blocks, taming's convention: ``(32,)`` puts attention at the 32 x 32 latent
        level of a 512 input. The mid block always has attention.
    z_channels
        Channels of the encoder output (before ``quant_conv``).
    resolution
        Nominal input size the attention levels refer to; the network is fully convolutional
        and accepts any size that is a multiple of 16.
    codebook_dim
        Width of the language-model codebook (``quant_conv`` maps ``z_channels`` to it).
    commitment_beta
        Weight of the quantizer's commitment loss.
    region_pixels
        Let the latent also see each position's own input pixels (the project's extension, off in
        the paper's presets): the 16 x 16 pixels under every latent position go, as HU / 100,
        through a two-layer 1 x 1 MLP whose output is added after ``quant_conv``
        (:class:`RegionPixels`). Its last layer starts at zero, so a LangAE loaded from a
        checkpoint without it tokenizes the same until the MLP is trained. It gives the words the
        exact intensities of their region (contrast-enhanced blood is 100-200 HU brighter than
        organs, a difference the deep features of a small encoder blur); SEED's encoder features
        are untouched.
    region_context
        Odd kernel size of the region-pixel MLP's first layer over the grid of latent positions:
        1 (each position sees its own pixels), 3 (also its eight neighbours', 48 x 48 pixels:
        enough to tell lung, air inside the body, from the air outside it). MLP head only.
    region_head
        Which region-pixel head: ``"mlp"`` (:class:`RegionPixels`) or ``"cnn"`` (:class:`RegionCNN`:
        a small CNN that sees about 127 x 127 pixels around each position, the shape and
        surroundings that tell the aorta from a vertebral body of the same HU, and that also
        classifies each region's tissue, which ``--tissue-steps`` trains first).
    region_wide
        CNN head only: two more dilated 3 x 3 convolutions on the latent grid (dilations 4 and 8,
        residual, starting at zero) so that each position sees nearly the whole slice: the lung's
        interior, tens of millimetres from any tissue, is then told from the air outside the body.
    word_choice
        ``"nearest"``: each token is the nearest codebook row to its latent (the paper's
        quantizer); ``"tissue"`` (CNN head only): the nearest among the generic words of the
        tissue classes the head sees in the token's region (:meth:`LangAE.word_pools`;
        :attr:`~napari_langmamba.anatomy.TissueClass.generic`: "tissue" or "organ", never "liver"
        or "muscle", which the head cannot tell apart), so a word never contradicts the head's
        tissue -- the latent still picks which of the class's generic words.
    name
        Name of the preset this config came from (``"custom"`` otherwise); stored in checkpoints.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    resolution: int
    codebook_dim: int
    in_channels: int = 1
    out_channels: int = 1
    dropout: float = 0.0
    commitment_beta: float = 0.3
    region_pixels: bool = False
    region_context: int = 1
    region_head: str = "mlp"
    region_wide: bool = False
    word_choice: str = "nearest"
    name: str = "custom"

    def __post_init__(self) -> None:
        # Normalise sequences (JSON gives lists) so configs compare and hash by value.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if len(self.ch_mult) != NUM_LEVELS:
            raise ConfigError(
                f"LangAE needs exactly {NUM_LEVELS} channel multipliers (four downsamplings, the five "
                f"feature scales SEED uses); got ch_mult={self.ch_mult}."
            )
        for name in ("ch", "num_res_blocks", "z_channels", "resolution", "codebook_dim", "in_channels",
                     "out_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"LangAE option {name!r} must be a positive integer; got {value!r}.")
        if any(m < 1 for m in self.ch_mult):
            raise ConfigError(f"LangAE channel multipliers must be positive; got {self.ch_mult}.")
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"LangAE resolution must be a multiple of {self.downsample_factor}; got {self.resolution}."
            )
        if not isinstance(self.name, str):
            raise ConfigError(f"LangAE config name must be a string; got {self.name!r}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LangAE dropout must be in [0, 1); got {self.dropout}.")
        if not float(self.commitment_beta) >= 0.0:
            raise ConfigError(f"LangAE commitment_beta must be >= 0; got {self.commitment_beta}.")
        if not isinstance(self.region_pixels, bool):
            raise ConfigError(f"LangAE region_pixels must be true or false; got {self.region_pixels!r}.")
        if (not isinstance(self.region_context, int) or isinstance(self.region_context, bool)
                or self.region_context < 1 or self.region_context % 2 == 0):
            raise ConfigError(f"LangAE region_context must be an odd positive integer; got {self.region_context!r}.")
        if self.region_head not in REGION_HEADS:
            raise ConfigError(f"LangAE region_head must be one of {', '.join(REGION_HEADS)}; got {self.region_head!r}.")
        if self.region_head == "cnn" and self.region_context != 1:
            raise ConfigError("LangAE region_context sizes the MLP head; the CNN head has its own context (keep it 1).")
        if not isinstance(self.region_wide, bool):
            raise ConfigError(f"LangAE region_wide must be true or false; got {self.region_wide!r}.")
        if self.word_choice not in WORD_CHOICES:
            raise ConfigError(f"LangAE word_choice must be one of {', '.join(WORD_CHOICES)}; got {self.word_choice!r}.")
        cnn = self.region_pixels and self.region_head == "cnn"
        if (self.region_wide or self.word_choice == "tissue") and not cnn:
            raise ConfigError("LangAE region_wide and word_choice 'tissue' need the CNN region head "
                              "(region_pixels true, region_head 'cnn').")

    @property
    def downsample_factor(self) -> int:
        """Input pixels per latent pixel along each axis (16)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def feature_channels(self) -> tuple[int, int, int, int, int]:
        """Channels of the five encoder feature scales (full, 1/2, 1/4, 1/8, 1/16 resolution).

        ``conv_in`` gives ``ch``; the downsampling at the end of level ``i`` keeps that level's
        ``ch * ch_mult[i]`` channels.
        """
        return (self.ch, *(self.ch * m for m in self.ch_mult[:-1]))  # type: ignore[return-value]

    @property
    def latent_resolution(self) -> int:
        """Latent size for an input of ``resolution`` pixels."""
        return self.resolution // self.downsample_factor

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def preset(cls, name: str, *, codebook_dim: int) -> LangAEConfig:
        """A named configuration: ``"paper"``, ``"lite"`` or ``"tiny"``.

        ``paper`` is the published setting (ch 64, z 256, 512 -> 32 x 32 latent); ``lite`` has the
        same topology with half the channels so CPU training is practical; ``tiny`` is for tests.
        """
        key = str(name).strip().lower()
        if key not in _PRESETS:
            raise ConfigError(f"Unknown LangAE preset {name!r}; choose one of {', '.join(_PRESETS)}.")
        return cls(**_PRESETS[key], codebook_dim=int(codebook_dim), name=key)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples as lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LangAEConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError`."""
        return config_from_dict(cls, data, what="LangAE")


_PRESETS: dict[str, dict] = {
    "paper": dict(ch=64, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(32,),
                  z_channels=256, resolution=512),
    "lite": dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(32,),
                 z_channels=128, resolution=512),
    "tiny": dict(ch=8, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                 z_channels=16, resolution=256),
}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``channels`` below 32 for narrow layers."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (taming's AttnBlock) through PyTorch's fused kernel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (b, c, h, w) -> (b, 1, h*w, c): one head, positions as the sequence axis
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(hn), self.k(hn), self.v(hn)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (right/bottom) zero padding: h -> h/2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResNet blocks, optional attention after each, optional resampling."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, *, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _check_input(x: Tensor, factor: int, channels: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ConfigError(f"Expected an image batch of shape (b, {channels}, h, w); got {tuple(x.shape)}.")
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ConfigError(
            f"Image height and width must be multiples of {factor} (the encoder downsamples by {factor}); "
            f"got {x.shape[-2]} x {x.shape[-1]}. Pad or crop the slice first."
        )


class Encoder(nn.Module):
    """Image (b, in_channels, h, w) -> latent (b, z_channels, h/16, w/16) and five feature scales."""

    def __init__(self, config: LangAEConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        block_in = cfg.ch
        for i_level, mult in enumerate(cfg.ch_mult):
            level = _Level()
            block_in = cfg.ch * in_mult[i_level]
            block_out = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout=cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout=cfg.dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def _run_level(self, level: _Level, h: Tensor) -> Tensor:
        for i_block, block in enumerate(level.block):
            h = block(h)
            if len(level.attn) > 0:
                h = level.attn[i_block](h)
        return h

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Only the five feature scales (stops after the fourth downsampling; cheaper for SEED)."""
        _check_input(x, self.config.downsample_factor, self.config.in_channels)
        h = self.conv_in(x)
        features = [h]  # (b, ch, h, w)
        for level in list(self.down)[:-1]:
            h = level.downsample(self._run_level(level, h))
            features.append(h)  # (b, ch*mult_i, h/2^(i+1), w/2^(i+1))
        return features

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(h, features)``: the latent and ``[conv_in out, after downsample 1..4]``."""
        features = self.forward_features(x)
        h = self._run_level(self.down[-1], features[-1])  # lowest resolution level (attention here)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (b, z_channels, h/16, w/16)
        return h, features


class Decoder(nn.Module):
    """Latent (b, z_channels, h/16, w/16) -> image (b, out_channels, h, w), taming's mirror layout."""

    def __init__(self, config: LangAEConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout=cfg.dropout)
        up: list[_Level] = []
        for i_level in reversed(range(len(cfg.ch_mult))):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout=cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)  # keep taming's key order: up.0 is the full-resolution level
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(len(self.up))):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (b, out_channels, h, w)


def _to_hu100(x: Tensor) -> Tensor:
    """Model units [0, 1] -> HU / 100 (air -10, fat about -1, organs 0.5, enhanced blood 1.5-3, bone 3+)."""
    lo, hi = MODEL_NORMALIZATION.hu_min, MODEL_NORMALIZATION.hu_max
    return x * ((hi - lo) / 100.0) + lo / 100.0


class RegionPixels(nn.Module):
    """The pixels under each latent position -> a latent offset (``LangAEConfig.region_pixels``).

    ``x`` (b, 1, h, w) in model units [0, 1] is mapped to HU / 100 (so air is -10, fat about
    -1, organs 0.5, enhanced blood 1.5-3, bone 3 and more: a scale a small MLP resolves),
    pixel-unshuffled to (b, f^2, h/f, w/f) and passed through a ``context`` x ``context`` conv
    (zero-padded) -> SiLU -> 1 x 1 conv. The last conv starts at zero: an untrained head adds
    nothing.
    """

    def __init__(self, factor: int, out_channels: int, *, hidden: int = 64, context: int = 1) -> None:
        super().__init__()
        self.factor = int(factor)
        self.mlp = nn.Sequential(nn.Conv2d(self.factor**2, hidden, context, padding=context // 2), nn.SiLU(),
                                 nn.Conv2d(hidden, out_channels, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(F.pixel_unshuffle(_to_hu100(x), self.factor))

    def adapt_state_dict(self, state: dict[str, Tensor], prefix: str) -> list[str]:
        """Make a LangAE state dict from before this head fit it, as the same function; returns what changed.

        Without the head's weights, this head's own (output zero) are put in. A trained head of a
        smaller context given to a wider one becomes the centre taps of the wider first layer.
        """
        own = self.state_dict()
        if not any(k.startswith(prefix) for k in state):
            state.update({prefix + k: v for k, v in own.items()})
            return [f"{prefix}* added at zero"]
        first, want = prefix + "mlp.0.weight", own["mlp.0.weight"]
        have = state.get(first)
        if have is None or have.shape[:2] != want.shape[:2] or not have.shape[-1] < want.shape[-1]:
            return []
        n, k = have.shape[-1], (want.shape[-1] - have.shape[-1]) // 2
        state[first] = torch.zeros(want.shape, dtype=have.dtype)
        state[first][..., k : k + n, k : k + n] = have
        return [f"{first} widened to {want.shape[-1]} x {want.shape[-1]} around the stored {n} x {n}"]


class RegionCNN(nn.Module):
    """The pixels around each latent position -> a latent offset and tissue-class logits
    (``LangAEConfig.region_head = "cnn"``).

    Why: at the 16 x 16 pixels of one position, enhanced blood in the aorta, an enhanced liver and
    the cancellous bone of a vertebral body have the same HU (115-165 HU on the Mayo volume); what
    tells them apart is shape and surroundings -- a disk in fat, a large organ, bone inside a
    cortical ring. Input: HU / 100 (clipped to [-10, 20]) and three soft HU thresholds (-30, 140,
    300 HU: the fat, blood and bone limits of :mod:`napari_langmamba.anatomy`); four stride-2 3 x 3
    convolutions down to the latent grid plus a 1 x 1 convolution of each position's own 16 x 16
    pixels; then a 3 x 3 and a dilated 3 x 3 convolution on the grid: each position sees about
    127 x 127 pixels (95 mm at 0.75 mm). Two 1 x 1 outputs share these features: ``offset`` (added
    to the latent; starts at zero, so an untrained head adds nothing) and ``tissue`` (logits of the
    seven :data:`napari_langmamba.anatomy.TISSUE_CLASSES`, trained by cross-entropy on tissue maps
    before the words: ``python -m training langae --tissue-steps``).
    """

    THRESHOLDS_HU100 = (FAT_HU / 100.0, BLOOD_HU / 100.0, BONE_HU / 100.0)

    def __init__(self, factor: int, out_channels: int, *, width: int = 32, wide_view: bool = False) -> None:
        super().__init__()
        if factor != 16:
            raise ConfigError(f"The CNN region head is built for a downsampling of 16; this LangAE has {factor}.")
        self.factor = int(factor)
        wide = 2 * width
        self.down = nn.Sequential(
            nn.Conv2d(1 + len(self.THRESHOLDS_HU100), width // 2, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(width // 2, width, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(width, wide, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(wide, wide, 3, 2, 1), nn.SiLU())
        self.cell = nn.Conv2d(self.factor**2, wide, 1)
        self.context = nn.Sequential(nn.SiLU(), nn.Conv2d(wide, wide, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(wide, wide, 3, padding=2, dilation=2), nn.SiLU())
        # LangAEConfig.region_wide: residual dilated convolutions starting at zero (the same function
        # until trained) that widen each position's view to +-15 positions, nearly a whole slice
        self.wide = nn.ModuleList(nn.Conv2d(wide, wide, 3, padding=d, dilation=d) for d in (4, 8)) \
            if wide_view else None
        for conv in self.wide or ():
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.offset = nn.Conv2d(wide, out_channels, 1)
        self.tissue = nn.Conv2d(wide, len(TISSUE_CLASSES), 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def features(self, x: Tensor) -> Tensor:
        """(b, 1, h, w) in model units -> (b, 2 * width, h/16, w/16) region features."""
        hu = _to_hu100(x).clamp(-10.0, 20.0)
        steps = [torch.sigmoid((hu - t) * 5.0) for t in self.THRESHOLDS_HU100]  # about 20 HU wide
        down = self.down(torch.cat([hu, *steps], dim=1))
        features = self.context(down + self.cell(F.pixel_unshuffle(hu, self.factor)))
        for conv in self.wide or ():
            features = features + F.silu(conv(features))
        return features

    def forward(self, x: Tensor) -> Tensor:
        return self.offset(self.features(x))

    def tissue_logits(self, x: Tensor) -> Tensor:
        """(b, 7, h/16, w/16) logits of each position's tissue class."""
        return self.tissue(self.features(x))

    def adapt_state_dict(self, state: dict[str, Tensor], prefix: str) -> list[str]:
        """Put this head (at zero) into a LangAE state dict without it or with an MLP head, or add the
        wide view (at zero) to a CNN head without it; returns what changed."""
        own = self.state_dict()
        stored = [k for k in state if k.startswith(prefix)]
        if stored and all(prefix + k in state for k in own):
            return []
        narrow = [k for k in own if not k.startswith("wide.")]
        if self.wide is not None and stored and all(prefix + k in state for k in narrow):
            state.update({prefix + k: v for k, v in own.items() if k.startswith("wide.")})
            return [f"{prefix}wide.* added at zero (the wide view)"]
        for k in stored:
            del state[k]
        state.update({prefix + k: v for k, v in own.items()})
        return [f"{prefix}* {'replaced by a CNN head' if stored else 'added'} at zero"]


class LangAE(nn.Module):
    """Autoencoder whose quantizer uses a frozen language-model vocabulary as its codebook.

    ``encode`` -> ``quantize`` (token pyramid) -> ``decode``. The codebook lives in the quantizer
    as a non-persistent buffer: it is never trained, never in an optimizer, and not stored in
    checkpoints (they record its source and SHA-256 and reload it from there).
    """

    def __init__(self, config: LangAEConfig, *, codebook: Codebook) -> None:
        super().__init__()
        if codebook.embeddings.ndim != 2 or codebook.embeddings.shape[1] != config.codebook_dim:
            raise ConfigError(
                f"The codebook {codebook.source!r} has {tuple(codebook.embeddings.shape)} embeddings but the "
                f"LangAE config expects width {config.codebook_dim}; build the config with "
                f"codebook_dim={codebook.embeddings.shape[-1]}."
            )
        self.config = config
        self.codebook = codebook
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.region_pixels: RegionPixels | RegionCNN | None = None
        if config.region_pixels and config.region_head == "cnn":
            self.region_pixels = RegionCNN(config.downsample_factor, config.codebook_dim, wide_view=config.region_wide)
        elif config.region_pixels:
            self.region_pixels = RegionPixels(config.downsample_factor, config.codebook_dim,
                                              context=config.region_context)
        self.quantizer = PyramidQuantizer(codebook.embeddings, beta=config.commitment_beta)
        if config.word_choice == "tissue":
            # only the words true of a whole class: the head tells tissues apart, not organs
            class_ids, _, _ = class_token_ids(codebook, generic=True)
            if not any(class_ids):
                raise ConfigError(f"word_choice 'tissue' needs the tissue classes' words in the codebook; none of them is "
                                  f"a token of {codebook.source!r}.")
            # not persistent: rebuilt from the codebook, like the codebook itself
            self.register_buffer("class_pools", class_pool_table(class_ids), persistent=False)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> Tensor:
        """Image (b, 1, h, w) -> continuous latent (b, codebook_dim, h/16, w/16) after ``quant_conv``
        (plus the region-pixel offset where the config has it)."""
        h, _ = self.encoder(x)
        z = self.quant_conv(h)
        return z if self.region_pixels is None else z + self.region_pixels(x)

    def quantize(self, z: Tensor, x: Tensor | None = None) -> PyramidOutput:
        """Token pyramid of a latent from :meth:`encode` of the image ``x`` (which ``word_choice
        "tissue"`` needs: the head's tissue classes choose each token's candidate words)."""
        if self.config.word_choice == "nearest":
            return self.quantizer(z)
        if x is None:
            raise ConfigError("This LangAE chooses words by tissue (word_choice 'tissue'): quantize(z, x) needs the image.")
        return self.quantizer(z, pools=self.word_pools(x, tuple(z.shape[-2:])))

    @torch.no_grad()
    def word_pools(self, x: Tensor, latent_shape: tuple[int, int]) -> list[PositionPools]:
        """Per pyramid layer, the candidate words of each token under ``word_choice "tissue"``: the
        generic words of the tissue classes the region head predicts on at least :data:`WORD_MIN_SHARE`
        of the token's latent positions (a layer-3 token: its position's class; the region's most
        frequent class always counts)."""
        if not isinstance(self.region_pixels, RegionCNN):
            raise ConfigError("Words chosen by tissue need the CNN region head.")
        said = self.region_pixels.tissue_logits(x).argmax(1)  # (b, h', w')
        if tuple(said.shape[-2:]) != tuple(latent_shape):
            raise ConfigError(f"The head's grid {tuple(said.shape[-2:])} is not the latent's {tuple(latent_shape)}.")
        sets = region_class_sets(said.cpu().numpy(), latent_shape, min_share=WORD_MIN_SHARE)
        return [PositionPools(self.class_pools, torch.as_tensor(bits.astype("int64"), device=x.device)) for bits in sets]

    def decode(self, z_q: Tensor) -> Tensor:
        """Quantized latent (b, codebook_dim, h', w') -> image (b, 1, 16 h', 16 w')."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: Tensor, *, decode: bool = True) -> tuple[Tensor | None, PyramidOutput]:
        """``(reconstruction, pyramid)`` of an image batch in [0, 1]; ``(None, pyramid)`` without ``decode``."""
        pyramid = self.quantize(self.encode(x), x)
        return (self.decode(pyramid.z_q) if decode else None), pyramid

    @torch.no_grad()
    def tokens(self, x: Tensor) -> PyramidOutput:
        """The token pyramid of an image batch without gradients (for display)."""
        return self.quantize(self.encode(x), x)
