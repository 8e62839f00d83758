"""``backward_chunk``: the engine rebuilds and differentiates per-sample runs slice by slice.

The gradients must be plain autograd's whatever the slice size (a divisor of the batch or
not, larger than the batch), with a context or none, in both directions,
with anchors; runs that mix samples (volume normalisation in training) or drew random numbers
must run whole, as slicing would change them.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import autoflow
from autoflow import AutoflowError, EngineError, engine
from autoflow.base import flatten_state
from autoflow.testing import assert_per_sample, relative_error

from toys import perturb, randomize_conditioner

BATCH = 7


def _data(context_rows: int | None) -> tuple[Tensor, Tensor | None]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, 4, 8, 8, generator=generator, dtype=torch.float64)
    context = None if context_rows is None else torch.randn(
        context_rows, 5, generator=generator, dtype=torch.float64)
    return x, context


def _glow(context: Tensor | None, **options) -> autoflow.Sequential:
    torch.manual_seed(0)
    chain = autoflow.glow(4, levels=2, depth_per_level=2, hidden_channels=8,
                          context_channels=0 if context is None else 5, **options).double()
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        chain(_data(None)[0], context=None if context is None else context.expand(BATCH, -1))
    return perturb(chain, scale=0.1)


def _gradients(chain: autoflow.Sequential, x: Tensor, context: Tensor | None, *,
               inverse: bool = False) -> list[Tensor]:
    x = x.clone().requires_grad_()
    context = None if context is None else context.clone().requires_grad_()
    if inverse:
        y, logdet = chain.inverse(chain(x, context=context)[0], context=context)
    else:
        y, logdet = chain(x, context=context)
    weights = torch.arange(1.0, 1.0 + BATCH, dtype=torch.float64)
    loss = sum((t.square() * t.shape[-1]).sum() for t in flatten_state(y)) + (
        weights * logdet).sum()
    loss.backward()
    extra = [] if context is None else [context.grad]
    return [x.grad, *extra, *(p.grad for p in chain.parameters())]


@pytest.fixture
def slice_sizes(monkeypatch) -> list[int]:
    """The batch sizes the engine's runs were rebuilt with."""
    seen: list[int] = []
    original = engine._backward_run

    def recording(plan, first, last, state, *args, **kwargs):
        seen.append(flatten_state(state)[0].shape[0])
        return original(plan, first, last, state, *args, **kwargs)

    monkeypatch.setattr(engine, "_backward_run", recording)
    return seen


@pytest.mark.parametrize("chunk", [1, 3, 4, BATCH, 100])
@pytest.mark.parametrize("context_rows", [None, BATCH], ids=["no-context", "context"])
def test_sliced_backward_gives_plain_autograds_gradients(chunk, context_rows, slice_sizes):
    x, context = _data(context_rows)
    expected = _gradients(_glow(context), x, context)
    found = _gradients(_glow(context, memory_saving=True, backward_chunk=chunk), x, context)
    for a, b in zip(found, expected, strict=True):
        assert relative_error(a, b) < 1e-11
    assert max(slice_sizes) == min(chunk, BATCH)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_sliced_backward_with_anchors_and_both_directions(inverse, slice_sizes):
    x, context = _data(BATCH)
    expected = _gradients(_glow(context), x, context, inverse=inverse)
    chain = _glow(context, memory_saving=True, backward_chunk=2, anchor_every=3)
    found = _gradients(chain, x, context, inverse=inverse)
    for a, b in zip(found, expected, strict=True):
        assert relative_error(a, b) < 1e-11
    assert max(slice_sizes) == 2


def test_runs_that_mix_samples_or_draw_random_numbers_run_whole(slice_sizes):
    # Volume normalisation averages log-scales over the batch in training: a slice would be
    # centred with its own mean. Dropout draws one mask for the batch.
    def chain(memory_saving: bool) -> autoflow.Sequential:
        torch.manual_seed(0)
        normalised = randomize_conditioner(
            autoflow.AffineCoupling(4, kernel_size=3, volume_norm="channel").double(), seed=1)
        dropout = autoflow.AffineCoupling(4, conditioner=torch.nn.Sequential(
            torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.Dropout(0.3),
            torch.nn.Conv2d(8, 4, 3, padding=1))).double()
        return autoflow.Sequential(normalised, autoflow.Permute(4, kind="reverse"), dropout,
                                   memory_saving=memory_saving, backward_chunk=2)

    x, _ = _data(None)
    torch.manual_seed(5)
    expected = _gradients(chain(False), x, None)
    torch.manual_seed(5)
    found = _gradients(chain(True), x, None)
    for a, b in zip(found, expected, strict=True):
        assert relative_error(a, b) < 1e-11
    assert slice_sizes and set(slice_sizes) == {BATCH}


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_a_bad_slice_size_is_refused(bad):
    with pytest.raises(EngineError, match="backward_chunk must be a positive int"):
        autoflow.Sequential(autoflow.Permute(4), memory_saving=True, backward_chunk=bad)


def test_every_per_sample_class_maps_each_sample_alone():
    """The kit's check, over samples covering every autoflow class in PER_SAMPLE, in eval and
    in training mode (after a first call, as ActNorm initialises on its first batch)."""
    from autoflow.base import PER_SAMPLE

    generator = torch.Generator().manual_seed(0)
    samples = [
        autoflow.glow(1, levels=2, depth_per_level=1, hidden_channels=4),
        autoflow.glow(1, levels=2, depth_per_level=1, hidden_channels=4, mixing="permute",
                      learned_prior=False, downsample="haar", coupling="additive"),
        autoflow.Sequential(autoflow.OnFirst(autoflow.ActNorm(4))),
    ]
    covered = set()
    for sample in samples:
        sample = sample.double()
        image = torch.randn(5, 1, 8, 8, generator=generator, dtype=torch.float64)
        x = (image.expand(-1, 4, -1, -1), image) if isinstance(sample[0], autoflow.OnFirst) else (
            image)
        with torch.no_grad():
            sample(x)  # initialises ActNorm
            perturb(sample, scale=0.1)
        for mode in (False, True):
            assert_per_sample(sample.train(mode), x)
        covered |= {type(m) for m in sample.modules()}
    ours = {c for c in PER_SAMPLE if c.__module__.startswith("autoflow")}
    assert ours <= covered, f"not sampled: {sorted(c.__name__ for c in ours - covered)}"


def test_the_per_sample_check_catches_batch_statistics():
    coupling = randomize_conditioner(
        autoflow.AffineCoupling(4, kernel_size=3, volume_norm="channel").double(), seed=2)
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    assert_per_sample(coupling.eval(), x)  # the running mean: each sample alone
    with pytest.raises(AssertionError, match="is not per-sample: its forward output of sample 0"):
        assert_per_sample(coupling.train(), x)  # the batch mean
    with pytest.raises(AutoflowError, match="at least 2 samples"):
        assert_per_sample(coupling, x[:1])
