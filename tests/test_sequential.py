"""Sequential: composition, log-det bookkeeping, shape checks and bijectivity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autoflow
from autoflow import NotBijectiveError, Sequential, ShapeError
from autoflow.testing import assert_invertible, assert_logdet_matches_jacobian
from autoflow.testing import strategies as afs

from toys import randomize_conditioner


def chain(channels: int) -> Sequential:
    return randomize_conditioner(Sequential(
        autoflow.ActNorm(channels), autoflow.InvConv1x1(channels),
        autoflow.AffineCoupling(channels), autoflow.Permute(channels),
        autoflow.AdditiveCoupling(channels),
    ), scale=0.3)


@settings(max_examples=15, deadline=None)
@given(afs.states(st.integers(2, 4), max_size=3))
def test_chain_is_invertible_and_its_logdet_is_the_sum(x):
    flow = chain(x.shape[1]).to(x.dtype)
    flow(x)  # ActNorm's data-dependent initialisation
    flow.eval()
    assert_invertible(flow, x)
    y, logdet = flow(x)
    parts, state = [], x
    for module in flow:
        state, part = module(state)
        parts.append(part)
    torch.testing.assert_close(logdet, sum(parts))
    assert_logdet_matches_jacobian(flow, x.double()[:1])


def test_inverse_applies_modules_in_reverse_order():
    flow = Sequential(autoflow.Squeeze(1), autoflow.Permute(4, kind="reverse"))
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y, _ = flow(x)
    back, _ = flow.inverse(y)
    assert torch.equal(back, x)
    assert flow.output_shape((1, 4, 4)) == (4, 2, 2)
    assert flow.input_shape((4, 2, 2)) == (1, 4, 4)


def test_shape_check_names_the_module_that_does_not_fit():
    flow = Sequential(autoflow.Squeeze(2), autoflow.InvConv1x1(2))
    with pytest.raises(ShapeError, match=r"module '1' \(InvConv1x1\) cannot take .* \(8, 2, 2\)"):
        flow.check((2, 4, 4))


def test_non_bijective_members_give_no_logdet_and_are_named():
    flow = Sequential(autoflow.LiftingConv1x1(4),
                      Sequential(autoflow.ActNorm(4), autoflow.LaplacianPyramid(2)))
    _, logdet = flow(torch.rand(2, 3, 4, 4))
    assert logdet is None and not flow.bijective
    with pytest.raises(NotBijectiveError, match=r"'0' \(LiftingConv1x1\)"):
        autoflow.require_bijective(flow)
    with pytest.raises(NotBijectiveError, match=r"'1.1' \(LaplacianPyramid\)"):
        autoflow.require_bijective(Sequential(autoflow.ActNorm(4), flow[1]))


def test_plain_modules_make_the_chain_one_way():
    flow = Sequential(nn.Conv2d(3, 4, 1), autoflow.ActNorm(4))
    y, logdet = flow(torch.rand(2, 3, 4, 4))
    assert y.shape == (2, 4, 4, 4) and logdet is None and not flow.bijective
    with pytest.raises(autoflow.EngineError, match="module '0' \\(Conv2d\\) is not an"):
        flow.inverse(y)
    with pytest.raises(ShapeError, match="cannot infer shapes through module '0'"):
        flow.output_shape((3, 4, 4))


def test_members_must_be_modules():
    with pytest.raises(TypeError, match="expects nn.Module members, received int at position 1"):
        Sequential(autoflow.ActNorm(2), 3)
    flow = Sequential(autoflow.ActNorm(2)).append(autoflow.Permute(2))
    assert len(flow) == 2 and flow.volume_preserving is False


def test_a_slice_is_a_chain_of_the_same_modules_with_the_same_engine_settings():
    torch.manual_seed(0)
    flow = Sequential(autoflow.ActNorm(4), autoflow.InvConv1x1(4), autoflow.AffineCoupling(4),
                      memory_saving=True, anchor_every=2)
    head, tail = flow[:2], flow[2:]
    assert isinstance(head, Sequential) and list(head) == list(flow)[:2]
    assert tail[0] is flow[2] and len(tail) == 1
    assert head.memory_saving and head.engine_options.anchor_every == 2
    x = torch.randn(2, 4, 4, 4)
    y, logdet = flow(x)
    middle, first = head(x)
    rest, second = tail(middle)
    assert torch.allclose(rest, y, atol=1e-6) and torch.allclose(first + second, logdet,
                                                                  atol=1e-5)
