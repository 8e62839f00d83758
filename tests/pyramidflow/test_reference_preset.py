"""The "paper-code" preset reproduces the public PyramidFlow code point by point."""

from __future__ import annotations

import pytest
import torch

import autoflow
from examples.pyramidflow import PyramidFlow, PyramidFlowConfig
from examples.pyramidflow.config import PRESETS
from examples.pyramidflow.model import LatentStatistics

__all__: list[str] = []

PAPER = {"channels": 16, "levels": 4, "depth": 4, "kernel_size": 7, "image_size": 64}


@pytest.fixture(scope="module")
def reference() -> PyramidFlow:
    torch.manual_seed(0)
    return PyramidFlow(PyramidFlowConfig.from_preset("paper-code", **PAPER))


def test_parameter_count_matches_the_public_code(reference):
    couplings = sum(p.numel() for m in reference.flow if isinstance(m, autoflow.Coupling)
                    for p in m.parameters())
    # The public code at C=16, L=4, D=4, k=7: 1,413,376 in the couplings, 48 in the lifting W.
    assert couplings == 1_413_376
    assert reference.flow[0].weight.numel() == 48


def test_block_order_odd_levels_first_and_conditioner_placement(reference):
    blocks = list(reference.flow)[2:]
    assert [b.target for b in blocks] == [1, 3, 0, 2] * 4
    for block in blocks:
        assert block.resize == "nearest" and block.clamp_kind == "atan"
        assert all(conv.bias is None for conv in block.conditioner if hasattr(conv, "bias"))
        assert block.conditioner[0].out_channels == 32  # hidden = 2C
        if block.target == 0:
            assert block.sources == (1,) and block.condition_at == "target"
        if block.target == 3:
            assert block.sources == (2,) and block.condition_at == "source"


def test_pyramid_operators_and_frozen_orthogonal_lifting(reference):
    assert reference.pyramid.kind == "blur_maxpool"
    weight = reference.flow[0].weight
    assert not weight.requires_grad
    assert torch.allclose(weight.T @ weight, torch.eye(3), atol=1e-6)


def test_images_are_standardised_with_imagenet_statistics(reference):
    images = torch.rand(2, 3, 64, 64)
    expected, _ = reference.flow((images - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
                                 / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    found = reference.eval()(images)
    reference.train()
    assert all(torch.allclose(a, b) for a, b in zip(found, expected))


def test_fourier_loss_of_the_channel_mean(reference):
    latents = tuple(torch.randn(2, 16, 64 >> d, 64 >> d) for d in range(4))
    differences = tuple((z[0:1] - z[1:2]).square() for z in latents)
    composed, _ = reference.pyramid.inverse(differences)
    expected = torch.fft.fft2(composed.mean(1)).abs().mean()
    assert torch.allclose(reference.loss(latents), expected)
    per_channel = PyramidFlow(PyramidFlowConfig.from_preset(
        "paper-code", **PAPER, loss="fourier_channels"))
    assert torch.allclose(per_channel.loss(latents), torch.fft.fft2(composed).abs().mean())


def test_every_preset_setting_is_a_config_field_and_overrides_win():
    assert set(PRESETS["paper-code"]) <= set(PyramidFlowConfig().to_dict())
    config = PyramidFlowConfig.from_preset("paper-code", resize="bilinear")
    assert config.resize == "bilinear" and config.pyramid == "blur_maxpool"
    with pytest.raises(ValueError, match="unknown preset 'paper'; known presets are"):
        PyramidFlowConfig.from_preset("paper")


def test_standardized_score_divides_by_the_training_spread():
    torch.manual_seed(0)
    config = PyramidFlowConfig(channels=4, levels=2, depth=1, kernel_size=3, image_size=8,
                               score="standardized", input_weight=0.0)
    model = PyramidFlow(config).eval()
    latents = [tuple(torch.randn(1, 4, 8 >> d, 8 >> d) for d in range(2)) for _ in range(5)]
    stacked = [torch.cat([z[d] for z in latents]).double() for d in range(2)]
    model.set_template(LatentStatistics(tuple(s.sum(0) for s in stacked),
                                        tuple(s.square().sum(0) for s in stacked), 5))
    mean = [s.mean(0, keepdim=True) for s in stacked]
    spread = [(s - m).square().mean(dim=(0, 2, 3), keepdim=True).sqrt()
              for s, m in zip(stacked, mean)]
    probe = tuple(torch.randn(1, 4, 8 >> d, 8 >> d) for d in range(2))
    per_level = [((z - m) / s).abs().mean(1, keepdim=True).float()
                 for z, m, s in zip(probe, mean, spread)]
    coarse_up = model.pyramid.up(per_level[1])
    expected = (per_level[0] + coarse_up)[:, 0]
    assert torch.allclose(model.anomaly_map(probe, (8, 8)), expected, atol=1e-5)
    model.config.score = "difference"
    plain = [(z - m).abs().mean(1, keepdim=True).float() for z, m in zip(probe, mean)]
    assert torch.allclose(model.anomaly_map(probe, (8, 8)),
                          (plain[0] + model.pyramid.up(plain[1]))[:, 0], atol=1e-5)
