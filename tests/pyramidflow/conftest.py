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
    """12 normal synthetic texture images, ``(12, 3, 16, 16)``; 3 are held out by TINY."""
    return torch.stack([s["image"] for s in SyntheticDefects("texture", "train", 12, 16)])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this folder's tests on one thread, restoring the count after each module.

    At these tiny sizes, handing work between threads costs more than the work itself: a
    16×16 convolution took ~0.1 ms on one thread and ~10 ms on two busy ones.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
