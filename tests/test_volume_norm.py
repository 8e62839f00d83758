"""Tests of channel (CVN) and spatial (SVN) volume normalisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoflow.errors import AutoflowError, ShapeError
from autoflow.testing import strategies as afs
from autoflow.volume_norm import VolumeNorm

DIMS = {"channel": (0, 1), "spatial": (0, 2, 3)}
modes = st.sampled_from(sorted(DIMS))
fast = settings(max_examples=20, deadline=None)


def tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


@fast
@given(s=afs.states(channels=st.integers(1, 4), max_size=5), mode=modes)
def test_training_centres_over_the_mode_dims(s: torch.Tensor, mode: str) -> None:
    out = VolumeNorm(mode).to(s.dtype)(s)
    assert out.shape == s.shape and out.dtype == s.dtype
    assert out.mean(dim=DIMS[mode]).abs().max() <= tol(s.dtype) * max(1.0, s.abs().max().item())
    torch.testing.assert_close(s - out, s.mean(dim=DIMS[mode], keepdim=True).expand_as(s))


@fast
@given(s=afs.states(channels=st.integers(1, 4), max_size=5), mode=modes)
def test_running_mean_after_one_step_is_momentum_times_batch_mean(
    s: torch.Tensor, mode: str
) -> None:
    norm = VolumeNorm(mode).to(s.dtype)
    assert norm.running_mean.numel() == 0
    norm(s)
    batch_mean = s.mean(dim=DIMS[mode], keepdim=True)
    expected_shape = (1, 1, *s.shape[2:]) if mode == "channel" else (1, s.shape[1], 1, 1)
    assert norm.running_mean.shape == expected_shape
    torch.testing.assert_close(norm.running_mean, 0.1 * batch_mean)


@fast
@given(
    s=afs.states(channels=st.integers(1, 3), max_size=4),
    seed=st.integers(0, 2**31 - 1),
    mode=modes,
    momentum=st.floats(0.0, 1.0),
)
def test_running_mean_follows_the_momentum_rule(
    s: torch.Tensor, seed: int, mode: str, momentum: float
) -> None:
    norm = VolumeNorm(mode, momentum=momentum).to(s.dtype)
    t = afs.tensor_of(tuple(s.shape), s.dtype, seed, scale=3.0)
    norm(s)
    norm(t)
    mean_s, mean_t = (v.mean(dim=DIMS[mode], keepdim=True) for v in (s, t))
    expected = (1 - momentum) * momentum * mean_s + momentum * mean_t
    torch.testing.assert_close(norm.running_mean, expected)


@fast
@given(s=afs.states(channels=st.integers(1, 4), max_size=5), mode=modes)
def test_no_update_when_asked_or_in_eval(s: torch.Tensor, mode: str) -> None:
    norm = VolumeNorm(mode).to(s.dtype)
    norm(s)
    before = norm.running_mean.clone()
    norm(2 * s + 1, update=False)
    torch.testing.assert_close(norm.running_mean, before, rtol=0, atol=0)
    norm.eval()
    norm(2 * s + 1)
    torch.testing.assert_close(norm.running_mean, before, rtol=0, atol=0)


@fast
@given(s=afs.states(channels=st.integers(1, 4), max_size=5), mode=modes)
def test_eval_subtracts_the_running_mean(s: torch.Tensor, mode: str) -> None:
    norm = VolumeNorm(mode).to(s.dtype)
    norm(s + 1.5)
    norm.eval()
    out = norm(s)
    torch.testing.assert_close(out, s - norm.running_mean)
    # Per-sample in eval: one sample's output does not depend on the others.
    torch.testing.assert_close(norm(s[:1]), out[:1])


def test_fresh_module_in_eval_subtracts_zeros() -> None:
    norm = VolumeNorm("spatial").eval()
    s = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(norm(s), s, rtol=0, atol=0)
    assert norm.running_mean.shape == (1, 3, 1, 1)


def test_running_mean_keeps_the_module_dtype() -> None:
    norm = VolumeNorm("channel").double()
    norm(torch.randn(2, 3, 4, 4))
    assert norm.running_mean.dtype == torch.float64
    norm.float().eval()
    assert norm(torch.randn(1, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64


def test_gradient_flows_through_the_batch_mean() -> None:
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    VolumeNorm("channel")(s).sum().backward()
    # Sum of a centred tensor is constant, so its gradient is exactly zero.
    assert s.grad is not None and s.grad.abs().max() < 1e-6


@pytest.mark.parametrize(
    ("mode", "first", "second", "match"),
    [
        ("channel", (2, 3, 4, 4), (2, 3, 4, 6), r"shape \(1, 1, 4, 6\).*shape \(1, 1, 4, 4\)"),
        ("spatial", (2, 3, 4, 4), (2, 5, 4, 4), r"shape \(1, 5, 1, 1\).*shape \(1, 3, 1, 1\)"),
    ],
)
def test_size_mismatch_with_running_mean_raises(
    mode: str, first: tuple[int, ...], second: tuple[int, ...], match: str
) -> None:
    norm = VolumeNorm(mode)
    norm(torch.randn(first))
    with pytest.raises(ShapeError, match=match):
        norm(torch.randn(second))
    norm(torch.randn(second), update=False)  # batch statistics only: no running mean needed
    norm.eval()
    with pytest.raises(ShapeError, match="in eval mode.*" + match):
        norm(torch.randn(second))


def test_other_sizes_are_fine_where_the_mode_averages_them_out() -> None:
    cvn, svn = VolumeNorm("channel"), VolumeNorm("spatial")
    cvn(torch.randn(2, 3, 4, 4))
    svn(torch.randn(2, 3, 4, 4))
    cvn.eval(), svn.eval()
    assert cvn(torch.randn(1, 7, 4, 4)).shape == (1, 7, 4, 4)
    assert svn(torch.randn(1, 3, 2, 6)).shape == (1, 3, 2, 6)


@fast
@given(s=afs.states(channels=st.integers(1, 4), max_size=5), mode=modes)
def test_state_dict_round_trip_resizes_the_running_mean(s: torch.Tensor, mode: str) -> None:
    trained = VolumeNorm(mode).to(s.dtype)
    trained(s)
    fresh = VolumeNorm(mode).to(s.dtype)
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.running_mean, trained.running_mean, rtol=0, atol=0)
    other = VolumeNorm(mode).to(s.dtype)
    other(torch.randn(1, 5, 7, 7, dtype=s.dtype))
    other.load_state_dict(trained.state_dict())
    assert other.running_mean.shape == trained.running_mean.shape
    trained.load_state_dict(VolumeNorm(mode).state_dict())
    assert trained.running_mean.numel() == 0


@pytest.mark.parametrize(
    ("mode", "shape"), [("channel", (1, 3, 4, 4)), ("spatial", (1, 3, 4, 4)), ("spatial", (3,))]
)
def test_loading_a_running_mean_of_the_wrong_form_raises(mode: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=r"expected a stored running mean of shape .*received"):
        VolumeNorm(mode).load_state_dict({"running_mean": torch.zeros(shape)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "batch"}, r"mode must be one of \['channel', 'spatial'\], received 'batch'"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\], received 1.5"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\], received -0.1"),
        ({"momentum": "0.1"}, r"momentum must be a float in \[0, 1\], received '0.1'"),
    ],
)
def test_bad_construction_raises(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(AutoflowError, match=match):
        VolumeNorm(**kwargs)  # type: ignore[arg-type]


def test_non_image_log_scale_raises() -> None:
    with pytest.raises(ShapeError, match=r"4-D log_scale.*received shape \(2, 3\)"):
        VolumeNorm()(torch.randn(2, 3))
