"""Training actually trains: every conditioner gets a gradient and the loss falls.

These guard against a training step that silently does nothing (no optimizer step, a zeroed
loss, a detached conditioner), which every other test of the example would let through.
"""

from __future__ import annotations

import pytest
import torch

import autoflow
from examples.pyramidflow import PyramidFlow, PyramidFlowConfig, train

__all__: list[str] = []

SMALL = {"channels": 4, "levels": 3, "depth": 2, "kernel_size": 3, "image_size": 16,
         "batch_size": 4, "holdout": 0.0}


@pytest.mark.parametrize("memory_saving", [True, False])
@pytest.mark.parametrize("preset", ["paper-code", None])
def test_every_conditioner_gets_a_nonzero_gradient_from_the_loss(preset, memory_saving):
    settings = SMALL | {"memory_saving": memory_saving}
    config = (PyramidFlowConfig.from_preset(preset, **settings) if preset
              else PyramidFlowConfig(**settings))
    torch.manual_seed(0)
    model = PyramidFlow(config).train()
    couplings = [m for m in model.flow if isinstance(m, autoflow.Coupling)]
    assert len(couplings) == config.levels * config.depth
    for coupling in couplings:  # leave the zero initialisation, so every layer passes signal
        for conv in coupling.conditioner:
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.normal_(conv.weight, std=0.1)
    model.loss(model(torch.rand(4, 3, 16, 16))).backward()
    for index, coupling in enumerate(couplings):
        for name, parameter in coupling.named_parameters():
            assert parameter.grad is not None, (index, name)
            assert parameter.grad.abs().max() > 0, (index, name)
    lifting = model.flow[0].weight
    assert lifting.requires_grad is config.train_lifting
    assert (lifting.grad is not None) is config.train_lifting


def test_the_training_loss_falls(normal_images):
    config = PyramidFlowConfig(**SMALL, epochs=4, learning_rate=1e-3)
    result = train(config, normal_images, progress=False)
    assert len(result.losses) == 4
    # Measured per-epoch means: 1.36, 1.17, 0.72, 0.89 (without optimizer steps they only
    # wander with the batches drawn).
    assert sum(result.losses[-2:]) / 2 < 0.8 * result.losses[0], result.losses


def test_the_frozen_lifting_convolution_keeps_its_initialisation(normal_images):
    config = PyramidFlowConfig(**SMALL, epochs=1)
    torch.manual_seed(config.seed)
    initial = PyramidFlow(config).flow[0].weight.detach().clone()
    trained = train(config, normal_images, progress=False).model.flow[0].weight
    assert torch.equal(trained, initial)
    assert not torch.equal(
        train(PyramidFlowConfig(**SMALL, epochs=1, train_lifting=True), normal_images,
              progress=False).model.flow[0].weight, initial)
