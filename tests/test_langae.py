"""LangAE architecture: presets, shapes of every module, the encoder's five scales, frozen codebook."""

from __future__ import annotations

import json

import pytest
import torch

from napari_langmamba.errors import ConfigError
from napari_langmamba.models.codebook import load_codebook
from napari_langmamba.models.langae import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    LangAE,
    LangAEConfig,
    ResnetBlock,
    Upsample,
    group_norm,
)

torch.set_num_threads(1)


def _model(preset: str, n: int = 64, d: int = 16, seed: int = 0) -> LangAE:
    torch.manual_seed(seed)
    codebook = load_codebook(f"random:{n}x{d}")
    return LangAE(LangAEConfig.preset(preset, codebook_dim=d), codebook=codebook)


def test_presets_feature_channels_and_factor():
    paper = LangAEConfig.preset("paper", codebook_dim=512)
    assert paper.feature_channels == (64, 64, 64, 128, 128)
    assert paper.downsample_factor == 16
    assert paper.latent_resolution == 32
    assert (paper.ch, paper.ch_mult, paper.num_res_blocks, paper.z_channels) == (64, (1, 1, 2, 2, 4), 1, 256)
    assert paper.attn_resolutions == (32,)
    lite = LangAEConfig.preset("lite", codebook_dim=384)
    assert lite.feature_channels == (32, 32, 32, 64, 64) and lite.z_channels == 128
    tiny = LangAEConfig.preset("TINY", codebook_dim=16)
    assert tiny.feature_channels == (8, 8, 8, 16, 16) and tiny.name == "tiny"


def test_config_dict_round_trip_through_json_and_rejects_typos():
    cfg = LangAEConfig.preset("lite", codebook_dim=384)
    again = LangAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    bad = cfg.to_dict() | {"z_chanels": 3}
    with pytest.raises(ConfigError, match="z_chanels"):
        LangAEConfig.from_dict(bad)
    incomplete = cfg.to_dict()
    del incomplete["ch"]
    with pytest.raises(ConfigError):
        LangAEConfig.from_dict(incomplete)
    with pytest.raises(ConfigError, match="5 channel multipliers|exactly 5"):
        LangAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4,
                     resolution=64, codebook_dim=4)
    with pytest.raises(ConfigError, match="preset"):
        LangAEConfig.preset("huge", codebook_dim=4)


def test_group_norm_groups_fit_narrow_layers():
    assert group_norm(64).num_groups == 32
    assert group_norm(8).num_groups == 8
    assert group_norm(48).num_groups == 24
    assert group_norm(3).num_groups == 3


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_encoder_five_scales_and_latent(preset):
    d = 16
    model = _model(preset, d=d).eval()
    cfg = model.config
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        h, feats = model.encoder(x)
        only = model.encoder.forward_features(x)
    assert h.shape == (2, cfg.z_channels, 4, 4)
    assert len(feats) == 5
    for f, c, size in zip(feats, cfg.feature_channels, (64, 32, 16, 8, 4), strict=True):
        assert f.shape == (2, c, size, size)
    for a, b in zip(feats, only, strict=True):
        assert torch.equal(a, b)


def test_paper_encoder_scales_at_nominal_layout():
    # the layout behind the paper's 64@512, 64@256, 64@128, 128@64, 128@32: where downsamplings sit
    enc = Encoder(LangAEConfig.preset("paper", codebook_dim=512))
    channels = [level.downsample.conv.out_channels for level in list(enc.down)[:-1]]
    assert [enc.conv_in.out_channels, *channels] == [64, 64, 64, 128, 128]
    assert not hasattr(enc.down[4], "downsample")
    # attention only at the 32 x 32 (latent) level, plus the mid block
    assert [len(level.attn) for level in enc.down] == [0, 0, 0, 0, 1]
    dec = Decoder(LangAEConfig.preset("paper", codebook_dim=512))
    assert [len(level.attn) for level in dec.up] == [0, 0, 0, 0, 2]
    assert [len(level.block) for level in dec.up] == [2, 2, 2, 2, 2]


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_langae_shapes(preset):
    d = 32
    model = _model(preset, d=d).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        z = model.encode(x)
        pyramid = model.quantize(z)
        recon = model.decode(pyramid.z_q)
        recon2, pyramid2 = model(x)
    assert z.shape == (2, d, 4, 4)
    assert pyramid.z_q.shape == z.shape
    assert [tuple(i.shape) for i in pyramid.ids] == [(2, 1, 1), (2, 1, 1), (2, 4, 4)]
    assert recon.shape == x.shape
    assert torch.allclose(recon, recon2)
    assert all(torch.equal(a, b) for a, b in zip(pyramid.ids, pyramid2.ids, strict=True))
    assert torch.isfinite(recon).all()
    with torch.no_grad():  # the word head's training steps: the same tokens, no decoder
        none, pyramid3 = model(x, decode=False)
    assert none is None and all(torch.equal(a, b) for a, b in zip(pyramid.ids, pyramid3.ids, strict=True))


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_blocks_shapes(preset):
    cfg = LangAEConfig.preset(preset, codebook_dim=8)
    c = cfg.ch
    x = torch.rand(1, c, 16, 16)
    assert ResnetBlock(c, 2 * c)(x).shape == (1, 2 * c, 16, 16)
    assert ResnetBlock(c, c).nin_shortcut is None
    assert AttnBlock(c)(x).shape == x.shape
    assert Downsample(c)(x).shape == (1, c, 8, 8)
    assert Upsample(c)(x).shape == (1, c, 32, 32)
    dec = Decoder(cfg)
    assert dec(torch.rand(1, cfg.z_channels, 4, 4)).shape == (1, 1, 64, 64)


def test_input_size_must_be_multiple_of_16():
    model = _model("tiny")
    with pytest.raises(ConfigError, match="multiples of 16"):
        model.encode(torch.rand(1, 1, 40, 48))
    with pytest.raises(ConfigError, match=r"\(b, 1, h, w\)"):
        model.encode(torch.rand(1, 3, 32, 32))


def test_codebook_width_must_match_config():
    with pytest.raises(ConfigError, match="codebook_dim"):
        LangAE(LangAEConfig.preset("tiny", codebook_dim=8), codebook=load_codebook("random:10x16"))


def test_state_dict_keys_follow_taming_and_exclude_codebook():
    keys = set(_model("tiny").state_dict())
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.3.downsample.conv.weight",
                "encoder.down.4.attn.0.q.weight", "encoder.mid.attn_1.proj_out.weight", "quant_conv.weight",
                "post_quant_conv.weight", "decoder.up.1.upsample.conv.weight", "decoder.conv_out.weight"):
        assert key in keys
    assert not any("codebook" in k for k in keys)


def test_frozen_codebook_no_grad_and_bit_identical_after_step():
    model = _model("tiny", n=50, d=16)
    table_before = model.quantizer.codebook.clone()
    assert all("codebook" not in name for name, _ in model.named_parameters())
    assert not model.quantizer.codebook.requires_grad
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    assert all(p.data_ptr() != model.quantizer.codebook.data_ptr() for g in optimizer.param_groups for p in g["params"])
    x = torch.rand(2, 1, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recon, pyramid = model(x)
    loss = torch.nn.functional.mse_loss(recon, x) + pyramid.commitment_loss
    loss.backward()
    assert model.quantizer.codebook.grad is None
    # straight-through: the reconstruction loss reaches the encoder
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    optimizer.step()
    assert torch.equal(model.quantizer.codebook, table_before)
    assert torch.equal(model.quantizer.codebook, load_codebook("random:50x16").embeddings)
    assert not torch.equal(model.state_dict()["encoder.conv_in.weight"], before["encoder.conv_in.weight"])


@pytest.mark.parametrize(
    "config_cls, kwargs",
    [
        ("langae", {"codebook_dim": 16}),
        ("redcnn", {}),
    ],
)
def test_config_dicts_round_trip_and_mistyped_values_are_config_errors(config_cls, kwargs):
    from napari_langmamba.errors import ConfigError
    from napari_langmamba.models.langae import LangAEConfig
    from napari_langmamba.models.redcnn import REDCNNConfig

    cls = {"langae": LangAEConfig, "redcnn": REDCNNConfig}[config_cls]
    config = cls.preset("tiny", **kwargs)
    data = config.to_dict()
    assert not any(isinstance(v, tuple) for v in data.values())  # JSON-ready
    assert cls.from_dict(data) == config
    with pytest.raises(ConfigError, match="Unknown .* config keys"):
        cls.from_dict({**data, "typo": 1})
    first_key = next(iter(data))  # a numeric field in both configs
    with pytest.raises(ConfigError) as excinfo:  # never a bare ValueError/TypeError
        cls.from_dict({**data, first_key: "x"})
    assert first_key in str(excinfo.value) or "x" in str(excinfo.value)
