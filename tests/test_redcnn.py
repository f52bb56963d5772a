"""RED-CNN: the paper's layer layout, shapes, residual shortcuts and configs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from napari_langmamba.errors import ConfigError
from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

torch.set_num_threads(1)


def test_paper_layers_follow_chen_2017():
    model = REDCNN(REDCNNConfig.preset("paper"))
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    deconvs = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == 5 and len(deconvs) == 5
    assert all(m.kernel_size == (5, 5) and m.padding == (0, 0) for m in convs + deconvs)
    assert [m.in_channels for m in convs] == [1, 96, 96, 96, 96]
    assert [m.out_channels for m in deconvs] == [96, 96, 96, 96, 1]
    assert sum(p.numel() for p in model.parameters()) == 1_848_865  # the paper's ~1.85 M


@pytest.mark.parametrize(("preset", "size"), [("tiny", 32), ("tiny", 64), ("paper", 64)])
def test_shapes(preset, size):
    model = REDCNN(REDCNNConfig.preset(preset))
    x = torch.rand(2, 1, size, size + 16)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert torch.all(y >= 0)  # the final ReLU


def test_residual_shortcuts():
    """With every layer zeroed the output is relu(input): the input shortcut is the only path."""
    model = REDCNN(REDCNNConfig.preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        x = torch.randn(1, 1, 24, 24)
        assert torch.equal(model(x), torch.relu(x))
        # A bias on conv 2 reaches the last stage only through the shortcut after deconv 3
        # (conv 3 and everything up to deconv 3 are zero); deconv 4 of ones passes it on.
        model.conv[1].bias.fill_(1.0)
        model.deconv[3].weight.fill_(1.0)
        model.deconv[4].weight.fill_(1.0)
        y = model(x)
        assert torch.all(y[..., 8:-8, 8:-8] > torch.relu(x)[..., 8:-8, 8:-8] + 1.0)
        model.conv[1].bias.fill_(0.0)
        assert torch.equal(model(x), torch.relu(x))


def test_gradients_reach_every_layer():
    model = REDCNN(REDCNNConfig.preset("tiny"))
    x = torch.rand(2, 1, 32, 32)
    model(x).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_too_small_input_is_refused():
    model = REDCNN(REDCNNConfig.preset("paper"))
    assert model.config.min_size == 21
    with pytest.raises(ValueError, match=">= 21"):
        model(torch.rand(1, 1, 16, 64))


def test_config_round_trip_and_validation():
    config = REDCNNConfig.preset("lite")
    assert REDCNNConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="Unknown RED-CNN config keys"):
        REDCNNConfig.from_dict({"channels": 8, "kernel": 3})
    with pytest.raises(ConfigError, match="odd"):
        REDCNNConfig(channels=8, kernel_size=4)
    with pytest.raises(ConfigError, match="Unknown RED-CNN preset"):
        REDCNNConfig.preset("huge")
