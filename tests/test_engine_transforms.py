"""``torch.func`` transforms and forward-mode AD through memory-saving chains and row bands.

Per-sample gradients (``vmap(grad(...))``), ``jvp``, ``functional_call`` with ``grad`` and
dual tensors need rules that a backward pass rebuilding its inputs does not have; there the
engine and the bands run with plain autograd, say so in a warning, and must give plain
autograd's derivatives. Outside them they must stay memory-saving, silently.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vmap

import autoflow
from autoflow.base import flatten_state

from toys import perturb, randomize_conditioner

FALLBACK = "runs with plain autograd"


def _glow(memory_saving: bool) -> autoflow.Sequential:
    torch.manual_seed(0)
    chain = autoflow.glow(4, levels=2, depth_per_level=2, hidden_channels=8,
                          memory_saving=memory_saving).double()
    with torch.no_grad():  # ActNorm's data-dependent initialisation, outside any transform
        chain(_images(seed=5))
    return perturb(chain, scale=0.1)


def _images(batch: int = 3, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=generator, dtype=torch.float64)


def _loss(chain: autoflow.Sequential, x: Tensor) -> Tensor:
    z, logdet = chain(x)
    return sum(t.square().sum() for t in flatten_state(z)) - logdet.sum()


def _flat(state) -> Tensor:
    return torch.cat([t.flatten() for t in flatten_state(state)])


def _each(memory_saving: bool, compute):
    """``compute(chain)`` for a fresh chain, with the warnings it raised."""
    chain = _glow(memory_saving)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = compute(chain)
    return found, [str(w.message) for w in caught]


def _same_as_plain(compute) -> None:
    expected, plain_warnings = _each(False, compute)
    found, engine_warnings = _each(True, compute)
    assert not any(FALLBACK in m for m in plain_warnings)
    assert any(FALLBACK in m for m in engine_warnings), engine_warnings
    for a, b in zip(flatten_state(found), flatten_state(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_with_vmap_of_grad():
    x = _images()

    def per_sample(chain):
        parameters = {k: v.detach() for k, v in chain.named_parameters()}

        def one(p, xi):
            return _loss(lambda s: functional_call(chain, p, (s,)), xi[None])

        found = vmap(grad(one), in_dims=(None, 0))(parameters, x)
        return tuple(found[k] for k in sorted(found))

    _same_as_plain(per_sample)


def test_grad_of_the_input_under_torch_func_grad():
    x = _images()
    _same_as_plain(lambda chain: grad(lambda s: _loss(chain, s))(x))


def test_jvp_under_torch_func():
    x, v = _images(seed=1), _images(seed=2)
    _same_as_plain(lambda chain: jvp(lambda s: _flat(chain(s)[0]), (x,), (v,))[1])


def test_forward_mode_dual_tensors_with_grad_enabled():
    x, v = _images(seed=1), _images(seed=2)

    def tangents(chain):
        with forward_ad.dual_level():
            z, logdet = chain(forward_ad.make_dual(x, v))
            return (forward_ad.unpack_dual(_flat(z)).tangent,
                    forward_ad.unpack_dual(logdet).tangent)

    _same_as_plain(tangents)


def test_a_plain_training_step_stays_memory_saving_and_silent():
    chain, x = _glow(True), _images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any fallback warning fails the test
        z, _ = chain(x)
        assert any(type(t.grad_fn).__name__ == "_MemorySavingChainBackward"
                   for t in flatten_state(z))
        with forward_ad.dual_level():  # a dual level alone, with no tangent, changes nothing
            z, _ = chain(x)
            assert type(flatten_state(z)[0].grad_fn).__name__ == "_MemorySavingChainBackward"


@pytest.mark.parametrize("memory_saving", [False, True])
def test_banded_coupling_per_sample_gradients(memory_saving):
    whole = randomize_conditioner(autoflow.PyramidCoupling(
        3, target=0, source=1, kernel_size=3, hidden_channels=5, condition_at="target").double())
    banded = copy.deepcopy(whole)
    banded.band_rows = 3
    generator = torch.Generator().manual_seed(1)
    pyramid = tuple(torch.randn(2, 3, 20 >> d, 12 >> d, generator=generator,
                                dtype=torch.float64) for d in range(2))

    def per_sample(block):
        chain = autoflow.Sequential(block, memory_saving=memory_saving)
        parameters = {k: v.detach() for k, v in chain.named_parameters()}

        def one(p, *levels):
            y, logdet = functional_call(chain, p, (tuple(t[None] for t in levels),))
            return sum(t.square().sum() for t in y) - logdet.sum()

        found = vmap(grad(one), in_dims=(None, 0, 0))(parameters, *pyramid)
        return [found[k] for k in sorted(found)]

    expected = per_sample(whole)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = per_sample(banded)
    assert any("row bands" in str(w.message) for w in caught)
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_torch_compile_keeps_the_engine():
    # While torch.compile traces, functorch's interpreter stack is not empty: that must not be
    # taken for a transform (it once made every compiled chain store its activations).
    def chain(memory_saving: bool) -> autoflow.Sequential:
        coupling = randomize_conditioner(autoflow.AffineCoupling(4, kernel_size=3).double())
        return autoflow.Sequential(coupling, memory_saving=memory_saving)

    x = _images()
    torch.manual_seed(0)
    plain = chain(False)
    expected = grad(lambda s: _loss(plain, s))(x)
    torch.manual_seed(0)
    compiled = torch.compile(lambda s: _loss(chain(True), s), backend="eager")
    x = x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x).backward()
    assert not any(FALLBACK in str(w.message) for w in caught)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def test_the_fallback_warning_points_at_the_callers_line():
    chain, x = _glow(True), _images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad(lambda s: _loss(chain, s))(x)
    found = [w for w in caught if FALLBACK in str(w.message)]
    # _loss, in this file, calls the chain: not autoflow's or torch's frames below it.
    assert found and all(w.filename == __file__ for w in found), [w.filename for w in found]
