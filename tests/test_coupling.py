"""Affine and additive couplings: eqs. 3-5, soft clamp, volume norm, engine hooks, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autoflow.base import InvertibleModule, State, flatten_state
from autoflow.coupling import AdditiveCoupling, AffineCoupling, make_conditioner
from autoflow.errors import AutoflowError, ShapeError
from autoflow.testing import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
)
from autoflow.testing import strategies as afs
from autoflow.volume_norm import VolumeNorm

from toys import randomize_conditioner

VOLUME_NORMS = [None, "channel", "spatial"]


def make_coupling(kind: str, channels: int, volume_norm: str | None, dtype: torch.dtype):
    if kind == "additive":
        module = AdditiveCoupling(channels)
    else:
        module = AffineCoupling(channels, volume_norm=volume_norm)
    return randomize_conditioner(module).to(dtype)


class _CallCounter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.calls += 1


def _loss(output: State, logdet: torch.Tensor, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    loss = logdet.sum() * 0.7
    for t in flatten_state(output):
        loss = loss + (t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
    return loss


def check_reconstruction(module: InvertibleModule, state: State, *, inverse: bool) -> None:
    """Assert that ``reconstruct`` (or ``reconstruct_inverse``) equals plain autograd.

    Plain run: ``out, logdet = f(state)`` with ``f`` the forward (or inverse) map. The hook gets
    ``out`` without a graph and must rebuild ``state`` (through ``input_from_leaves``), ``out``
    and ``logdet``, and give the same gradients for the input and every parameter, while
    calling the conditioner exactly once.
    """
    function = module.inverse if inverse else module
    hook = module.reconstruct_inverse if inverse else module.reconstruct
    leaves = [t.detach().clone().requires_grad_() for t in flatten_state(state)]
    packed = leaves[0] if isinstance(state, torch.Tensor) else tuple(leaves)
    out, logdet = function(packed)
    params = list(module.parameters())
    expected = torch.autograd.grad(_loss(out, logdet), leaves + params, allow_unused=True)

    given_state = type(out)(t.detach() for t in out) if isinstance(out, tuple) else out.detach()
    counter = _CallCounter(module.conditioner)
    rec = hook(given_state)
    assert counter.calls == 1, f"conditioner ran {counter.calls} times"
    assert len({id(leaf) for leaf in rec.leaves}) == len(rec.leaves)
    assert all(leaf.is_leaf and leaf.requires_grad for leaf in rec.leaves)
    tol = 1e-10 if leaves[0].dtype == torch.float64 else 1e-4

    def close(a: State, b: State) -> None:
        for x, y in zip(flatten_state(a), flatten_state(b), strict=True):
            assert x.shape == y.shape
            assert (x - y).abs().max() <= tol * max(1.0, y.abs().max().item())

    close(rec.input_from_leaves([leaf.detach() for leaf in rec.leaves]), state)
    close(rec.output, out)
    close(rec.logdet, logdet)
    got = torch.autograd.grad(
        _loss(rec.output, rec.logdet), rec.leaves + params, allow_unused=True
    )
    n = len(rec.leaves)
    close(rec.input_from_leaves(list(got[:n])), pack(expected[: len(leaves)], state))
    for g, e in zip(got[n:], expected[len(leaves):], strict=True):
        close(torch.zeros(()) if g is None else g, torch.zeros(()) if e is None else e)


def pack(tensors, like: State) -> State:
    return tensors[0] if isinstance(like, torch.Tensor) else tuple(tensors)


# Properties over shapes, dtypes and configurations ------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    x=afs.states(st.integers(2, 5), max_size=5),
    kind=st.sampled_from(["affine", "additive"]),
    volume_norm=st.sampled_from(VOLUME_NORMS),
)
def test_round_trip_and_logdet_sign(x, kind, volume_norm):
    module = make_coupling(kind, x.shape[1], volume_norm, x.dtype)
    assert_invertible(module, x)  # training mode: the batch mean is the same in both directions
    assert_invertible(module.eval(), x)


@settings(max_examples=10, deadline=None)
@given(
    x=afs.states(st.integers(2, 4), max_size=3),
    kind=st.sampled_from(["affine", "additive"]),
    volume_norm=st.sampled_from(VOLUME_NORMS),
)
def test_logdet_matches_the_jacobian(x, kind, volume_norm):
    module = make_coupling(kind, x.shape[1], volume_norm, x.dtype)
    module(x)  # a training step gives the volume norm a non-trivial running mean
    # In training mode the volume norm subtracts the *batch* mean of s, so one sample's output
    # depends on the other samples and the kit's per-sample Jacobian does not describe the
    # module; eval mode (running mean) makes the map per-sample. Batch 1 is checked below.
    assert_logdet_matches_jacobian(module.eval(), x)


@settings(max_examples=10, deadline=None)
@given(
    x=afs.states(st.integers(2, 4), max_size=3, batch=st.just(1)),
    volume_norm=st.sampled_from(["channel", "spatial"]),
)
def test_logdet_matches_the_jacobian_in_training_with_batch_one(x, volume_norm):
    module = make_coupling("affine", x.shape[1], volume_norm, x.dtype).train()
    assert_logdet_matches_jacobian(module, x)


@settings(max_examples=10, deadline=None)
@given(
    x=afs.states(st.integers(2, 4), max_size=4),
    kind=st.sampled_from(["affine", "additive"]),
    volume_norm=st.sampled_from(VOLUME_NORMS),
    inverse=st.booleans(),
)
def test_reconstruction_hooks_match_autograd_with_one_conditioner_call(
    x, kind, volume_norm, inverse
):
    module = make_coupling(kind, x.shape[1], volume_norm, x.dtype)
    check_reconstruction(module, x, inverse=inverse)
    check_reconstruction(module.eval(), x, inverse=inverse)


@pytest.mark.parametrize("volume_norm", VOLUME_NORMS)
@pytest.mark.parametrize("inverse", [False, True])
def test_reconstruction_does_not_update_the_running_mean(volume_norm, inverse):
    module = make_coupling("affine", 4, volume_norm, torch.float64)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    module(x)
    before = {k: v.clone() for k, v in module.named_buffers()}
    (module.reconstruct_inverse if inverse else module.reconstruct)(x)
    module.inverse(x)
    for name, value in module.named_buffers():
        assert torch.equal(value, before[name]), name


@settings(max_examples=10, deadline=None)
@given(
    x=afs.states(st.integers(2, 4), max_size=4),
    kind=st.sampled_from(["affine", "additive"]),
    inverse=st.booleans(),
)
def test_memory_saving_engine_matches_autograd(x, kind, inverse):
    module = make_coupling(kind, x.shape[1], "channel" if kind == "affine" else None, x.dtype)
    assert_engine_gradients_match(module, x, inverse=inverse)


# The maths -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AffineCoupling, AdditiveCoupling])
def test_default_conditioner_starts_as_identity(cls):
    x = torch.randn(2, 5, 4, 4)
    y, logdet = cls(5)(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(2))


def test_affine_coupling_applies_eq_3_and_5():
    module = randomize_conditioner(AffineCoupling(5, clamp=1.5)).double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    s, t = module.conditioner(x[:, :2]).chunk(2, dim=1)
    s = 1.5 * torch.tanh(s / 1.5)
    y, logdet = module(x)
    assert torch.equal(y[:, :2], x[:, :2])
    assert torch.allclose(y[:, 2:], torch.exp(s) * x[:, 2:] + t)
    assert torch.allclose(logdet, s.sum(dim=(1, 2, 3)))


def test_soft_clamp_bounds_the_log_scale():
    module = randomize_conditioner(AffineCoupling(4, clamp=0.5), scale=100.0)
    y, logdet = module(torch.randn(2, 4, 3, 3))
    assert logdet.abs().max() <= 0.5 * 2 * 3 * 3
    assert torch.isfinite(y).all()


def test_additive_coupling_is_volume_preserving_with_exact_zero_logdet():
    module = randomize_conditioner(AdditiveCoupling(3))
    assert module.volume_preserving and not AffineCoupling.volume_preserving
    assert module.conditioner[-1].out_channels == 2  # only t, for the 2 transformed channels
    x = torch.randn(2, 3, 4, 4)
    y, logdet = module(x)
    assert torch.equal(logdet, torch.zeros(2)) and not torch.equal(y, x)
    assert torch.equal(module.inverse(y)[1], torch.zeros(2))


def test_channel_volume_norm_centres_the_batch_log_volume():
    module = randomize_conditioner(AffineCoupling(4, volume_norm="channel")).double()
    _, logdet = module(torch.randn(3, 4, 3, 3, dtype=torch.float64))
    # s - mean over (batch, channels) sums to zero over the batch at every pixel.
    assert abs(logdet.sum().item()) < 1e-10 and logdet.abs().max() > 1e-3
    assert isinstance(module.volume_norm, VolumeNorm) and module.volume_norm.mode == "channel"


def test_volume_norm_instance_is_used_as_given():
    norm = VolumeNorm("spatial", momentum=0.5)
    assert AffineCoupling(4, volume_norm=norm).volume_norm is norm


def test_custom_conditioner_and_hidden_width():
    custom = nn.Conv2d(2, 4, 1)
    module = AffineCoupling(4, conditioner=custom)
    assert module.conditioner is custom
    assert_invertible(module.double(), torch.randn(2, 4, 3, 3, dtype=torch.float64))
    default = AffineCoupling(6, hidden_channels=11, kernel_size=5)
    assert default.conditioner[0].out_channels == 11
    assert default.conditioner[0].kernel_size == (5, 5)
    assert AffineCoupling(6).conditioner[0].out_channels == 6


def test_make_conditioner_zero_initialises_the_last_layer():
    net = make_conditioner(3, 4, 8, kernel_size=5)
    assert [type(m) for m in net] == [nn.Conv2d, nn.LeakyReLU, nn.Conv2d]
    assert net[-1].weight.abs().sum() == 0 and net[-1].bias.abs().sum() == 0
    assert net(torch.randn(1, 3, 6, 7)).shape == (1, 4, 6, 7)


# Bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(2, 3, 4, 4), r"expected 4 channels in its input, received 3"),
        (torch.zeros(4, 4, 4), r"expected a 4-D input \(B, C, H, W\) or a 2-D input "
                               r"\(B, C\) of vectors, received shape \(4, 4, 4\)"),
        ((torch.zeros(1, 4, 2, 2),), "expected a tensor input, received tuple"),
    ],
)
@pytest.mark.parametrize("method", ["forward", "inverse", "reconstruct", "reconstruct_inverse"])
def test_bad_inputs_raise_shape_errors(x, match, method):
    module = AffineCoupling(4)
    call = module if method == "forward" else getattr(module, method)
    with pytest.raises(ShapeError, match=match):
        call(x)


def test_shape_methods_check_channels():
    assert AffineCoupling(4).output_shape((4, 5, 6)) == (4, 5, 6)
    assert AdditiveCoupling(4).input_shape((4, 5, 6)) == (4, 5, 6)
    with pytest.raises(ShapeError, match=r"expected 4 channels, received shape \(3, 5, 6\)"):
        AffineCoupling(4).output_shape((3, 5, 6))


def test_wrong_conditioner_output_is_reported():
    module = AffineCoupling(4, conditioner=nn.Conv2d(2, 3, 1))
    with pytest.raises(ShapeError, match=r"conditioner must return s and t as one tensor of "
                                         r"shape \(1, 4, 2, 2\), received \(1, 3, 2, 2\)"):
        module(torch.zeros(1, 4, 2, 2))
    additive = AdditiveCoupling(4, conditioner=nn.Conv2d(2, 4, 1))
    with pytest.raises(ShapeError, match=r"must return t as one tensor of shape \(1, 2, 2, 2\)"):
        additive(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": 1}, "channels must be an int >= 2 .* received 1"),
        ({"channels": 4.0}, "channels must be an int >= 2 .* received 4.0"),
        ({"channels": 4, "kernel_size": 4}, "kernel_size must be odd, received 4"),
        ({"channels": 4, "kernel_size": 0}, "kernel_size must be an int >= 1, received 0"),
        ({"channels": 4, "hidden_channels": 0}, "hidden_channels must be an int >= 1"),
        ({"channels": 4, "clamp": 0.0}, "clamp must be a positive finite number, received 0.0"),
        ({"channels": 4, "clamp": float("inf")}, "clamp must be a positive finite number"),
        ({"channels": 4, "volume_norm": "batch"}, "mode must be one of .* received 'batch'"),
        ({"channels": 4, "volume_norm": 1}, "volume_norm must be None, a mode string .* int"),
        ({"channels": 4, "conditioner": nn.Identity(), "hidden_channels": 3},
         "both a conditioner and hidden_channels"),
        ({"channels": 4, "conditioner": lambda x: x}, "conditioner must be an nn.Module"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(AutoflowError, match=match):
        AffineCoupling(**kwargs)


@pytest.mark.parametrize("volume_norm", ["channel", "spatial"])
def test_a_training_forward_updates_the_volume_norms_running_mean(volume_norm):
    # The eval-mode map uses the running mean of the log-scales seen in training.
    torch.manual_seed(0)
    layer = randomize_conditioner(AffineCoupling(4, volume_norm=volume_norm))
    x = torch.randn(3, 4, 5, 5)
    layer.train()(x)
    first = layer.volume_norm.running_mean.clone()
    layer(x + 1.0)
    second = layer.volume_norm.running_mean.clone()
    assert first.abs().sum() > 0 and not torch.equal(second, first)
    layer.eval()(x)
    assert torch.equal(layer.volume_norm.running_mean, second)  # eval leaves it alone
