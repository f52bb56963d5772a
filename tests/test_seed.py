"""ES2D / ESSM / EMA block and the SEED denoiser (frozen encoder, shapes, configs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from napari_langmamba.errors import ConfigError
from napari_langmamba.models.ema import (
    ES2D,
    ESSM,
    EMABlock,
    es2d_merge,
    es2d_order,
    es2d_split,
)
from napari_langmamba.models.scan import selective_scan_reference
from napari_langmamba.models.seed import SEED, SEEDConfig

torch.set_num_threads(1)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# --------------------------------------------------------------------------- scan orders


def _sequences(h: int, w: int, step: int) -> list[list[tuple[int, int]]]:
    """The four scan orders written out from their definition (module docstring of ema)."""
    if step == 2:
        return [
            [(r, c) for r in range(0, h, 2) for c in range(0, w, 2)],  # TL->BR, row-major
            [(r, c) for r in reversed(range(1, h, 2)) for c in reversed(range(0, w, 2))],  # BR->TL
            [(r, c) for c in reversed(range(1, w, 2)) for r in range(0, h, 2)],  # TR->BL, col-major
            [(r, c) for c in range(1, w, 2) for r in reversed(range(1, h, 2))],  # BL->TR, col-major
        ]
    return [
        [(r, c) for r in range(h) for c in range(w)],
        [(r, c) for r in reversed(range(h)) for c in reversed(range(w))],
        [(r, c) for c in reversed(range(w)) for r in range(h)],
        [(r, c) for c in range(w) for r in reversed(range(h))],
    ]


def test_es2d_order_on_4x4_follows_the_documented_directions():
    order = es2d_order(4, 4)
    # Pixel index = row * 4 + col.
    assert order.tolist() == [
        [0, 2, 8, 10],  # even rows, even cols: TL->BR row-major
        [14, 12, 6, 4],  # odd rows, even cols: BR->TL row-major
        [3, 11, 1, 9],  # even rows, odd cols: TR->BL column-major
        [13, 5, 15, 7],  # odd rows, odd cols: BL->TR column-major
    ]


@pytest.mark.parametrize(("h", "w"), [(2, 2), (4, 6), (8, 4), (16, 16)])
def test_es2d_order_visits_every_pixel_exactly_once(h, w):
    order = es2d_order(h, w)
    assert order.shape == (4, h * w // 4)
    counts = torch.bincount(order.reshape(-1), minlength=h * w)
    assert torch.equal(counts, torch.ones(h * w, dtype=torch.long))
    for k, (row_parity, col_parity) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        assert torch.all(order[k] // w % 2 == row_parity)
        assert torch.all(order[k] % w % 2 == col_parity)
        expected = [r * w + c for r, c in _sequences(h, w, 2)[k]]
        assert order[k].tolist() == expected


def test_split_then_merge_writes_every_pixel_once():
    x = torch.randn(2, 6, 8, 3)
    xs = es2d_split(x)
    assert xs.shape == (2, 4, 12, 3)
    assert torch.equal(es2d_merge(xs, 6, 8), x)
    ones = es2d_merge(torch.ones(1, 4, 12, 1), 6, 8)
    assert torch.equal(ones, torch.ones(1, 6, 8, 1))
    # Step 1 (cross-scan): four full passes whose outputs are summed.
    assert torch.equal(es2d_merge(es2d_split(x, step=1), 6, 8, step=1), 4 * x)


def test_es2d_order_rejects_odd_sizes_and_bad_steps():
    with pytest.raises(ValueError, match="even"):
        es2d_order(5, 4)
    with pytest.raises(ValueError, match="step"):
        es2d_order(4, 4, step=3)


# --------------------------------------------------------------------------- ES2D


def _es2d_reference(m: ES2D, x: torch.Tensor) -> torch.Tensor:
    """ES2D in float64 from its definition: each direction scans its own (uneven) sub-grid."""
    b, h, w, d = x.shape
    k_dirs, r, n = 4, m.dt_rank, m.d_state
    A = -torch.exp(m.A_logs.double()).view(k_dirs, d, n)
    Ds = m.Ds.double().view(k_dirs, d)
    bias = m.dt_projs_bias.double()
    out = torch.zeros(b, h, w, d, dtype=torch.float64)
    for k, pixels in enumerate(_sequences(h, w, m.step)):
        if not pixels:
            continue
        rows = torch.tensor([p[0] for p in pixels])
        cols = torch.tensor([p[1] for p in pixels])
        u = x[:, rows, cols, :]  # (b, Lk, d)
        x_dbl = u @ m.x_proj_weight[k].double().t()  # (b, Lk, r + 2n)
        dts, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        delta = dts @ m.dt_projs_weight[k].double().t()  # (b, Lk, d)
        y = selective_scan_reference(
            u.transpose(1, 2), delta.transpose(1, 2), A[k], B.transpose(1, 2), C.transpose(1, 2),
            Ds[k], bias[k], True,
        )  # fmt: skip
        out[:, rows, cols, :] += y.transpose(1, 2)
    return out


def _random_es2d(d=6, n=3, r=2, step=2, seed=0) -> ES2D:
    torch.manual_seed(seed)
    m = ES2D(d, d_state=n, dt_rank=r, step=step)
    with torch.no_grad():  # larger steps than the init so the state carries information
        m.dt_projs_bias.add_(2.0)
        m.Ds.normal_()
    return m


@pytest.mark.parametrize(("h", "w"), [(6, 8), (5, 7), (3, 4), (1, 1)])
def test_es2d_matches_its_definition(h, w):
    m = _random_es2d()
    x = torch.randn(2, h, w, 6)
    ref = _es2d_reference(m, x.double())
    with torch.no_grad():  # fused CPU inference kernel
        y_inference = m(x)
    assert _rel(y_inference, ref) < 1e-4
    xg = x.clone().requires_grad_()
    y = m(xg)  # differentiable path (split, projections, selective_scan, merge)
    assert _rel(y, ref) < 1e-4
    gy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, [xg], gy)
    x64 = x.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(_es2d_reference(m, x64), [x64], gy.double())
    assert _rel(grad, grad_ref) < 1e-4


def test_es2d_cross_scan_step_1_matches_its_definition():
    m = _random_es2d(step=1, seed=1)
    x = torch.randn(1, 4, 5, 6)
    ref = _es2d_reference(m, x.double())
    with torch.no_grad():
        assert _rel(m(x), ref) < 1e-4


def test_es2d_parameter_grads_match_torch_backend(monkeypatch):
    """The numba backward inside ES2D agrees with autograd through the pure-torch scan."""
    import napari_langmamba.models.ema as ema

    m = _random_es2d(seed=2)
    x = torch.randn(1, 6, 6, 6)
    grads_numba = torch.autograd.grad(m(x).square().sum(), list(m.parameters()))
    original = ema.selective_scan_channels_last
    monkeypatch.setattr(
        ema, "selective_scan_channels_last", lambda *a, **k: original(*a, **k, backend="torch")
    )
    grads_torch = torch.autograd.grad(m(x).square().sum(), list(m.parameters()))
    for (name, _), g_numba, g_torch in zip(m.named_parameters(), grads_numba, grads_torch, strict=True):
        assert _rel(g_numba, g_torch) < 1e-4, name


def test_es2d_initialisation():
    m = ES2D(32, d_state=8, dt_rank=2)
    assert torch.allclose(-torch.exp(m.A_logs), -torch.arange(1, 9.0).expand(128, 8))  # S4D-real
    assert torch.equal(m.Ds, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert ESSM(40, d_state=4).scan.dt_rank == math.ceil(40 / 16)


# --------------------------------------------------------------------------- ESSM / EMA


@pytest.mark.parametrize(("h", "w"), [(8, 6), (5, 3)])
def test_essm_and_ema_block_inference_equals_training_path(h, w):
    torch.manual_seed(0)
    essm = ESSM(8, d_state=4)
    with torch.no_grad():
        essm.out_norm.weight.normal_()
        essm.out_norm.bias.normal_()
    x = torch.randn(2, h, w, 8)
    y_train = essm(x)  # parameters require grad: autograd path
    with torch.no_grad():
        y_infer = essm(x)  # fused scan, chunked tail, in-place ops
    assert y_train.shape == (2, h, w, 8)
    assert _rel(y_infer, y_train) < 1e-5

    block = EMABlock(8, 4, d_state=4)
    xb = torch.randn(2, 8, h, w)
    y_train = block(xb)
    with torch.no_grad():
        y_infer = block(xb)
    assert y_train.shape == (2, 4, h, w)
    assert _rel(y_infer, y_train) < 1e-5
    y_cl = block(xb.contiguous(memory_format=torch.channels_last))  # memory format only
    assert _rel(y_cl.detach(), y_train.detach()) < 1e-5


@pytest.mark.parametrize("case", ["essm", "ema", "ema_channels_last"])
def test_parameter_gradients_have_their_parameters_strides(case):
    """DDP copies each gradient into a bucket view with its parameter's strides, size-1
    dimensions included, and warns "Grad strides do not match bucket view strides" when they
    differ: dt_projs_weight with dt_rank 1 (widths <= 16), the depthwise conv's (d, 1, 3, 3)."""
    torch.manual_seed(0)
    if case == "essm":
        module, x = ESSM(16, d_state=4), torch.randn(2, 6, 6, 16)
        assert module.scan.dt_rank == 1
    else:
        module, x = EMABlock(8, 4, d_state=4), torch.randn(2, 8, 6, 6)
        if case == "ema_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    module(x).square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad.stride() == p.stride(), name


def test_ema_block_keeps_channels_without_a_shortcut_conv():
    block = EMABlock(6, 6, d_state=4)
    assert isinstance(block.ffn.shortcut, nn.Identity)
    assert EMABlock(6, 3, d_state=4).ffn.shortcut.kernel_size == (1, 1)


# --------------------------------------------------------------------------- SEED


class StandInEncoder(nn.Module):
    """A small encoder honouring the contract: forward -> (latent, [5 feature scales]).

    It has a BatchNorm, whose running statistics would move if SEED let it train.
    """

    def __init__(self, channels=(4, 4, 6, 8, 8)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 3, padding=1), nn.BatchNorm2d(channels[0]))
        self.down = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1) for i in range(4)
        )
        self.to_latent = nn.Conv2d(channels[4], 2, 1)

    def forward(self, x):
        features = [self.stem(x)]
        for down in self.down:
            features.append(down(features[-1]))
        return self.to_latent(features[-1]), features


def _stand_in_seed(preset="tiny", channels=(4, 4, 6, 8, 8)):
    torch.manual_seed(0)
    encoder = StandInEncoder(channels)
    return SEED(SEEDConfig.preset(preset, feature_channels=channels), encoder=encoder), encoder


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_seed_on_a_stand_in_encoder_shapes_and_identity_at_init():
    seed, _ = _stand_in_seed()
    for h, w in ((32, 32), (48, 48), (64, 32)):  # 48: a 3x3 bottleneck, odd for ES2D
        x = torch.rand(2, 1, h, w)
        with torch.no_grad():
            y = seed(x)
        assert y.shape == x.shape
        # Zero output conv + global residual: the untrained network returns its input.
        assert torch.equal(y, x)


def test_frozen_encoder_gets_no_grad_stays_in_eval_and_is_bit_identical():
    seed, encoder = _stand_in_seed()
    before = _snapshot(encoder)
    assert all(not p.requires_grad for p in encoder.parameters())
    seed.train()
    assert seed.training and seed.bottleneck.training
    assert not encoder.training and not any(m.training for m in encoder.modules())
    optimizer = torch.optim.AdamW(seed.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-9)
    decoder_before = _snapshot(seed.up)
    x = torch.rand(2, 1, 32, 32)
    target = torch.rand(2, 1, 32, 32)
    for _ in range(2):  # the zero output conv moves first; the second step reaches the rest
        optimizer.zero_grad()
        loss = (seed(x) - target).square().mean()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in seed.parameters() if p.requires_grad)
    after = _snapshot(encoder)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # incl. BatchNorm running stats
    decoder_after = _snapshot(seed.up)
    assert any(not torch.equal(decoder_after[k], decoder_before[k]) for k in decoder_before)
    with torch.no_grad():
        assert not torch.equal(seed(x), x)


def test_seed_parameter_gradients_have_their_parameters_strides():
    """The DDP bucket-view condition on the whole denoiser (tiny widths: dt_rank 1)."""
    seed, _ = _stand_in_seed()
    with torch.no_grad():
        seed.head.weight.normal_(std=0.1)
    seed(torch.rand(2, 1, 32, 32)).mean().backward()
    for name, p in seed.named_parameters():
        if p.requires_grad:
            assert p.grad.stride() == p.stride(), name


def test_weight_init_never_touches_the_encoder():
    encoder = StandInEncoder()
    before = _snapshot(encoder)
    seed = SEED(SEEDConfig.preset("tiny", feature_channels=(4, 4, 6, 8, 8)), encoder=encoder)
    seed.reset_parameters()
    after = _snapshot(encoder)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_seed_rejects_sizes_that_are_not_multiples_of_16():
    seed, _ = _stand_in_seed()
    with pytest.raises(ValueError, match="multiples of 16"):
        seed(torch.rand(1, 1, 30, 32))


def test_paper_stage_channels_and_state_sizes():
    config = SEEDConfig.preset("paper", feature_channels=(64, 64, 64, 128, 128))
    assert config.decoder_channels == (128, 64, 64, 64)
    seed = SEED(config, encoder=StandInEncoder((64, 64, 64, 128, 128)))
    stages = [(s.block.ffn.conv1.in_channels, s.block.ffn.conv2.out_channels) for s in seed.up]
    assert stages == [(256, 128), (192, 64), (128, 64), (128, 64)]
    assert seed.bottleneck.essm.scan.d_state == 32  # 4 x 8 heads
    assert [s.block.essm.scan.d_state for s in seed.up] == [32, 16, 8, 4]  # heads 8, 4, 2, 1
    assert seed.up[-1].block.essm.scan.dt_rank == math.ceil(128 / 16)


def test_seed_config_round_trip_and_validation():
    config = SEEDConfig.preset("lite", feature_channels=(32, 32, 32, 64, 64))
    data = json.loads(json.dumps(config.to_dict()))
    assert SEEDConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="Unknown SEED config keys"):
        SEEDConfig.from_dict({**data, "heds": [1, 2, 4, 8]})
    with pytest.raises(ConfigError, match="Incomplete"):
        SEEDConfig.from_dict({"heads": [1, 2, 4, 8]})
    with pytest.raises(ConfigError, match="heads"):
        SEEDConfig.from_dict({**data, "heads": [1, 2, 4]})
    with pytest.raises(ConfigError, match="step"):
        SEEDConfig.from_dict({**data, "step": 3})
    with pytest.raises(ConfigError, match="Unknown SEED preset"):
        SEEDConfig.preset("huge", feature_channels=(1, 1, 1, 1, 1))


# --------------------------------------------------------------------------- real encoder


def _real_seed(preset: str) -> SEED:
    from napari_langmamba.models.langae import Encoder, LangAEConfig

    torch.manual_seed(0)
    encoder_config = LangAEConfig.preset(preset, codebook_dim=16)
    seed_config = SEEDConfig.preset(preset, feature_channels=encoder_config.feature_channels)
    return SEED(seed_config, encoder=Encoder(encoder_config))


@pytest.mark.parametrize(("preset", "size"), [("tiny", 32), ("tiny", 64), ("paper", 64)])
def test_seed_on_the_langae_encoder(preset, size):
    seed = _real_seed(preset)
    with torch.no_grad():
        seed.head.weight.normal_(std=0.1)  # leave the identity so the decoder shows in the output
    x = torch.rand(1, 1, size, size)
    with torch.no_grad():
        y = seed(x)
    assert y.shape == (1, 1, size, size)
    assert torch.isfinite(y).all() and not torch.equal(y, x)
    y_grad = seed(x)  # the training path gives the same result
    assert _rel(y_grad.detach() - x, y - x) < 1e-4
    y_grad.mean().backward()
    assert all(p.grad is None for p in seed.encoder.parameters())
    assert seed.head.weight.grad is not None and seed.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["tiny", "lite"])
def test_seed_runs_on_a_1x1_bottleneck_with_batch_1(preset):
    """16 x 16 input: the bottleneck and the 1/8 scale are 1 x 1 and 2 x 2. Nothing in SEED
    normalises over the batch or over single pixels, so train and eval, any batch, work."""
    seed = _real_seed(preset)
    with torch.no_grad():
        seed.head.weight.normal_(std=0.1)
    for batch in (1, 3):
        x = torch.rand(batch, 1, 16, 16)
        seed.train()
        y = seed(x)
        y.square().mean().backward()
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert all(torch.isfinite(p.grad).all() for p in seed.parameters() if p.requires_grad)
        seed.eval()
        with torch.no_grad():
            y_eval = seed(x)
        assert _rel(y_eval - x, y.detach() - x) < 1e-4
        seed.zero_grad(set_to_none=True)


def test_lite_is_small_enough_for_cpu_training():
    seed = _real_seed("lite")
    assert seed.num_parameters() < 3_000_000
    assert seed.num_parameters(trainable_only=False) > seed.num_parameters()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_es2d_on_cuda_matches_its_definition():
    """On CUDA ES2D runs mamba_ssm's kernel (or the pure-torch scan without mamba_ssm)."""
    m = _random_es2d(seed=4)
    x = torch.randn(2, 6, 5, 6)
    ref = _es2d_reference(m, x.double())
    m = m.cuda()
    xg = x.cuda().requires_grad_()
    y = m(xg)
    assert _rel(y.detach().cpu(), ref) < 1e-4
    gy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, [xg], gy)
    x64 = x.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(_es2d_reference(m.cpu(), x64), [x64], gy.double().cpu())
    assert _rel(grad.cpu(), grad_ref) < 1e-4


def test_training_works_after_the_same_shapes_ran_under_inference_mode():
    """Cached scan-order and codebook tables first built while denoising must not poison training."""
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.ema import ESSM, _build_fused_order, _build_orders

    _build_orders.cache_clear()
    _build_fused_order.cache_clear()
    torch.manual_seed(0)
    block = ESSM(8, d_state=4)
    x = torch.randn(1, 6, 10, 8)
    with torch.inference_mode():
        block(x)
        table = load_codebook("random:50x8:3").embeddings
    assert not table.is_inference()
    out = block(x.clone().requires_grad_(True))
    out.square().mean().backward()
    grads = [p.grad for p in block.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_es2d_under_cpu_bf16_autocast_takes_the_fused_training_kernel(monkeypatch):
    """``--amp bf16`` on CPU: ES2D's bfloat16 input goes through the fused float32 training
    kernel (not the generic split/scan/merge graph), with the same values and gradients as
    the float32 call on the same (bfloat16-rounded) input."""
    import napari_langmamba.models.ema as ema

    calls = []
    original = ema.es2d_scan_train
    monkeypatch.setattr(ema, "es2d_scan_train", lambda *a, **k: calls.append(a[0].dtype) or original(*a, **k))
    m = _random_es2d(seed=3)
    x = torch.randn(2, 6, 8, 6).bfloat16()
    gy = torch.randn(2, 6, 8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.requires_grad_())
    grads = torch.autograd.grad(y, [x, *m.parameters()], gy)
    x32 = x.detach().float().requires_grad_()
    y32 = m(x32)
    grads32 = torch.autograd.grad(y32, [x32, *m.parameters()], gy)
    assert calls == [torch.bfloat16, torch.float32]
    assert y.dtype == torch.float32  # the kernel's float32 result, not rounded to bf16
    assert torch.equal(y, y32)
    assert grads[0].dtype == torch.bfloat16 and torch.equal(grads[0], grads32[0].bfloat16())
    for (name, _), g, g32 in zip(m.named_parameters(), grads[1:], grads32[1:], strict=True):
        assert torch.equal(g, g32), name
    ref = _es2d_reference(m, x.detach().double())
    assert _rel(y, ref) < 1e-4
