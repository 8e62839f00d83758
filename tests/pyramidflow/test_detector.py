"""The Detector API: fit, predict, evaluate, save and load, and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import examples.pyramidflow as pyramidflow
from examples.pyramidflow import Detector, PyramidFlowConfig, SyntheticDefects

__all__: list[str] = []


@pytest.fixture(scope="module")
def detector() -> Detector:
    train_set = SyntheticDefects("object", "train", 12, 16)
    return Detector(channels=4, levels=3, depth=1, kernel_size=3, image_size=16, epochs=1,
                    batch_size=4, holdout=0.25).fit(train_set)


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return torch.stack([s["image"] for s in SyntheticDefects("object", "test", 6, 16)])


def test_save_and_load_give_identical_predictions(tmp_path, detector, test_images):
    path = detector.save(tmp_path / "model.pt")
    loaded = Detector.load(path)
    assert loaded.config == detector.config and loaded.thresholds == detector.thresholds
    before, after = detector.predict(test_images), loaded.predict(test_images)
    for field in ("maps", "scores", "masks", "verdicts"):
        assert torch.equal(getattr(before, field), getattr(after, field)), field
    assert torch.equal(detector.image_template(), loaded.image_template())


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path, detector):
    path = detector.save(tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)  # would fail on any pickled object
    assert isinstance(state["config"], str) and isinstance(state["thresholds"], dict)


def test_prediction_follows_the_thresholds(detector, test_images):
    prediction = detector.predict(test_images)
    assert prediction.maps.shape == (6, 16, 16) and prediction.scores.shape == (6,)
    # Image scores are the maxima of the raw maps (before config.map_normalization).
    config = detector.model.config
    detector.model.config = dataclasses.replace(config, map_normalization="none")
    try:
        raw = detector.predict(test_images).maps
    finally:
        detector.model.config = config
    assert config.map_normalization == "image_mean" and not torch.equal(raw, prediction.maps)
    assert torch.equal(prediction.scores, raw.flatten(1).max(1).values)
    assert torch.equal(prediction.masks, prediction.maps > detector.thresholds.pixel)
    assert torch.equal(prediction.verdicts, prediction.scores > detector.thresholds.image)


def test_other_sizes_and_lists_are_resized_bilinearly(detector, test_images):
    large = torch.nn.functional.interpolate(test_images, size=(40, 24), mode="bilinear")
    assert detector.predict(large).maps.shape == (6, 16, 16)
    as_list = detector.predict(list(test_images))
    assert torch.equal(as_list.maps, detector.predict(test_images).maps)


@pytest.mark.parametrize(("images", "error", "match"), [
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "divide 8-bit images by 255"),
    (torch.rand(1, 1, 16, 16), ValueError, r"shape \(N, 3, H, W\), received \(1, 1, 16, 16\)"),
    (torch.rand(1, 3, 16, 16) * 255, ValueError, r"values in \[0, 1\], received values in"),
    ("images/", TypeError, "expected a Dataset of samples"),
])
def test_bad_images_are_named(detector, images, error, match):
    with pytest.raises(error, match=match):
        detector.predict(images)


def test_evaluate_reports_the_metrics_and_resolution(detector):
    results = detector.evaluate(SyntheticDefects("object", "test", 6, 16))
    assert results["resolution"] == [16, 16] and results["images"] == 6
    assert all(0.0 <= results[key] <= 1.0 for key in ("pixel_auroc", "image_auroc", "aupro_0.3"))
    assert "aupro_full_range" not in results


def test_image_template_is_an_image(detector):
    template = detector.image_template()
    assert template.shape == (3, 16, 16) and 0 <= template.min() and template.max() <= 1


def test_without_holdout_there_are_no_thresholds(test_images, normal_images):
    detector = Detector(channels=4, levels=2, depth=1, kernel_size=3, image_size=16, epochs=1,
                        holdout=0.0).fit(normal_images)
    prediction = detector.predict(test_images)
    assert detector.thresholds is None and prediction.masks is None
    assert prediction.verdicts is None


def test_unfitted_detector_says_so():
    with pytest.raises(RuntimeError, match="not fitted"):
        Detector(image_size=16, levels=2).predict(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize(("overrides", "match"), [
    ({"channels": 0}, "config.channels must be an int of at least 1, received 0"),
    ({"epochs": -1}, "config.epochs must be an int of at least 0, received -1"),
    ({"colour": "red"}, r"unknown config keys \['colour'\]"),
    ({"image_size": 30, "levels": 3}, "must be divisible by 4 for 3 levels"),
    ({"volume_norm": "batch"}, "config.volume_norm must be one of"),
    ({"learning_rate": -1e-3}, "config.learning_rate must be a positive number, received -0.001"),
    ({"pixel_quantile": 99.9}, r"config.pixel_quantile must be a quantile in \[0, 1\]"),
    ({"betas": (0.5, 1.5)}, r"config.betas must be two numbers in \[0, 1\)"),
])
def test_bad_config_values_are_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        Detector(**overrides)


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        Detector.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a PyramidFlow checkpoint"):
        Detector.load(tmp_path / "other.pt")


def test_public_names_and_no_private_autoflow_imports():
    for name in ("Detector", "PyramidFlow", "PyramidFlowConfig", "MVTecAD", "BTAD",
                 "ImageFolder", "SyntheticDefects", "pixel_auroc", "image_auroc", "aupro"):
        assert name in pyramidflow.__all__ and hasattr(pyramidflow, name)
    assert isinstance(pyramidflow.PyramidFlowConfig(), PyramidFlowConfig)
    for source in Path(pyramidflow.__file__).parent.glob("*.py"):
        private = re.findall(r"^\s*(?:from|import) autoflow\.\w+", source.read_text(), re.M)
        assert not private, f"{source.name} imports autoflow internals: {private}"
