"""Tiny PyramidFlow settings and data shared by the example's training tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from examples.pyramidflow import PyramidFlowConfig, SyntheticDefects

TINY = {"channels": 4, "levels": 3, "depth": 1, "kernel_size": 3, "image_size": 16,
        "epochs": 2, "batch_size": 4, "holdout": 0.25, "memory_saving": True}
"""A model small enough to train for a few epochs in well under a second."""


@pytest.fixture
def tiny_config() -> Callable[..., PyramidFlowConfig]:
    """Factory of tiny configs: ``tiny_config(epochs=1, seed=3)``."""

    def make(**overrides: Any) -> PyramidFlowConfig:
        return PyramidFlowConfig(**(TINY | overrides))

    return make


@pytest.fixture(scope="session")
def normal_images() -> torch.Tensor:
    """16 normal synthetic texture images, ``(16, 3, 16, 16)``."""
    return torch.stack([s["image"] for s in SyntheticDefects("texture", "train", 16, 16)])
