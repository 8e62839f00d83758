"""Conditioning end to end: a context through couplings, containers, the engine and Flow.

The contract: ``module(x, context=c)`` / ``module.inverse(y, context=c)``; containers pass
the context to the members that take one; the memory-saving engine gives it the gradient
plain autograd gives; ``Flow.log_prob(x, context)`` and ``Flow.sample(n, context=c)``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import autoflow
from autoflow import AutoflowError, EngineError, Flow, Sequential, ShapeError
from autoflow.testing import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
)
from autoflow.testing import strategies as afs

from toys import Flip, perturb

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def coupling(kind: str, channels: int, context_channels: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    make = autoflow.AffineCoupling if kind == "affine" else autoflow.AdditiveCoupling
    layer = make(channels, hidden_channels=4, context_channels=context_channels)
    return perturb(layer, 0.3, seed=seed).double()


# Couplings under the kit -------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(pair=afs.conditional_states(st.integers(2, 4), st.integers(1, 3), max_size=4,
                                   dtype=st.just(F64)),
       kind=st.sampled_from(["affine", "additive"]))
def test_conditional_couplings_pass_the_kit(pair, kind):
    x, c = pair
    layer = coupling(kind, x.shape[1], c.shape[1])
    assert_invertible(layer, x, context=c)
    assert_logdet_matches_jacobian(layer, x, context=c)
    assert_engine_gradients_match(layer, x, context=c)
    assert_engine_gradients_match(layer, x, context=c, inverse=True)


@pytest.mark.parametrize("spatial", [False, True])
def test_the_context_changes_the_map(spatial):
    layer = coupling("affine", 4, 2)
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    c = torch.randn(3, 2, 7, 3, dtype=F64) if spatial else torch.randn(3, 2, dtype=F64)
    y, logdet = layer(x, context=c)
    y2, logdet2 = layer(x, context=c + 1)
    assert not torch.allclose(y, y2) and not torch.allclose(logdet, logdet2)
    back, _ = layer.inverse(y, context=c)
    assert torch.allclose(back, x)


def test_a_vector_context_is_the_constant_image_context():
    layer = coupling("affine", 4, 2)
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    c = torch.randn(2, 2, dtype=F64)
    y, logdet = layer(x, context=c)
    y_image, logdet_image = layer(x, context=c[:, :, None, None].expand(-1, -1, 3, 3))
    assert torch.allclose(y, y_image) and torch.allclose(logdet, logdet_image)


# The engine gives the context its gradient ---------------------------------------------------


class Embedded(nn.Module):
    """A class-conditional flow as a user writes it: an embedding before a conditional glow."""

    def __init__(self, memory_saving: bool, **engine) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 3)
        self.flow = autoflow.glow(1, levels=2, depth_per_level=2, hidden_channels=8,
                                  context_channels=3, memory_saving=memory_saving)
        self.flow.engine_options.anchor_every = engine.get("anchor_every")
        self.flow.engine_options.debug = engine.get("debug", False)
        perturb(self.flow, 0.1)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        z, logdet = self.flow(x, context=self.embed(labels))
        return sum((t * t).sum() for t in z) + (logdet * logdet).sum()


@pytest.mark.parametrize("engine", [{}, {"anchor_every": 2}, {"debug": True}])
def test_engine_gives_the_context_and_its_embedding_the_autograd_gradient(engine):
    x = torch.randn(4, 1, 8, 8, dtype=F64)
    labels = torch.tensor([0, 3, 3, 9])
    grads = []
    for memory_saving in (False, True):
        model = Embedded(memory_saving, **engine).double()
        model(x, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    plain, saving = grads
    assert plain["embed.weight"].abs().sum() > 0  # the context does reach the loss
    for name in plain:
        assert torch.allclose(saving[name], plain[name], rtol=1e-9, atol=1e-12), name


def test_under_no_grad_the_engine_keeps_direction_context_and_debug():
    # Without grad the memory-saving chain takes the plain path (conditional sampling does):
    # it must still run the asked direction, pass the context on and honour debug mode.
    layer = coupling("affine", 4, 2)
    plain = Sequential(layer, Flip(), memory_saving=False)
    saving = Sequential(layer, Flip(), memory_saving=True, debug=True)
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    c = torch.randn(2, 2, dtype=F64)
    with torch.no_grad():
        for direction in ("forward", "inverse"):
            expected = getattr(plain, direction)(x, context=c)
            found = getattr(saving, direction)(x, context=c)
            assert all(torch.equal(a, b) for a, b in zip(found, expected)), direction
        with pytest.raises(EngineError, match="NaN or inf"):
            saving(torch.full_like(x, float("nan")), context=c)


def test_engine_refuses_a_context_changed_in_place_before_backward():
    layer = coupling("affine", 4, 2)
    chain = Sequential(layer, Flip(), memory_saving=True)
    c = torch.randn(2, 2, dtype=F64)
    y, _ = chain(torch.randn(2, 4, 3, 3, dtype=F64, requires_grad=True), context=c)
    c.add_(1.0)
    with pytest.raises(EngineError, match="modified in place"):
        y.sum().backward()


class UserConditional(autoflow.InvertibleModule):
    """A conditional module written by a user: ``context=None`` is all it declares."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.5, -0.3], dtype=F64))

    def _shift(self, context: Tensor) -> Tensor:
        return (context * self.weight).sum(1)[:, None, None, None]

    def forward(self, x, context=None):
        return x + self._shift(context), x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        return y - self._shift(context), y.new_zeros(y.shape[0])


class NoContextReconstruct(UserConditional):
    def reconstruct(self, y):  # forgot the context
        return super().reconstruct(y)


class DetachingReconstruct(UserConditional):
    def reconstruct(self, y, *, context=None):  # a bug: the context loses its gradient
        return super().reconstruct(y, context=context.detach())


def test_kit_catches_an_engine_run_that_loses_the_context_gradient():
    x, c = torch.randn(2, 4, 3, 3, dtype=F64), torch.randn(2, 2, dtype=F64)
    assert_engine_gradients_match(UserConditional(), x, context=c)
    with pytest.raises(AssertionError, match="plain autograd gives a gradient for the context "
                                             "and the engine gives none"):
        assert_engine_gradients_match(DetachingReconstruct(), x, context=c)


def test_sequential_passes_the_context_only_to_members_that_take_one():
    chain = Sequential(Flip(), UserConditional(), autoflow.ActNorm(4).double(),
                       coupling("affine", 4, 2))
    assert chain.conditional and not chain[0].conditional and chain[1].conditional
    assert not chain[2].conditional and chain[3].conditional
    x, c = torch.randn(2, 4, 3, 3, dtype=F64), torch.randn(2, 2, dtype=F64)
    chain.eval()
    assert_invertible(chain, x, context=c)
    assert_engine_gradients_match(chain, x, context=c)


def test_engine_refuses_a_conditional_module_whose_reconstruct_takes_no_context():
    chain = Sequential(NoContextReconstruct(), Flip(), memory_saving=True)
    y, _ = chain(torch.randn(2, 4, 3, 3, dtype=F64, requires_grad=True),
                 context=torch.randn(2, 2, dtype=F64))
    with pytest.raises(EngineError, match=r"module '0' \(NoContextReconstruct\) takes a "
                                          r"context, but its reconstruct does not"):
        y.sum().backward()


# Flow ----------------------------------------------------------------------------------------


def conditional_flow(context_channels: int = 3) -> Flow:
    torch.manual_seed(1)
    transform = autoflow.glow(1, levels=2, depth_per_level=2, hidden_channels=8,
                              context_channels=context_channels)
    return Flow(perturb(transform, 0.1).double().eval(), (1, 4, 4))


def test_flow_sample_and_log_prob_agree_per_context():
    flow = conditional_flow()
    c = torch.randn(5, 3, dtype=F64)
    with torch.no_grad():
        x, reported = flow.sample(5, context=c, return_log_prob=True)
        assert torch.allclose(flow.log_prob(x, context=c), reported, atol=1e-9)
        # one shared context, broadcast to every sample
        x, reported = flow.sample((2, 3), context=c[:1], return_log_prob=True)
        assert x.shape == (2, 3, 1, 4, 4)
        expected = flow.log_prob(x.reshape(6, 1, 4, 4), context=c[:1].expand(6, 3))
        assert torch.allclose(expected.reshape(2, 3), reported, atol=1e-9)
        assert flow.bits_per_dim(x.reshape(6, 1, 4, 4), c[:1].expand(6, 3)).shape == (6,)


def test_flow_density_depends_on_the_context():
    flow = conditional_flow()
    x = torch.randn(4, 1, 4, 4, dtype=F64)
    c = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        assert not torch.allclose(flow.log_prob(x, context=c), flow.log_prob(x, context=-c))
        generator = torch.Generator().manual_seed(0)
        a = flow.sample(4, context=c, generator=generator)
        generator = torch.Generator().manual_seed(0)
        b = flow.sample(4, context=-c, generator=generator)
    assert not torch.allclose(a, b)


def test_flow_runs_labels_through_its_context_encoder():
    torch.manual_seed(0)
    embed = nn.Embedding(10, 3).double()
    transform = conditional_flow().transform
    flow = Flow(transform, (1, 4, 4), context_encoder=embed)
    assert any(p is embed.weight for p in flow.parameters())  # trained and saved with the flow
    assert "context_encoder.weight" in flow.state_dict()
    x = torch.randn(4, 1, 4, 4, dtype=F64)
    labels = torch.tensor([0, 3, 3, 9])
    log_p = flow.log_prob(x, context=labels)
    with torch.no_grad():
        expected = Flow(transform, (1, 4, 4)).log_prob(x, context=embed(labels))
    assert torch.allclose(log_p, expected, atol=1e-12)
    log_p.sum().backward()
    assert embed.weight.grad[[0, 3, 9]].abs().sum(1).min() > 0  # each label used is trained
    assert embed.weight.grad[[1, 2]].abs().max() == 0
    seen = []
    embed.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        x, reported = flow.sample(3, context=labels[1:2], return_log_prob=True)
        assert seen == [1]  # a shared context is encoded once, then expanded
        assert torch.allclose(flow.log_prob(x, context=labels[1:2].expand(3)), reported,
                              atol=1e-9)


def test_a_context_encoder_must_be_a_module():
    with pytest.raises(AutoflowError, match="context_encoder to be an nn.Module .* received "
                                            "function"):
        Flow(conditional_flow().transform, (1, 4, 4), context_encoder=lambda c: c)


# Refusals ------------------------------------------------------------------------------------


def test_context_mistakes_are_refused_clearly():
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    with pytest.raises(AutoflowError, match="AffineCoupling was built without "
                                            "context_channels, but received a context"):
        coupling("affine", 4, 0)(x, context=torch.randn(2, 2, dtype=F64))
    with pytest.raises(AutoflowError, match=r"built with context_channels=2 and expects a "
                                            r"context tensor \(B, 2\) or \(B, 2, h, w\), "
                                            r"received None"):
        coupling("affine", 4, 2)(x)
    with pytest.raises(ShapeError, match=r"expected a context of shape \(B, 2\) or "
                                         r"\(B, 2, h, w\) with B = 2, received \(2, 3\)"):
        coupling("affine", 4, 2)(x, context=torch.randn(2, 3, dtype=F64))
    with pytest.raises(ShapeError, match=r"with B = 2, received \(5, 2\)"):
        coupling("affine", 4, 2)(x, context=torch.randn(5, 2, dtype=F64))
    with pytest.raises(AutoflowError, match="floating-point context"):
        coupling("affine", 4, 2)(x, context=torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(AutoflowError, match="Sequential received a context, but none of its "
                                            "modules takes one"):
        Sequential(Flip(), autoflow.ActNorm(4))(x.float(), context=torch.randn(2, 2))
    with pytest.raises(AutoflowError, match=r"Flow received a context, but its transform "
                                            r"\(Sequential\) takes none"):
        Flow(Sequential(Flip()), (4, 3, 3)).log_prob(x.float(), context=torch.randn(2, 2))
    flow = conditional_flow()
    with pytest.raises(AutoflowError, match=r"batch of 1 \(shared\) or 4 \(one per sample\), "
                                            r"received shape \(3, 3\)"):
        flow.sample(4, context=torch.randn(3, 3, dtype=F64))
    with pytest.raises(AutoflowError, match="context_channels without learned_prior"):
        autoflow.Split(4, learned_prior=False, context_channels=2)
    with pytest.raises(AutoflowError, match="context_channels must be an int >= 0"):
        autoflow.glow(1, context_channels=-1)
    with pytest.raises(AutoflowError, match="context_channels must be an int >= 0"):
        autoflow.AffineCoupling(4, context_channels=True)
