"""Scoring options: test-time flips give orientation-equivariant maps; smoothing blurs them."""

from __future__ import annotations

import torch

from examples.pyramidflow import PyramidFlow, PyramidFlowConfig
from examples.pyramidflow.inference import batch_maps, latent_statistics
from examples.pyramidflow.model import gaussian_blur

__all__: list[str] = []

SMALL = {"channels": 4, "levels": 3, "depth": 1, "kernel_size": 3, "image_size": 16}


def _fitted(**overrides) -> PyramidFlow:
    torch.manual_seed(0)
    model = PyramidFlow(PyramidFlowConfig(**SMALL, **overrides)).eval()
    for parameter in model.parameters():
        if parameter.dim() == 4:  # conditioner kernels: leave the identity initialisation
            torch.nn.init.normal_(parameter, std=0.1)
    model.set_template(latent_statistics(model, torch.rand(6, 3, 16, 16)))
    return model


def test_test_time_flips_make_the_map_follow_a_rotated_or_flipped_image():
    images = torch.rand(2, 3, 16, 16)
    model = _fitted(test_time_flips=True)
    maps = batch_maps(model, images)
    assert torch.allclose(batch_maps(model, images.rot90(1, (-2, -1))),
                          maps.rot90(1, (-2, -1)), atol=1e-5)
    assert torch.allclose(batch_maps(model, images.flip(-1)), maps.flip(-1), atol=1e-5)
    model.config.test_time_flips = False
    single = batch_maps(model, images)
    assert not torch.allclose(batch_maps(model, images.rot90(1, (-2, -1))),
                              single.rot90(1, (-2, -1)), atol=1e-3)


def test_smoothing_is_a_gaussian_blur_of_the_plain_map():
    images = torch.rand(2, 3, 16, 16)
    model = _fitted()
    plain = batch_maps(model, images)
    model.config.smoothing = 1.5
    assert torch.allclose(batch_maps(model, images), gaussian_blur(plain[:, None], 1.5)[:, 0],
                          atol=1e-6)


def test_gaussian_blur_keeps_mass_and_spreads_a_point():
    point = torch.zeros(1, 1, 15, 15)
    point[0, 0, 7, 7] = 1.0
    blurred = gaussian_blur(point, 2.0)
    assert torch.isclose(blurred.sum(), torch.tensor(1.0), atol=1e-4)
    assert blurred[0, 0, 7, 7] < 0.05 and blurred[0, 0, 7, 9] > 0.02
