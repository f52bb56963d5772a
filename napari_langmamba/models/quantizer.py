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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_langmamba.errors import ConfigError

__all__ = [
    "LAYER_STARTS",
    "LAYER_STRIDES",
    "POOL_TARGETS",
    "PyramidOutput",
    "PositionPools",
    "PyramidQuantizer",
    "axis_positions",
    "nearest_pool_tokens",
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


@torch.no_grad()
def nearest_pool_tokens(
    x: Tensor, codebook: Tensor, pool_ids: Tensor, index: Tensor, *, sq_norms: Tensor | None = None,
    block_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Nearest codebook row to each row of ``x`` (N, d) among the rows of its pool.

    ``pool_ids`` (k, m) lists each pool's rows (padded with -1), ``index`` (N,) names each row's
    pool; a row whose index is -1 or whose pool is empty searches the whole codebook
    (:func:`nearest_tokens`). Returns ``(ids, squared_distances)``, both (N,).
    """
    ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    table = codebook.to(dtype=x.dtype)
    searched = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for pool in torch.unique(index[index >= 0]).tolist():
        members = pool_ids[pool][pool_ids[pool] >= 0]
        if members.numel() == 0:
            continue
        where = (index == pool).nonzero().squeeze(1)
        d2 = (x[where, None, :] - table[members][None]).pow(2).sum(-1)  # (n, m): exact, the pools are small
        best, pick = d2.min(dim=1)
        ids[where], dist[where] = members[pick], best
        searched[where] = True
    rest = (~searched).nonzero().squeeze(1)  # no pool or an empty one: the whole codebook
    if rest.numel():
        ids[rest], dist[rest] = nearest_tokens(x[rest], codebook, sq_norms=sq_norms, block_elements=block_elements)
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

    def forward(self, z: Tensor, *, pools: Sequence[PositionPools] | None = None) -> PyramidOutput:
        """Quantize a latent (b, d, h, w) into the three-layer token pyramid.

        ``pools`` (one :class:`PositionPools` per layer, optional): each position's token is the
        nearest among its pool's words instead of the whole codebook (positions without a pool
        search the whole codebook); :class:`~napari_langmamba.models.langae.LangAE` passes the
        words of the tissue its region head sees (``LangAEConfig.word_choice = "tissue"``).
        """
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
        if pools is not None and len(pools) != len(positions):
            raise ConfigError(f"The quantizer takes one pool set per pyramid layer ({len(positions)}); got {len(pools)}.")
        for layer, (rows, cols) in enumerate(positions):
            grid = (rows[:, None], cols[None, :])  # (r, 1), (1, c) broadcast to the r x c grid
            z_l = z[:, :, grid[0], grid[1]]  # (b, d, r, c)
            k = count[:, :, grid[0], grid[1]] + 1.0
            residual = k * z_l - acc[:, :, grid[0], grid[1]]  # what keeps the running mean at z
            r, c = residual.shape[-2:]
            flat = residual.detach().permute(0, 2, 3, 1).reshape(-1, d)  # (b*r*c, d)
            if pools is None:
                ids, dist = nearest_tokens(flat, codebook, sq_norms=self.codebook_sq_norm,
                                           block_elements=self.block_elements)
            else:
                index = pools[layer].index
                if tuple(index.shape) != (b, r, c):
                    raise ConfigError(f"Layer {layer + 1}'s pools cover {tuple(index.shape)} positions; the latent "
                                      f"has {(b, r, c)}.")
                ids, dist = nearest_pool_tokens(flat, codebook, pools[layer].pool_ids, index.reshape(-1),
                                                sq_norms=self.codebook_sq_norm, block_elements=self.block_elements)
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


@dataclass(frozen=True)
class PositionPools:
    """Per-position candidate pools of one pyramid layer, in a compact pool-table form.

    Positions that show the same thing share a pool, so the pools are stored once
    (``pool_ids``) and each position names its pool (``index``): for the anatomy prior a pool
    is a combination of tissue classes, at most 2**7 of them, whatever the vocabulary size.

    Attributes
    ----------
    pool_ids
        (k, m) LongTensor: ``k`` pools of vocabulary ids, each padded with ``-1`` to ``m``.
    index
        (b, rows, cols) LongTensor: the row of ``pool_ids`` of each position of the layer, ``-1``
        (or an empty pool) for a position without a pool (it does not contribute).
    group
        Optional (b, rows, cols) LongTensor of non-negative group labels that the semantic loss's
        ``balance`` counts instead of the pools (e.g. each region's majority tissue class, so that
        a rare tissue weighs more but a rare *mix* of common tissues does not); ``None``: the pools.
    """

    pool_ids: Tensor
    index: Tensor
    group: Tensor | None = None

    def to(self, device: torch.device | str) -> PositionPools:
        group = self.group.to(device) if self.group is not None else None
        return PositionPools(self.pool_ids.to(device), self.index.to(device), group)


def _pool_statistics(table: Tensor, sq_norms: Tensor, pool_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean embedding (k, d), mean squared norm (k,) and size (k,) of padded pools (k, m)."""
    valid = pool_ids >= 0
    safe = pool_ids.clamp_min(0)
    count = valid.sum(1)
    weights = valid.to(table.dtype) / count.clamp_min(1).unsqueeze(1).to(table.dtype)  # (k, m)
    mean = torch.einsum("km,kmd->kd", weights, table[safe])
    mean_sq = (weights * sq_norms[safe]).sum(1)
    return mean, mean_sq, count


POOL_TARGETS = ("uniform", "any")
"""Targets of :func:`pyramid_semantic_loss`: a uniform distribution over the pool, or the pool as a whole."""


class _PoolCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy between softmax(-|x - e|^2) over the vocabulary and a uniform
    target over the position's pool, with the gradient computed block-wise in the forward pass so
    that no (positions x vocabulary) activation is kept for backward.

    For logits ``s_c = -|x - e_c|^2`` the loss is ``logsumexp_c s_c - mean_{c in pool} s_c``. The
    ``|x|^2`` term is the same for every token and cancels, and the pool mean only needs the
    pool's mean embedding ``mu`` and mean squared norm ``nu``:
    ``mean_{c in pool} (2 x.e_c - |e_c|^2) = 2 x.mu - nu``. The gradient is
    ``2 * (sum_c p_c e_c - mu)`` with ``p = softmax(s)``.

    With ``pool_masks`` (k, n) given (target ``"any"``), the loss is instead
    ``logsumexp_c s_c - logsumexp_{c in pool} s_c``: minus the log of the probability of the
    whole pool, however it is shared among its words, with the gradient
    ``2 * (sum_c p_c e_c - sum_{c in pool} q_c e_c)``, ``q`` the softmax within the pool.
    """

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, sq_norms: Tensor, pool_of: Tensor, pool_mean: Tensor,
                pool_mean_sq: Tensor, block: int, pool_masks: Tensor | None = None) -> Tensor:
        # x: (N, d) positions; pool_of: (N,) row of pool_mean / pool_mean_sq (/ pool_masks) of each position
        need_grad = ctx.needs_input_grad[0]
        loss = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        grad = torch.empty_like(x) if need_grad else None
        with torch.no_grad():
            for start in range(0, x.shape[0], block):
                xb = x[start : start + block]  # (m, d)
                rows = pool_of[start : start + block]
                logits = torch.addmm(-sq_norms.unsqueeze(0), xb, table.t(), alpha=2.0)  # (m, n)
                if pool_masks is None:
                    mu = pool_mean[rows]  # (m, d)
                    pool_logit = 2.0 * (xb * mu).sum(1) - pool_mean_sq[rows]
                    loss[start : start + block] = torch.logsumexp(logits, dim=1) - pool_logit
                    if need_grad:
                        grad[start : start + block] = 2.0 * (torch.softmax(logits, dim=1) @ table - mu)
                    continue
                in_pool = logits.masked_fill(~pool_masks[rows], -math.inf)
                loss[start : start + block] = torch.logsumexp(logits, dim=1) - torch.logsumexp(in_pool, dim=1)
                if need_grad:
                    weights = torch.softmax(logits, dim=1).sub_(torch.softmax(in_pool, dim=1))
                    grad[start : start + block] = 2.0 * (weights @ table)
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        return (grad_loss.unsqueeze(-1) * grad, *(None,) * 7)


def _layer_pools(pool: Tensor | PositionPools, b: int, rows: int, cols: int, n: int, table: Tensor,
                 sq_norms: Tensor, *, with_masks: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(pool of each position (b*rows*cols,) or -1, pool means (k, d), pool mean sq norms (k,),
    pool member masks (k, n) when ``with_masks``, else None)``."""
    device = table.device
    if isinstance(pool, PositionPools):
        pool_ids = pool.pool_ids.to(device=device, dtype=torch.long)
        index = pool.index.to(device=device, dtype=torch.long)
        if pool_ids.ndim != 2 or index.shape != (b, rows, cols):
            raise ConfigError(
                f"Per-position pools need pool_ids (k, m) and an index ({b}, {rows}, {cols}); got "
                f"{tuple(pool_ids.shape)} and {tuple(index.shape)}."
            )
        if pool_ids.numel() and (int(pool_ids.min()) < -1 or int(pool_ids.max()) >= n):
            raise ConfigError(f"Pool token ids must be in [0, {n}) (or -1 for padding).")
        if index.numel() and (int(index.min()) < -1 or int(index.max()) >= pool_ids.shape[0]):
            raise ConfigError(f"A position names pool {int(index.max())}; there are {pool_ids.shape[0]} pools.")
        mean, mean_sq, count = _pool_statistics(table, sq_norms, pool_ids)
        flat = index.reshape(-1)
        empty = flat < 0
        flat = torch.where(empty | (count[flat.clamp_min(0)] == 0), torch.full_like(flat, -1), flat)
        if not with_masks:
            return flat, mean, mean_sq, None
        masks = torch.zeros(pool_ids.shape[0], n + 1, dtype=torch.bool, device=device)
        masks.scatter_(1, torch.where(pool_ids >= 0, pool_ids, n), True)  # padding goes to column n
        return flat, mean, mean_sq, masks[:, :n]
    mask = pool.to(device=device, dtype=torch.bool)
    if mask.ndim == 1:
        mask = mask.unsqueeze(0).expand(b, -1)
    if mask.shape != (b, n):
        raise ConfigError(f"A pool mask must have shape ({b}, {n}) or ({n},); got {tuple(pool.shape)}.")
    count = mask.sum(1)
    weights = mask.to(table.dtype) / count.clamp_min(1).unsqueeze(1).to(table.dtype)  # (b, n)
    mean, mean_sq = weights @ table, weights @ sq_norms
    per_image = torch.where(count > 0, torch.arange(b, device=device), torch.full_like(count, -1))
    return per_image.repeat_interleave(rows * cols), mean, mean_sq, mask if with_masks else None


def pyramid_semantic_loss(
    layer_embeddings: Sequence[Tensor],
    codebook: Tensor,
    pools: Sequence[Tensor | PositionPools | None],
    *,
    block_elements: int | None = None,
    balance: float = 0.0,
    target: str = "uniform",
) -> Tensor:
    """Pyramid semantic loss: pull each layer's embeddings toward its candidate token pool.

    At every position of layer ``l`` the logits over the whole vocabulary are the negative squared
    distances ``-|x - e_c|^2``; the loss is the softmax cross-entropy against a *uniform target
    over the position's pool*, i.e. the mean over pool members of ``-log softmax`` (``logsumexp``
    form, numerically stable). The pool is the image's ``C_l`` (the paper's per-image pools) or,
    with :class:`PositionPools`, a pool of its own for every position (the anatomy prior:
    each region gets the words of the tissues it shows). It is computed in blocks of positions
    with an analytic gradient, so 32 x 32 positions against a 49408-token vocabulary fit in memory.

    Parameters
    ----------
    layer_embeddings
        Per layer, (b, d, rows_l, cols_l) tensors (``PyramidOutput.layer_embeddings``).
    codebook
        (n, d) frozen table (no gradient is computed for it).
    pools
        Per layer: a bool mask (b, n) or (n,) of pool members (one pool per image), a
        :class:`PositionPools` (one pool per position), or ``None`` to skip the layer. Images and
        positions whose pool is empty do not contribute.
    balance
        Exponent of the pool-frequency weights: in each layer a position whose pool ``k`` is
        held by ``c_k`` positions of the batch weighs ``c_k ** -balance`` (0: a plain mean;
        0.5: rare pools, such as soft tissue beside much air and fat, count more; 1: every
        distinct pool counts the same). Weights are normalised to mean 1. Where a
        :class:`PositionPools` has a ``group``, positions are counted by group instead of by pool.
    target
        ``"uniform"`` (the paper's): a uniform target over the pool, which pulls each embedding
        toward the pool's centre; ``"any"``: the probability of the pool as a whole (``-log`` of
        the summed softmax of its words), which is low wherever one pool word is near, so the
        nearest word -- the one shown -- is drawn into the pool rather than to its centre.

    Returns
    -------
    Tensor
        Scalar: the mean over layers (those with a pool) of the mean loss over the positions with a pool.
    """
    if target not in POOL_TARGETS:
        raise ConfigError(f"The semantic loss's target is one of {', '.join(POOL_TARGETS)}; got {target!r}.")
    if len(pools) != len(layer_embeddings):
        raise ConfigError(f"Give one pool per pyramid layer: {len(layer_embeddings)} layers, {len(pools)} pools.")
    n = codebook.shape[0]
    per_layer = []
    for emb, pool in zip(layer_embeddings, pools, strict=True):
        if pool is None:
            continue
        b, d, rows, cols = emb.shape
        table = codebook.detach().to(device=emb.device, dtype=emb.dtype)
        sq_norms = table.pow(2).sum(1)
        pool_of, mean, mean_sq, masks = _layer_pools(pool, b, rows, cols, n, table, sq_norms,
                                                     with_masks=target == "any")
        keep = pool_of >= 0
        if not bool(keep.any()):
            continue
        x = emb.permute(0, 2, 3, 1).reshape(-1, d)[keep]  # (positions with a pool, d)
        block = _rows_per_block(n, block_elements)
        losses = _PoolCrossEntropy.apply(x, table, sq_norms, pool_of[keep], mean, mean_sq, block, masks)
        if balance:
            kept = pool_of[keep]
            if isinstance(pool, PositionPools) and pool.group is not None:
                group = pool.group.to(device=kept.device, dtype=torch.long)
                if group.shape != (b, rows, cols) or (group.numel() and int(group.min()) < 0):
                    raise ConfigError(f"Balance groups are non-negative labels of shape ({b}, {rows}, {cols}); "
                                      f"got {tuple(group.shape)}.")
                kept = group.reshape(-1)[keep]
            counts = torch.bincount(kept, minlength=int(kept.max()) + 1).to(losses.dtype)
            weights = counts[kept].pow(-float(balance))
            per_layer.append((losses * weights).sum() / weights.sum())
        else:
            per_layer.append(losses.mean())
    if not per_layer:
        return layer_embeddings[0].sum() * 0.0
    return torch.stack(per_layer).mean()
