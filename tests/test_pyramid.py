"""The Laplacian pyramid decomposes and composes exactly, for any operators, and checks shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from autoflow.base import require_bijective
from autoflow.errors import AutoflowError, NotBijectiveError, ShapeError
from autoflow.pyramid import LaplacianPyramid, gaussian_up
from autoflow.testing import assert_engine_gradients_match, assert_invertible
from autoflow.testing import strategies as afs

KINDS = ["gaussian", "maxpool", "blur_maxpool"]
# The kinds whose padding keeps constants (blur_maxpool zero-pads, as the public code does).
CONSTANT_KEEPING_KINDS = ["gaussian", "maxpool"]


@st.composite
def pyramid_inputs(draw, max_levels: int = 4, dtype=None):
    """A pyramid (random level count and kind) and an input whose size it divides."""
    levels = draw(st.integers(1, max_levels))
    x = draw(afs.states(st.integers(1, 3), min_size=1, max_size=2 ** (levels - 1) * 3,
                        multiple_of=2 ** (levels - 1), dtype=dtype))
    return LaplacianPyramid(levels, kind=draw(st.sampled_from(KINDS))), x


@settings(max_examples=25, deadline=None)
@given(case=pyramid_inputs())
def test_round_trip_is_exact_and_shapes_agree(case):
    pyramid, x = case
    # Checks the round trip (1e-10 in float64, 1e-4 in float32) and output_shape/input_shape.
    assert_invertible(pyramid, x)
    levels, logdet = pyramid(x)
    assert logdet is None and pyramid.inverse(levels)[1] is None
    b, c, h, w = x.shape
    assert [tuple(t.shape) for t in levels] == [
        (b, c, h >> d, w >> d) for d in range(pyramid.levels)
    ]


@settings(max_examples=10, deadline=None)
@given(case=pyramid_inputs(dtype=st.just(torch.float64)))
def test_composition_is_exact_for_arbitrary_operators(case):
    pyramid, x = case
    # Nonlinear, non-matching operators: the recursive composition does not care.
    custom = LaplacianPyramid(
        pyramid.levels,
        down=lambda t: torch.tanh(F.avg_pool2d(t, 2)) ** 3,
        up=lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest") * 0.7 + 1.0,
    )
    assert_invertible(custom, x)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_reconstruction_within_1e_10(kind):
    x = torch.randn(3, 2, 16, 24, dtype=torch.float64)
    pyramid = LaplacianPyramid(4, kind=kind)
    restored, _ = pyramid.inverse(pyramid(x)[0])
    assert (restored - x).abs().max() <= 1e-10 * x.abs().max()


def test_gaussian_composition_unrolls_to_eq_2():
    # With a linear U the recursion equals x = sum_d U^d(x_d) (eq. 2).
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    levels, _ = LaplacianPyramid(3)(x)
    total = torch.zeros_like(x)
    for d, level in enumerate(levels):
        for _ in range(d):
            level = gaussian_up(level)
        total = total + level
    assert torch.allclose(total, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", CONSTANT_KEEPING_KINDS)
def test_constant_image_has_zero_details(kind):
    # Both operator pairs keep constants, so all detail levels vanish (even 1-pixel levels,
    # where the Gaussian blur's reflect padding has to fold more than once).
    x = torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)
    levels, _ = LaplacianPyramid(4, kind=kind)(x)
    for detail in levels[:-1]:
        assert detail.abs().max() < 1e-12
    assert torch.allclose(levels[-1], torch.full((1, 2, 1, 1), 3.0, dtype=torch.float64))


def test_maxpool_kind_uses_max_pool_and_bilinear_upsampling():
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    fine, coarse = LaplacianPyramid(2, kind="maxpool")(x)[0]
    assert torch.equal(coarse, F.max_pool2d(x, 2))
    up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(fine, x - up)


def _zero_padded_binomial_blur(x):
    # The full 5x5 kernel in one conv, independent of the library's separable passes.
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype)
    kernel = (taps[:, None] * taps[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(x, kernel, padding=2, groups=x.shape[1])


def test_blur_maxpool_kind_matches_the_public_code_operators():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fine, coarse = LaplacianPyramid(2, kind="blur_maxpool")(x)[0]
    expected_coarse = F.max_pool2d(_zero_padded_binomial_blur(x), 2)
    assert torch.allclose(coarse, expected_coarse, rtol=0, atol=1e-12)
    up = _zero_padded_binomial_blur(F.interpolate(coarse, scale_factor=2, mode="nearest"))
    assert torch.allclose(fine, x - up, rtol=0, atol=1e-12)


def test_one_level_is_the_identity():
    x = torch.randn(2, 3, 5, 7)
    levels, _ = LaplacianPyramid(1)(x)
    assert len(levels) == 1 and torch.equal(levels[0], x)


def test_pyramid_is_not_bijective_and_differentiable_through_the_engine():
    pyramid = LaplacianPyramid(3)
    assert pyramid.bijective is False
    with pytest.raises(NotBijectiveError, match="left-invertible"):
        require_bijective(pyramid)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert_engine_gradients_match(pyramid, x)
    assert_engine_gradients_match(pyramid, pyramid(x)[0], inverse=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 6, 8), (1, 1, 8, 12), (2, 3, 4, 8)])
def test_indivisible_sizes_are_refused(kind, shape):
    pyramid = LaplacianPyramid(4, kind=kind)
    with pytest.raises(ShapeError, match=r"4 levels .* 2\^3 = 8, received shape"):
        pyramid(torch.zeros(shape))
    with pytest.raises(ShapeError, match=r"2\^3 = 8"):
        pyramid.output_shape(shape[1:])


@pytest.mark.parametrize(
    ("levels", "match"),
    [
        ("tensor", "expected a tuple of 3 levels, received Tensor"),
        ("two", "expected 3 level shapes"),
        ("channels", r"level 2 should have shape \(2, 2, 2\).*received \(1, 2, 2\)"),
        ("size", r"level 1 should have shape \(2, 4, 4\).*received \(2, 4, 3\)"),
        ("batch", r"same batch size in every level, received \[2, 2, 1\]"),
        ("rank", r"4-D level 1 .* received shape \(2, 4, 4\)"),
    ],
)
def test_inverse_validates_the_levels(levels, match):
    good = [torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 2, 2)]
    bad = {
        "tensor": good[0],
        "two": tuple(good[:2]),
        "channels": (*good[:2], torch.zeros(2, 1, 2, 2)),
        "size": (good[0], torch.zeros(2, 2, 4, 3), good[2]),
        "batch": (*good[:2], torch.zeros(1, 2, 2, 2)),
        "rank": (good[0], torch.zeros(2, 4, 4), good[2]),
    }[levels]
    with pytest.raises(ShapeError, match=match):
        LaplacianPyramid(3).inverse(bad)


def test_shape_methods():
    pyramid = LaplacianPyramid(3)
    shapes = pyramid.output_shape((5, 8, 16))
    assert shapes == ((5, 8, 16), (5, 4, 8), (5, 2, 4))
    assert pyramid.input_shape(shapes) == (5, 8, 16)
    with pytest.raises(ShapeError, match=r"expected a \(C, H, W\) shape"):
        pyramid.output_shape((8, 16))
    with pytest.raises(ShapeError, match="level 1 should have shape"):
        pyramid.input_shape(((5, 8, 16), (5, 8, 16), (5, 2, 4)))


def test_custom_operator_with_wrong_shape_is_reported():
    pyramid = LaplacianPyramid(2, down=lambda t: t)
    with pytest.raises(ShapeError, match=r"down operator mapped shape \(1, 1, 4, 4\) to "
                                         r"\(1, 1, 4, 4\), expected \(1, 1, 2, 2\)"):
        pyramid(torch.zeros(1, 1, 4, 4))


def test_module_operators_are_registered():
    down = torch.nn.AvgPool2d(2)
    pyramid = LaplacianPyramid(2, down=down)
    assert pyramid.down is down and "down" in dict(pyramid.named_children())
    assert pyramid.up is gaussian_up


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"levels": 0}, "levels must be an int >= 1, received 0"),
        ({"levels": 2.0}, "levels must be an int >= 1, received 2.0"),
        ({"levels": True}, "levels must be an int >= 1, received True"),
        ({"kind": "laplace"},
         r"kind must be one of \['gaussian', 'maxpool', 'blur_maxpool'\], received 'laplace'"),
        ({"down": 3}, "down must be callable or None, received int"),
        ({"up": "bilinear"}, "up must be callable or None, received str"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(AutoflowError, match=match):
        LaplacianPyramid(**kwargs)
