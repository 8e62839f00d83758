"""MaskedCoupling: any mask, any elementwise bijection, through the kit; checkerboard_mask; the
elementwise transforms and their errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import autoflow
from autoflow import (
    AdditiveTransform,
    AffineTransform,
    AutoflowError,
    ElementwiseTransform,
    MaskedCoupling,
    ShapeError,
    SplineTransform,
    checkerboard_mask,
)
from autoflow.coupling import make_conditioner, soft_clamp
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

TRANSFORMS = {
    "affine": lambda: AffineTransform(clamp=1.5),
    "additive": AdditiveTransform,
    "spline": lambda: SplineTransform(4, bound=2.0),
}


def image_mask(kind: str, shape: tuple[int, int, int], seed: int) -> Tensor:
    c, h, w = shape
    if kind == "checkerboard":
        return checkerboard_mask(shape)
    if kind == "channels":
        return (torch.arange(c) >= c // 2)[:, None, None]
    # An arbitrary mask with both values, fixed size.
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask.view(-1)[0], mask.view(-1)[-1] = True, False
    return mask


def make_masked(channels: int, mask: Tensor, transform: str, *, context_channels: int = 0,
                kernel_size: int = 3, seed: int = 0) -> MaskedCoupling:
    torch.manual_seed(seed)
    layer = MaskedCoupling(channels, mask, transform=TRANSFORMS[transform](), hidden_channels=4,
                           kernel_size=kernel_size, context_channels=context_channels)
    return randomize_conditioner(layer, scale=0.8, seed=seed).double()


# Through the kit ---------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(x=afs.states(st.integers(2, 3), min_size=2, max_size=3, dtype=st.just(F64)),
       mask_kind=st.sampled_from(["checkerboard", "channels", "arbitrary"]),
       transform=st.sampled_from(sorted(TRANSFORMS)), seed=st.integers(0, 99))
def test_masked_coupling_on_images_passes_the_kit(x, mask_kind, transform, seed):
    mask = image_mask(mask_kind, tuple(x.shape[1:]), seed)
    layer = make_masked(x.shape[1], mask, transform, seed=seed)
    x = 2 * x
    assert_invertible(layer, x)
    assert_logdet_matches_jacobian(layer, x)
    assert_engine_gradients_match(layer, x)
    assert_engine_gradients_match(layer, x, inverse=True)


@settings(max_examples=8, deadline=None)
@given(x=afs.vector_states(st.integers(2, 6), dtype=st.just(F64)),
       transform=st.sampled_from(sorted(TRANSFORMS)), invert=st.booleans(),
       seed=st.integers(0, 99))
def test_masked_coupling_on_vectors_passes_the_kit(x, transform, invert, seed):
    mask = checkerboard_mask((x.shape[1],), invert=invert)
    layer = make_masked(x.shape[1], mask, transform, kernel_size=1, seed=seed)
    assert_invertible(layer, 2 * x)
    assert_logdet_matches_jacobian(layer, 2 * x)
    assert_engine_gradients_match(layer, 2 * x)


@settings(max_examples=8, deadline=None)
@given(pair=afs.conditional_states(st.integers(2, 3), st.integers(1, 2), min_size=2,
                                   max_size=3, dtype=st.just(F64)),
       transform=st.sampled_from(sorted(TRANSFORMS)), seed=st.integers(0, 99))
def test_conditional_masked_coupling_passes_the_kit(pair, transform, seed):
    x, c = pair
    layer = make_masked(x.shape[1], checkerboard_mask((1, *x.shape[2:])), transform,
                        context_channels=c.shape[1], seed=seed)
    assert_invertible(layer, 2 * x, context=c)
    assert_logdet_matches_jacobian(layer, 2 * x, context=c)
    assert_engine_gradients_match(layer, 2 * x, context=c)
    assert not torch.allclose(layer(x, context=c)[0], layer(x, context=c + 1)[0])


def test_conditional_masked_coupling_on_vectors():
    layer = make_masked(4, checkerboard_mask((4,)), "spline", context_channels=3,
                        kernel_size=1)
    x, c = 2 * torch.randn(3, 4, dtype=F64), torch.randn(3, 3, dtype=F64)
    assert_invertible(layer, x, context=c)
    assert_logdet_matches_jacobian(layer, x, context=c)
    assert_engine_gradients_match(layer, x, context=c, inverse=True)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_reconstruction_calls_the_conditioner_once(transform, inverse):
    layer = make_masked(3, checkerboard_mask((3, 4, 4)), transform)
    check_reconstruction(layer, 2 * torch.randn(2, 3, 4, 4, dtype=F64), inverse=inverse)


# What the mask means -----------------------------------------------------------------------


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_only_the_masked_elements_change_and_only_the_others_condition(transform):
    mask = image_mask("arbitrary", (3, 4, 5), 1)
    layer = make_masked(3, mask, transform)
    x = 2 * torch.randn(2, 3, 4, 5, dtype=F64)
    y, _ = layer(x)
    assert torch.equal(y[:, ~mask], x[:, ~mask])
    assert (y[:, mask] - x[:, mask]).abs().min() > 0 or transform == "spline"
    assert not torch.allclose(y[:, mask], x[:, mask])
    # Changing a transformed element changes nothing else; changing a kept one changes the map.
    bumped = x.clone()
    bumped[:, mask] += 0.1
    y2, _ = layer(bumped)
    assert torch.equal(y2[:, ~mask], y[:, ~mask])
    if transform != "additive":
        changed = (y2[:, mask] - y[:, mask]).abs()
        assert changed.max() > 0
    kept_bump = x.clone()
    kept_bump[:, ~mask] += 0.1
    y3, _ = layer(kept_bump)
    assert not torch.allclose(y3[:, mask], y[:, mask])


def test_affine_through_the_mask_is_eqs_3_to_5_on_the_masked_elements():
    mask = checkerboard_mask((2, 3, 3))
    layer = make_masked(2, mask, "affine")
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    out = layer.conditioner(x.masked_fill(mask, 0))  # (B, 2 * C, H, W): s then t
    s, t = soft_clamp(out[:, :2], 1.5), out[:, 2:]
    y, logdet = layer(x)
    expected = torch.where(mask, torch.exp(s) * x + t, x)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)
    assert torch.allclose(logdet, (s * mask).flatten(1).sum(1), rtol=0, atol=1e-12)


def test_a_mask_and_its_complement_transform_every_element():
    mask = checkerboard_mask((2, 4, 4))
    flow = autoflow.Sequential(make_masked(2, mask, "affine"),
                               make_masked(2, ~mask, "affine", seed=1))
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    y, _ = flow(x)
    assert ((y - x).abs() > 0).all()
    assert_invertible(flow, x)


def test_channel_mask_takes_any_image_size():
    layer = make_masked(4, (torch.arange(4) >= 2)[:, None, None], "affine")
    for size in [(1, 1), (3, 5)]:
        assert_invertible(layer, torch.randn(2, 4, *size, dtype=F64))
        assert layer.output_shape((4, *size)) == (4, *size)


def test_a_user_written_elementwise_transform_passes_the_kit():
    class SoftplusAffine(ElementwiseTransform):
        params_per_element = 2

        def forward(self, x, params):
            scale = F.softplus(params[..., 0]) + 1e-3
            return scale * x + params[..., 1], scale.log()

        def inverse(self, y, params):
            scale = F.softplus(params[..., 0]) + 1e-3
            return (y - params[..., 1]) / scale, -scale.log()

    torch.manual_seed(0)
    layer = MaskedCoupling(3, checkerboard_mask((3, 3, 3)), transform=SoftplusAffine(),
                           hidden_channels=4)
    layer = randomize_conditioner(layer).double()
    x = torch.randn(2, 3, 3, 3, dtype=F64)
    assert_invertible(layer, x)
    assert_logdet_matches_jacobian(layer, x)
    assert_engine_gradients_match(layer, x)


def test_coupling_with_a_transform_is_volume_preserving_when_the_transform_is():
    additive = MaskedCoupling(2, checkerboard_mask((2,)), transform=AdditiveTransform())
    assert additive.volume_preserving
    assert not MaskedCoupling(2, checkerboard_mask((2,))).volume_preserving
    _, logdet = randomize_conditioner(additive)(torch.randn(3, 2))
    assert torch.equal(logdet, torch.zeros(3))


# checkerboard_mask and the transforms ------------------------------------------------------


def test_checkerboard_mask():
    mask = checkerboard_mask((2, 3, 4))
    assert mask.dtype == torch.bool and mask.shape == (2, 3, 4)
    assert torch.equal(mask[0], mask[1])
    assert mask[0, 0, 0] and not mask[0, 0, 1] and not mask[0, 1, 0] and mask[0, 1, 1]
    assert torch.equal(checkerboard_mask((2, 3, 4), invert=True), ~mask)
    assert checkerboard_mask((5,)).tolist() == [True, False, True, False, True]


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (((2, 3),), {}, r"expected a shape \(C, H, W\) or \(D,\), received \(2, 3\)"),
    ((4,), {}, r"expected a shape \(C, H, W\) or \(D,\), received 4"),
    (((0,),), {}, "sizes must be an int >= 1, received 0"),
    (((2, 2.0, 2),), {}, "sizes must be an int >= 1, received 2.0"),
    (((4,),), {"invert": "yes"}, "invert must be a bool"),
])
def test_checkerboard_mask_refuses_bad_arguments(args, kwargs, match):
    with pytest.raises(AutoflowError, match=match):
        checkerboard_mask(*args, **kwargs)


def test_elementwise_transforms_directly():
    x = torch.tensor([1.0, -2.0])
    y, ld = AffineTransform()(x, torch.tensor([[0.0, 1.0], [100.0, 0.0]]))
    assert torch.allclose(y, torch.tensor([2.0, -2.0 * torch.exp(torch.tensor(2.0))]))
    assert torch.allclose(ld, torch.tensor([0.0, 2.0]))
    x_back, ld_inv = AffineTransform().inverse(y, torch.tensor([[0.0, 1.0], [100.0, 0.0]]))
    assert torch.allclose(x_back, x) and torch.allclose(ld_inv, -ld)
    y, ld = AdditiveTransform()(x, torch.ones(2, 1))
    assert y.tolist() == [2.0, -1.0] and ld.tolist() == [0.0, 0.0]
    # The atan clamp is used, not just stored: 2 * (2/pi) * atan(1/2) for s = 1, clamp 2.
    _, ld = AffineTransform(clamp_kind="atan")(x, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(ld, torch.full((2,), 4 / math.pi * math.atan(0.5)))
    with pytest.raises(ShapeError, match=r"AdditiveTransform expected parameters of shape "
                                         r"x.shape \+ \(1,\) = \(2, 1\), received \(2,\)"):
        AdditiveTransform()(x, torch.ones(2))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clamp": 0.0}, "AffineTransform clamp must be a positive finite number, received 0.0"),
    ({"clamp": True}, "clamp must be a positive finite number, received True"),
    ({"clamp_kind": "sigmoid"}, r"clamp_kind must be one of \('tanh', 'atan'\), received"),
])
def test_affine_transform_validates(kwargs, match):
    with pytest.raises(AutoflowError, match=match):
        AffineTransform(**kwargs)


# Bad arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "match"), [
    (torch.ones(4, 3, 3), "mask must be a bool tensor .*, received a torch.float32 tensor"),
    ([True, False, True, False], "mask must be a bool tensor .*, received list"),
    (torch.ones(4, 3, 3, dtype=torch.bool), r"some to keep \(False\), received all True"),
    (torch.zeros(4, dtype=torch.bool), r"some elements to transform \(True\).*received all "
                                       "False"),
    (torch.ones(3, dtype=torch.bool), r"mask must have shape \(4,\) for vectors with "
                                      r"channels=4, received \(3,\)"),
    (checkerboard_mask((2, 3, 3)), r"mask must have shape \(4 or 1, H or 1, W or 1\) for "
                                   r"images with channels=4, received \(2, 3, 3\)"),
    (torch.ones(4, 3, dtype=torch.bool), r"\(4,\) for vectors or \(4 or 1, H or 1, W or 1\)"),
])
def test_masked_coupling_refuses_bad_masks(mask, match):
    with pytest.raises(AutoflowError, match=match):
        MaskedCoupling(4, mask)


def test_masked_coupling_refuses_bad_arguments():
    mask = checkerboard_mask((4,))
    with pytest.raises(AutoflowError, match="transform must be an ElementwiseTransform .*"
                                            "received Tanh"):
        MaskedCoupling(4, mask, transform=nn.Tanh())
    with pytest.raises(AutoflowError, match="both a conditioner and hidden_channels"):
        MaskedCoupling(4, mask, conditioner=nn.Identity(), hidden_channels=3)
    with pytest.raises(AutoflowError, match="channels must be an int >= 1, received 0"):
        MaskedCoupling(0, mask)
    with pytest.raises(AutoflowError, match="context_channels must be an int >= 0"):
        MaskedCoupling(4, mask, context_channels=-1)
    with pytest.raises(AutoflowError, match=r"transform= replaces the built-in affine map"):
        autoflow.Coupling(make_conditioner(2, 4, 4), transform=AffineTransform(), additive=True)
    with pytest.raises(AutoflowError, match=r"transform must be an ElementwiseTransform or None"):
        autoflow.Coupling(make_conditioner(2, 4, 4), transform="spline")


def test_masked_coupling_refuses_inputs_that_do_not_fit_the_mask():
    layer = MaskedCoupling(2, checkerboard_mask((2, 4, 4)))
    with pytest.raises(ShapeError, match=r"mask of shape \(2, 4, 4\) does not broadcast to an "
                                         r"input of shape \(B, 2, 3, 4\); it fits \(B, 2, 4, 4\) "
                                         "images"):
        layer(torch.randn(1, 2, 3, 4))
    with pytest.raises(ShapeError, match=r"does not broadcast to an input of shape \(B, 2\)"):
        layer.inverse(torch.randn(1, 2))
    with pytest.raises(ShapeError, match=r"does not broadcast to an input of shape \(B, 2, 5, 5\)"):
        layer.output_shape((2, 5, 5))
    with pytest.raises(ShapeError, match="expected 2 channels in its input, received 3"):
        layer(torch.randn(1, 3, 4, 4))
    vectors = MaskedCoupling(2, checkerboard_mask((2,)))
    with pytest.raises(ShapeError, match=r"mask of shape \(2,\) .* it fits \(B, 2\) vectors"):
        vectors(torch.randn(1, 2, 1, 1))


def test_masked_coupling_reports_a_wrong_conditioner_output():
    layer = MaskedCoupling(2, checkerboard_mask((2, 4, 4)), transform=SplineTransform(2),
                           conditioner=nn.Conv2d(2, 4, 1))
    with pytest.raises(ShapeError, match=r"conditioner must return the 5 parameters per element "
                                         r"of its SplineTransform as one tensor of shape "
                                         r"\(B, 5 \* 2, H, W\) \(B = 1, the input's own H and "
                                         r"W\), received \(1, 4, 4, 4\)"):
        layer(torch.randn(1, 2, 4, 4))
    shrinking = MaskedCoupling(2, checkerboard_mask((2, 4, 4)), conditioner=nn.Conv2d(2, 4, 3))
    with pytest.raises(ShapeError, match=r"received \(1, 4, 2, 2\)"):
        shrinking(torch.randn(1, 2, 4, 4))


def test_a_transform_returning_the_wrong_shape_is_named():
    class Broken(ElementwiseTransform):
        params_per_element = 1

        def forward(self, x, params):
            return x + params[..., 0], torch.zeros(x.shape[0])

        def inverse(self, y, params):
            return y - params[..., 0], torch.zeros(y.shape[0])

    layer = MaskedCoupling(2, checkerboard_mask((2,)), transform=Broken())
    with pytest.raises(ShapeError, match=r"Broken.forward must return a log-derivative shaped "
                                         r"like its input \(3, 1\), received \(3,\)"):
        layer(torch.randn(3, 2))
    with pytest.raises(ShapeError, match=r"Broken.inverse must return a log-derivative"):
        layer.inverse(torch.randn(3, 2))

    class WrongOutput(Broken):
        def forward(self, x, params):
            return x.sum(-1), torch.zeros_like(x)

    layer = MaskedCoupling(2, checkerboard_mask((2,)), transform=WrongOutput())
    with pytest.raises(ShapeError, match=r"WrongOutput.forward must return an output shaped "
                                         r"like its input \(3, 1\), received \(3,\)"):
        layer(torch.randn(3, 2))
