"""The selective scan of Mamba (S6), with one function and three interchangeable backends.

Semantics (mamba_ssm's ``selective_scan_fn``; layout u, delta (b, d, L), A (d, n),
B, C (b, n, L) or (b, g, n, L) with the d channels split into g consecutive groups)::

    delta = softplus(delta + delta_bias)    # bias and softplus only when given / asked
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      # per channel, state (n,)
    y_t   = C_t . h_t + D * u_t

Backends (see :func:`scan_backend`):

- ``"mamba_ssm"``: CUDA tensors with ``mamba_ssm`` importable; its fused kernel.
- ``"numba"``: CPU tensors; a compiled kernel (``prange`` over batch x groups x channel
  blocks, the time loop inside, float32 state) with a hand-written backward (the
  reverse-time recurrence of the state adjoint) in a :class:`torch.autograd.Function`;
  bias and softplus happen inside the kernels. Output and gradients are the same bits
  from call to call and for any thread count (sums across work items are taken in a
  fixed order), so a resumed CPU training run matches an uninterrupted one exactly.
  Without gradients nothing is allocated but the output (no (b, d, L, n) tensor ever);
  with gradients the state at the start of every 32 steps is kept and the rest
  recomputed. numba is imported and the kernels compiled (then cached on disk) on first
  use, never at import.
- ``"torch"``: pure PyTorch, chunked (a stable segment-sum form inside chunks of a few
  dozen steps, the state carried across chunks); any device, e.g. MPS.

:func:`selective_scan_reference` is the plain sequential loop the others are tested
against. :func:`selective_scan_channels_last` takes the "grouped channels-last" layout the
2D scan produces directly, u (b, g, L, dg), so the CPU path needs no transposes.
:func:`es2d_scan_fused` and :func:`norm_gate_` are CPU inference fusions used by ES2D/ESSM;
:func:`es2d_scan_train` is ES2D's fused CPU training scan (float32 inside, also under CPU
bfloat16 autocast, where it takes its inputs in float32 and returns float32).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import threading

import torch
import torch.nn.functional as F

from napari_langmamba.errors import DependencyError

logger = logging.getLogger(__name__)

BACKENDS = ("mamba_ssm", "numba", "torch")

# Steps per chunk of the numba backward: the states of one chunk are recomputed into a
# per-work-item buffer of (chunk + 1) x n x block floats, small enough for the L2 cache.
_NUMBA_CHUNK = 32
# numba's default "workqueue" threading layer must not be entered from two threads at
# once (a napari worker and a test thread, say); the OpenMP layer would not mind.
_NUMBA_LOCK = threading.Lock()

# The previous (unfused) training paths stay selectable, so that a benchmark measures the
# fused ones against them in one process: NAPARI_LANGMAMBA_LEGACY_TRAINING=1 in the
# environment, or legacy_training_paths(True).
_LEGACY_TRAINING_ENV = "NAPARI_LANGMAMBA_LEGACY_TRAINING"
_legacy_training = os.environ.get(_LEGACY_TRAINING_ENV, "").strip() not in ("", "0")


def legacy_training_paths(enabled: bool | None = None) -> bool:
    """Query, or set, whether training takes the previous unfused CPU code paths.

    The fused paths (ES2D's scan in image order with its own backward, the fused LayerNorm x
    SiLU gate) compute the same function within float rounding; the legacy ones are kept
    only to measure against (``benchmarks/training.py``). Inference is not affected.

    Parameters
    ----------
    enabled
        True: legacy paths; False: fused paths; None: leave as is.

    Returns
    -------
    bool
        The setting in force after the call.
    """
    global _legacy_training
    if enabled is not None:
        _legacy_training = bool(enabled)
    return _legacy_training


# --------------------------------------------------------------------------- backends


@functools.lru_cache(maxsize=1)
def _mamba_selective_scan_fn():
    """mamba_ssm's ``selective_scan_fn``, or None when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # triton, a CUDA mismatch or a missing build: any failure
        logger.debug("mamba_ssm is not usable (%s: %s)", type(exc).__name__, exc)
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def _numba_kernels():
    """The numba kernel module (imported on first use), or None when numba is unusable."""
    try:
        from napari_langmamba.models import _scan_numba
    except Exception as exc:
        logger.warning(
            "numba could not be imported (%s: %s); the selective scan falls back to the "
            "slower pure-PyTorch path on CPU",
            type(exc).__name__,
            exc,
        )
        return None
    return _scan_numba


@functools.lru_cache(maxsize=1)
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def scan_backend(device: torch.device | str) -> str:
    """Name the selective-scan backend used for tensors on ``device``.

    Parameters
    ----------
    device
        A torch device or its name ("cpu", "cuda:0", "mps").

    Returns
    -------
    str
        ``"mamba_ssm"`` (CUDA with mamba_ssm importable), ``"numba"`` (CPU with numba
        installed) or ``"torch"`` (anything else).
    """
    device = torch.device(device)
    if device.type == "cuda" and _mamba_selective_scan_fn() is not None:
        return "mamba_ssm"
    if device.type == "cpu" and _numba_installed():
        return "numba"
    return "torch"


# --------------------------------------------------------------------------- public API


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Run the selective scan in mamba_ssm's layout.

    Parameters
    ----------
    u, delta
        (b, d, L) input and step.
    A
        (d, n) state matrix (diagonal per channel; negative for a stable scan).
    B, C
        (b, n, L), or (b, g, n, L) with channel ``c`` in group ``c // (d // g)``.
    D
        (d,) skip weight, or None.
    delta_bias
        (d,) added to ``delta`` before the softplus, or None.
    delta_softplus
        Apply softplus to ``delta + delta_bias``.
    backend
        Force a backend from :data:`BACKENDS`; default :func:`scan_backend` of ``u``.

    Returns
    -------
    torch.Tensor
        (b, d, L), dtype of ``u``.
    """
    if u.dim() != 3:
        raise ValueError(f"selective_scan expects u of shape (b, d, L); got {tuple(u.shape)}")
    b, d, seqlen = u.shape
    B4 = B.unsqueeze(1) if B.dim() == 3 else B  # (b, g, n, L)
    C4 = C.unsqueeze(1) if C.dim() == 3 else C  # (b, g, n, L)
    g = B4.shape[1]
    _check_shapes(u.shape, delta.shape, A.shape, B4.shape, C4.shape, D, delta_bias, layout="bdl")
    backend = _resolve_backend(backend, u.device)
    if backend == "mamba_ssm":
        return _scan_mamba_ssm(u, delta, A, B, C, D, delta_bias, delta_softplus)
    dg = d // g
    # (b, d, L) -> (b, g, dg, L) -> (b, g, L, dg): the grouped channels-last layout.
    y = selective_scan_channels_last(
        u.reshape(b, g, dg, seqlen).transpose(2, 3),
        delta.reshape(b, g, dg, seqlen).transpose(2, 3),
        A,
        B4.transpose(2, 3),  # (b, g, L, n)
        C4.transpose(2, 3),  # (b, g, L, n)
        D,
        delta_bias,
        delta_softplus,
        backend=backend,
    )
    # (b, g, L, dg) -> (b, g, dg, L) -> (b, d, L)
    return y.transpose(2, 3).reshape(b, d, seqlen)


def selective_scan_channels_last(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Run the selective scan in the grouped channels-last layout.

    Same recurrence as :func:`selective_scan`; only the memory layout differs, the one a
    2D scan produces without transposes: u, delta (b, g, L, dg); A (g * dg, n);
    B, C (b, g, L, n); D, delta_bias (g * dg,). Channel ``j`` of group ``k`` is channel
    ``k * dg + j`` of A, D and delta_bias.

    Returns
    -------
    torch.Tensor
        (b, g, L, dg), dtype of ``u``.
    """
    if u.dim() != 4 or B.dim() != 4:
        raise ValueError(
            "selective_scan_channels_last expects u of shape (b, g, L, dg) and B of shape "
            f"(b, g, L, n); got u {tuple(u.shape)} and B {tuple(B.shape)}"
        )
    _check_shapes(u.shape, delta.shape, A.shape, B.shape, C.shape, D, delta_bias, layout="bgld")
    backend = _resolve_backend(backend, u.device)
    if backend == "numba":
        kernels = _numba_kernels()
        if kernels is None:
            return _scan_torch_cl(u, delta, A, B, C, D, delta_bias, delta_softplus)
        tensors = (u, delta, A, B, C, D, delta_bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _NumbaScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
        return _numba_inference(kernels, u, delta, A, B, C, D, delta_bias, delta_softplus)
    if backend == "mamba_ssm":
        b, g, seqlen, dg = u.shape
        # (b, g, L, dg) -> (b, g, dg, L) -> (b, g * dg, L): mamba_ssm's layout.
        y = _scan_mamba_ssm(
            u.transpose(2, 3).reshape(b, g * dg, seqlen),
            delta.transpose(2, 3).reshape(b, g * dg, seqlen),
            A,
            B.transpose(2, 3),  # (b, g, n, L)
            C.transpose(2, 3),
            D,
            delta_bias,
            delta_softplus,
        )
        return y.view(b, g, dg, seqlen).transpose(2, 3)  # (b, g, L, dg)
    return _scan_torch_cl(u, delta, A, B, C, D, delta_bias, delta_softplus)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan as a plain sequential loop (mamba layout; the definition).

    Slow (one step per iteration) and differentiable; computes in the dtype of its inputs,
    so float64 inputs give the float64 reference the backends are tested against.
    """
    b, d, seqlen = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B4 = B.unsqueeze(1) if B.dim() == 3 else B  # (b, g, n, L)
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    per_group = d // B4.shape[1]
    h = u.new_zeros(b, d, A.shape[1])  # (b, d, n)
    ys = []
    for t in range(seqlen):
        b_t = B4[..., t].repeat_interleave(per_group, dim=1)  # (b, g, n) -> (b, d, n)
        c_t = C4[..., t].repeat_interleave(per_group, dim=1)
        dt = delta[:, :, t, None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * b_t
        ys.append((h * c_t).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, L)
    if D is not None:
        y = y + D[:, None] * u
    return y


# --------------------------------------------------------------------------- helpers


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return scan_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; expected one of {BACKENDS}")
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"the numba selective scan runs on CPU tensors only, got device {device}")
    if backend == "mamba_ssm":
        if device.type != "cuda":
            raise ValueError(f"the mamba_ssm selective scan runs on CUDA tensors only, got device {device}")
        if _mamba_selective_scan_fn() is None:
            raise DependencyError(
                "the mamba_ssm selective scan was requested but mamba_ssm cannot be imported; "
                "install it with `pip install napari-langmamba[cuda]` or use the 'torch' backend"
            )
    return backend


def _check_shapes(u_shape, delta_shape, A_shape, B_shape, C_shape, D, delta_bias, *, layout):
    """Validate shapes; B_shape/C_shape are 4-D ((b, g, n, L) for 'bdl', (b, g, L, n) for 'bgld')."""
    if tuple(delta_shape) != tuple(u_shape):
        raise ValueError(f"delta must have the shape of u {tuple(u_shape)}; got {tuple(delta_shape)}")
    if layout == "bdl":
        b, d, seqlen = u_shape
        g, n = B_shape[1], B_shape[2]
        expected_bc = (b, g, n, seqlen)
    else:
        b, g, seqlen, dg = u_shape
        d = g * dg
        n = B_shape[3]
        expected_bc = (b, g, seqlen, n)
    if len(A_shape) != 2 or tuple(A_shape) != (d, n):
        raise ValueError(f"A must have shape (d, n) = {(d, n)}; got {tuple(A_shape)}")
    if g < 1 or d % g:
        raise ValueError(f"the {d} channels cannot be split into {g} groups of B and C")
    for name, shape in (("B", B_shape), ("C", C_shape)):
        if tuple(shape) != expected_bc:
            raise ValueError(f"{name} must have shape {expected_bc}; got {tuple(shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{name} must have shape ({d},); got {tuple(t.shape)}")


def _step(delta, delta_bias, delta_softplus, g, dg):
    """delta -> softplus(delta + bias) in the (b, g, L, dg) layout (no copy when neither)."""
    if delta_bias is not None:
        delta = delta + delta_bias.view(g, 1, dg)  # (d,) -> (g, 1, dg) broadcast over b, L
    return F.softplus(delta) if delta_softplus else delta


# --------------------------------------------------------------------------- numba path


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _flat(t: torch.Tensor):
    """A flat numpy view of a contiguous float32 CPU tensor (shares memory)."""
    return t.view(-1).numpy()


def _numba_block(n_seq: int, dg: int, *, min_block: int = 16, max_block: int = 128) -> int:
    """Channels per work item: wide for vectorisation, narrow enough to feed every thread.

    A power of two from ``min_block`` (a power of two) to ``max_block``, or ``dg`` when that
    is smaller.
    """
    threads = torch.get_num_threads()
    blk = max_block
    while blk > min_block and n_seq * math.ceil(dg / blk) < 2 * threads:
        blk //= 2
    return max(1, min(blk, dg))


def _sum_in_order(parts: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum ``parts`` over ``dim`` by adding its slices one after the other, in index order.

    Unlike ``Tensor.sum``, whose order of additions may follow the thread count, this is
    elementwise work only, so the result is the same bits on any machine setting.
    """
    out = parts.select(dim, 0).clone(memory_format=torch.contiguous_format)
    for i in range(1, parts.shape[dim]):
        out += parts.select(dim, i)
    return out


def _run_numba(kernel, *args) -> None:
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    with _NUMBA_LOCK:
        numba.set_num_threads(threads)
        kernel(*args)


def _numba_forward(kernels, u, delta, bias, softplus, A, B, C, D, *, save_states: bool):
    """Forward kernel on float32 contiguous tensors in the (b, g, L, dg) layout."""
    b, g, seqlen, dg = u.shape
    n = A.shape[1]
    At = A.t().contiguous()  # (n, d): a state row contiguous over channels
    y = torch.empty_like(u)
    nchunks = math.ceil(seqlen / _NUMBA_CHUNK)
    h_chunks = torch.empty((b, g, nchunks, n, dg) if save_states else (0,), dtype=torch.float32)
    _run_numba(
        kernels.scan_forward,
        _flat(u), _flat(delta), _flat(bias), bool(softplus), _flat(At), _flat(B), _flat(C), _flat(D),
        _flat(y), _flat(h_chunks),
        b, g, seqlen, dg, n, _numba_block(b * g, dg), _NUMBA_CHUNK,
    )  # fmt: skip
    return y, h_chunks


def _f32_or_zeros(t: torch.Tensor | None, size: int) -> torch.Tensor:
    return _f32(t) if t is not None else torch.zeros(size)


def _numba_inference(kernels, u, delta, A, B, C, D, delta_bias, delta_softplus):
    """No-gradient path: bias and softplus happen in the kernel; only the output is new."""
    b, g, seqlen, dg = u.shape
    y, _ = _numba_forward(
        kernels,
        _f32(u),
        _f32(delta),
        _f32_or_zeros(delta_bias, g * dg),
        delta_softplus,
        _f32(A),
        _f32(B),
        _f32(C),
        _f32_or_zeros(D, g * dg),
        save_states=False,
    )
    return y.to(u.dtype)


class _NumbaScan(torch.autograd.Function):
    """The numba scan with its hand-written backward; layout (b, g, L, dg).

    Saves the float32 inputs and the state at the start of every chunk of
    ``_NUMBA_CHUNK`` steps, (b, g, L / chunk, n, dg); the backward recomputes the rest.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        kernels = _numba_kernels()
        b, g, seqlen, dg = u.shape
        u32, delta32, A32, B32, C32 = _f32(u), _f32(delta), _f32(A), _f32(B), _f32(C)
        D32 = _f32_or_zeros(D, g * dg)
        bias32 = _f32_or_zeros(delta_bias, g * dg)
        y, h_chunks = _numba_forward(
            kernels, u32, delta32, bias32, delta_softplus, A32, B32, C32, D32, save_states=True
        )
        ctx.save_for_backward(u32, delta32, A32, B32, C32, D32, bias32, h_chunks)
        ctx.delta_softplus = delta_softplus
        ctx.has_D = D is not None
        ctx.has_bias = delta_bias is not None
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (u, delta, A, B, C, D, delta_bias))
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, dy):
        kernels = _numba_kernels()
        u32, delta32, A32, B32, C32, D32, bias32, h_chunks = ctx.saved_tensors
        b, g, seqlen, dg = u32.shape
        d, n = A32.shape
        # Whole sub-blocks of the B and C sums per work item: the kernel's condition for
        # gradients that do not depend on the thread count.
        blk = _numba_block(b * g, dg, min_block=kernels.SUM_BLOCK)
        nsub = math.ceil(dg / kernels.SUM_BLOCK)
        du = torch.empty_like(u32)
        ddelta = torch.empty_like(u32)  # with respect to delta before bias and softplus
        # Partial sums in separate slots, added up below in a fixed order (reproducible bits).
        dA_part = torch.empty(b, d, n)  # per batch element
        dD_part = torch.empty(b, d)
        dbias_part = torch.empty(b, d)
        dB_part = torch.empty(b, g, seqlen, nsub, n)  # per sub-block of channels
        dC_part = torch.empty(b, g, seqlen, nsub, n)
        _run_numba(
            kernels.scan_backward,
            _flat(u32), _flat(delta32), _flat(bias32), bool(ctx.delta_softplus), _flat(A32.t().contiguous()),
            _flat(B32), _flat(C32), _flat(D32), _flat(_f32(dy)), _flat(h_chunks),
            _flat(du), _flat(ddelta), _flat(dA_part), _flat(dD_part), _flat(dbias_part), _flat(dB_part),
            _flat(dC_part),
            b, g, seqlen, dg, n, blk, _NUMBA_CHUNK,
        )  # fmt: skip
        u_t, delta_t, A_t, B_t, C_t, D_t, bias_t = ctx.dtypes
        # Every gradient is a fresh contiguous tensor in its input's own shape: DDP's bucket
        # views and AccumulateGrad's layout contract take it as it is.
        return (
            du.to(u_t),
            ddelta.to(delta_t),
            _sum_in_order(dA_part, 0).to(A_t),  # (d, n)
            _sum_in_order(dB_part, 3).to(B_t),  # (b, g, L, n)
            _sum_in_order(dC_part, 3).to(C_t),
            _sum_in_order(dD_part, 0).to(D_t) if ctx.has_D else None,
            _sum_in_order(dbias_part, 0).to(bias_t) if ctx.has_bias else None,
            None,
        )


def es2d_scan_fused(
    x: torch.Tensor,
    order: torch.Tensor,
    xdbl: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """ES2D's scan for CPU inference, fused: image order in and out, no (b, K, L, d) tensors.

    Parameters
    ----------
    x
        (b, P, d) float32, the P real pixels in image order.
    order
        (K, L) int64: pixel of step t of direction k, or -1 for a padding position.
    xdbl
        (b, K, L, r + 2n): per step, the low-rank step input, then B, then C.
    dt_weight, dt_bias
        (K, d, r) and (K, d): the step is softplus(dt_weight[k] @ xdbl[..., :r] + dt_bias[k]).
    A, D
        (K * d, n) and (K * d,).
    out
        Optional contiguous float32 (b, P, d) tensor to write into (not ``x``).

    Returns
    -------
    torch.Tensor or None
        (b, P, d); None when numba is unusable (the caller then takes the generic path).
    """
    kernels = _numba_kernels()
    if kernels is None:
        return None
    # Whole pixel rows per work item when there are enough items: two of the directions
    # step 2 image rows at a time, so short blocks would waste most of each memory access.
    b, npix, d = x.shape
    k, seqlen = order.shape
    n = A.shape[1]
    r = dt_weight.shape[2]
    if out is None or out.shape != (b, npix, d) or out.dtype != torch.float32 or not out.is_contiguous():
        out = torch.empty(b, npix, d)
    y = out
    _run_numba(
        kernels.es2d_forward,
        _flat(_f32(x)), order.contiguous().view(-1).numpy(), _flat(_f32(xdbl)),
        _flat(_f32(dt_weight.transpose(1, 2))), _flat(_f32(dt_bias)), _flat(_f32(A).t().contiguous()),
        _flat(_f32(D)), _flat(y),
        b, k, seqlen, d, npix, r, n, _numba_block(b * k, d, max_block=1024),
    )  # fmt: skip
    return y


def es2d_scan_train(
    x: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor | None:
    """ES2D's scan for CPU training, fused and differentiable: image order in and out.

    The same function as ES2D's generic path (split, projections, selective scan, merge),
    computed without its (b, K, L, d) step, split and merge tensors: the numba kernels read
    the input and write the output (and, backwards, the input gradient) in image order
    through ``order``, and compute the step from the low-rank projection themselves.
    Gradients are the same bits for any thread count.

    Parameters
    ----------
    x
        (b, P, d) float32, the pixels of an even-sized map in image order.
    order, inverse
        (K, L) int64 step-2 scan order (every pixel in exactly one direction) and its
        inverse permutation (P,) (:func:`~napari_langmamba.models.ema.es2d_order`).
    x_proj_weight
        (K, r + 2n, d): per direction, the low-rank step input, B and C of a pixel.
    dt_weight, dt_bias
        (K, d, r) and (K, d): the step is softplus(dt_weight[k] @ low-rank input + dt_bias[k]).
    A, D
        (K * d, n) and (K * d,).

    Returns
    -------
    torch.Tensor or None
        (b, P, d); None when numba is unusable (the caller then takes the generic path).
    """
    if _numba_kernels() is None:
        return None
    return _ES2DTrain.apply(x, x_proj_weight, dt_weight, dt_bias, A, D, order, inverse)


class _ES2DTrain(torch.autograd.Function):
    """:func:`es2d_scan_train`: saves the float32 inputs, the gathered sequences, the
    projected ones and the state before every chunk of ``_NUMBA_CHUNK`` steps."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # float32 kernels under autocast
    def forward(ctx, x, x_proj_weight, dt_weight, dt_bias, A, D, order, inverse):
        kernels = _numba_kernels()
        b, npix, d = x.shape
        k, seqlen = order.shape
        n = A.shape[1]
        r = dt_weight.shape[2]
        x32 = _f32(x)
        order = order.contiguous()
        flat_order = order.view(-1)
        proj32 = _f32(x_proj_weight)  # (K, m, d), m = r + 2n
        xs = x32.index_select(1, flat_order).view(b, k, seqlen, d)  # (b, K, L, d): scan order
        xdbl = torch.matmul(xs, proj32.transpose(1, 2))  # (b, K, L, m)
        dtw32 = _f32(dt_weight)  # (K, d, r)
        wT = dtw32.transpose(1, 2).contiguous()  # (K, r, d)
        bias32 = _f32(dt_bias).view(-1)  # (K * d,)
        At = _f32(A).t().contiguous()  # (n, K * d)
        D32 = _f32(D)
        y = torch.empty(b, npix, d)
        h_chunks = torch.empty(b, k, math.ceil(seqlen / _NUMBA_CHUNK), n, d)
        blk = _numba_block(b * k, d, min_block=kernels.SUM_BLOCK)
        _run_numba(
            kernels.es2d_train_forward,
            _flat(xs), flat_order.numpy(), _flat(xdbl), _flat(wT), _flat(bias32), _flat(At), _flat(D32),
            _flat(y), _flat(h_chunks),
            b, k, seqlen, d, npix, r, n, blk, _NUMBA_CHUNK,
        )  # fmt: skip
        ctx.npix = npix
        ctx.save_for_backward(xs, xdbl, proj32, wT, bias32, At, D32, h_chunks, order, inverse)
        ctx.dtypes = tuple(t.dtype for t in (x, x_proj_weight, dt_weight, dt_bias, A, D))
        return y.to(x.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy):
        kernels = _numba_kernels()
        xs, xdbl, proj32, wT, bias32, At, D32, h_chunks, order, inverse = ctx.saved_tensors
        b, npix, d = xs.shape[0], ctx.npix, xs.shape[3]
        k, seqlen = order.shape
        n = At.shape[0]
        r = wT.shape[1]
        sub = kernels.SUM_BLOCK
        nsub = math.ceil(d / sub)
        du = torch.empty(b, k, seqlen, d)  # scan order
        # Partial sums in separate slots, added up below in a fixed order (reproducible bits).
        dA_part = torch.empty(b, k * d, n)  # per batch element
        dD_part = torch.empty(b, k * d)
        dbias_part = torch.empty(b, k * d)
        dW_part = torch.empty(b, k * d, r)
        dX_part = torch.empty(b, k, seqlen, nsub, r + 2 * n)  # per sub-block of channels
        _run_numba(
            kernels.es2d_train_backward,
            _flat(xs), order.view(-1).numpy(), _flat(xdbl), _flat(wT), _flat(bias32), _flat(At), _flat(D32),
            _flat(_f32(dy)), _flat(h_chunks),
            _flat(du), _flat(dA_part), _flat(dD_part), _flat(dbias_part), _flat(dW_part), _flat(dX_part),
            b, k, seqlen, d, npix, r, n, _numba_block(b * k, d, min_block=sub), _NUMBA_CHUNK,
        )  # fmt: skip
        dxdbl = _sum_in_order(dX_part, 3)  # (b, K, L, m)
        d_proj = _sum_in_order(torch.matmul(dxdbl.transpose(2, 3), xs), 0)  # (K, m, d)
        du.view(b * k, seqlen, d).baddbmm_(dxdbl.view(b * k, seqlen, -1), proj32.repeat(b, 1, 1))  # + dxdbl @ W
        dx = du.view(b, k * seqlen, d).index_select(1, inverse)  # back to image order
        x_t, proj_t, dtw_t, bias_t, A_t, D_t = ctx.dtypes
        return (
            dx.to(x_t),
            d_proj.to(proj_t),
            _sum_in_order(dW_part, 0).view(k, d, r).to(dtw_t),
            _sum_in_order(dbias_part, 0).view(k, d).to(bias_t),
            _sum_in_order(dA_part, 0).to(A_t),
            _sum_in_order(dD_part, 0).to(D_t),
            None,
            None,
        )


def norm_gate_(
    y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> bool:
    """In place on CPU float32: ``y = layer_norm(y) * silu(z)`` over the last dim, fused.

    Parameters
    ----------
    y, z
        Contiguous float32 CPU tensors of the same shape (..., d); ``y`` is overwritten.
    weight, bias
        (d,) LayerNorm affine parameters.
    eps
        LayerNorm epsilon.

    Returns
    -------
    bool
        False (and ``y`` untouched) when numba is unusable; the caller then uses torch ops.
    """
    kernels = _numba_kernels()
    if kernels is None:
        return False
    d = y.shape[-1]
    _run_numba(
        kernels.norm_gate,
        _flat(y), _flat(z), _flat(_f32(weight)), _flat(_f32(bias)), float(eps), y.numel() // d, d,
    )  # fmt: skip
    return True


# --------------------------------------------------------------------------- torch path


def _scan_torch_cl(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """Pure-PyTorch chunked scan, layout (b, g, L, dg); differentiable by autograd.

    Inside a chunk of T steps, with the cumulative log-decay s_t = sum_{r<=t} dt_r A,
    h_t = exp(s_t) h_0 + sum_{r<=t} exp(s_t - s_r) dt_r B_r u_r; exponents of r > t are
    masked to -inf before the exponential, so nothing overflows. Memory per chunk is
    (b, g, T, T, dg, n); T is chosen to keep that near 4 M elements.
    """
    b, g, seqlen, dg = u.shape
    n = A.shape[1]
    dtype = torch.promote_types(u.dtype, torch.float32)
    u_c = u.to(dtype)
    dt = _step(delta.to(dtype), delta_bias, delta_softplus, g, dg)  # (b, g, L, dg)
    A_g = A.to(dtype).view(g, 1, dg, n)  # (g, 1, dg, n), broadcast over b and T
    B_c, C_c = B.to(dtype), C.to(dtype)
    T = max(1, min(64, int(math.sqrt(4_000_000 / max(1, b * g * dg * n)))))
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()  # [t, r]: r <= t
    h = u_c.new_zeros(b, g, dg, n)
    ys = []
    for t0 in range(0, seqlen, T):
        t1 = min(seqlen, t0 + T)
        k = t1 - t0
        dt_k = dt[:, :, t0:t1]  # (b, g, k, dg)
        s = torch.cumsum(dt_k.unsqueeze(-1) * A_g, dim=2)  # (b, g, k, dg, n)
        x = (dt_k * u_c[:, :, t0:t1]).unsqueeze(-1) * B_c[:, :, t0:t1].unsqueeze(3)  # (b, g, k, dg, n)
        seg = s.unsqueeze(3) - s.unsqueeze(2)  # (b, g, k[t], k[r], dg, n) = s_t - s_r
        mask = causal[:k, :k].view(1, 1, k, k, 1, 1)
        decay = torch.exp(seg.masked_fill(~mask, float("-inf")))
        h_k = torch.einsum("bgtrdn,bgrdn->bgtdn", decay, x) + torch.exp(s) * h.unsqueeze(2)
        ys.append(torch.einsum("bgtdn,bgtn->bgtd", h_k, C_c[:, :, t0:t1]))  # (b, g, k, dg)
        h = h_k[:, :, -1]  # (b, g, dg, n)
    y = torch.cat(ys, dim=2)  # (b, g, L, dg)
    if D is not None:
        y = y + u_c * D.to(dtype).view(g, 1, dg)
    return y.to(u.dtype)


# --------------------------------------------------------------------------- mamba_ssm path


def _scan_mamba_ssm(u, delta, A, B, C, D, delta_bias, delta_softplus):
    """mamba_ssm's CUDA kernel, mamba layout; it needs unit stride in L and float32 A/D/bias."""
    fn = _mamba_selective_scan_fn()
    return fn(
        u.contiguous(),
        delta.contiguous(),
        A.float().contiguous(),
        B.contiguous(),
        C.contiguous(),
        D=D.float().contiguous() if D is not None else None,
        z=None,
        delta_bias=delta_bias.float().contiguous() if delta_bias is not None else None,
        delta_softplus=delta_softplus,
    )
