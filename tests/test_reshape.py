"""Tests of the Haar downsampling transform and the space-to-depth squeeze."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from autoflow.errors import AutoflowError, ShapeError
from autoflow.reshape import HaarDownsample, Squeeze
from autoflow.testing import assert_invertible, assert_logdet_matches_jacobian
from autoflow.testing import strategies as afs

fast = settings(max_examples=20, deadline=None)
modules = st.sampled_from([HaarDownsample, Squeeze])
even_states = afs.states(channels=st.integers(1, 3), max_size=6, multiple_of=2)


@fast
@given(x=even_states, cls=modules)
def test_round_trip_and_shapes(x: torch.Tensor, cls: type) -> None:
    module = cls(x.shape[1])
    assert module.volume_preserving and module.bijective
    assert_invertible(module, x)
    y, logdet = module(x)
    b, c, h, w = x.shape
    assert y.shape == (b, 4 * c, h // 2, w // 2)
    assert logdet.shape == (b,) and logdet.dtype == x.dtype and not logdet.any()


@fast
@given(x=afs.states(channels=st.integers(1, 2), max_size=4, multiple_of=2), cls=modules)
def test_logdet_matches_jacobian(x: torch.Tensor, cls: type) -> None:
    assert_logdet_matches_jacobian(cls(x.shape[1]), x)


@fast
@given(shape=afs.image_shapes(channels=st.integers(1, 2), max_size=4, multiple_of=2))
def test_haar_is_orthonormal(shape: tuple[int, int, int]) -> None:
    haar = HaarDownsample(shape[0])
    n = shape[0] * shape[1] * shape[2]

    def flat(v: torch.Tensor) -> torch.Tensor:
        return haar(v.view(1, *shape))[0].reshape(-1)

    jacobian = torch.autograd.functional.jacobian(flat, torch.zeros(n, dtype=torch.float64))
    torch.testing.assert_close(jacobian.T @ jacobian, torch.eye(n, dtype=torch.float64))


@fast
@given(x=even_states)
def test_haar_low_pass_band_is_twice_the_average(x: torch.Tensor) -> None:
    y, _ = HaarDownsample(x.shape[1])(x)
    torch.testing.assert_close(y[:, : x.shape[1]], 2 * F.avg_pool2d(x, 2))


@fast
@given(x=even_states)
def test_squeeze_matches_pixel_unshuffle(x: torch.Tensor) -> None:
    y, _ = Squeeze(x.shape[1])(x)
    assert torch.equal(y, F.pixel_unshuffle(x, 2))


@pytest.mark.parametrize("cls", [HaarDownsample, Squeeze])
def test_shape_methods(cls: type) -> None:
    module = cls(3)
    assert module.output_shape((3, 4, 6)) == (12, 2, 3)
    assert module.input_shape((12, 2, 3)) == (3, 4, 6)
    with pytest.raises(ShapeError, match=r"even height and width, received H=5, W=4"):
        module.output_shape((3, 5, 4))
    with pytest.raises(ShapeError, match="expected 12 channels"):
        module.input_shape((3, 2, 3))


@pytest.mark.parametrize("cls", [HaarDownsample, Squeeze])
@pytest.mark.parametrize(
    ("direction", "x", "match"),
    [
        ("forward", torch.randn(1, 2, 3, 4), r"even height and width, received H=3, W=4"),
        ("forward", torch.randn(1, 2, 4, 5), r"even height and width, received H=4, W=5"),
        ("forward", torch.randn(1, 3, 4, 4), "expected 2 channels.*received 3"),
        ("inverse", torch.randn(1, 2, 2, 2), "expected 8 channels.*received 2"),
        ("inverse", torch.randn(8, 2, 2), "4-D input"),
    ],
)
def test_rejects_bad_inputs(cls: type, direction: str, x: torch.Tensor, match: str) -> None:
    module = cls(2)
    with pytest.raises(ShapeError, match=match):
        getattr(module, direction)(x)


def test_haar_rejects_integer_input_and_bad_channels() -> None:
    with pytest.raises(AutoflowError, match="floating-point.*torch.int64"):
        HaarDownsample(1)(torch.ones(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(AutoflowError, match="channels must be an int >= 1, received 0"):
        Squeeze(0)
