"""Scoring options: test-time flips give orientation-equivariant maps; smoothing blurs them."""

from __future__ import annotations

import pytest
import torch

from examples.pyramidflow import PyramidFlow, PyramidFlowConfig
from examples.pyramidflow.inference import batch_maps, batch_predictions, latent_statistics
from examples.pyramidflow.model import (
    _local_nearest_distance,
    _nearest_distance,
    gaussian_blur,
)

__all__: list[str] = []

SMALL = {"channels": 4, "levels": 3, "depth": 1, "kernel_size": 3, "image_size": 16}


def _fitted(**overrides) -> PyramidFlow:
    """A small model with a template; raw maps (eq. 10) unless ``overrides`` say otherwise."""
    torch.manual_seed(0)
    settings = {"map_normalization": "none"} | overrides
    model = PyramidFlow(PyramidFlowConfig(**SMALL, **settings)).eval()
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


def test_image_mean_normalization_divides_each_map_by_its_mean_and_scores_the_raw_maximum():
    images = torch.rand(3, 3, 16, 16)
    model = _fitted()
    raw = batch_maps(model, images)
    model.config.map_normalization = "image_mean"
    maps, scores = batch_predictions(model, images)
    assert torch.allclose(maps, raw / raw.mean(dim=(1, 2), keepdim=True), rtol=1e-6)
    assert torch.allclose(maps.mean(dim=(1, 2)), torch.ones(3), rtol=1e-5)
    assert torch.equal(scores, raw.amax(dim=(1, 2)))
    # A map that is zero everywhere (an image equal to the template) stays finite.
    flat, _ = model.localize(torch.zeros(1, 4, 4))
    assert torch.equal(flat, torch.zeros(1, 4, 4))


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
    with pytest.raises(RuntimeError, match="score='nearest' needs a bank of training latents"):
        batch_maps(model, torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("radius", [0, 1])
def test_local_nearest_score_is_the_distance_to_the_closest_nearby_training_vector(radius):
    model = _fitted(score="local_nearest", search_radius=radius)
    assert model.bank is not None and model.bank[0].shape == (6, 4, 16, 16)  # 6 images kept
    level = 1
    z = model(torch.rand(1, 3, 16, 16))[level]
    gallery, spread = model.bank[level] / model.spread[level], model.spread[level]
    size = z.shape[-1]
    brute = torch.empty(size, size)
    for y in range(size):
        for x in range(size):
            ys = [min(max(y + d, 0), size - 1) for d in range(-radius, radius + 1)]
            xs = [min(max(x + d, 0), size - 1) for d in range(-radius, radius + 1)]
            near = gallery[:, :, ys][..., xs].permute(0, 2, 3, 1).reshape(-1, 4)
            brute[y, x] = ((z[0, :, y, x] / spread.view(-1)) - near).norm(dim=1).min() / 2.0
    found = _local_nearest_distance(z, model.bank[level], spread, radius)[0, 0]
    assert torch.allclose(found, brute, atol=1e-4)
    # A banked training image scores zero everywhere.
    own = _local_nearest_distance(model.bank[level][2:3], model.bank[level], spread, radius)
    assert own.abs().max() < 1e-3


def test_local_nearest_banks_bank_images_evenly_spaced_through_a_large_set():
    model = PyramidFlow(PyramidFlowConfig(**SMALL, score="local_nearest", bank_images=3)).eval()
    images = torch.rand(7, 3, 16, 16)
    stats = latent_statistics(model, images, batch_size=2)
    expected = torch.cat([model(images[[0, 3, 6]])[0]])
    assert torch.allclose(stats.bank[0], expected, atol=1e-5)
    # A set no larger than bank_images is banked whole.
    model.config.bank_images = 7
    assert len(latent_statistics(model, images, batch_size=3).bank[0]) == 7


def test_bank_images_must_be_a_positive_int():
    for wrong in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="config.bank_images must be an int of at least 1"):
            PyramidFlowConfig(bank_images=wrong)


def test_a_bank_of_the_other_kind_is_a_clear_error():
    model = _fitted(score="nearest")
    model.config.score = "local_nearest"
    with pytest.raises(RuntimeError, match="score='local_nearest' needs a bank of training"):
        batch_maps(model, torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("score", ["local_nearest", "difference"])
def test_channels_last_fast_path_gives_the_maps_of_a_contiguous_run(score):
    # The model runs its flow channels-last on the CPU (faster convolutions); the latents and
    # maps must be those of the flow run on contiguous images.
    model = _fitted(score=score, input_weight=0.0)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        contiguous, _ = model.flow((images - model.image_mean) / model.image_std)
        latents = model(images)
        plain = model.anomaly_map(contiguous, (16, 16))
    assert latents[0].is_contiguous(memory_format=torch.channels_last)
    for fast, slow in zip(latents, contiguous):
        assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    assert torch.allclose(batch_maps(model, images), plain, rtol=1e-5, atol=1e-6)


def test_input_pyramid_is_the_pyramid_of_the_lifted_images():
    model = _fitted()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        levels = model.input_pyramid(images)
        features, _ = model.flow[1].inverse(levels)
        rebuilt, _ = model.flow[0].inverse(features)
    assert [tuple(x.shape) for x in levels] == [(2, 4, 16, 16), (2, 4, 8, 8), (2, 4, 4, 4)]
    assert torch.allclose(rebuilt, (images - model.image_mean) / model.image_std, atol=1e-4)


@pytest.mark.parametrize("score", ["local_nearest", "standardized"])
def test_input_weight_mixes_the_maps_of_the_latents_and_of_the_input_pyramid(score):
    images, training = torch.rand(2, 3, 16, 16), torch.rand(6, 3, 16, 16)
    model = _fitted(score=score)
    maps = {}
    for weight in (0.0, 0.3, 1.0):
        model.config.input_weight = weight
        model.set_template(latent_statistics(model, training))
        maps[weight] = batch_maps(model, images)
    assert torch.allclose(maps[0.3], 0.7 * maps[0.0] + 0.3 * maps[1.0], atol=1e-5)
    assert not torch.allclose(maps[0.0], maps[1.0], atol=1e-3)
    # With weight 1 the couplings play no part: changing them leaves the map as it was.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 4:
                parameter.add_(0.1)
    model.set_template(latent_statistics(model, training))
    assert torch.allclose(batch_maps(model, images), maps[1.0], atol=1e-6)


def test_a_template_fitted_for_another_input_weight_is_a_clear_error():
    model = _fitted(score="local_nearest", input_weight=0.0)
    model.config.input_weight = 0.5
    with pytest.raises(RuntimeError, match=r"input_weight=0.5 scores 6 tensors .* refit"):
        batch_maps(model, torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize(("settings", "message"), [
    ({"input_weight": 1.5}, r"config.input_weight must be a number in \[0, 1\], received 1.5"),
    ({"input_weight": 0.5, "localization": "compose"},
     "config.input_weight must be 0 with localization='compose'"),
])
def test_bad_input_weights_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        PyramidFlowConfig(**SMALL, **settings)


def test_local_nearest_search_in_bands_of_rows_finds_what_the_whole_search_finds():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 9, 7, generator=generator)
    gallery = torch.randn(5, 3, 9, 7, generator=generator)
    spread = torch.rand(1, 3, 1, 1, generator=generator) + 0.5
    whole = _local_nearest_distance(z, gallery, spread, 1, tile_bytes=2**30)
    for tile_bytes in (1, 2 * 5 * 7 * 4 * 4):  # one row, then four rows at a time
        banded = _local_nearest_distance(z, gallery, spread, 1, tile_bytes=tile_bytes)
        torch.testing.assert_close(banded, whole, rtol=1e-6, atol=1e-6)
