"""Training: seeds repeat runs, resuming repeats them too, NaN stops, thresholds are held out."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import autoflow
from examples.pyramidflow import PyramidFlow, PyramidFlowConfig, train
from examples.pyramidflow.cli import build_parser
from examples.pyramidflow.inference import predictions
from examples.pyramidflow.train import augment, load_checkpoint, split_holdout

__all__: list[str] = []


def assert_same_weights(first: PyramidFlow, second: PyramidFlow) -> None:
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_repeats_the_run_and_another_seed_does_not(tiny_config, normal_images):
    config = tiny_config(augment=True, epochs=1)
    first = train(config, normal_images, progress=False)
    second = train(config, normal_images, progress=False)
    assert_same_weights(first.model, second.model)
    assert first.thresholds == second.thresholds
    assert first.losses == second.losses and len(first.losses) == config.epochs

    other = train(tiny_config(augment=True, epochs=1, seed=1), normal_images, progress=False).model
    assert not all(torch.equal(a, b) for a, b in zip(other.parameters(),
                                                     first.model.parameters()))


def test_resuming_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiny_config,
                                                                normal_images):
    config = tiny_config(epochs=2, augment=True)
    whole = train(config, normal_images, checkpoint_dir=tmp_path / "whole", progress=False)
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["epoch-001.pt",
                                                                      "epoch-002.pt"]

    train(tiny_config(epochs=1, augment=True), normal_images, checkpoint_dir=tmp_path / "part",
          progress=False)
    resumed = train(config, normal_images, checkpoint_dir=tmp_path / "part",
                    resume=tmp_path / "part" / "epoch-001.pt", progress=False)
    assert_same_weights(whole.model, resumed.model)
    assert resumed.thresholds == whole.thresholds
    assert len(resumed.losses) == 1 and resumed.losses[0] == whole.losses[1]
    for a, b in zip(resumed.model.template, whole.model.template):
        assert torch.equal(a, b)


def test_checkpoints_hold_training_state_and_the_final_one_the_template(
        tmp_path, tiny_config, normal_images):
    result = train(tiny_config(), normal_images, checkpoint_dir=tmp_path, progress=False)
    first, last = load_checkpoint(tmp_path / "epoch-001.pt"), load_checkpoint(result.checkpoint)
    assert first["epoch"] == 1 and first["optimizer"] is not None and first["template"] is None
    assert last["epoch"] == 2 and last["config"] == tiny_config()
    assert last["thresholds"] == result.thresholds
    assert last["holdout"] == result.holdout_indices
    # The latents' template, then the input pyramid's (config.input_weight > 0).
    assert [tuple(t.shape) for t in last["template"]] == 2 * [(1, 4, 16, 16), (1, 4, 8, 8),
                                                              (1, 4, 4, 4)]


def test_resume_rejects_another_config(tmp_path, tiny_config, normal_images):
    train(tiny_config(epochs=1), normal_images, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"differs in channels: 4 -> 8"):
        train(tiny_config(channels=8), normal_images, resume=tmp_path / "epoch-001.pt",
              progress=False)


def test_resume_may_change_the_optimiser_settings_and_they_are_used(tmp_path, tiny_config,
                                                                    normal_images):
    train(tiny_config(epochs=1), normal_images, checkpoint_dir=tmp_path, progress=False)
    changed = tiny_config(epochs=2, learning_rate=1e-5, betas=(0.9, 0.99), eps=1e-6,
                          weight_decay=0.0, grad_clip=0.5)
    train(changed, normal_images, checkpoint_dir=tmp_path, resume=tmp_path / "epoch-001.pt",
          progress=False)
    group = load_checkpoint(tmp_path / "epoch-002.pt")["optimizer"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (
        1e-5, (0.9, 0.99), 1e-6, 0.0)


def test_nan_loss_stops_at_once_naming_epoch_and_step(monkeypatch, tmp_path, tiny_config,
                                                      normal_images):
    calls = itertools.count(1)
    loss = PyramidFlow.loss

    def poisoned(self, latents):
        value = loss(self, latents)
        return value * float("nan") if next(calls) == 2 else value

    monkeypatch.setattr(PyramidFlow, "loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"nan at epoch 1/2, step 2/2"):
        train(tiny_config(), normal_images, checkpoint_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # no checkpoint of the broken epoch


def test_thresholds_come_from_held_out_images_never_trained_on(monkeypatch, tiny_config,
                                                               normal_images):
    trained_on = []
    forward = PyramidFlow.forward

    def spy(self, images):
        if self.training:
            trained_on.append(images.detach().clone())
        return forward(self, images)

    monkeypatch.setattr(PyramidFlow, "forward", spy)
    config = tiny_config()
    result = train(config, normal_images, progress=False)

    assert len(result.holdout_indices) == 3 and len(result.train_indices) == 9
    assert sorted(result.train_indices + result.holdout_indices) == list(range(12))
    seen = torch.cat(trained_on)
    for index in result.holdout_indices:
        assert not (seen == normal_images[index]).flatten(1).all(1).any()

    monkeypatch.setattr(PyramidFlow, "forward", forward)
    maps, scores = predictions(result.model, normal_images[result.holdout_indices])
    maps, image_scores = maps.double().numpy(), scores.double().numpy()
    assert result.thresholds.image == pytest.approx(np.quantile(image_scores, 0.99))
    assert result.thresholds.pixel == pytest.approx(np.quantile(maps, 0.999))


def test_holdout_keeps_at_least_one_image_and_zero_keeps_none():
    assert [len(part) for part in split_holdout(5, 0.01, seed=0)] == [4, 1]
    assert split_holdout(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_holdout(1, 0.5, seed=0)


def test_too_few_images_for_a_batch(tiny_config, normal_images):
    with pytest.raises(ValueError, match=r"3 training images .* fewer than config.batch_size=4"):
        train(tiny_config(), normal_images[:4], progress=False)


def test_augmentation_only_flips_and_rotates():
    images = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    out = augment(images, torch.Generator().manual_seed(0))
    for original, changed in zip(images, out):
        variants = [original.rot90(k, (-2, -1)) for k in range(4)]
        variants += [v.flip(-1) for v in variants]
        assert any(torch.equal(changed, v) for v in variants)


def test_a_checkpoint_from_before_input_weight_and_bank_images_loads_their_former_settings(
        tmp_path, tiny_config, normal_images):
    # Then the latents alone were scored, against a bank of 32 images, on raw maps (whose
    # values the thresholds were set on), and whole levels were evaluated at once
    # (band_rows=None).
    config = tiny_config(epochs=1, input_weight=0.0, bank_images=32, map_normalization="none")
    result = train(config, normal_images, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(result.checkpoint, weights_only=False)
    values = json.loads(state["config"])
    del values["input_weight"], values["bank_images"], values["band_rows"]
    del values["map_normalization"]
    state["config"] = json.dumps(values)
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["config"] == config


def test_training_in_row_bands_trains_the_same_model(tiny_config, normal_images):
    whole = train(tiny_config(epochs=1), normal_images, progress=False).model
    banded_config = tiny_config(epochs=1, band_rows=5)
    banded = train(banded_config, normal_images, progress=False).model
    couplings = [m for m in banded.flow if isinstance(m, autoflow.Coupling)]
    assert couplings and all(m.band_rows == 5 for m in couplings)
    for (name, a), b in zip(whole.state_dict().items(), banded.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(whole.state_dict()["flow.2.conditioner.2.weight"],
                           PyramidFlow(banded_config).state_dict()["flow.2.conditioner.2.weight"])


def test_band_rows_is_checked_and_parsed():
    for wrong in (0, -1, 2.0, True, "8"):
        with pytest.raises(ValueError, match="config.band_rows must be None or an int"):
            PyramidFlowConfig(band_rows=wrong)
    with pytest.raises(ValueError, match="band_rows needs volume_norm 'channel' or 'none'"):
        PyramidFlowConfig(band_rows=8, volume_norm="spatial")
    parsed = build_parser().parse_args(["demo", "--band-rows", "64"])
    assert getattr(parsed, "config.band_rows") == 64
