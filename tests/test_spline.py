"""Rational-quadratic splines: the elementwise maths, SplineCoupling under the kit, glow's
``coupling=`` choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import autoflow
from autoflow import AutoflowError, ShapeError, SplineCoupling, SplineTransform
from autoflow.spline import _knots, rational_quadratic_spline, spline_params
from autoflow.testing import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
)
from autoflow.testing import strategies as afs

from test_coupling import check_reconstruction
from toys import randomize_conditioner

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def random_params(shape: tuple[int, ...], bins: int, scale: float, seed: int) -> torch.Tensor:
    return afs.tensor_of((*shape, spline_params(bins)), F64, seed, scale)


# The elementwise maths ---------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(bins=st.integers(1, 9), bound=st.sampled_from([0.5, 3.0]),
       scale=st.sampled_from([0.0, 1.0, 5.0]), seed=st.integers(0, 2**31 - 1))
# A steep knot beside a flat bin (b < 0 in the inverse's quadratic): the root written as
# 2c / (-b - sqrt(D)) cancelled there, an error of 250 rounding units in y.
@example(bins=7, bound=3.0, scale=5.0, seed=42210)
def test_spline_round_trip_and_inverse_logdet(bins, bound, scale, seed):
    # Points inside and outside [-B, B], parameters from tame to extreme.
    x = afs.tensor_of((64,), F64, seed + 1, 1.5 * bound)
    params = random_params((64,), bins, scale, seed)
    y, log_derivative = rational_quadratic_spline(x, params, bound=bound)
    x_back, log_derivative_inv = rational_quadratic_spline(y, params, bound=bound, inverse=True)
    # Backward stable: the error in x, times dy/dx, is a rounding error of y (extreme
    # parameters give slopes of 1e-4 and below, which amplify rounding in x-space). Worst
    # over 3000 draws: 5.4e-15, a dozen rounding units of y.
    assert ((x_back - x).abs() * log_derivative.exp()).max() < 2e-14
    # The inverse's log-derivative at y is minus the forward one at the point it returns.
    # Compared at x instead, the gap is d(log f')/dx times the error in x: 1e-8 for extreme
    # parameters, ill-conditioning rather than a wrong formula (worst over 3000 draws here:
    # 5e-13 at x_back, 1.2e-8 at x).
    _, log_derivative_back = rational_quadratic_spline(x_back, params, bound=bound)
    assert (log_derivative_back + log_derivative_inv).abs().max() < 1e-10


@settings(max_examples=10, deadline=None)
@given(bins=st.integers(1, 9), inverse=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_spline_log_derivative_is_the_autograd_derivative(bins, inverse, seed):
    x = afs.tensor_of((50,), F64, seed + 1, 2.5).requires_grad_()
    params = random_params((50,), bins, 2.0, seed)
    y, log_derivative = rational_quadratic_spline(x, params, inverse=inverse)
    (derivative,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the diagonal
    assert (derivative.log() - log_derivative).abs().max() < 1e-9


def test_spline_tails_are_the_identity_both_ways():
    bound = 3.0
    params = random_params((6,), 8, 3.0, 0)
    tails = torch.tensor([-1e6, -7.0, -3.0000001, 3.0000001, 4.5, 1e6], dtype=F64)
    for inverse in (False, True):
        y, log_derivative = rational_quadratic_spline(tails, params, bound=bound,
                                                      inverse=inverse)
        assert torch.equal(y, tails) and torch.equal(log_derivative, torch.zeros(6, dtype=F64))


def test_spline_is_increasing_continuous_and_maps_the_interval_onto_itself():
    params = random_params((1,), 8, 3.0, 1).expand(4001, -1)
    x = torch.linspace(-4, 4, 4001, dtype=F64)
    y, log_derivative = rational_quadratic_spline(x, params)
    assert (y.diff() > 0).all()
    # Value and derivative continuous at every interior knot (left and right limits agree).
    knots = _knots(params[0, :8], 3.0, 1e-3)[0][1:-1]
    sides = torch.stack([knots - 1e-12, knots + 1e-12], dim=1).reshape(-1)
    y_sides, ld_sides = rational_quadratic_spline(sides, params[: sides.numel()])
    assert (y_sides[0::2] - y_sides[1::2]).abs().max() < 1e-9
    assert (ld_sides[0::2] - ld_sides[1::2]).abs().max() < 1e-6
    ends, _ = rational_quadratic_spline(torch.tensor([-3.0, 3.0], dtype=F64), params[:2])
    assert torch.allclose(ends, torch.tensor([-3.0, 3.0], dtype=F64), atol=1e-12, rtol=0)
    # Derivative 1 at the bounds, as in the linear tails: log-derivative continuous there.
    near = torch.tensor([-3 + 1e-12, 3 - 1e-12], dtype=F64)
    _, at_bounds = rational_quadratic_spline(near, params[:2])
    assert at_bounds.abs().max() < 1e-6


def test_zero_parameters_give_the_identity():
    x = torch.linspace(-5, 5, 101, dtype=F64)
    y, log_derivative = rational_quadratic_spline(x, torch.zeros(101, 23, dtype=F64))
    assert (y - x).abs().max() < 1e-13 and log_derivative.abs().max() < 1e-13


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_spline_gradients_are_finite_in_the_tails_and_at_the_bounds(dtype):
    # Far tails too: evaluated there unclamped, the discarded spline branch overflows, and
    # torch.where would pass its NaN gradient on (0 * inf).
    huge = 1e30 if dtype == torch.float32 else 1e200
    x = torch.tensor([-huge, -9.0, -3.0, 0.0, 3.0, 9.0, huge], dtype=dtype, requires_grad=True)
    params = random_params((7,), 4, 2.0, 2).to(dtype).requires_grad_()
    tails = [0, 1, 5, 6]
    for inverse in (False, True):
        y, log_derivative = rational_quadratic_spline(x, params, inverse=inverse)
        gx, gp = torch.autograd.grad((y + log_derivative).sum(), (x, params))
        assert torch.isfinite(gx).all() and torch.isfinite(gp).all()
        assert torch.equal(gx[tails], torch.ones(4, dtype=dtype))  # identity tails
        assert torch.equal(gp[tails], torch.zeros(4, gp.shape[1], dtype=dtype))


def test_spline_refuses_parameters_of_the_wrong_shape():
    with pytest.raises(ShapeError, match=r"x.shape \+ \(3K - 1,\) = \(4,\) \+ \(3K - 1,\), "
                                         r"received \(4, 24\)"):
        rational_quadratic_spline(torch.zeros(4), torch.zeros(4, 24))
    with pytest.raises(ShapeError, match=r"SplineTransform expected parameters of shape "
                                         r"x.shape \+ \(11,\) = \(2, 3, 11\), "
                                         r"received \(2, 3, 23\)"):
        SplineTransform(4)(torch.zeros(2, 3), torch.zeros(2, 3, 23))


@pytest.mark.parametrize("option", ["bound", "min_bin_width", "min_bin_height",
                                    "min_derivative"])
@pytest.mark.parametrize("inverse", [False, True])
def test_spline_transform_passes_its_options_to_the_spline(option, inverse):
    x = afs.tensor_of((40,), F64, 1, 2.0)
    params = random_params((40,), 4, 5.0, 0)  # extreme: the minimum widths and slopes bind
    value = {"bound": 2.5, "min_derivative": 0.2}.get(option, 0.15)
    module = SplineTransform(4, **{option: value})
    found = module.inverse(x, params) if inverse else module(x, params)
    expected = rational_quadratic_spline(x, params, inverse=inverse, **{option: value})
    default = rational_quadratic_spline(x, params, inverse=inverse)
    assert all(torch.equal(f, e) for f, e in zip(found, expected))
    assert not torch.equal(found[0], default[0])  # the option changes the map


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bins": 0}, "bins must be an int >= 1, received 0"),
    ({"bins": 8.0}, "bins must be an int >= 1, received 8.0"),
    ({"bound": 0.0}, "bound must be a positive finite number, received 0.0"),
    ({"bound": float("inf")}, "bound must be a positive finite number"),
    ({"bound": True}, "bound must be a positive finite number, received True"),
    ({"bins": 10, "min_bin_width": 0.1}, r"min_bin_width \* bins must be below 1"),
    ({"min_bin_height": -1e-3}, "min_bin_height must be a positive finite number"),
    ({"min_derivative": 1.0}, "min_derivative must be below 1"),
])
def test_spline_transform_validates(kwargs, match):
    with pytest.raises(AutoflowError, match=match):
        SplineTransform(**kwargs)


# SplineCoupling under the kit --------------------------------------------------------------


def make_spline(channels: int, *, context_channels: int = 0, kernel_size: int = 3,
                bins: int = 4, bound: float = 2.0, seed: int = 0) -> SplineCoupling:
    torch.manual_seed(seed)
    layer = SplineCoupling(channels, bins=bins, bound=bound, hidden_channels=4,
                           kernel_size=kernel_size, context_channels=context_channels)
    # Large enough parameters for uneven bins; inputs of scale 2 reach the tails too.
    return randomize_conditioner(layer, scale=1.0, seed=seed).double()


@settings(max_examples=6, deadline=None)
@given(x=afs.states(st.integers(2, 4), max_size=3, dtype=st.just(F64)), seed=st.integers(0, 99))
def test_spline_coupling_on_images_passes_the_kit(x, seed):
    layer = make_spline(x.shape[1], seed=seed)
    x = 2 * x
    assert_invertible(layer, x)
    assert_logdet_matches_jacobian(layer, x)
    assert_engine_gradients_match(layer, x)
    assert_engine_gradients_match(layer, x, inverse=True)


@settings(max_examples=6, deadline=None)
@given(x=afs.vector_states(st.integers(2, 6), dtype=st.just(F64)), seed=st.integers(0, 99))
def test_spline_coupling_on_vectors_passes_the_kit(x, seed):
    layer = make_spline(x.shape[1], kernel_size=1, seed=seed)
    x = 2 * x
    assert_invertible(layer, x)
    assert_logdet_matches_jacobian(layer, x)
    assert_engine_gradients_match(layer, x)
    assert layer.output_shape((x.shape[1],)) == (x.shape[1],)


@settings(max_examples=6, deadline=None)
@given(pair=afs.conditional_states(st.integers(2, 4), st.integers(1, 3), max_size=3,
                                   dtype=st.just(F64)),
       seed=st.integers(0, 99))
def test_conditional_spline_coupling_passes_the_kit(pair, seed):
    x, c = pair
    layer = make_spline(x.shape[1], context_channels=c.shape[1], seed=seed)
    assert_invertible(layer, 2 * x, context=c)
    assert_logdet_matches_jacobian(layer, 2 * x, context=c)
    assert_engine_gradients_match(layer, 2 * x, context=c)
    # The context changes the map.
    assert not torch.allclose(layer(x, context=c)[0], layer(x, context=c + 1)[0])


def test_conditional_spline_coupling_on_vectors_passes_the_kit():
    layer = make_spline(5, kernel_size=1, context_channels=2)
    x, c = 2 * torch.randn(3, 5, dtype=F64), torch.randn(3, 2, dtype=F64)
    assert_invertible(layer, x, context=c)
    assert_logdet_matches_jacobian(layer, x, context=c)
    assert_engine_gradients_match(layer, x, context=c, inverse=True)


@pytest.mark.parametrize("inverse", [False, True])
def test_spline_reconstruction_calls_the_conditioner_once(inverse):
    check_reconstruction(make_spline(4), 2 * torch.randn(2, 4, 3, 3, dtype=F64),
                         inverse=inverse)


def test_spline_coupling_starts_as_the_identity_and_keeps_x0():
    layer = SplineCoupling(5).double()
    x = 4 * torch.randn(3, 5, 4, 4, dtype=F64)
    y, logdet = layer(x)
    assert (y - x).abs().max() < 1e-13 and logdet.abs().max() < 1e-12
    moved = make_spline(5, bound=3.0)
    y, _ = moved(x)
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.allclose(y[:, 2:], x[:, 2:])


def test_spline_coupling_is_the_spline_of_its_conditioner_output():
    layer = make_spline(3, bins=5, bound=2.5)
    x = 2 * torch.randn(2, 3, 3, 3, dtype=F64)
    out = layer.conditioner(x[:, :1])  # (2, 14 * 2, 3, 3), parameter-major
    params = out.unflatten(1, (14, 2)).movedim(1, -1)
    expected, log_derivative = rational_quadratic_spline(x[:, 1:], params, bound=2.5)
    y, logdet = layer(x)
    assert torch.allclose(y[:, 1:], expected, rtol=0, atol=1e-12)
    assert torch.allclose(logdet, log_derivative.flatten(1).sum(1), rtol=0, atol=1e-12)


def test_spline_coupling_options_and_errors():
    layer = SplineCoupling(6, bins=5, bound=4.0)
    assert layer.transform.bins == 5 and layer.transform.bound == 4.0
    assert layer.conditioner[-1].out_channels == 14 * 3
    assert "bins=5, bound=4.0" in repr(layer)
    with pytest.raises(AutoflowError, match="bins must be an int >= 1, received 0"):
        SplineCoupling(4, bins=0)
    with pytest.raises(AutoflowError, match="bound must be a positive finite number"):
        SplineCoupling(4, bound=-1.0)
    with pytest.raises(AutoflowError, match="channels must be an int >= 2"):
        SplineCoupling(1)
    bad = SplineCoupling(4, bins=2, conditioner=nn.Conv2d(2, 4, 1))
    with pytest.raises(ShapeError, match=r"conditioner must return the 5 parameters per element "
                                         r"of its SplineTransform as one tensor of shape "
                                         r"\(1, 10, 2, 2\), received \(1, 4, 2, 2\)"):
        bad(torch.zeros(1, 4, 2, 2))


def test_spline_coupling_in_float32():
    # Moderate parameters: extreme ones give slopes of 1e-7, where float32 cannot invert.
    # Even moderate draws lose up to ~4e-4 (relative) in float32 through the quadratic root
    # (measured over 30 seeds), so the round trip gets a float32 tolerance and fixed draws.
    torch.manual_seed(0)
    layer = randomize_conditioner(SplineCoupling(4, bins=8), scale=0.3)
    assert_invertible(layer, 2 * torch.randn(3, 4, 5, 5), rtol=1e-3)
    assert_engine_gradients_match(layer, 2 * torch.randn(3, 4, 5, 5))


# glow(coupling=...) ------------------------------------------------------------------------


@pytest.mark.parametrize(("coupling", "cls"), [
    ("affine", autoflow.AffineCoupling),
    ("additive", autoflow.AdditiveCoupling),
    ("spline", SplineCoupling),
])
def test_glow_builds_the_coupling_asked_for(coupling, cls):
    torch.manual_seed(0)
    flow = autoflow.glow(1, levels=2, depth_per_level=1, hidden_channels=4, coupling=coupling)
    kinds = {type(m) for m in flow.modules()
             if isinstance(m, (autoflow.AffineCoupling, autoflow.AdditiveCoupling,
                               SplineCoupling))}
    assert kinds == {cls}
    flow = randomize_conditioner(flow, scale=0.3).double()
    x = torch.randn(2, 1, 4, 4, dtype=F64)
    assert_invertible(flow, x)
    assert_logdet_matches_jacobian(flow.eval(), x)


def test_glow_default_coupling_is_affine():
    flow = autoflow.glow(1, levels=1, depth_per_level=1, hidden_channels=4)
    assert any(isinstance(m, autoflow.AffineCoupling) for m in flow.modules())


def test_vector_spline_glow_under_the_engine():
    torch.manual_seed(0)
    flow = autoflow.glow(3, levels=1, depth_per_level=2, hidden_channels=8, downsample=None,
                         kernel_size=1, coupling="spline", context_channels=2)
    flow = randomize_conditioner(flow, scale=0.5).double()
    x, c = 2 * torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    flow(x, context=c)  # ActNorm initialises from the first batch
    assert_engine_gradients_match(flow, x, context=c)


@pytest.mark.parametrize("coupling", ["Affine", "nsf", None, 1, ["spline"]])
def test_glow_refuses_other_couplings(coupling):
    with pytest.raises(AutoflowError, match=r"glow expected coupling in \('affine', 'additive', "
                                            r"'spline'\), received "):
        autoflow.glow(1, coupling=coupling)
