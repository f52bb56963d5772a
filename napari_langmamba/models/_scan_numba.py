"""Numba CPU kernels of the selective scan: the forward recurrence and its hand-written backward.

Private to :mod:`napari_langmamba.models.scan`, which imports this module only the first
time the CPU path runs, so neither numba's import nor any compilation happens when napari
starts. Every kernel is compiled on its first call and cached on disk (``cache=True``).

Layout ("grouped channels last"; every array is a flat, C-contiguous float32 view):

- ``u``, ``delta``, ``y``, ``du``, ``ddelta``, ``dy``: (b, g, L, dg), channel ``c = gi * dg + j``
- ``At``: (n, g * dg), i.e. A transposed, so that a state row is contiguous over channels
- ``B``, ``C``: (b, g, L, n)
- ``Dv``, ``bias``: (g * dg,)

The step is ``dt = softplus(delta + bias)`` (or ``delta + bias`` when ``softplus`` is
False), computed inside the kernels. A work item is one (batch, group, block of ``blk``
channels); the time loop runs inside it and the innermost loop runs over the channels of
the block, which are contiguous in memory, so LLVM vectorises it. That needs ``exp`` and
``softplus`` as branch-free polynomials, plain loop indices into row views (an offset
like ``a[o + j]`` makes numba emit negative-index handling that blocks vectorisation), and
inner loops that store to one or two arrays only (each extra pair of arrays that might
alias costs LLVM a runtime check, and past a handful it gives up). The state is float32.

Results are bit-reproducible whatever the thread count: a work item computes each of its
channels exactly as any other split would (no value depends on the block width; checked
by tests/test_scan.py), and every sum across work items (over channels or the batch) is
left to the caller as partial results in separate slots, added up in a fixed order. The
block width follows the thread count, so a sum over a work item's channels would not be
reproducible: the B and C gradients are summed per fixed sub-block of ``SUM_BLOCK``
channels instead.

:func:`es2d_forward` is the inference-only fusion used by ES2D: it reads its input and
writes its output in image order through the scan order, and computes the step from the
low-rank projection itself, so no (b, 4, L, d) tensor is ever materialised.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_F32 = np.float32

# Channels per partial sum of the B and C gradients, which are sums over channels. Fixed, so
# that the backward's results do not depend on how the channels are cut into work items (that
# follows the thread count). 64 is four AVX-512 vectors: measured as fast as one sum over a
# 128-channel block, where 16 or 32 made the whole backward ~25 % slower.
SUM_BLOCK = 64


@intrinsic
def _int32_bits_as_float32(typingctx, x):
    """Reinterpret the bits of an int32 as a float32 (used to build 2**k)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=True, error_model="numpy", cache=True)
def _exp(x):
    """float32 exp as a polynomial (Cephes ``expf``), so the channel loop vectorises.

    numba only vectorises ``math.exp`` with Intel SVML, which is usually absent; this
    version is branch-free and accurate to a few ulp. Arguments below -87 give about
    1e-38 instead of a smaller number, which is irrelevant as a decay factor.
    """
    x = min(max(x, _F32(-87.0)), _F32(88.0))
    fx = math.floor(x * _F32(1.44269504) + _F32(0.5))
    r = x - fx * _F32(0.693359375) + fx * _F32(2.12194440e-4)
    z = r * r
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * z + r + _F32(1.0)
    k = np.int32(fx) + np.int32(127)
    return p * _int32_bits_as_float32(k << np.int32(23))


@njit(inline="always", fastmath=True, error_model="numpy", cache=True)
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), branch-free, relative error ~1e-7.

    log1p(e) = 2 atanh(s) with s = e / (2 + e) in [0, 1/3], summed to s**13. Above 20 the
    correction is below float32's resolution, which reproduces torch's threshold of 20.
    """
    e = _exp(-abs(x))
    s = e / (_F32(2.0) + e)
    s2 = s * s
    p = _F32(1.0 / 13.0)
    p = p * s2 + _F32(1.0 / 11.0)
    p = p * s2 + _F32(1.0 / 9.0)
    p = p * s2 + _F32(1.0 / 7.0)
    p = p * s2 + _F32(1.0 / 5.0)
    p = p * s2 + _F32(1.0 / 3.0)
    p = p * s2 + _F32(1.0)
    return max(x, _F32(0.0)) + _F32(2.0) * s * p


@njit(inline="always", fastmath=True, error_model="numpy", cache=True)
def _sigmoid(x):
    """1 / (1 + exp(-x)): the derivative of softplus."""
    return _F32(1.0) / (_F32(1.0) + _exp(-x))


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy", cache=True)
def scan_forward(u, delta, bias, softplus, At, B, C, Dv, y, h_chunks, nb, ng, seqlen, dg, n, blk, chunk):
    """y = scan(u, dt, A, B, C) + D * u; optionally store the state before every chunk.

    ``h_chunks`` is (b, g, ceil(L / chunk), n, dg) when the backward pass will need it
    (the state just before step ``c * chunk``), or an empty array otherwise.
    """
    d = ng * dg
    nblk = (dg + blk - 1) // blk
    nchunks = (seqlen + chunk - 1) // chunk
    save = h_chunks.shape[0] > 0
    for item in prange(nb * ng * nblk):
        bi = item // (ng * nblk)
        gi = (item // nblk) % ng
        j0 = (item % nblk) * blk
        w = min(dg - j0, blk)
        c0 = gi * dg + j0
        seq = bi * ng + gi
        h = np.zeros((n, w), np.float32)
        a_loc = np.empty((n, w), np.float32)
        for k in range(n):
            a_loc[k, :] = At[k * d + c0 : k * d + c0 + w]
        d_loc = Dv[c0 : c0 + w].copy()
        b_loc = bias[c0 : c0 + w].copy()
        acc = np.empty(w, np.float32)
        dtu = np.empty(w, np.float32)
        dtl = np.empty(w, np.float32)
        for t in range(seqlen):
            if save and t % chunk == 0:
                hc = ((seq * nchunks + t // chunk) * n) * dg + j0
                for k in range(n):
                    h_chunks[hc + k * dg : hc + k * dg + w] = h[k]
            o = (seq * seqlen + t) * dg + j0
            ur = u[o : o + w]
            dr = delta[o : o + w]
            bc = B[(seq * seqlen + t) * n : (seq * seqlen + t + 1) * n]
            cc = C[(seq * seqlen + t) * n : (seq * seqlen + t + 1) * n]
            if softplus:
                for j in range(w):
                    dtl[j] = _softplus(dr[j] + b_loc[j])
            else:
                for j in range(w):
                    dtl[j] = dr[j] + b_loc[j]
            for j in range(w):
                acc[j] = d_loc[j] * ur[j]
            for j in range(w):
                dtu[j] = dtl[j] * ur[j]
            for k in range(n):
                bk = bc[k]
                hk = h[k]
                ak = a_loc[k]
                for j in range(w):
                    hk[j] = _exp(dtl[j] * ak[j]) * hk[j] + dtu[j] * bk
            for k in range(n):
                ck = cc[k]
                hk = h[k]
                for j in range(w):
                    acc[j] += ck * hk[j]
            y[o : o + w] = acc


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy", cache=True)
def scan_backward(
    u,
    delta,
    bias,
    softplus,
    At,
    B,
    C,
    Dv,
    dy,
    h_chunks,
    du,
    ddelta,
    dA_part,
    dD_part,
    dbias_part,
    dB_part,
    dC_part,
    nb,
    ng,
    seqlen,
    dg,
    n,
    blk,
    chunk,
):
    """Gradients of the scan by the reverse-time recurrence of the state adjoint.

    With a_t = exp(dt_t A) and h_t = a_t h_{t-1} + dt_t B_t u_t, y_t = C_t . h_t + D u_t,
    the adjoint is dh_t = C_t dy_t + a_{t+1} dh_{t+1}. The states of a chunk are recomputed
    from ``h_chunks`` into a small per-item buffer, then walked backwards.

    Outputs (all fully overwritten): ``du`` and ``ddelta`` (b, g, L, dg), the latter with
    respect to ``delta`` before bias and softplus; per batch element, summed over time in
    time order: ``dA_part`` (b, g*dg, n), ``dD_part`` and ``dbias_part`` (b, g*dg); per
    sub-block of ``SUM_BLOCK`` channels: ``dB_part`` and ``dC_part``
    (b, g, L, ceil(dg / SUM_BLOCK), n). The caller sums the partials in a fixed order.
    ``blk`` must be a multiple of ``SUM_BLOCK`` or at least ``dg``, so that every work item
    holds whole sub-blocks: then no value written depends on ``blk``, and the gradients are
    the same bits for any thread count.
    """
    d = ng * dg
    nblk = (dg + blk - 1) // blk
    nsub = (dg + SUM_BLOCK - 1) // SUM_BLOCK
    nchunks = (seqlen + chunk - 1) // chunk
    for item in prange(nb * ng * nblk):
        bi = item // (ng * nblk)
        gi = (item // nblk) % ng
        ib = item % nblk
        j0 = ib * blk
        w = min(dg - j0, blk)
        c0 = gi * dg + j0
        seq = bi * ng + gi
        s0 = j0 // SUM_BLOCK  # first sub-block of this item
        nsub_w = (w + SUM_BLOCK - 1) // SUM_BLOCK
        a_loc = np.empty((n, w), np.float32)
        for k in range(n):
            a_loc[k, :] = At[k * d + c0 : k * d + c0 + w]
        d_loc = Dv[c0 : c0 + w].copy()
        b_loc = bias[c0 : c0 + w].copy()
        hbuf = np.empty((chunk + 1, n, w), np.float32)  # hbuf[i] = state before step t0 + i
        abuf = np.empty((chunk, n, w), np.float32)  # abuf[i] = decay at step t0 + i
        carry = np.zeros((n, w), np.float32)  # a_{t+1} * dh_{t+1}
        dA_acc = np.zeros((n, w), np.float32)
        dD_acc = np.zeros(w, np.float32)
        dbias_acc = np.zeros(w, np.float32)
        ul = np.empty(w, np.float32)
        dtl = np.empty(w, np.float32)
        dtu = np.empty(w, np.float32)
        slope = np.empty(w, np.float32)
        du_l = np.empty(w, np.float32)
        ddt_l = np.empty(w, np.float32)
        dh = np.empty(w, np.float32)
        sv = np.empty(w, np.float32)
        for c in range(nchunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(seqlen, t0 + chunk)
            hc = ((seq * nchunks + c) * n) * dg + j0
            for k in range(n):
                hbuf[0, k, :] = h_chunks[hc + k * dg : hc + k * dg + w]
            # Recompute the chunk's decays and states.
            for t in range(t0, t1):
                i = t - t0
                o = (seq * seqlen + t) * dg + j0
                ur = u[o : o + w]
                dr = delta[o : o + w]
                bc = B[(seq * seqlen + t) * n : (seq * seqlen + t + 1) * n]
                if softplus:
                    for j in range(w):
                        dtl[j] = _softplus(dr[j] + b_loc[j])
                else:
                    for j in range(w):
                        dtl[j] = dr[j] + b_loc[j]
                for j in range(w):
                    dtu[j] = dtl[j] * ur[j]
                for k in range(n):
                    bk = bc[k]
                    ak = a_loc[k]
                    ab = abuf[i, k]
                    hp = hbuf[i, k]
                    hn = hbuf[i + 1, k]
                    for j in range(w):
                        ab[j] = _exp(dtl[j] * ak[j])
                    for j in range(w):
                        hn[j] = ab[j] * hp[j] + dtu[j] * bk
            # Walk the chunk backwards.
            for t in range(t1 - 1, t0 - 1, -1):
                i = t - t0
                o = (seq * seqlen + t) * dg + j0
                ur = u[o : o + w]
                dr = delta[o : o + w]
                gr = dy[o : o + w]
                bc = B[(seq * seqlen + t) * n : (seq * seqlen + t + 1) * n]
                cc = C[(seq * seqlen + t) * n : (seq * seqlen + t + 1) * n]
                if softplus:
                    for j in range(w):
                        v = dr[j] + b_loc[j]
                        dtl[j] = _softplus(v)
                        slope[j] = _sigmoid(v)
                else:
                    for j in range(w):
                        dtl[j] = dr[j] + b_loc[j]
                        slope[j] = _F32(1.0)
                for j in range(w):
                    ul[j] = ur[j]
                    dtu[j] = dtl[j] * ur[j]
                    du_l[j] = d_loc[j] * gr[j]
                    ddt_l[j] = _F32(0.0)
                for j in range(w):
                    dD_acc[j] += gr[j] * ur[j]
                pr = ((seq * seqlen + t) * nsub + s0) * n  # this item's first partial of step t
                for k in range(n):
                    bk = bc[k]
                    ck = cc[k]
                    ab = abuf[i, k]
                    hp = hbuf[i, k]
                    hn = hbuf[i + 1, k]
                    cy = carry[k]
                    ak = a_loc[k]
                    dak = dA_acc[k]
                    for j in range(w):  # the state adjoint at step t
                        dh[j] = ck * gr[j] + cy[j]
                    for s in range(nsub_w):  # dC = sum dy h, dB = sum dh dt u, per sub-block
                        lo = s * SUM_BLOCK
                        dc = _F32(0.0)
                        db = _F32(0.0)
                        if lo + SUM_BLOCK <= w:
                            gs = gr[lo : lo + SUM_BLOCK]
                            hs = hn[lo : lo + SUM_BLOCK]
                            es = dh[lo : lo + SUM_BLOCK]
                            vs = dtu[lo : lo + SUM_BLOCK]
                            for j in range(SUM_BLOCK):
                                dc += gs[j] * hs[j]
                                db += es[j] * vs[j]
                        else:  # the ragged end of a group
                            gs = gr[lo:w]
                            hs = hn[lo:w]
                            es = dh[lo:w]
                            vs = dtu[lo:w]
                            for j in range(w - lo):
                                dc += gs[j] * hs[j]
                                db += es[j] * vs[j]
                        dB_part[pr + s * n + k] = db
                        dC_part[pr + s * n + k] = dc
                    for j in range(w):
                        du_l[j] += dh[j] * dtl[j] * bk
                    for j in range(w):  # adjoint of the exponent dt * A
                        sv[j] = dh[j] * hp[j] * ab[j]
                    for j in range(w):
                        ddt_l[j] += sv[j] * ak[j] + dh[j] * bk * ul[j]
                    for j in range(w):
                        dak[j] += sv[j] * dtl[j]
                    for j in range(w):
                        cy[j] = ab[j] * dh[j]
                du[o : o + w] = du_l
                ddr = ddelta[o : o + w]
                for j in range(w):
                    ddr[j] = ddt_l[j] * slope[j]
                for j in range(w):
                    dbias_acc[j] += ddr[j]
        for j in range(w):  # (b, d, n): the layout of A, so the caller's sum needs no transpose
            for k in range(n):
                dA_part[(bi * d + c0 + j) * n + k] = dA_acc[k, j]
        dD_part[bi * d + c0 : bi * d + c0 + w] = dD_acc
        dbias_part[bi * d + c0 : bi * d + c0 + w] = dbias_acc


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy", cache=True)
def es2d_forward(x, order, xdbl, WdtT, bias, At, Dv, y, nb, nk, seqlen, dg, npix, r, n, blk):
    """Fused ES2D scan for inference: image order in and out, step computed in place.

    Arrays (flat, float32 unless said): ``x`` and ``y`` (b, P, dg), P real pixels in image
    order; ``order`` int64 (K, L), the pixel of step t of direction k, or -1 for a padding
    position (skipped: the state passes through); ``xdbl`` (b, K, L, r + 2n), the
    low-rank step input, B and C of every step; ``WdtT`` (K, r, dg), the step projection
    transposed; ``bias``, ``Dv`` (K * dg); ``At`` (n, K * dg). Each real pixel belongs to
    exactly one direction, so every ``y`` element is written exactly once.
    """
    d = nk * dg
    nblk = (dg + blk - 1) // blk
    width = r + 2 * n
    for item in prange(nb * nk * nblk):
        bi = item // (nk * nblk)
        ki = (item // nblk) % nk
        j0 = (item % nblk) * blk
        w = min(dg - j0, blk)
        c0 = ki * dg + j0
        h = np.zeros(n * blk, np.float32)
        a_loc = np.empty(n * blk, np.float32)
        for k in range(n):
            for j in range(w):
                a_loc[k * blk + j] = At[k * d + c0 + j]
        w_loc = np.empty(r * blk, np.float32)  # step projection of the block (r, blk)
        for q in range(r):
            for j in range(w):
                w_loc[q * blk + j] = WdtT[(ki * r + q) * dg + j0 + j]
        d_loc = np.empty(blk, np.float32)
        b_loc = np.empty(blk, np.float32)
        for j in range(w):
            d_loc[j] = Dv[c0 + j]
            b_loc[j] = bias[c0 + j]
        acc = np.empty(blk, np.float32)
        dtu = np.empty(blk, np.float32)
        dtl = np.empty(blk, np.float32)
        for t in range(seqlen):
            p = order[ki * seqlen + t]
            if p < 0:
                continue
            o = (bi * npix + p) * dg + j0
            ob = ((bi * nk + ki) * seqlen + t) * width
            for j in range(w):
                dtl[j] = b_loc[j]
            for q in range(r):
                v = xdbl[ob + q]
                for j in range(w):
                    dtl[j] += v * w_loc[q * blk + j]
            for j in range(w):
                dv = _softplus(dtl[j])
                uu = x[o + j]
                dtl[j] = dv
                acc[j] = d_loc[j] * uu
                dtu[j] = dv * uu
            for k in range(n):
                bk = xdbl[ob + r + k]
                ck = xdbl[ob + r + n + k]
                kb = k * blk
                for j in range(w):
                    hv = _exp(dtl[j] * a_loc[kb + j]) * h[kb + j] + dtu[j] * bk
                    h[kb + j] = hv
                    acc[j] += ck * hv
            for j in range(w):
                y[o + j] = acc[j]


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy", cache=True)
def es2d_train_forward(xs, order, xdbl, WdtT, bias, At, Dv, y, h_chunks, nb, nk, seqlen, dg, npix, r, n, blk, chunk):
    """ES2D's scan for training: output in image order, step from the low-rank input.

    ``xs`` (b, K, L, dg) the input in scan order; ``y`` (b, P, dg) the output in image order;
    ``order`` int64 (K, L), the pixel of step t of direction k (no padding: every pixel in
    exactly one direction); ``xdbl`` (b, K, L, r + 2n):
    per step the low-rank step input, then B, then C; ``WdtT`` (K, r, dg); ``bias``, ``Dv``
    (K * dg); ``At`` (n, K * dg). The step is ``softplus(bias + sum_q xdbl_q WdtT_q)``.
    ``h_chunks`` (b, K, ceil(L / chunk), n, dg) receives the state before every chunk.
    """
    d = nk * dg
    nblk = (dg + blk - 1) // blk
    width = r + 2 * n
    nchunks = (seqlen + chunk - 1) // chunk
    for item in prange(nb * nk * nblk):
        bi = item // (nk * nblk)
        ki = (item // nblk) % nk
        j0 = (item % nblk) * blk
        w = min(dg - j0, blk)
        c0 = ki * dg + j0
        seq = bi * nk + ki
        h = np.zeros((n, w), np.float32)
        a_loc = np.empty((n, w), np.float32)
        for k in range(n):
            a_loc[k, :] = At[k * d + c0 : k * d + c0 + w]
        w_loc = np.empty((r, w), np.float32)
        for q in range(r):
            w_loc[q, :] = WdtT[(ki * r + q) * dg + j0 : (ki * r + q) * dg + j0 + w]
        d_loc = Dv[c0 : c0 + w].copy()
        b_loc = bias[c0 : c0 + w].copy()
        acc = np.empty(w, np.float32)
        dtu = np.empty(w, np.float32)
        dtl = np.empty(w, np.float32)
        for t in range(seqlen):
            if t % chunk == 0:
                hc = ((seq * nchunks + t // chunk) * n) * dg + j0
                for k in range(n):
                    h_chunks[hc + k * dg : hc + k * dg + w] = h[k]
            o = (bi * npix + order[ki * seqlen + t]) * dg + j0
            os = (seq * seqlen + t) * dg + j0
            ob = (seq * seqlen + t) * width
            ur = xs[os : os + w]
            xr = xdbl[ob : ob + width]
            for j in range(w):
                dtl[j] = b_loc[j]
            for q in range(r):
                v = xr[q]
                wq = w_loc[q]
                for j in range(w):
                    dtl[j] += v * wq[j]
            for j in range(w):
                dv = _softplus(dtl[j])
                dtl[j] = dv
                acc[j] = d_loc[j] * ur[j]
                dtu[j] = dv * ur[j]
            for k in range(n):
                bk = xr[r + k]
                hk = h[k]
                ak = a_loc[k]
                for j in range(w):
                    hk[j] = _exp(dtl[j] * ak[j]) * hk[j] + dtu[j] * bk
            for k in range(n):
                ck = xr[r + n + k]
                hk = h[k]
                for j in range(w):
                    acc[j] += ck * hk[j]
            y[o : o + w] = acc


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy", cache=True)
def es2d_train_backward(
    xs,
    order,
    xdbl,
    WdtT,
    bias,
    At,
    Dv,
    dy,
    h_chunks,
    du,
    dA_part,
    dD_part,
    dbias_part,
    dW_part,
    dX_part,
    nb,
    nk,
    seqlen,
    dg,
    npix,
    r,
    n,
    blk,
    chunk,
):
    """Gradients of :func:`es2d_train_forward` (the recurrence of :func:`scan_backward`).

    Inputs in the layouts of the forward (``dy`` like ``y``). Outputs, all fully overwritten:
    ``du`` (b, K, L, dg) in scan order (the scan's part of the input gradient); per batch element ``dA_part`` (b, K*dg, n), ``dD_part`` and
    ``dbias_part`` (b, K*dg) and ``dW_part`` (b, K*dg, r), the step projection's gradient;
    per sub-block of ``SUM_BLOCK`` channels ``dX_part`` (b, K, L, ceil(dg / SUM_BLOCK), r + 2n),
    the gradient of ``xdbl`` (sums over channels). The gradient of the step before its bias
    and softplus is never stored. Same reproducibility contract as :func:`scan_backward`
    (``blk`` a multiple of ``SUM_BLOCK`` or at least ``dg``).
    """
    d = nk * dg
    nblk = (dg + blk - 1) // blk
    nsub = (dg + SUM_BLOCK - 1) // SUM_BLOCK
    width = r + 2 * n
    nchunks = (seqlen + chunk - 1) // chunk
    for item in prange(nb * nk * nblk):
        bi = item // (nk * nblk)
        ki = (item // nblk) % nk
        j0 = (item % nblk) * blk
        w = min(dg - j0, blk)
        c0 = ki * dg + j0
        seq = bi * nk + ki
        s0 = j0 // SUM_BLOCK
        nsub_w = (w + SUM_BLOCK - 1) // SUM_BLOCK
        a_loc = np.empty((n, w), np.float32)
        for k in range(n):
            a_loc[k, :] = At[k * d + c0 : k * d + c0 + w]
        w_loc = np.empty((r, w), np.float32)
        for q in range(r):
            w_loc[q, :] = WdtT[(ki * r + q) * dg + j0 : (ki * r + q) * dg + j0 + w]
        d_loc = Dv[c0 : c0 + w].copy()
        b_loc = bias[c0 : c0 + w].copy()
        hbuf = np.empty((chunk + 1, n, w), np.float32)  # hbuf[i] = state before step t0 + i
        abuf = np.empty((chunk, n, w), np.float32)  # abuf[i] = decay at step t0 + i
        dtbuf = np.empty((chunk, w), np.float32)  # step after softplus
        slbuf = np.empty((chunk, w), np.float32)  # its slope (sigmoid)
        carry = np.zeros((n, w), np.float32)  # a_{t+1} * dh_{t+1}
        dA_acc = np.zeros((n, w), np.float32)
        dD_acc = np.zeros(w, np.float32)
        dbias_acc = np.zeros(w, np.float32)
        dW_acc = np.zeros((r, w), np.float32)
        ddr = np.empty(w, np.float32)
        ul = np.empty(w, np.float32)
        dtl = np.empty(w, np.float32)
        dtu = np.empty(w, np.float32)
        du_l = np.empty(w, np.float32)
        ddt_l = np.empty(w, np.float32)
        dh = np.empty(w, np.float32)
        sv = np.empty(w, np.float32)
        for c in range(nchunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(seqlen, t0 + chunk)
            hc = ((seq * nchunks + c) * n) * dg + j0
            for k in range(n):
                hbuf[0, k, :] = h_chunks[hc + k * dg : hc + k * dg + w]
            # Recompute the chunk's steps, decays and states.
            for t in range(t0, t1):
                i = t - t0
                os = (seq * seqlen + t) * dg + j0
                ob = (seq * seqlen + t) * width
                ur = xs[os : os + w]
                xr = xdbl[ob : ob + width]
                dl = dtbuf[i]
                sl = slbuf[i]
                for j in range(w):
                    dtl[j] = b_loc[j]
                for q in range(r):
                    v = xr[q]
                    wq = w_loc[q]
                    for j in range(w):
                        dtl[j] += v * wq[j]
                for j in range(w):
                    v = dtl[j]
                    dv = _softplus(v)
                    dl[j] = dv
                    sl[j] = _sigmoid(v)
                    dtu[j] = dv * ur[j]
                for k in range(n):
                    bk = xr[r + k]
                    ak = a_loc[k]
                    ab = abuf[i, k]
                    hp = hbuf[i, k]
                    hn = hbuf[i + 1, k]
                    for j in range(w):
                        ab[j] = _exp(dl[j] * ak[j])
                    for j in range(w):
                        hn[j] = ab[j] * hp[j] + dtu[j] * bk
            # Walk the chunk backwards.
            for t in range(t1 - 1, t0 - 1, -1):
                i = t - t0
                o = (bi * npix + order[ki * seqlen + t]) * dg + j0
                os = (seq * seqlen + t) * dg + j0
                ob = (seq * seqlen + t) * width
                ur = xs[os : os + w]
                gr = dy[o : o + w]
                xr = xdbl[ob : ob + width]
                dl = dtbuf[i]
                sl = slbuf[i]
                for j in range(w):
                    ul[j] = ur[j]
                    dtu[j] = dl[j] * ur[j]
                    du_l[j] = d_loc[j] * gr[j]
                    ddt_l[j] = _F32(0.0)
                for j in range(w):
                    dD_acc[j] += gr[j] * ur[j]
                pr = ((seq * seqlen + t) * nsub + s0) * width  # this item's first partial of step t
                for k in range(n):
                    bk = xr[r + k]
                    ck = xr[r + n + k]
                    ab = abuf[i, k]
                    hp = hbuf[i, k]
                    hn = hbuf[i + 1, k]
                    cy = carry[k]
                    ak = a_loc[k]
                    dak = dA_acc[k]
                    for j in range(w):  # the state adjoint at step t
                        dh[j] = ck * gr[j] + cy[j]
                    for s in range(nsub_w):  # dC = sum dy h, dB = sum dh dt u, per sub-block
                        lo = s * SUM_BLOCK
                        dc = _F32(0.0)
                        db = _F32(0.0)
                        if lo + SUM_BLOCK <= w:
                            gs = gr[lo : lo + SUM_BLOCK]
                            hs = hn[lo : lo + SUM_BLOCK]
                            es = dh[lo : lo + SUM_BLOCK]
                            vs = dtu[lo : lo + SUM_BLOCK]
                            for j in range(SUM_BLOCK):
                                dc += gs[j] * hs[j]
                                db += es[j] * vs[j]
                        else:  # the ragged end of a direction's channels
                            gs = gr[lo:w]
                            hs = hn[lo:w]
                            es = dh[lo:w]
                            vs = dtu[lo:w]
                            for j in range(w - lo):
                                dc += gs[j] * hs[j]
                                db += es[j] * vs[j]
                        dX_part[pr + s * width + r + k] = db
                        dX_part[pr + s * width + r + n + k] = dc
                    for j in range(w):
                        du_l[j] += dh[j] * dl[j] * bk
                    for j in range(w):  # adjoint of the exponent dt * A
                        sv[j] = dh[j] * hp[j] * ab[j]
                    for j in range(w):
                        ddt_l[j] += sv[j] * ak[j] + dh[j] * bk * ul[j]
                    for j in range(w):
                        dak[j] += sv[j] * dl[j]
                    for j in range(w):
                        cy[j] = ab[j] * dh[j]
                du[os : os + w] = du_l
                for j in range(w):  # w.r.t. the step before bias and softplus
                    ddr[j] = ddt_l[j] * sl[j]
                for j in range(w):
                    dbias_acc[j] += ddr[j]
                for q in range(r):
                    v = xr[q]
                    dwq = dW_acc[q]
                    for j in range(w):
                        dwq[j] += ddr[j] * v
                    wq = w_loc[q]
                    for s in range(nsub_w):  # d xdbl_q = sum ddr W_q, per sub-block
                        lo = s * SUM_BLOCK
                        hi = min(w, lo + SUM_BLOCK)
                        acc = _F32(0.0)
                        for j in range(lo, hi):
                            acc += ddr[j] * wq[j]
                        dX_part[pr + s * width + q] = acc
        for j in range(w):  # (b, K*dg, n): the layout of A
            for k in range(n):
                dA_part[(bi * d + c0 + j) * n + k] = dA_acc[k, j]
        dD_part[bi * d + c0 : bi * d + c0 + w] = dD_acc
        dbias_part[bi * d + c0 : bi * d + c0 + w] = dbias_acc
        for j in range(w):  # (b, K*dg, r): the layout of the step projection
            for q in range(r):
                dW_part[(bi * d + c0 + j) * r + q] = dW_acc[q, j]


@njit(parallel=True, nogil=True, fastmath=True, error_model="numpy", cache=True)
def norm_gate(y, z, weight, bias, eps, rows, d):
    """In place, per row of d channels: y = LayerNorm(y) * silu(z) (ESSM's output gate).

    One pass over ``y`` and ``z`` ((rows, d) float32, flat) instead of the three of
    LayerNorm, SiLU and a product.
    """
    for i in prange(rows):
        yr = y[i * d : (i + 1) * d]  # row views: plain indices let LLVM vectorise
        zr = z[i * d : (i + 1) * d]
        mean = _F32(0.0)
        for j in range(d):
            mean += yr[j]
        mean /= d
        var = _F32(0.0)
        for j in range(d):
            v = yr[j] - mean
            var += v * v
        inv = _F32(1.0) / math.sqrt(var / d + eps)
        for j in range(d):
            zj = zr[j]
            gate = zj / (_F32(1.0) + _exp(-zj))
            yr[j] = ((yr[j] - mean) * inv * weight[j] + bias[j]) * gate
