"""Tests of ActNorm: data-dependent init, round trip, log-det."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoflow.actnorm import ActNorm
from autoflow.errors import AutoflowError, ShapeError
from autoflow.testing import assert_invertible, assert_logdet_matches_jacobian
from autoflow.testing import strategies as afs

seeds = st.integers(0, 2**31 - 1)
fast = settings(max_examples=20, deadline=None)


def initialised(x: torch.Tensor, seed: int) -> ActNorm:
    """An ActNorm initialised on a shifted, scaled copy of ``x``, then switched to eval."""
    norm = ActNorm(x.shape[1]).to(x.dtype)
    norm(afs.tensor_of(tuple(x.shape), x.dtype, seed, scale=2.0) + 0.5)
    return norm.eval()


@fast
@given(x=afs.states(channels=st.integers(1, 4), min_size=2, max_size=5), seed=seeds)
def test_init_gives_zero_mean_unit_std_per_channel(x: torch.Tensor, seed: int) -> None:
    data = 3.0 * x - 2.0
    norm = ActNorm(x.shape[1]).to(x.dtype)
    y, logdet = norm(data)
    assert bool(norm.initialized)
    tol = 1e-10 if x.dtype == torch.float64 else 1e-4
    assert y.mean(dim=(0, 2, 3)).abs().max() < tol
    std = y.std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(std, torch.ones_like(std), rtol=1e-4, atol=1e-4)
    expected = x.shape[2] * x.shape[3] * norm.log_scale.detach().sum()
    torch.testing.assert_close(logdet, expected.expand(x.shape[0]))


@fast
@given(x=afs.states(channels=st.integers(1, 4), min_size=2, max_size=5), seed=seeds)
def test_init_is_not_redone(x: torch.Tensor, seed: int) -> None:
    norm = ActNorm(x.shape[1]).to(x.dtype)
    norm(x)
    before = [p.detach().clone() for p in norm.parameters()]
    norm(afs.tensor_of(tuple(x.shape), x.dtype, seed, scale=5.0) + 3.0)
    for p, q in zip(norm.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_initialized_survives_state_dict() -> None:
    norm = ActNorm(3)
    norm(torch.randn(4, 3, 5, 5) * 4 + 1)
    fresh = ActNorm(3)
    fresh.load_state_dict(norm.state_dict())
    assert bool(fresh.initialized)
    fresh(torch.randn(4, 3, 5, 5))
    for p, q in zip(fresh.parameters(), norm.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_eval_and_inverse_never_initialise() -> None:
    norm = ActNorm(2)
    x = torch.randn(2, 2, 3, 3) * 3 + 1
    x_back, logdet_inv = norm.inverse(x)
    assert not bool(norm.initialized)
    torch.testing.assert_close(x_back, x, rtol=0, atol=0)
    assert torch.equal(logdet_inv, torch.zeros(2))
    y, _ = norm.eval()(x)
    assert not bool(norm.initialized)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@fast
@given(x=afs.states(channels=st.integers(1, 4), max_size=5), seed=seeds)
def test_round_trip(x: torch.Tensor, seed: int) -> None:
    assert_invertible(initialised(x, seed), x)


@fast
@given(
    x=afs.states(channels=st.integers(1, 2), max_size=4, dtype=afs.dtypes(torch.float64)),
    seed=seeds,
)
def test_logdet_matches_jacobian(x: torch.Tensor, seed: int) -> None:
    assert_logdet_matches_jacobian(initialised(x, seed), x)


def test_constant_channel_gets_a_finite_scale() -> None:
    norm = ActNorm(1)
    y, logdet = norm(torch.full((2, 1, 2, 2), 7.0))
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(2, 2, 3, 3), ShapeError, "expected 3 channels.*received 2"),
        (torch.randn(2, 3, 3), ShapeError, "4-D input"),
        (torch.randn(1, 3, 2, 2, dtype=torch.float64), AutoflowError, "float32.*float64"),
    ],
)
def test_rejects_bad_inputs(x: torch.Tensor, error: type, match: str) -> None:
    norm = ActNorm(3)
    with pytest.raises(error, match=match):
        norm(x)
    with pytest.raises(error, match=match):
        norm.inverse(x)
    assert not bool(norm.initialized)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [((0,), {}, "channels must be an int >= 1"), ((2,), {"eps": 0.0}, "positive float eps")],
)
def test_rejects_bad_construction(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(AutoflowError, match=match):
        ActNorm(*args, **kwargs)


def test_shape_methods() -> None:
    norm = ActNorm(3)
    assert norm.output_shape((3, 4, 5)) == (3, 4, 5) == norm.input_shape((3, 4, 5))
    with pytest.raises(ShapeError, match="expected 3 channels"):
        norm.output_shape((4, 4, 5))
