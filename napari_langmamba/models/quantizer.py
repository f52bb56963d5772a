"""Token pyramid quantizer (SPAE style) over a frozen language-model codebook, and its semantic loss.

Positions (per axis of a latent of length ``s``; rows and columns are chosen independently)
------------------------------------------------------------------------------------------
* layer 1: every 16th position starting at 7 (``7::16``) -> 2 per axis on a 32 x 32 latent;
* layer 2: every 4th position starting at 3 (``3::4``)   -> 8 per axis on 32 x 32;
* layer 3: every position                                 -> 32 per axis.

The same strides hold for any latent size, so a 16 x 16 latent has 1 x 1, 4 x 4 and 16 x 16
positions and a 64 x 64 one 4 x 4, 16 x 16, 64 x 64. The layers are nested (``7 = 3 + 4``), so
every layer-1 position is also a layer-2 position. When an axis is too short for a layer to get
a position (``s <= 7`` for layer 1, ``s <= 3`` for layer 2), that layer takes the single position
of the layer below it nearest the axis centre, so every layer always has at least one token.

Quantization (streaming average, as in SPAE)
--------------------------------------------
The quantized latent at a position is the *mean* of the embeddings of the layers present there.
So that this mean approaches the latent ``z``, layer ``l`` quantizes the residual the earlier
layers left at its positions, ``r_l = k * z - sum(e_j for earlier layers j present)`` with ``k``
the number of layers present so far including ``l`` (for the first layer at a position simply
``z``); its token is the nearest codebook row to ``r_l``. Gradients pass straight through
(``z + (z_q - z).detach()``). The commitment loss is ``beta * mean_l MSE(r_l, e_l)`` (the
codebook is frozen, so the usual codebook term vanishes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_langmamba.errors import ConfigError

__all__ = [
    "LAYER_STARTS",
    "LAYER_STRIDES",
    "PyramidOutput",
    "PyramidQuantizer",
    "axis_positions",
    "nearest_tokens",
    "pyramid_positions",
    "pyramid_semantic_loss",
]

LAYER_STRIDES = (16, 4, 1)
LAYER_STARTS = (7, 3, 0)
NUM_LAYERS = len(LAYER_STRIDES)
# Elements of one (positions x vocabulary) block: 2**24 float32 = 64 MB, so 32 x 32 positions
# against PubMedCLIP's 49408 tokens run in a few blocks of ~340 positions.
_BLOCK_ELEMENTS = 2**24


def axis_positions(size: int) -> list[list[int]]:
    """Per-layer positions along one axis of length ``size`` (see the module docstring)."""
    if size < 1:
        raise ConfigError(f"A latent axis needs at least one position; got {size}.")
    layers: list[list[int]] = [list(range(0, size))]  # built bottom-up: layer 3, 2, 1
    for stride, start in zip(LAYER_STRIDES[-2::-1], LAYER_STARTS[-2::-1], strict=True):
        picked = list(range(start, size, stride))
        if not picked:
            below = layers[-1]
            picked = [min(below, key=lambda p: (abs(p - (size - 1) / 2), p))]
        layers.append(picked)
    return layers[::-1]


def pyramid_positions(h: int, w: int, *, device: torch.device | str | None = None) -> list[tuple[Tensor, Tensor]]:
    """Row and column indices of the three pyramid layers on an ``h x w`` latent.

    Returns
    -------
    list of (rows, cols)
        One pair of 1-D LongTensors per layer; layer ``l`` covers the grid ``rows x cols``.
        On 32 x 32: rows/cols ``7::16``, ``3::4`` and all positions.
    """
    rows, cols = axis_positions(int(h)), axis_positions(int(w))
    return [
        (torch.tensor(r, dtype=torch.long, device=device), torch.tensor(c, dtype=torch.long, device=device))
        for r, c in zip(rows, cols, strict=True)
    ]


def _rows_per_block(n_tokens: int, block_elements: int | None) -> int:
    return max(1, (block_elements or _BLOCK_ELEMENTS) // max(1, n_tokens))


@torch.no_grad()
def nearest_tokens(
    x: Tensor, codebook: Tensor, *, sq_norms: Tensor | None = None, block_elements: int | None = None
) -> tuple[Tensor, Tensor]:
    """Nearest codebook row to each row of ``x`` (N, d), computed in blocks of positions.

    Returns ``(ids, squared_distances)``, both of shape (N,).
    """
    codebook = codebook.to(dtype=x.dtype)
    if sq_norms is None:
        sq_norms = codebook.pow(2).sum(1)
    sq_norms = sq_norms.to(dtype=x.dtype)
    ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _rows_per_block(codebook.shape[0], block_elements)
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        # |x - e|^2 = |x|^2 - 2 x.e + |e|^2; |x|^2 does not change the argmin, add it afterwards
        partial = torch.addmm(sq_norms.unsqueeze(0), xb, codebook.t(), alpha=-2.0)  # (chunk, n)
        best, idx = partial.min(dim=1)
        ids[start : start + step] = idx
        dist[start : start + step] = (best + xb.pow(2).sum(1)).clamp_min(0.0)
    return ids, dist


@dataclass
class PyramidOutput:
    """What :class:`PyramidQuantizer` returns.

    Attributes
    ----------
    z_q
        (b, d, h, w) quantized latent with straight-through gradients.
    ids
        Three LongTensors, layer ``l`` of shape (b, n_rows_l, n_cols_l): vocabulary ids.
    positions
        Three ``(rows, cols)`` 1-D index tensors into the latent (see :func:`pyramid_positions`).
    layer_embeddings
        Three (b, d, n_rows_l, n_cols_l) tensors: the residual each layer quantized (with
        gradients), the input of :func:`pyramid_semantic_loss`.
    commitment_loss
        Scalar, already multiplied by ``beta``.
    distances
        Three (b, n_rows_l, n_cols_l) squared distances between each residual and its token.
    """

    z_q: Tensor
    ids: list[Tensor]
    positions: list[tuple[Tensor, Tensor]]
    layer_embeddings: list[Tensor]
    commitment_loss: Tensor
    distances: list[Tensor]


class PyramidQuantizer(nn.Module):
    """Three-layer token pyramid over a frozen codebook (a non-persistent buffer, never a Parameter).

    Parameters
    ----------
    embeddings
        (n, d) codebook table; shared, never modified, not saved in the state dict.
    beta
        Weight of the commitment loss.
    block_elements
        Size of the (positions x vocabulary) blocks of the nearest-token search.
    """

    def __init__(self, embeddings: Tensor, *, beta: float = 0.3, block_elements: int | None = None) -> None:
        super().__init__()
        if embeddings.ndim != 2:
            raise ConfigError(f"A codebook is an (n, d) table; got shape {tuple(embeddings.shape)}.")
        self.beta = float(beta)
        self.block_elements = block_elements
        table = embeddings.detach().to(torch.float32)
        self.register_buffer("codebook", table, persistent=False)
        self.register_buffer("codebook_sq_norm", table.pow(2).sum(1), persistent=False)

    @property
    def num_tokens(self) -> int:
        return int(self.codebook.shape[0])

    def forward(self, z: Tensor) -> PyramidOutput:
        """Quantize a latent (b, d, h, w) into the three-layer token pyramid."""
        if z.ndim != 4 or z.shape[1] != self.codebook.shape[1]:
            raise ConfigError(
                f"The quantizer expects a latent (b, {self.codebook.shape[1]}, h, w); got {tuple(z.shape)}."
            )
        b, d, h, w = z.shape
        positions = pyramid_positions(h, w, device=z.device)
        codebook = self.codebook.to(z.dtype)
        acc = torch.zeros_like(z, requires_grad=False)  # sum of the layer embeddings present
        count = torch.zeros((1, 1, h, w), dtype=z.dtype, device=z.device)
        ids_out, residuals, dists, commits = [], [], [], []
        for rows, cols in positions:
            grid = (rows[:, None], cols[None, :])  # (r, 1), (1, c) broadcast to the r x c grid
            z_l = z[:, :, grid[0], grid[1]]  # (b, d, r, c)
            k = count[:, :, grid[0], grid[1]] + 1.0
            residual = k * z_l - acc[:, :, grid[0], grid[1]]  # what keeps the running mean at z
            r, c = residual.shape[-2:]
            flat = residual.detach().permute(0, 2, 3, 1).reshape(-1, d)  # (b*r*c, d)
            ids, dist = nearest_tokens(flat, codebook, sq_norms=self.codebook_sq_norm,
                                       block_elements=self.block_elements)
            emb = codebook[ids].reshape(b, r, c, d).permute(0, 3, 1, 2)  # (b, d, r, c)
            with torch.no_grad():
                acc[:, :, grid[0], grid[1]] += emb
                count[:, :, grid[0], grid[1]] += 1.0
            commits.append(F.mse_loss(residual, emb))
            ids_out.append(ids.reshape(b, r, c))
            dists.append(dist.reshape(b, r, c))
            residuals.append(residual)
        quantized = acc / count  # mean of the layer embeddings at each position
        z_q = z + (quantized - z).detach()  # straight-through estimator
        commitment = self.beta * torch.stack(commits).mean()
        return PyramidOutput(
            z_q=z_q, ids=ids_out, positions=positions, layer_embeddings=residuals,
            commitment_loss=commitment, distances=dists,
        )


class _PoolCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy between softmax(-|x - e|^2) over the vocabulary and a uniform
    target over the position's pool, with the gradient computed block-wise in the forward pass so
    that no (positions x vocabulary) activation is kept for backward.

    For logits ``s_c = -|x - e_c|^2`` the loss is ``logsumexp_c s_c - mean_{c in pool} s_c`` and its
    gradient ``2 * (sum_c p_c e_c - mean_{c in pool} e_c)`` with ``p = softmax(s)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, sq_norms: Tensor, pool_ids: tuple[Tensor, ...],
                block: int) -> Tensor:
        # x: (b, P, d); pool_ids[i]: ids of item i's pool (non-empty)
        need_grad = ctx.needs_input_grad[0]
        loss = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
        grad = torch.empty_like(x) if need_grad else None
        with torch.no_grad():
            for i in range(x.shape[0]):
                pool = pool_ids[i]
                pool_table = table[pool]  # (k, d)
                pool_mean = pool_table.mean(0)  # (d,)
                for start in range(0, x.shape[1], block):
                    xb = x[i, start : start + block]  # (m, d)
                    # |x|^2 is the same for every token and cancels between the two terms
                    logits = torch.addmm(-sq_norms.unsqueeze(0), xb, table.t(), alpha=2.0)  # (m, n)
                    lse = torch.logsumexp(logits, dim=1)
                    pool_logits = 2.0 * xb @ pool_table.t() - sq_norms[pool].unsqueeze(0)  # (m, k)
                    loss[i, start : start + block] = lse - pool_logits.mean(1)
                    if need_grad:
                        probs = torch.softmax(logits, dim=1)  # (m, n)
                        grad[i, start : start + block] = 2.0 * (probs @ table - pool_mean)
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return grad_loss.unsqueeze(-1) * grad, None, None, None, None


def pyramid_semantic_loss(
    layer_embeddings: Sequence[Tensor],
    codebook: Tensor,
    pools: Sequence[Tensor | None],
    *,
    block_elements: int | None = None,
) -> Tensor:
    """Pyramid semantic loss: pull each layer's embeddings toward its candidate token pool.

    At every position of layer ``l`` the logits over the whole vocabulary are the negative squared
    distances ``-|x - e_c|^2``; the loss is the softmax cross-entropy against a *uniform target
    over the pool* ``C_l`` of that image, i.e. the mean over pool members of ``-log softmax``
    (``logsumexp`` form, numerically stable). It is computed in blocks of positions with an
    analytic gradient, so 32 x 32 positions against a 49408-token vocabulary fit in memory.

    Parameters
    ----------
    layer_embeddings
        Per layer, (b, d, rows_l, cols_l) tensors (``PyramidOutput.layer_embeddings``).
    codebook
        (n, d) frozen table (no gradient is computed for it).
    pools
        Per layer, a bool mask (b, n) or (n,) of pool members, or ``None`` to skip the layer.
        Images whose pool is empty for a layer do not contribute to it.

    Returns
    -------
    Tensor
        Scalar: the mean over layers (those with a pool) of the mean loss over their positions.
    """
    if len(pools) != len(layer_embeddings):
        raise ConfigError(f"Give one pool per pyramid layer: {len(layer_embeddings)} layers, {len(pools)} pools.")
    n = codebook.shape[0]
    per_layer = []
    for emb, pool in zip(layer_embeddings, pools, strict=True):
        if pool is None:
            continue
        b, d = emb.shape[:2]
        mask = pool.to(device=emb.device, dtype=torch.bool)
        if mask.ndim == 1:
            mask = mask.unsqueeze(0).expand(b, -1)
        if mask.shape != (b, n):
            raise ConfigError(f"A pool mask must have shape ({b}, {n}) or ({n},); got {tuple(pool.shape)}.")
        keep = mask.any(dim=1)
        if not bool(keep.any()):
            continue
        x = emb.permute(0, 2, 3, 1).reshape(b, -1, d)[keep]  # (b', P, d)
        pool_ids = tuple(row.nonzero().squeeze(1) for row in mask[keep])
        table = codebook.detach().to(device=emb.device, dtype=emb.dtype)
        sq_norms = table.pow(2).sum(1)
        block = _rows_per_block(n, block_elements)
        per_layer.append(_PoolCrossEntropy.apply(x, table, sq_norms, pool_ids, block).mean())
    if not per_layer:
        return layer_embeddings[0].sum() * 0.0
    return torch.stack(per_layer).mean()
