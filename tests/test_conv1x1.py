"""Tests of the PLU invertible 1x1 convolution and the lifting 1x1 convolution."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoflow.base import require_bijective
from autoflow.conv1x1 import InvConv1x1, LiftingConv1x1
from autoflow.errors import AutoflowError, NotBijectiveError, ShapeError
from autoflow.testing import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
)
from autoflow.testing import strategies as afs

seeds = st.integers(0, 2**31 - 1)
fast = settings(max_examples=20, deadline=None)


def perturbed(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter off its initial value so the checks see a generic map."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.add_(scale * noise.to(p.dtype))
    return module


def make_conv(channels: int, seed: int, dtype: torch.dtype, **kwargs: bool) -> InvConv1x1:
    torch.manual_seed(seed)
    return perturbed(InvConv1x1(channels, **kwargs), seed).to(dtype)


# ---------------------------------------------------------------- InvConv1x1


@fast
@given(x=afs.states(channels=st.integers(1, 4), max_size=5), seed=seeds, vn=st.booleans())
def test_invconv_round_trip(x: torch.Tensor, seed: int, vn: bool) -> None:
    conv = make_conv(x.shape[1], seed, x.dtype, volume_norm=vn)
    assert_invertible(conv, x)


@fast
@given(
    x=afs.states(channels=st.integers(1, 2), max_size=4, dtype=afs.dtypes(torch.float64)),
    seed=seeds,
    vn=st.booleans(),
)
def test_invconv_logdet_matches_jacobian(x: torch.Tensor, seed: int, vn: bool) -> None:
    assert_logdet_matches_jacobian(make_conv(x.shape[1], seed, x.dtype, volume_norm=vn), x)


@fast
@given(channels=st.integers(1, 6), seed=seeds)
def test_weight_is_product_of_factors_and_logdet_is_sum_of_s(channels: int, seed: int) -> None:
    conv = make_conv(channels, seed, torch.float64)
    eye = torch.eye(channels, dtype=torch.float64)
    lower = torch.tril(conv.lower, -1) + eye
    upper = torch.triu(conv.upper, 1) + torch.diag(conv.sign * conv.log_scale.exp())
    weight = conv.weight().detach()
    torch.testing.assert_close(weight, conv.perm @ lower @ upper, rtol=1e-12, atol=1e-12)
    logabsdet = torch.linalg.slogdet(weight).logabsdet
    torch.testing.assert_close(logabsdet, conv.log_scale.detach().sum(), rtol=1e-10, atol=1e-10)
    inverse = conv.inverse_weight().detach()
    torch.testing.assert_close(inverse @ weight, eye, rtol=0, atol=1e-10)


@fast
@given(channels=st.integers(1, 6), _torch_state=st.random_module())
def test_permutation_and_sign_are_frozen_buffers(channels: int, _torch_state) -> None:
    conv = InvConv1x1(channels)
    buffers = dict(conv.named_buffers())
    assert {"perm", "sign"} <= buffers.keys()
    assert set(dict(conv.named_parameters())) == {"lower", "upper", "log_scale"}
    perm = buffers["perm"]
    assert torch.equal(perm.sum(0), torch.ones(channels)) and torch.equal(perm.sum(1), perm.sum(0))
    assert set(buffers["sign"].abs().tolist()) == {1.0}


def test_init_is_orthogonal_and_repeatable_under_manual_seed() -> None:
    torch.manual_seed(3)
    a = InvConv1x1(5).weight().detach()
    torch.manual_seed(3)
    b = InvConv1x1(5).weight().detach()
    c = InvConv1x1(5).weight().detach()
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a @ a.T, torch.eye(5), rtol=0, atol=1e-5)


@fast
@given(x=afs.states(channels=st.integers(2, 4), max_size=4), seed=seeds)
def test_volume_norm_conv_has_zero_logdet(x: torch.Tensor, seed: int) -> None:
    conv = make_conv(x.shape[1], seed, x.dtype, volume_norm=True)
    assert conv.volume_preserving
    _, logdet = conv(x)
    assert logdet.abs().max() < 1e-5
    s = conv.effective_log_scale().detach()
    assert abs(s.sum().item()) < 1e-5
    logabsdet = torch.linalg.slogdet(conv.weight().detach().double()).logabsdet
    assert abs(logabsdet.item()) < 1e-5
    assert not InvConv1x1(x.shape[1]).volume_preserving


def test_gradients_reach_parameters_and_respect_masks() -> None:
    conv = perturbed(InvConv1x1(3), 0)
    y, logdet = conv(torch.randn(2, 3, 2, 2))
    (y.square().sum() + logdet.sum()).backward()
    assert conv.log_scale.grad is not None and conv.log_scale.grad.abs().sum() > 0
    assert torch.all(torch.triu(conv.lower.grad) == 0)
    assert torch.all(torch.tril(conv.upper.grad) == 0)


def test_logdet_follows_input_dtype_and_shape() -> None:
    conv = InvConv1x1(2).double()
    _, logdet = conv(torch.randn(3, 2, 2, 5, dtype=torch.float64))
    assert logdet.shape == (3,) and logdet.dtype == torch.float64


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(2, 3, 4, 4), ShapeError, "expected 4 channels.*received 3"),
        (torch.randn(4, 4, 4), ShapeError, "4-D input"),
        (torch.randn(1, 4, 2, 2, dtype=torch.float64), AutoflowError, "torch.float32.*float64"),
    ],
)
def test_invconv_rejects_bad_inputs(x: torch.Tensor, error: type, match: str) -> None:
    conv = InvConv1x1(4)
    with pytest.raises(error, match=match):
        conv(x)
    with pytest.raises(error, match=match):
        conv.inverse(x)


@pytest.mark.parametrize("volume_norm", ["none", "channel", 1, None])
def test_invconv_volume_norm_must_be_a_bool(volume_norm: object) -> None:
    # A coupling's mode string ("none") must not silently switch normalisation on.
    message = f"volume_norm must be a bool, received {volume_norm!r}"
    with pytest.raises(AutoflowError, match=message):
        InvConv1x1(4, volume_norm=volume_norm)


@pytest.mark.parametrize("channels", [0, -1, 2.0, True])
def test_invconv_rejects_bad_channels(channels: object) -> None:
    with pytest.raises(AutoflowError, match="must be an int >= 1"):
        InvConv1x1(channels)  # type: ignore[arg-type]


def test_invconv_shape_methods() -> None:
    conv = InvConv1x1(3)
    assert conv.output_shape((3, 5, 7)) == (3, 5, 7) == conv.input_shape((3, 5, 7))
    with pytest.raises(ShapeError, match="expected 3 channels"):
        conv.output_shape((2, 5, 7))


# ---------------------------------------------------------------- InvConv1x1(lu=False)


@fast
@given(x=afs.states(channels=st.integers(1, 4), max_size=4), seed=seeds, vn=st.booleans())
def test_plain_invconv_round_trip(x: torch.Tensor, seed: int, vn: bool) -> None:
    assert_invertible(make_conv(x.shape[1], seed, x.dtype, volume_norm=vn, lu=False), x)


@settings(max_examples=6, deadline=None)
@given(
    x=afs.states(channels=st.integers(1, 3), max_size=3, dtype=afs.dtypes(torch.float64)),
    seed=seeds,
    vn=st.booleans(),
)
def test_plain_invconv_logdet_matches_jacobian_and_engine(x: torch.Tensor, seed: int,
                                                         vn: bool) -> None:
    conv = make_conv(x.shape[1], seed, x.dtype, volume_norm=vn, lu=False)
    assert_logdet_matches_jacobian(conv, x)
    assert_engine_gradients_match(conv, x)


@settings(max_examples=10, deadline=None)
@given(x=afs.vector_states(st.integers(1, 5), dtype=afs.dtypes(torch.float64)), seed=seeds)
def test_plain_invconv_on_vectors_passes_the_kit(x: torch.Tensor, seed: int) -> None:
    conv = make_conv(x.shape[1], seed, x.dtype, lu=False)
    assert_invertible(conv, x)
    assert_logdet_matches_jacobian(conv, x)
    assert_engine_gradients_match(conv, x, inverse=True)


def test_plain_invconv_is_the_matrix_with_slogdet() -> None:
    torch.manual_seed(3)
    conv = perturbed(InvConv1x1(4, lu=False), 0).double()
    assert set(dict(conv.named_parameters())) == {"matrix"} and not list(conv.buffers())
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y, logdet = conv(x)
    matrix = conv.matrix.detach()
    torch.testing.assert_close(y, torch.einsum("ij,bjhw->bihw", matrix, x))
    expected = 15 * torch.linalg.slogdet(matrix).logabsdet
    torch.testing.assert_close(logdet, expected.expand(2), rtol=1e-12, atol=1e-12)
    assert abs(expected.item()) > 0.1  # perturbed off the orthogonal start
    assert "lu=False" in repr(conv) and "lu=False" not in repr(InvConv1x1(4))


def test_plain_invconv_starts_orthogonal_and_repeatable_under_manual_seed() -> None:
    torch.manual_seed(3)
    a = InvConv1x1(5, lu=False)
    torch.manual_seed(3)
    b = InvConv1x1(5)
    w = a.weight().detach()
    torch.testing.assert_close(w @ w.T, torch.eye(5), rtol=0, atol=1e-5)
    torch.testing.assert_close(w, b.weight().detach(), rtol=0, atol=1e-5)  # same draw as LU
    _, logdet = a(torch.randn(2, 5, 2, 2))
    assert logdet.abs().max() < 1e-4


def test_plain_invconv_volume_norm_has_zero_logdet() -> None:
    conv = perturbed(InvConv1x1(3, lu=False, volume_norm=True), 0).double()
    assert conv.volume_preserving
    assert abs(torch.linalg.slogdet(conv.weight().detach()).logabsdet.item()) < 1e-12
    _, logdet = conv(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))


def test_plain_invconv_has_no_lu_log_scale_and_lu_is_a_bool() -> None:
    with pytest.raises(AutoflowError, match=r"lu=False\) has no LU log-scale"):
        InvConv1x1(3, lu=False).effective_log_scale()
    for value in ("no", 0, None):
        with pytest.raises(AutoflowError, match=f"InvConv1x1 lu must be a bool, received "
                                                f"{value!r}"):
            InvConv1x1(3, lu=value)  # type: ignore[arg-type]
    default = InvConv1x1(3)
    assert default.lu and {"lower", "upper", "log_scale"} <= set(dict(default.named_parameters()))
    with pytest.raises(AutoflowError, match="torch.float32.*float64"):
        InvConv1x1(3, lu=False)(torch.randn(1, 3, 2, 2, dtype=torch.float64))


# ---------------------------------------------------------------- LiftingConv1x1


@st.composite
def lifting_cases(draw: st.DrawFn, max_size: int = 4) -> tuple[LiftingConv1x1, torch.Tensor]:
    in_channels = draw(st.integers(1, 3))
    channels = draw(st.integers(in_channels, 5))
    x = draw(afs.states(channels=in_channels, max_size=max_size))
    seed = draw(seeds)
    torch.manual_seed(seed)
    lift = perturbed(LiftingConv1x1(channels, in_channels=in_channels), seed).to(x.dtype)
    return lift, x


@fast
@given(case=lifting_cases())
def test_lifting_round_trip(case: tuple[LiftingConv1x1, torch.Tensor]) -> None:
    lift, x = case
    assert_invertible(lift, x)
    y, _ = lift(x)
    assert y.shape == (x.shape[0], lift.channels, *x.shape[2:])


@fast
@given(case=lifting_cases(max_size=2))
def test_lifting_logdet_is_embedding_volume(case: tuple[LiftingConv1x1, torch.Tensor]) -> None:
    lift, x = case
    assert_logdet_matches_jacobian(lift, x.double())
    w = lift.weight.detach().double()
    _, logdet = lift.double()(x.double())
    expected = x.shape[2] * x.shape[3] * 0.5 * torch.logdet(w.T @ w)
    torch.testing.assert_close(logdet, expected.expand(x.shape[0]), rtol=1e-10, atol=1e-10)


@fast
@given(case=lifting_cases(), seed=seeds)
def test_lifting_inverse_is_least_squares(
    case: tuple[LiftingConv1x1, torch.Tensor], seed: int
) -> None:
    lift, x = case
    lift = lift.double()
    # A generic y is not in the range of W, so this checks the projection, not a round trip.
    y = afs.tensor_of((x.shape[0], lift.channels, *x.shape[2:]), torch.float64, seed)
    x_hat, _ = lift.inverse(y)
    pinv = torch.linalg.pinv(lift.weight.detach())
    expected = torch.einsum("ij,bjhw->bihw", pinv, y)
    torch.testing.assert_close(x_hat, expected, rtol=1e-9, atol=1e-9)


def test_lifting_is_orthogonal_at_init_and_not_bijective() -> None:
    lift = LiftingConv1x1(6)
    w = lift.weight.detach()
    torch.testing.assert_close(w.T @ w, torch.eye(3), rtol=0, atol=1e-5)
    assert not lift.bijective
    with pytest.raises(NotBijectiveError, match="LiftingConv1x1"):
        require_bijective(lift)


@pytest.mark.parametrize("column", [1, 2])
def test_lifting_singular_weight_raises(column: int) -> None:
    lift = LiftingConv1x1(5, in_channels=3)
    with torch.no_grad():
        lift.weight[:, column] = lift.weight[:, 0]
    message = "full column rank 3.*received rank 2.*smallest singular value"
    with pytest.raises(AutoflowError, match=message):
        lift(torch.randn(1, 3, 2, 2))
    with pytest.raises(AutoflowError, match=message):
        lift.inverse(torch.randn(1, 5, 2, 2))


def test_lifting_rejects_bad_construction_and_inputs() -> None:
    with pytest.raises(AutoflowError, match="channels >= in_channels.*channels=2, in_channels=3"):
        LiftingConv1x1(2)
    with pytest.raises(AutoflowError, match="in_channels must be an int >= 1"):
        LiftingConv1x1(4, in_channels=0)
    lift = LiftingConv1x1(4)
    with pytest.raises(ShapeError, match="expected 3 channels.*received 4"):
        lift(torch.randn(1, 4, 2, 2))
    with pytest.raises(ShapeError, match="expected 4 channels.*received 3"):
        lift.inverse(torch.randn(1, 3, 2, 2))
    with pytest.raises(AutoflowError, match="float32.*float64"):
        lift(torch.randn(1, 3, 2, 2, dtype=torch.float64))


def test_lifting_shape_methods() -> None:
    lift = LiftingConv1x1(8, in_channels=2)
    assert lift.output_shape((2, 5, 6)) == (8, 5, 6)
    assert lift.input_shape((8, 5, 6)) == (2, 5, 6)
    with pytest.raises(ShapeError, match="expected 2 channels"):
        lift.output_shape((8, 5, 6))
    with pytest.raises(ShapeError, match="expected 8 channels"):
        lift.input_shape((2, 5, 6))
