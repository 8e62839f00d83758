"""Scoring options: test-time flips give orientation-equivariant maps; smoothing blurs them."""

from __future__ import annotations

import pytest
import torch

from examples.pyramidflow import PyramidFlow, PyramidFlowConfig
from examples.pyramidflow.inference import batch_maps, latent_statistics
from examples.pyramidflow.model import _nearest_distance, gaussian_blur

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


def test_nearest_score_is_the_standardised_distance_to_the_closest_bank_vector():
    model = _fitted(score="nearest")
    assert model.bank is not None and model.bank[0].shape[1] == 4
    latents = model(torch.rand(1, 3, 16, 16))
    level = 1
    z, bank, spread = latents[level], model.bank[level], model.spread[level]
    vectors = (z[0].flatten(1).T / spread.view(1, -1))
    brute = torch.stack([((v - bank / spread.view(1, -1)).square().sum(1).sqrt().min())
                         for v in vectors]) / 2.0  # sqrt(C) with C = 4
    found = _nearest_distance(z, bank, spread)[0, 0].flatten()
    assert torch.allclose(found, brute, atol=1e-5)
    # A training vector itself scores zero: the bank holds real training latents.
    assert _nearest_distance(bank[:1].view(1, 4, 1, 1), bank, spread).item() < 1e-5


def test_nearest_score_without_a_bank_is_a_clear_error():
    model = _fitted()
    model.config.score = "nearest"
    model.bank = None
    with pytest.raises(RuntimeError, match="score='nearest' needs the training latents' bank"):
        batch_maps(model, torch.rand(1, 3, 16, 16))
