"""Efficient Mamba attention: the 2D selective scan (ES2D), the ESSM mixer and the EMA block.

ES2D with step 2 (EfficientVMamba's atrous scan) splits a feature map into its four
sub-grids and scans each in its own direction, so the four directions together visit every
pixel exactly once and the cost is linear in the number of pixels. With ``(r, c)`` the
(row, column) parities of a sub-grid and ``H2 x W2`` its size:

==  ========  ======================================================================
k   (r, c)    order of the sequence
==  ========  ======================================================================
0   (0, 0)    row-major from the top-left: rows top->bottom, each left->right (TL->BR)
1   (1, 0)    row-major from the bottom-right: rows bottom->top, each right->left (BR->TL)
2   (0, 1)    column-major from the top-right: columns right->left, each top->bottom (TR->BL)
3   (1, 1)    column-major from the bottom-left: columns left->right, each bottom->top (BL->TR)
==  ========  ======================================================================

:func:`es2d_order` returns these orders as flat pixel indices; the split gathers with it
and the merge gathers with its inverse permutation, so every output pixel is written
exactly once. Odd heights or widths are zero-padded to even and the step ``delta`` is set
to 0 on the padding, which makes the scan pass its state through those positions
unchanged: the result on the real pixels is exactly that of scanning the unpadded
(uneven) sub-grids. Step 1 is VMamba's cross-scan (each direction visits all pixels in
one of the four orders above applied to the whole map; the four outputs are summed), kept
as an ablation.

Tensors inside ESSM are channels-last, (b, h, w, c); the EMA block takes and returns
(b, c, h, w) and runs fastest when that tensor is in ``torch.channels_last`` memory
format, because then the permutes to and from (b, h, w, c) are free views.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_langmamba.models.scan import (
    es2d_scan_fused,
    es2d_scan_train,
    legacy_training_paths,
    norm_gate_,
    scan_backend,
    selective_scan_channels_last,
)

N_DIRECTIONS = 4
# Pixels per slice of ESSM's per-pixel tail at inference: temporaries of a few MB stay
# below glibc's mmap threshold, so they are recycled instead of page-faulted in afresh.
_TAIL_CHUNK_BYTES = 16 << 20


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no per-device query
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _lean(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call may take the lean inference path (in-place ops, fused kernels).

    Only when autograd records nothing (no grad mode, or nothing requires grad) and no
    autocast mixes dtypes under the in-place ops.
    """
    if _autocast_on(x.device.type):
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _fused_training(x: torch.Tensor) -> bool:
    """Whether a differentiable call may take the fused CPU training kernels (float32, or
    bfloat16 under CPU autocast: the kernels compute in float32 either way; not switched off
    by :func:`~napari_langmamba.models.scan.legacy_training_paths`)."""
    if legacy_training_paths():
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _autocast_on(x.device.type))


# --------------------------------------------------------------------------- scan orders


def _orders_cpu(height: int, width: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    # The tables are cached across calls: build them outside any inference_mode a caller is in,
    # or a table first made while denoising could not be saved for backward when training.
    with torch.inference_mode(False):
        return _build_orders(height, width, step)


@functools.lru_cache(maxsize=64)
def _build_orders(height: int, width: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    idx = torch.arange(height * width).view(height, width)  # flat index of each pixel
    if step == 2:
        seqs = [
            idx[0::2, 0::2],  # (H2, W2) rows top->bottom, cols left->right
            idx[1::2, 0::2].flip(0, 1),  # rows bottom->top, cols right->left
            idx[0::2, 1::2].flip(1).t(),  # (W2, H2): cols right->left, each top->bottom
            idx[1::2, 1::2].flip(0).t(),  # (W2, H2): cols left->right, each bottom->top
        ]
    else:
        seqs = [idx, idx.flip(0, 1), idx.flip(1).t(), idx.flip(0).t()]
    order = torch.stack([s.reshape(-1) for s in seqs])  # (K, L)
    inverse = None
    if step == 2:
        flat = order.reshape(-1)
        inverse = torch.empty_like(flat)
        inverse[flat] = torch.arange(flat.numel())  # position in (K * L) of every pixel
    return order, inverse


def es2d_order(height: int, width: int, *, step: int = 2) -> torch.Tensor:
    """Flat pixel indices (``row * width + col``) of the four scan sequences.

    Parameters
    ----------
    height, width
        Size of the feature map; both even for ``step=2``.
    step
        2 for ES2D (four sub-grids, one direction each), 1 for the full cross-scan.

    Returns
    -------
    torch.Tensor
        (4, L) int64 with L = height * width / 4 (step 2) or height * width (step 1).
    """
    if step not in (1, 2):
        raise ValueError(f"the ES2D step must be 1 or 2; got {step}")
    if step == 2 and (height % 2 or width % 2):
        raise ValueError(f"ES2D with step 2 needs an even height and width; got {height}x{width}")
    return _orders_cpu(height, width, step)[0]


def _orders(height, width, step, device):
    order, inverse = _orders_cpu(height, width, step)
    return order.to(device), (inverse.to(device) if inverse is not None else None)


def _fused_order_cpu(height: int, width: int) -> torch.Tensor:
    """The step-2 order of the even-padded map, as indices into the unpadded map (-1: padding)."""
    with torch.inference_mode(False):  # cached: see _orders_cpu
        return _build_fused_order(height, width)


@functools.lru_cache(maxsize=64)
def _build_fused_order(height: int, width: int) -> torch.Tensor:
    hp, wp = height + height % 2, width + width % 2
    order = _orders_cpu(hp, wp, 2)[0]  # (K, L) indices into (hp, wp)
    rows, cols = order // wp, order % wp
    real = (rows < height) & (cols < width)
    return torch.where(real, rows * width + cols, torch.full_like(order, -1))


def es2d_split(x: torch.Tensor, *, step: int = 2) -> torch.Tensor:
    """(b, h, w, d) -> (b, 4, L, d): the four scan sequences (h and w even for step 2)."""
    b, h, w, d = x.shape
    order, _ = _orders(h, w, step, x.device)
    k, seqlen = order.shape
    xs = x.reshape(b, h * w, d).index_select(1, order.reshape(-1))  # (b, K * L, d)
    return xs.view(b, k, seqlen, d)


def es2d_merge(ys: torch.Tensor, height: int, width: int, *, step: int = 2) -> torch.Tensor:
    """(b, 4, L, d) -> (b, h, w, d): every pixel from its sequence (step 1: sum of four)."""
    b, k, seqlen, d = ys.shape
    order, inverse = _orders(height, width, step, ys.device)
    ys = ys.reshape(b, k * seqlen, d)  # (b, K * L, d)
    if inverse is not None:
        return ys.index_select(1, inverse).view(b, height, width, d)
    out = ys.new_zeros(b, height * width, d)
    return out.index_add(1, order.reshape(-1), ys).view(b, height, width, d)


# --------------------------------------------------------------------------- modules


class ES2D(nn.Module):
    """Efficient 2D selective scan over four directions (see the module docstring).

    Parameters
    ----------
    d_inner
        Channels scanned (ESSM's inner width).
    d_state
        State size N per channel.
    dt_rank
        Rank of the step projection (ESSM uses ceil(C / 16)).
    step
        2 (ES2D) or 1 (cross-scan).
    dt_min, dt_max
        Range of the initial step, sampled log-uniformly; the step bias is its inverse
        softplus (Mamba's initialisation).
    """

    def __init__(
        self,
        d_inner: int,
        *,
        d_state: int,
        dt_rank: int,
        step: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        if step not in (1, 2):
            raise ValueError(f"the ES2D step must be 1 or 2; got {step}")
        self.d_inner = d_inner
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.step = step
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        k = N_DIRECTIONS
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, D = 1, inverse-softplus step bias."""
        bound = 1.0 / math.sqrt(self.d_inner)  # nn.Linear's default for x_proj
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        std = self.dt_rank**-0.5  # keeps the variance of dt_proj's output at initialisation
        nn.init.uniform_(self.dt_projs_weight, -std, std)
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.dt_projs_bias.shape) * (log_hi - log_lo) + log_lo)
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        # S4D-real: A = -(1, 2, ..., N) for every channel, stored as log(-A).
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(a).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, w, d_inner) -> (b, h, w, d_inner)."""
        if self.step == 2 and scan_backend(x.device) == "numba":
            if _lean(self, x):
                y = self._forward_fused(x)
            elif _fused_training(x) and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
                y = self._forward_fused_train(x)
            else:
                y = None
            if y is not None:
                return y
        return self._forward_generic(x)

    def _forward_fused_train(self, x: torch.Tensor) -> torch.Tensor | None:
        """CPU training (even h and w): one differentiable fused scan in image order.

        The same function as :meth:`_forward_generic`, without its (b, 4, L, d) step and
        merge tensors or their gradients (see :func:`~napari_langmamba.models.scan.es2d_scan_train`).
        """
        b, h, w, d = x.shape
        order, inverse = _orders(h, w, 2, x.device)  # (K, L), (P,)
        A = -torch.exp(self.A_logs.float())  # (K * d, n)
        y = es2d_scan_train(
            x.reshape(b, h * w, d), order, inverse, self.x_proj_weight, self.dt_projs_weight,
            self.dt_projs_bias, A, self.Ds,
        )
        return y.view(b, h, w, d) if y is not None else None

    def _forward_fused(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """CPU inference: one fused kernel, no (b, 4, L, d) intermediates, any h and w.

        ``out`` (b, h, w, d), if given, receives the result (a dead buffer of the caller).
        """
        b, h, w, d = x.shape
        k, r, n = N_DIRECTIONS, self.dt_rank, self.d_state
        order = _fused_order_cpu(h, w)  # (K, L) pixel indices, -1 on padding
        x2 = x.reshape(b, h * w, d)  # (b, P, d)
        # The low-rank projection of every pixel for all four directions (4x a small matmul
        # is cheaper than gathering the d-channel input into scan order), then each step
        # picks its own direction's slice.
        x_all = F.linear(x2, self.x_proj_weight.reshape(k * (r + 2 * n), d))  # (b, P, K * (r + 2n))
        x_all = x_all.view(b, h * w, k, r + 2 * n)  # (b, P, K, r + 2n)
        direction = torch.arange(k).view(k, 1)  # (K, 1) broadcast against order (K, L)
        xdbl = x_all[:, order.clamp(min=0), direction]  # (b, K, L, r + 2n)
        A = -torch.exp(self.A_logs.float())  # (K * d, n)
        buf = out.view(b, h * w, d) if out is not None else None
        y = es2d_scan_fused(x2, order, xdbl, self.dt_projs_weight, self.dt_projs_bias, A, self.Ds, out=buf)
        return y.view(b, h, w, d).to(x.dtype) if y is not None else None

    def _forward_generic(self, x: torch.Tensor) -> torch.Tensor:
        """Any backend, differentiable: split, project, selective_scan, merge."""
        b, h, w, d = x.shape
        k, r, n = N_DIRECTIONS, self.dt_rank, self.d_state
        pad_h, pad_w = (h % 2, w % 2) if self.step == 2 else (0, 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (b, h + pad_h, w + pad_w, d)
        hp, wp = h + pad_h, w + pad_w
        xs = es2d_split(x, step=self.step)  # (b, K, L, d)
        # Both projections take their weight as the left operand: autograd then returns each
        # weight's gradient in the weight's own strides. With a transposed weight on the right
        # it returns a transposed gradient, which DDP's bucket views reject (dt_rank 1).
        x_dbl = torch.matmul(self.x_proj_weight, xs.transpose(2, 3))  # (b, K, r + 2n, L)
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)  # (b, K, r, L), (b, K, n, L) x 2
        dts = torch.matmul(self.dt_projs_weight, dts).transpose(2, 3)  # (b, K, d, L) -> (b, K, L, d)
        Bs, Cs = Bs.transpose(2, 3), Cs.transpose(2, 3)  # (b, K, L, n)
        A = -torch.exp(self.A_logs.float())  # (K * d, n)
        if pad_h or pad_w:
            order, _ = _orders(hp, wp, self.step, x.device)  # (K, L)
            real = ((order // wp) < h) & ((order % wp) < w)  # (K, L) True on real pixels
            delta = F.softplus(dts + self.dt_projs_bias.view(1, k, 1, d)) * real.view(1, k, -1, 1)
            ys = selective_scan_channels_last(xs, delta, A, Bs, Cs, self.Ds, None, False)
        else:
            ys = selective_scan_channels_last(
                xs, dts, A, Bs, Cs, self.Ds, self.dt_projs_bias.reshape(-1), True
            )  # (b, K, L, d)
        y = es2d_merge(ys, hp, wp, step=self.step)  # (b, hp, wp, d)
        if pad_h or pad_w:
            y = y[:, :h, :w]
        return y


class ESSM(nn.Module):
    """Efficient selective-scan mixer on (b, h, w, c).

    Linear c -> 4c split in x and z halves (2c each); x: depthwise 3x3 + SiLU, ES2D,
    LayerNorm; gated by SiLU(z); Linear 2c -> c.

    Parameters
    ----------
    channels
        c.
    d_state
        State size of the scan (4 x heads in SEED).
    step
        ES2D step (2), or 1 for the full cross-scan.
    expand
        Inner width = expand * c (2).
    """

    def __init__(self, channels: int, *, d_state: int, step: int = 2, expand: int = 2) -> None:
        super().__init__()
        d_inner = expand * channels
        self.d_inner = d_inner
        self.in_proj = nn.Linear(channels, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        # Its input is always a channels-last view of (b, h, w, d_inner), so its weight
        # gradient comes out channels-last: keep the weight in that layout too (same values),
        # or the two layouts of this (d_inner, 1, 3, 3) tensor differ and DDP complains.
        self.conv2d.to(memory_format=torch.channels_last)
        self.scan = ES2D(d_inner, d_state=d_state, dt_rank=math.ceil(channels / 16), step=step)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, h, w, c) -> (b, h, w, c)."""
        # The two halves of in_proj are applied one after the other so that the z half
        # does not occupy memory while the scan runs (same weights, same result).
        w_x, w_z = self.in_proj.weight.split(self.d_inner, dim=0)
        inference = _lean(self, x)
        lin = F.linear(x, w_x)  # (b, h, w, d_inner)
        xi = self.conv2d(lin.permute(0, 3, 1, 2))  # (b, d_inner, h, w), channels-last memory
        xi = F.silu(xi, inplace=inference).permute(0, 2, 3, 1)  # (b, h, w, d_inner)
        if inference:
            y = None
            if self.scan.step == 2 and scan_backend(x.device) == "numba" and lin.dtype == torch.float32:
                y = self.scan._forward_fused(xi, out=lin)  # lin is dead: reuse its memory
            if y is None:
                y = self.scan(xi)
            del xi, lin
            return self._tail_inference(x, y, w_z)
        y = self.scan(xi)  # (b, h, w, d_inner)
        del xi, lin
        y = self.out_norm(y) * F.silu(F.linear(x, w_z))  # (b, h, w, d_inner)
        return self.out_proj(y)  # (b, h, w, c)

    def _tail_inference(self, x: torch.Tensor, y: torch.Tensor, w_z: torch.Tensor) -> torch.Tensor:
        """out_proj(LayerNorm(y) * SiLU(z)) slice by slice of pixels (all per-pixel ops)."""
        b, h, w, c = x.shape
        x2 = x.reshape(-1, c)  # (P, c)
        y2 = y.reshape(-1, self.d_inner)  # (P, d_inner)
        out = x.new_empty(b * h * w, c)  # (P, c)
        step = max(1, _TAIL_CHUNK_BYTES // (4 * self.d_inner))
        norm = self.out_norm
        fused = y2.dtype == torch.float32 and y2.is_contiguous() and scan_backend(y.device) == "numba"
        for s in range(0, y2.shape[0], step):
            zc = F.linear(x2[s : s + step], w_z)  # (chunk, d_inner)
            yc = y2[s : s + step]
            if not (fused and norm_gate_(yc, zc, norm.weight, norm.bias, norm.eps)):
                yc = F.layer_norm(yc, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                yc.mul_(F.silu(zc, inplace=True))
            torch.mm(yc, self.out_proj.weight.t(), out=out[s : s + step])
        return out.view(b, h, w, c)


class ChannelAttention(nn.Module):
    """RCAN channel attention: x * sigmoid(MLP(global average of x))."""

    def __init__(self, channels: int, *, squeeze: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // squeeze)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> the per-channel weights (b, c, 1, 1)."""
        s = x.mean(dim=(2, 3), keepdim=True)  # (b, c, 1, 1)
        return torch.sigmoid(self.expand(F.relu(self.reduce(s))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        return x * self.gate(x)


class SpatialGate(nn.Module):
    """Per-pixel gate: x * sigmoid(1x1 -> SiLU -> 1x1 to one channel)."""

    def __init__(self, channels: int, *, squeeze: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // squeeze)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.to_gate = nn.Conv2d(hidden, 1, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> the per-pixel weights (b, 1, h, w)."""
        return torch.sigmoid(self.to_gate(F.silu(self.reduce(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        return x * self.gate(x)


class ConvAttention(nn.Module):
    """The CBAM-like convolution branch: 3x3 (c -> c/r), GELU, 3x3 (-> c), channel attention."""

    def __init__(self, channels: int, *, compress: int = 4, squeeze: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // compress)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.channel_attention = ChannelAttention(channels, squeeze=squeeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, h, w) -> (b, c, h, w)."""
        y = self.conv2(F.gelu(self.conv1(x)))
        if _lean(self, x):
            return y.mul_(self.channel_attention.gate(y))  # y is ours: scale it in place
        return y * self.channel_attention.gate(y)


class ConvFFN(nn.Module):
    """3x3 conv, LeakyReLU, 3x3 conv, LeakyReLU, plus a shortcut (1x1 when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, *, hidden_channels: int | None = None) -> None:
        super().__init__()
        hidden = hidden_channels or in_channels
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c_in, h, w) -> (b, c_out, h, w)."""
        inference = _lean(self, x)
        y = F.leaky_relu(self.conv1(x), inplace=inference)
        y = F.leaky_relu(self.conv2(y), inplace=inference)
        return y.add_(self.shortcut(x)) if inference else y + self.shortcut(x)


class EMABlock(nn.Module):
    """Efficient Mamba attention block: x + ESSM(x) + gate(conv attention(x)), then a conv FFN.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input and of the FFN's output.
    d_state
        ES2D state size (SEED: 4 x heads).
    step
        ES2D step.
    expand
        ESSM inner width factor.
    compress, squeeze
        Reductions of the conv branch (c / compress) and of the attentions (c / squeeze).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        d_state: int,
        step: int = 2,
        expand: int = 2,
        compress: int = 4,
        squeeze: int = 16,
    ) -> None:
        super().__init__()
        self.essm = ESSM(in_channels, d_state=d_state, step=step, expand=expand)
        self.conv_attention = ConvAttention(in_channels, compress=compress, squeeze=squeeze)
        self.spatial_gate = SpatialGate(in_channels, squeeze=squeeze)
        self.ffn = ConvFFN(in_channels, out_channels)
        # Channels-last weights (oneDNN's fast CPU layout; values unchanged) make every
        # convolution's output and weight gradient channels-last whatever the input's layout,
        # so each gradient has its weight's strides (which DDP's bucket views require).
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c_in, h, w) -> (b, c_out, h, w)."""
        s = self.essm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (b, h, w, c) -> (b, c, h, w)
        a = self.conv_attention(x)  # (b, c, h, w)
        if _lean(self, x):  # s and a are fresh tensors of ours: accumulate in place
            x = s.add_(x).add_(a.mul_(self.spatial_gate.gate(a)))
        else:
            x = x + s + a * self.spatial_gate.gate(a)
        return self.ffn(x)
