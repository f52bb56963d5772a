"""Selective scan: every backend against the float64 sequential reference (values and gradients)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from napari_langmamba.errors import DependencyError
from napari_langmamba.models import scan
from napari_langmamba.models.scan import (
    norm_gate_,
    scan_backend,
    selective_scan,
    selective_scan_channels_last,
    selective_scan_reference,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
# (batch, channels, length, state, groups of B/C or None for 3-D B/C). Lengths cross the
# numba backward's chunk of 32 steps and the torch path's chunks, with ragged ends.
SHAPES = [(2, 8, 37, 4, None), (2, 12, 70, 5, 3), (1, 40, 101, 3, 2)]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(b, d, L, n, g, *, seed=0, delta_scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    bc = (b, n, L) if g is None else (b, g, n, L)
    return {
        "u": torch.randn(b, d, L, generator=gen),
        "delta": torch.randn(b, d, L, generator=gen) * delta_scale,
        "A": -torch.exp(torch.randn(d, n, generator=gen) * 0.5),
        "B": torch.randn(bc, generator=gen),
        "C": torch.randn(bc, generator=gen),
        "D": torch.randn(d, generator=gen),
        "delta_bias": torch.randn(d, generator=gen) * 0.5,
    }


def _reference(inputs, softplus):
    """float64 output and gradients of every input for a fixed random output gradient."""
    x64 = {k: v.double().requires_grad_() for k, v in inputs.items()}
    y = selective_scan_reference(**x64, delta_softplus=softplus)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, [x64[k] for k in NAMES], gy)
    return y, gy, dict(zip(NAMES, grads, strict=True))


def _check_backend(backend, inputs, softplus):
    ref, gy, ref_grads = _reference(inputs, softplus)
    x32 = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(**x32, delta_softplus=softplus, backend=backend)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-4
    grads = torch.autograd.grad(y, [x32[k] for k in NAMES], gy.float())
    for name, grad in zip(NAMES, grads, strict=True):
        assert grad.shape == inputs[name].shape, name
        assert _rel(grad, ref_grads[name]) < 1e-4, name
    with torch.no_grad():  # the lean inference path gives the same values
        y_inf = selective_scan(**inputs, delta_softplus=softplus, backend=backend)
    assert _rel(y_inf, ref) < 1e-4


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_float64_reference(backend, shape):
    _check_backend(backend, _inputs(*shape), softplus=True)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_backend_without_softplus_bias_or_skip(backend):
    inputs = _inputs(2, 6, 45, 4, 2, seed=3)
    inputs["delta"] = inputs["delta"].abs() * 0.3  # a valid step without softplus
    ref = selective_scan_reference(
        inputs["u"].double(), inputs["delta"].double(), inputs["A"].double(),
        inputs["B"].double(), inputs["C"].double(),
    )  # fmt: skip
    y = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend=backend)
    assert _rel(y, ref) < 1e-4
    _check_backend(backend, inputs, softplus=False)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_softplus_threshold_region(backend):
    """Steps above softplus's threshold of 20 (identity there) give the right gradients."""
    inputs = _inputs(1, 8, 40, 3, None, seed=5, delta_scale=12.0)
    assert (inputs["delta"] + inputs["delta_bias"][:, None] > 20).any()
    _check_backend(backend, inputs, softplus=True)


def _numba_output_and_grads(inputs, gy):
    x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(**x, delta_softplus=True, backend="numba")
    return [y.detach(), *torch.autograd.grad(y, [x[k] for k in NAMES], gy)]


def test_numba_results_are_the_same_bits_for_any_thread_count_and_call():
    """A resumed CPU training run must match an uninterrupted one bit for bit.

    The kernels cut the channels into work items of a width that follows the thread count
    (2 groups of 136 channels: 128 + 8 wide with one thread, narrower with more), so any sum
    over a work item's channels (the B and C gradients) would change in the last bits.
    """
    inputs = _inputs(1, 272, 40, 4, 2, seed=11)
    gy = torch.randn(1, 272, 40, generator=torch.Generator().manual_seed(12))
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            runs[count] = [_numba_output_and_grads(inputs, gy) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    reference = runs[1][0]
    for count, results in runs.items():
        for result in results:
            for name, value, expected in zip(("y", *NAMES), result, reference, strict=True):
                assert torch.equal(value, expected), f"{name} differs with {count} threads"


def test_numba_gradients_have_the_strides_of_their_inputs():
    """DDP copies gradients into bucket views laid out like the parameters: no transposed ones."""
    b, g, L, dg, n = 2, 3, 37, 4, 5
    gen = torch.Generator().manual_seed(4)
    inputs = {
        "u": torch.randn(b, g, L, dg, generator=gen),
        "delta": torch.randn(b, g, L, dg, generator=gen),
        "A": -torch.rand(g * dg, n, generator=gen) - 0.5,
        "B": torch.randn(b, g, L, n, generator=gen),
        "C": torch.randn(b, g, L, n, generator=gen),
        "D": torch.randn(g * dg, generator=gen),
        "delta_bias": torch.randn(g * dg, generator=gen),
    }
    x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan_channels_last(**x, delta_softplus=True, backend="numba")
    grads = torch.autograd.grad(y, [x[k] for k in NAMES], torch.ones_like(y))  # as the Function returns them
    for name, grad in zip(NAMES, grads, strict=True):
        assert grad.shape == inputs[name].shape and grad.stride() == inputs[name].stride(), name


def test_channels_last_layout_matches_mamba_layout():
    inputs = _inputs(2, 12, 50, 4, 3, seed=7)
    b, d, L = inputs["u"].shape
    g, dg = 3, 4
    expected = selective_scan(**inputs, delta_softplus=True)
    to_cl = lambda t: t.view(b, g, dg, L).transpose(2, 3)  # (b, d, L) -> (b, g, L, dg)  # noqa: E731
    y = selective_scan_channels_last(
        to_cl(inputs["u"]), to_cl(inputs["delta"]), inputs["A"],
        inputs["B"].transpose(2, 3), inputs["C"].transpose(2, 3),  # (b, g, n, L) -> (b, g, L, n)
        inputs["D"], inputs["delta_bias"], True,
    )  # fmt: skip
    torch.testing.assert_close(y.transpose(2, 3).reshape(b, d, L), expected, rtol=1e-5, atol=1e-6)


def test_float64_inputs_keep_their_dtype_on_numba():
    inputs = {k: v.double().requires_grad_() for k, v in _inputs(1, 4, 20, 2, None).items()}
    y = selective_scan(**inputs, delta_softplus=True, backend="numba")
    assert y.dtype == torch.float64
    (grad_u,) = torch.autograd.grad(y.sum(), [inputs["u"]])
    assert grad_u.dtype == torch.float64


def test_scan_backend_names():
    assert scan_backend("cpu") == "numba"
    assert scan_backend(torch.device("meta")) == "torch"
    assert scan_backend("mps") == "torch"
    expected_cuda = "mamba_ssm" if scan._mamba_selective_scan_fn() is not None else "torch"
    assert scan_backend("cuda") == expected_cuda


def test_bad_shapes_and_backends_are_refused():
    inputs = _inputs(1, 4, 10, 2, None)
    with pytest.raises(ValueError, match="A must have shape"):
        selective_scan(**{**inputs, "A": inputs["A"][:, :1]})
    with pytest.raises(ValueError, match="delta must have the shape"):
        selective_scan(**{**inputs, "delta": inputs["delta"][..., :5]})
    with pytest.raises(ValueError, match="groups"):
        selective_scan(**{**inputs, "B": torch.randn(1, 3, 2, 10), "C": torch.randn(1, 3, 2, 10)})
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(**inputs, backend="cupy")
    if scan._mamba_selective_scan_fn() is None and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA tensors only"):
            selective_scan(**inputs, backend="mamba_ssm")


def test_mamba_ssm_unavailable_is_a_dependency_error(monkeypatch):
    monkeypatch.setattr(scan, "_mamba_selective_scan_fn", lambda: None)
    with pytest.raises(DependencyError, match="mamba_ssm"):
        scan._resolve_backend("mamba_ssm", torch.device("cuda"))


def test_norm_gate_matches_torch():
    gen = torch.Generator().manual_seed(0)
    y, z = torch.randn(33, 24, generator=gen), torch.randn(33, 24, generator=gen)
    weight, bias = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    expected = F.layer_norm(y, (24,), weight, bias, 1e-5) * F.silu(z)
    assert norm_gate_(y, z, weight, bias, 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_importing_the_models_does_not_import_numba():
    """numba (and its compilation) must not be paid when napari imports the plugin."""
    code = (
        "import sys\n"
        "import napari_langmamba.models.scan, napari_langmamba.models.ema, napari_langmamba.models.seed\n"
        "assert 'numba' not in sys.modules, 'numba imported at import time'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(scan._mamba_selective_scan_fn() is None, reason="needs mamba_ssm")
@pytest.mark.parametrize("shape", SHAPES)
def test_mamba_ssm_matches_float64_reference(shape):
    inputs = _inputs(*shape)
    ref, gy, ref_grads = _reference(inputs, True)
    x = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(**x, delta_softplus=True)
    assert scan_backend(y.device) == "mamba_ssm"
    assert _rel(y.cpu(), ref) < 1e-4
    grads = torch.autograd.grad(y, [x[k] for k in NAMES], gy.float().cuda())
    for name, grad in zip(NAMES, grads, strict=True):
        assert _rel(grad.cpu(), ref_grads[name]) < 1e-4, name
