"""The ResNet-18 front trains from a local torchvision-format file, and only from one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.pyramidflow import Detector
from examples.pyramidflow.resnet_stem import ResNet18Stem

__all__: list[str] = []


def write_random_resnet18(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A random state dict in torchvision's key format: the stem's own keys plus ``fc``."""
    with monkeypatch.context() as patch:
        patch.setattr(ResNet18Stem, "_load", lambda self, path: None)
        keys = ResNet18Stem("unused").state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in keys.items():
        if key in ("mean", "std"):  # the stem's own normalisation, not torchvision's
            continue
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1)
        elif key.endswith("running_var"):  # variances must be positive
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    state["fc.weight"] = torch.randn(1000, 512, generator=generator)
    torch.save(state, path)
    return state


def test_resnet_front_loads_local_weights_and_stays_frozen(tmp_path, monkeypatch,
                                                           normal_images):
    state = write_random_resnet18(tmp_path / "resnet18.pt", monkeypatch)
    detector = Detector(front="resnet18", resnet_weights=str(tmp_path / "resnet18.pt"),
                        levels=2, depth=1, kernel_size=3, image_size=16, epochs=1,
                        batch_size=4, holdout=0.25).fit(normal_images[:8])
    assert detector.config.channels == 64
    stems = [m for m in detector.model.modules() if isinstance(m, ResNet18Stem)]
    assert len(stems) == 1
    assert torch.equal(stems[0].conv1.weight, state["conv1.weight"])  # untouched by training
    assert torch.equal(stems[0].layer1[1].bn2.running_var, state["layer1.1.bn2.running_var"])
    assert detector.predict(normal_images[:2]).maps.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="has no inverse"):
        detector.image_template()


def test_missing_weights_file_is_a_clear_error(tmp_path, normal_images):
    detector = Detector(front="resnet18", resnet_weights=str(tmp_path / "nowhere.pt"),
                        levels=2, depth=1, kernel_size=3, image_size=16, epochs=1)
    with pytest.raises(FileNotFoundError, match=r"weights not found at .*nowhere\.pt"):
        detector.fit(normal_images)


def test_resnet_front_without_weights_is_a_clear_error(normal_images):
    with pytest.raises(ValueError, match="needs config.resnet_weights"):
        Detector(front="resnet18", levels=2, image_size=16, epochs=1).fit(normal_images)
