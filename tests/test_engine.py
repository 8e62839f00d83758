"""The memory-saving engine reproduces plain autograd, updates state once and saves memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autoflow
from autoflow import EngineError, InvertibleModule, OnFirst, Reconstruction, Sequential
from autoflow.testing import assert_engine_gradients_match, relative_error
from autoflow.testing import strategies as afs

from toys import (
    Flip,
    LevelMix,
    NoInverse,
    ShapeChanger,
    ToyCoupling,
    perturb,
    randomize_conditioner,
)


def toy_chain(depth: int, channels: int, **conditioner) -> Sequential:
    modules = []
    for _ in range(depth):
        modules += [ToyCoupling(channels, **conditioner), Flip()]
    return perturb(Sequential(*modules))


@settings(max_examples=15, deadline=None)
@given(depth=st.integers(1, 5), x=afs.states(st.integers(2, 4), max_size=5),
       inverse=st.booleans())
def test_engine_matches_autograd_over_depths_and_shapes(depth, x, inverse):
    chain = toy_chain(depth, x.shape[1]).to(x.dtype)
    assert_engine_gradients_match(chain, x, inverse=inverse)


@pytest.mark.parametrize("conditioner", [
    {"dropout": 0.5}, {"skip": True}, {"batch_norm": True},
    {"dropout": 0.3, "batch_norm": True, "skip": True},
])
@pytest.mark.parametrize("inverse", [False, True])
def test_engine_replays_randomness_and_updates_state_once(conditioner, inverse):
    chain = toy_chain(3, 4, **conditioner).double().train()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    # Compares outputs, log-dets, input and parameter gradients and every buffer afterwards.
    assert_engine_gradients_match(chain, x, inverse=inverse)


def test_the_kit_detects_a_wrong_gradient():
    class Leaky(ToyCoupling):
        def reconstruct(self, y):  # a deliberately broken reconstruction
            rec = super().reconstruct(y)
            return rec._replace(output=rec.output * 1.001)

    chain = perturb(Sequential(Leaky(4), Flip())).double()
    with pytest.raises(AssertionError, match="differs from plain autograd"):
        assert_engine_gradients_match(chain, torch.randn(2, 4, 3, 3, dtype=torch.float64))


class Leaky(ToyCoupling):
    """A deliberately broken reconstruction in both directions (outputs off by a factor)."""

    factor = 1.001

    def reconstruct(self, y):
        rec = super().reconstruct(y)
        return rec._replace(output=rec.output * self.factor)

    def reconstruct_inverse(self, x):
        rec = super().reconstruct_inverse(x)
        return rec._replace(output=rec.output * self.factor)


@pytest.mark.parametrize("inverse", [False, True])
def test_the_kit_runs_a_bare_module_through_the_engine_in_either_direction(inverse):
    module = perturb(Leaky(4)).double()  # not a Sequential: the kit must wrap it
    with pytest.raises(AssertionError, match="differs from plain autograd"):
        assert_engine_gradients_match(module, torch.randn(2, 4, 3, 3, dtype=torch.float64),
                                      inverse=inverse)
    healthy = perturb(ToyCoupling(4)).double()
    assert_engine_gradients_match(healthy, torch.randn(2, 4, 3, 3, dtype=torch.float64),
                                  inverse=inverse)


def test_the_kit_checks_the_direction_it_is_asked_for():
    class LeakyInverse(ToyCoupling):
        def reconstruct_inverse(self, x):
            rec = super().reconstruct_inverse(x)
            return rec._replace(output=rec.output * 1.001)

    module = perturb(LeakyInverse(4)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert_engine_gradients_match(module, x)
    with pytest.raises(AssertionError, match="differs from plain autograd"):
        assert_engine_gradients_match(module, x, inverse=True)


def test_the_kit_default_float32_tolerance_is_tight():
    module = perturb(Leaky(4))
    with pytest.raises(AssertionError, match="tolerance 1.0e-04"):
        assert_engine_gradients_match(module, torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("wrapped", [False, True])
def test_the_kit_leaves_the_module_untouched(wrapped):
    from autoflow import AffineCoupling

    module = randomize_conditioner(AffineCoupling(4, volume_norm="channel")).double().train()
    if wrapped:
        module = Sequential(module, Flip())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert_engine_gradients_match(module, torch.randn(3, 4, 5, 5, dtype=torch.float64))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in module.parameters())


class Frozen(ToyCoupling):
    """A broken reconstruction that builds no graph to the module's parameters."""

    def reconstruct(self, y):
        for p in self.parameters():
            p.requires_grad_(False)
        try:
            return super().reconstruct(y)
        finally:
            for p in self.parameters():
                p.requires_grad_(True)


class NoGradScale(InvertibleModule):
    """Scales by exp(w) computed without a graph, but rebuilds itself with one (broken)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x):
        with torch.no_grad():
            scale = self.w.exp()
        return x * scale, x.new_zeros(x.shape[0])

    def inverse(self, y):
        with torch.no_grad():
            scale = self.w.exp()
        return y / scale, y.new_zeros(y.shape[0])

    def reconstruct(self, y):
        leaf = (y / self.w.exp()).detach().requires_grad_()
        return Reconstruction([leaf], leaf * self.w.exp(), leaf.new_zeros(leaf.shape[0]),
                              lambda tensors: tensors[0])


def test_the_kit_fails_when_the_engine_gives_no_gradient_where_autograd_gives_one():
    chain = perturb(Sequential(Frozen(4), Flip())).double()
    with pytest.raises(AssertionError, match="plain autograd gives a gradient for 0.net.0.weight "
                                             "and the engine gives none"):
        assert_engine_gradients_match(chain, torch.randn(2, 4, 3, 3, dtype=torch.float64))


def test_the_kit_fails_when_the_engine_gives_a_gradient_autograd_does_not():
    with pytest.raises(AssertionError, match="the engine gives a gradient for 0.w and plain "
                                             "autograd gives none"):
        assert_engine_gradients_match(Sequential(NoGradScale(), Flip()),
                                      torch.randn(2, 4, 3, 3, dtype=torch.float64))


class HiddenWeight(NoGradScale):
    """Its forward uses no parameter at all; its (broken) reconstruction uses one."""

    def forward(self, x):
        return x * 1.5, x.new_zeros(x.shape[0])

    def inverse(self, y):
        return y / 1.5, y.new_zeros(y.shape[0])


def test_debug_mode_reports_a_leaf_only_the_reconstruction_reaches():
    chain = Sequential(HiddenWeight(), Flip(), memory_saving=True, debug=True)
    y, _ = chain(torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(EngineError, match="module '0' \\(HiddenWeight\\).*did not use"):
        y.sum().backward()
    chain.engine_options.debug = False
    y, _ = chain(torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))
    y.sum().backward()  # without the check the weight silently gets no gradient
    assert chain[0].w.grad is None


class NaNMaker(Flip):
    def forward(self, x):
        y, logdet = super().forward(x)
        return y * torch.nan, logdet

    def inverse(self, y):
        return super().inverse(y / torch.nan)


def test_nan_never_passes_a_comparison():
    nan = torch.tensor([float("nan"), 1.0])
    assert relative_error(nan, torch.ones(2)) == float("inf")
    assert relative_error(torch.ones(2), nan) == float("inf")
    assert relative_error(nan, nan) == float("inf")
    with pytest.raises(AssertionError, match="NaNMaker's output under plain autograd contains "
                                             "NaN or inf"):
        assert_engine_gradients_match(NaNMaker(), torch.randn(2, 4, 3, 3, dtype=torch.float64))


@settings(max_examples=10, deadline=None)
@given(levels=afs.pyramid_states(st.integers(1, 3), levels=2, max_top_size=3),
       depth=st.integers(1, 4), _torch_state=st.random_module())
def test_engine_handles_tuple_states(levels, depth, _torch_state):
    chain = perturb(Sequential(*[LevelMix(levels[0].shape[1]) for _ in range(depth)]))
    assert_engine_gradients_match(chain.to(levels[0].dtype), levels)


def test_engine_float32_tolerance():
    chain = toy_chain(4, 4)
    assert_engine_gradients_match(chain, torch.randn(2, 4, 6, 6))


def test_no_grad_inference_builds_no_graph_and_matches():
    chain = toy_chain(3, 4).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected, _ = chain(x)
    chain.memory_saving = True
    with torch.no_grad():
        y, logdet = chain(x)
    assert y.grad_fn is None and logdet.grad_fn is None
    assert relative_error(y, expected.detach()) == 0.0


@pytest.mark.parametrize("state", ["tensor", "tuple"])
def test_a_frozen_chain_in_grad_mode_builds_no_graph_and_matches(state):
    # Grad mode on, but neither the input nor any parameter requires grad (a frozen model
    # evaluated outside no_grad): the engine's shortcut returns the forward outputs as is.
    chain = toy_chain(2, 4).double().requires_grad_(False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x = x if state == "tensor" else (x, torch.randn(2, 3, dtype=torch.float64))
    if state == "tuple":
        chain = Sequential(*[OnFirst(block) for block in chain])
    expected, expected_logdet = chain(x)
    chain.memory_saving = True
    y, logdet = chain(x)
    assert type(y) is type(expected)
    for got, want in zip(y if state == "tuple" else (y,),
                         expected if state == "tuple" else (expected,)):
        assert not got.requires_grad and relative_error(got, want) == 0.0
    assert relative_error(logdet, expected_logdet) == 0.0


def test_frozen_and_late_parameters_are_resolved_at_call_time():
    chain = toy_chain(2, 4).double()
    chain.memory_saving = True
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    frozen = chain[0].net[0].weight
    frozen.requires_grad_(False)
    chain.append(perturb(ToyCoupling(4), seed=3).double())  # added after construction
    y, logdet = chain(x)
    (y.square().sum() + logdet.sum()).backward()
    assert frozen.grad is None
    assert chain[-1].net[0].weight.grad is not None
    assert_engine_gradients_match(chain, x)


def test_plain_module_in_the_chain_stays_on_autograd():
    encoder = nn.Conv2d(3, 4, 3, padding=1).double()
    chain = Sequential(encoder, *toy_chain(3, 4)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert not chain.bijective
    assert_engine_gradients_match(chain, x)


def test_anchors_and_debug_report_reconstruction_error():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    anchored = toy_chain(4, 4).double()
    anchored.engine_options.anchor_every = 3
    assert_engine_gradients_match(anchored, x)
    chain = toy_chain(4, 4).double()
    chain.memory_saving = True
    chain.engine_options.debug = True
    y, logdet = chain(x)
    (y.sum() + logdet.sum()).backward()
    assert set(chain.reconstruction_errors) == {str(i) for i in range(8)}
    assert max(chain.reconstruction_errors.values()) < 1e-12


def test_caller_input_stays_valid():
    chain = toy_chain(3, 4).double()
    chain.memory_saving = True
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    y, _ = chain(x)
    y.sum().backward()
    assert torch.equal(x.detach(), before) and x.grad is not None


def test_backward_twice_is_a_clear_error_unless_retained():
    chain = toy_chain(2, 4).double()
    chain.memory_saving = True
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y, _ = chain(x)
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    with pytest.raises(EngineError, match="backward ran twice"):
        y.sum().backward()


def test_module_without_inverse_is_rejected_at_construction():
    with pytest.raises(EngineError, match="'0' \\(NoInverse\\) does not"):
        Sequential(NoInverse(), memory_saving=True)


def test_inverse_that_changes_shape_is_reported():
    chain = Sequential(ShapeChanger(), memory_saving=True).double()
    y, _ = chain(torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True))
    with pytest.raises(EngineError, match="reconstructed an input of shape"):
        y.sum().backward()


def test_bad_anchor_option():
    with pytest.raises(EngineError, match="anchor_every must be a positive int"):
        Sequential(Flip(), memory_saving=True, anchor_every=0)


def saved_bytes(chain: Sequential, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chain(x)
    return total


def test_memory_saving_keeps_no_intermediates():
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    plain = [saved_bytes(toy_chain(d, 4), x) for d in (1, 8)]
    saving = []
    for d in (1, 8):
        chain = toy_chain(d, 4)
        chain.memory_saving = True
        saving.append(saved_bytes(chain, x))
    assert plain[1] > 6 * plain[0]
    assert saving[1] == saving[0] <= x.numel() * x.element_size()


def pyramid_stack(channels: int, levels: int, depth: int, **options) -> Sequential:
    """A PyramidFlow-like coupling stack over a tuple of pyramid levels, at initialisation."""
    from autoflow import DualPyramidCoupling, PyramidCoupling

    blocks = []
    for _ in range(depth):
        for first in (0, 1):
            for level in range(first, levels, 2):
                if 0 < level < levels - 1:
                    blocks.append(DualPyramidCoupling(channels, target=level, **options))
                else:
                    source = 1 if level == 0 else levels - 2
                    blocks.append(PyramidCoupling(channels, target=level, source=source,
                                                  **options))
    return Sequential(*blocks)


def test_pyramid_stack_reconstruction_error_in_float32():
    torch.manual_seed(0)
    # Random affine parameters large enough that the stack amplifies its input about 5-fold;
    # much larger ones make the cross-level shifts feed back chaotically (see the engine docs).
    stack = randomize_conditioner(pyramid_stack(4, 4, 8, kernel_size=3, volume_norm="channel"),
                                  scale=0.1)
    stack.memory_saving = True
    stack.engine_options.debug = True
    levels = tuple(torch.randn(2, 4, 32 >> d, 32 >> d, requires_grad=True) for d in range(4))
    out, _ = stack(levels)
    sum(z.square().sum() for z in out).backward()
    assert len(stack.reconstruction_errors) == 8 * 4
    assert max(stack.reconstruction_errors.values()) <= 1e-4


def test_conditioner_runs_twice_per_step_not_three_times():
    stack = perturb(pyramid_stack(2, 3, 2, kernel_size=3)).double()
    calls = []
    for block in stack:
        block.conditioner.register_forward_hook(lambda *_: calls.append(1))
    levels = tuple(torch.randn(2, 2, 8 >> d, 8 >> d, dtype=torch.float64) for d in range(3))
    for saving, per_block in ((False, 1), (True, 2)):
        stack.memory_saving = saving
        calls.clear()
        out, logdet = stack(tuple(t.requires_grad_() for t in levels))
        (sum(z.sum() for z in out) + logdet.sum()).backward()
        # forward once, then one reconstruction that both inverts and rebuilds the graph
        assert len(calls) == per_block * len(stack)


def test_volume_norm_running_mean_updated_once_under_the_engine():
    stack = perturb(pyramid_stack(2, 3, 1, kernel_size=3, volume_norm="spatial")).double()
    levels = tuple(torch.randn(2, 2, 8 >> d, 8 >> d, dtype=torch.float64) for d in range(3))
    assert_engine_gradients_match(stack, levels)  # compares every buffer after the step


class _InitialisingScale(autoflow.InvertibleModule):
    """A per-channel scale that, like ActNorm, initialises itself in a training forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.log_scale.copy_(-x.std(dim=(0, 2, 3), keepdim=True).log())
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0]) * 0

    def inverse(self, y):
        return y * (-self.log_scale).exp(), self.log_scale.sum().expand(y.shape[0]) * 0


def _inverse_gradients(modules, y, memory_saving):
    flow = autoflow.Sequential(*modules, memory_saving=memory_saving).train()
    x, logdet = flow.inverse(y)
    (x.square().sum() + logdet.sum()).backward()
    return x.detach(), [p.grad.clone() for p in flow.parameters()]


def test_an_uninitialised_actnorm_inverted_under_the_engine_is_not_initialised():
    # Its inverse never initialises; the rebuild runs the map the other way and must not either
    # (it used to, mid-backward, giving gradients of a map that was never applied).
    y = torch.randn(3, 4, 5, 5)

    def modules():
        torch.manual_seed(0)
        coupling = autoflow.AffineCoupling(4, hidden_channels=8)
        for p in coupling.parameters():
            torch.nn.init.normal_(p, std=0.1)
        return [autoflow.ActNorm(4), coupling]

    plain_x, plain_grads = _inverse_gradients(modules(), y, memory_saving=False)
    chain = modules()
    x, grads = _inverse_gradients(chain, y, memory_saving=True)
    assert not bool(chain[0].initialized)
    torch.testing.assert_close(x, plain_x)
    for g, expected in zip(grads, plain_grads):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)


def test_a_reconstruction_that_writes_parameters_is_refused():
    y = torch.randn(3, 4, 5, 5)
    with pytest.raises(autoflow.EngineError, match="changed its parameters \\['log_scale'\\]"):
        _inverse_gradients([_InitialisingScale(4), _InitialisingScale(4)], y,
                           memory_saving=True)


class _CheckpointedConditioner(nn.Module):
    """A conditioner that recomputes its activations itself (torch.utils.checkpoint)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(8, 4, 3, padding=1))
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.net, x, use_reentrant=self.reentrant)


def test_checkpointed_conditioners_work_or_are_refused_by_name():
    def gradients(memory_saving: bool, reentrant: bool) -> list:
        torch.manual_seed(0)
        chain = Sequential(
            autoflow.AffineCoupling(4, conditioner=_CheckpointedConditioner(reentrant)),
            autoflow.Permute(4),
            autoflow.AffineCoupling(4, conditioner=_CheckpointedConditioner(reentrant)),
            memory_saving=memory_saving).double()
        x = torch.randn(3, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        y, logdet = chain(x)
        (y.square().sum() - logdet.sum()).backward()
        return [x.grad, *(p.grad for p in chain.parameters())]

    for a, b in zip(gradients(True, False), gradients(False, False), strict=True):
        assert relative_error(a, b) < 1e-12
    with pytest.raises(EngineError, match="use_reentrant=True"):
        gradients(True, True)


def test_a_conditioner_whose_forward_updates_what_it_uses_is_rebuilt_alike():
    # Spectral norm's power iteration updates its vectors in training mode and then divides
    # the weight by the norm they give: the reconstruction must start from the vectors the
    # forward pass started from, or it computes with another weight (2.5% off before).
    from torch.nn.utils.parametrizations import spectral_norm

    def step(memory_saving: bool):
        torch.manual_seed(0)

        def conditioner() -> nn.Module:
            return nn.Sequential(spectral_norm(nn.Conv2d(2, 8, 3, padding=1)), nn.Tanh(),
                                 nn.Conv2d(8, 4, 3, padding=1))

        chain = Sequential(autoflow.AffineCoupling(4, conditioner=conditioner()),
                           autoflow.Permute(4),
                           autoflow.AffineCoupling(4, conditioner=conditioner()),
                           memory_saving=memory_saving).double().train()
        perturb(chain, scale=0.1)
        x = torch.randn(3, 4, 6, 6, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)).requires_grad_()
        y, logdet = chain(x)
        (y.square().sum() - logdet.sum()).backward()
        return [x.grad, *(p.grad for p in chain.parameters())], list(chain.buffers())

    expected, expected_buffers = step(False)
    found, found_buffers = step(True)
    for a, b in zip(found, expected, strict=True):
        assert relative_error(a, b) < 1e-12
    for a, b in zip(found_buffers, expected_buffers, strict=True):
        assert torch.equal(a, b)  # updated once, as by plain autograd
