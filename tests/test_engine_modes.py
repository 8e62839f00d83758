"""The engine gives plain autograd's gradients or a clear error, never a silent wrong one.

One test per case of issue 10: tensors requiring grad that are not the module's registered
parameters, parameters shared across modules, mode changes, in-place changes and double backward
between forward and backward, and anchors freed by the backward pass.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import Tensor, nn

from autoflow import AffineCoupling, EngineError, InvConv1x1, InvertibleModule, Sequential
from autoflow.testing import assert_engine_gradients_match, relative_error

from toys import Flip, ToyCoupling, perturb, randomize_conditioner


class ContextCoupling(ToyCoupling):
    """An affine coupling conditioned on ``self.context``, a tensor set from outside."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.net = nn.Conv2d(self.half + 1, 2 * (channels - self.half), 3, padding=1)
        self.context: Tensor | None = None

    def _scale_shift(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        c = self.context.expand(x0.shape[0], 1, *x0.shape[2:])
        s, t = self.net(torch.cat([x0, c], 1)).chunk(2, 1)
        return torch.tanh(s), t


class HyperScale(InvertibleModule):
    """``y = x * exp(w)`` with a per-channel ``w`` produced by a hypernetwork (not a parameter)."""

    def __init__(self, make_weight) -> None:
        super().__init__()
        self.make_weight = make_weight  # a closure: the weight is computed outside the module

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.make_weight()
        return x * w.exp(), (w.sum() * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        w = self.make_weight()
        return y * (-w).exp(), -(w.sum() * y.shape[2] * y.shape[3]).expand(y.shape[0])


class Borrower(ToyCoupling):
    """A coupling that also scales its shift by a parameter of another module it only references."""

    def __init__(self, channels: int, lender: nn.Module) -> None:
        super().__init__(channels)
        self._lender = [lender]  # a plain list: not registered, so not in self.parameters()

    def _scale_shift(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        s, t = super()._scale_shift(x0)
        return s, t * self._lender[0].net[0].bias.sum()


def loss_and_grads(chain: Sequential, x: Tensor, wrt: list[Tensor], *, saving: bool,
                   before_backward=None) -> list[Tensor | None]:
    chain.memory_saving = saving
    y, logdet = chain(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    loss = (y * weights).sum() + logdet.sum()
    if before_backward is not None:
        before_backward()
    return list(torch.autograd.grad(loss, wrt, allow_unused=True))


def assert_same(engine: list, plain: list, tol: float = 1e-9) -> None:
    assert len(engine) == len(plain)
    for k, (a, b) in enumerate(zip(engine, plain)):
        assert (a is None) == (b is None), f"gradient {k}: engine {a is None}, autograd {b is None}"
        if a is not None:
            assert relative_error(a, b) <= tol, f"gradient {k} off by {relative_error(a, b):.2e}"


def test_case1_a_context_computed_by_another_network_gets_its_gradient():
    torch.manual_seed(0)
    encoder = nn.Linear(3, 1).double()  # computes the condition; not part of the chain
    blocks = [perturb(ContextCoupling(4), seed=k).double() for k in range(3)]
    chain = Sequential(blocks[0], Flip(), blocks[1], Flip(), blocks[2])
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    label = torch.randn(3, dtype=torch.float64)
    wrt = [x, *encoder.parameters(), *chain.parameters()]
    results = []
    for saving in (False, True):
        context = encoder(label).reshape(1, 1, 1, 1)  # non-leaf, requires grad
        for block in blocks:
            block.context = context
        results.append(loss_and_grads(chain, x, wrt, saving=saving))
    assert all(g is not None for g in results[0])
    assert_same(results[1], results[0])


def test_case1_a_hypernetwork_weight_and_a_captured_leaf_get_their_gradients():
    torch.manual_seed(0)
    hyper = nn.Linear(2, 4).double()
    code = torch.randn(2, dtype=torch.float64)
    free = torch.randn(4, 1, 1, dtype=torch.float64, requires_grad=True)  # a captured leaf
    chain = Sequential(HyperScale(lambda: hyper(code).reshape(4, 1, 1)), Flip(),
                       HyperScale(lambda: free), perturb(ToyCoupling(4)).double())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)  # the input does not require grad
    wrt = [*hyper.parameters(), free, *chain.parameters()]
    plain = loss_and_grads(chain, x, wrt, saving=False)
    engine = loss_and_grads(chain, x, wrt, saving=True)
    assert all(g is not None for g in plain)
    assert_same(engine, plain)


def test_case2_a_parameter_used_by_another_module_gets_the_sum_of_both_contributions():
    lender = perturb(ToyCoupling(4), seed=1).double()
    chain = Sequential(lender, Flip(), perturb(Borrower(4, lender), seed=2).double())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    wrt = [x, *chain.parameters()]
    assert_same(loss_and_grads(chain, x, wrt, saving=True),
                loss_and_grads(chain, x, wrt, saving=False))
    assert_engine_gradients_match(chain, x.detach())


def test_case2_a_module_used_twice_sums_its_gradients():
    shared = perturb(ToyCoupling(4), seed=1).double()
    chain = Sequential(shared, Flip(), shared, Flip(), perturb(ToyCoupling(4), seed=3).double())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    wrt = [x, *chain.parameters()]
    engine = loss_and_grads(chain, x, wrt, saving=True)
    plain = loss_and_grads(chain, x, wrt, saving=False)
    assert_same(engine, plain)
    # Either use alone gives a different gradient, so an overwrite instead of a sum shows.
    single = Sequential(shared, Flip())
    alone = loss_and_grads(single, x, [shared.net[0].weight], saving=False)[0]
    assert relative_error(alone, plain[1]) > 1e-2


@pytest.mark.parametrize("switch", ["eval", "train"])
def test_case3_the_forward_mode_is_restored_for_the_reconstruction(switch):
    torch.manual_seed(0)
    chain = randomize_conditioner(Sequential(
        *[AffineCoupling(4, volume_norm="channel") for _ in range(2)]), scale=0.3).double()
    chain.train(switch == "eval")
    with torch.no_grad():  # give the running means a value other than zero
        for _ in range(3):
            chain.train()(torch.randn(8, 4, 5, 5, dtype=torch.float64))
    chain.train(switch == "eval")
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    wrt = [x, *chain.parameters()]
    plain = loss_and_grads(chain, x, wrt, saving=False)
    flip = chain.eval if switch == "eval" else chain.train
    before = [m.training for m in chain.modules()]
    engine = loss_and_grads(chain, x, wrt, saving=True, before_backward=flip)
    assert_same(engine, plain)
    assert [m.training for m in chain.modules()] != before  # the user's switch is kept


def test_case4_an_optimizer_step_before_backward_is_refused_naming_the_parameter():
    chain = perturb(Sequential(ToyCoupling(4), Flip(), ToyCoupling(4))).double()
    chain.memory_saving = True
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y, logdet = chain(x)
    with torch.no_grad():
        chain[2].net[0].weight.add_(0.1)  # what optimizer.step() does
    with pytest.raises(EngineError, match=r"module '2' \(ToyCoupling\).*parameter 'net.0.weight'"
                       r".*modified in place"):
        (y.sum() + logdet.sum()).backward()


def test_case4_a_changed_captured_tensor_or_buffer_is_refused():
    free = torch.randn(4, 1, 1, dtype=torch.float64, requires_grad=True)
    chain = Sequential(HyperScale(lambda: free), InvConv1x1(4).double(), memory_saving=True)
    y, logdet = chain(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with torch.no_grad():
        free.mul_(2)
    with pytest.raises(EngineError, match="module '0' .*a tensor of shape \\(4, 1, 1\\)"):
        y.sum().backward()
    y, logdet = chain(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    chain[1].sign.neg_()  # a buffer the forward pass read
    with pytest.raises(EngineError, match="module '1' \\(InvConv1x1\\).*buffer 'sign'"):
        y.sum().backward()


def test_case4_running_statistics_updated_by_a_second_forward_are_not_an_error():
    chain = perturb(Sequential(ToyCoupling(4, batch_norm=True), Flip(),
                               AffineCoupling(4, volume_norm="spatial"))).double().train()
    chain.memory_saving = True
    x1, x2 = (torch.randn(3, 4, 5, 5, dtype=torch.float64) for _ in range(2))
    (y1, ld1), (y2, ld2) = chain(x1.requires_grad_()), chain(x2.requires_grad_())
    (y1.sum() + y2.sum() + ld1.sum() + ld2.sum()).backward()
    assert x1.grad is not None and x2.grad is not None


def test_a_reconstruction_writing_a_buffer_another_call_reads_is_not_an_error():
    # A training forward, then an evaluation forward (which reads the batch norm's buffers and
    # so watches them), then the two backward passes in that order. The first reconstruction
    # runs the batch norm in training mode again, which counts one more batch before the
    # engine restores the buffers: an engine write, which the second backward must not take
    # for the user's in-place change, and whose restore must leave the buffers and the
    # gradients as plain autograd has them.
    def run(saving: bool) -> tuple[list[Tensor | None], list[Tensor]]:
        torch.manual_seed(0)
        chain = perturb(Sequential(ToyCoupling(4, batch_norm=True), Flip(),
                                   AffineCoupling(4, volume_norm="spatial"))).double()
        chain.memory_saving = saving
        x1, x2 = (torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
                  for _ in range(2))
        y1, ld1 = chain.train()(x1)
        y2, ld2 = chain.eval()(x2)
        (y1.square().sum() + ld1.sum()).backward()
        (y2.square().sum() + ld2.sum()).backward()
        return [x1.grad, x2.grad, *(p.grad for p in chain.parameters())], list(chain.buffers())

    (engine, engine_buffers), (plain, plain_buffers) = run(True), run(False)
    assert_same(engine, plain)
    assert_same(engine_buffers, plain_buffers)


def test_case5_create_graph_is_refused():
    chain = perturb(Sequential(ToyCoupling(4), Flip())).double()
    chain.memory_saving = True
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y, logdet = chain(x)
    with pytest.raises(EngineError, match="create_graph=True .*memory_saving=False"):
        torch.autograd.grad((y.square().sum() + logdet.sum()), x, create_graph=True)


def test_anchored_inputs_are_held_by_autograd_and_freed_by_backward():
    chain = perturb(Sequential(*[m for _ in range(8) for m in (ToyCoupling(4), Flip())]))
    chain.memory_saving = True
    chain.engine_options.anchor_every = 2
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    packed = []

    class Held:
        def __init__(self, t):
            self.t = t

    def pack(t):
        packed.append(Held(t))
        return packed[-1]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        y, logdet = chain(x)
    state_bytes = x.numel() * x.element_size()
    # The output and the inputs of modules 0, 2, ..., 14.
    assert sum(h.t.numel() * h.t.element_size() for h in packed) == 9 * state_bytes
    anchors = [weakref.ref(h.t) for h in packed if h.t.data_ptr() != y.data_ptr()]
    assert len(anchors) == 8
    packed.clear()
    gc.collect()
    assert all(ref() is not None for ref in anchors)  # held until backward
    (y.sum() + logdet.sum()).backward()
    gc.collect()
    # While the output (and its graph node) lives on, nothing keeps the anchors alive.
    assert y.grad_fn is not None and all(ref() is None for ref in anchors)


def autocast_chain(kind: str) -> tuple[Sequential, Tensor]:
    """Every built-in primitive, in a flat chain or a PyramidFlow-like one."""
    from autoflow import (
        ActNorm,
        AdditiveCoupling,
        DualPyramidCoupling,
        LaplacianPyramid,
        LiftingConv1x1,
        MaskedCoupling,
        Permute,
        PyramidCoupling,
        SplineCoupling,
        checkerboard_mask,
    )

    torch.manual_seed(0)
    if kind == "flat":
        chain = Sequential(
            # The spline and masked couplings follow a 1x1 convolution, whose autocast output
            # is bf16/fp16: they must lift it to float32 themselves.
            ActNorm(4), InvConv1x1(4), SplineCoupling(4), AffineCoupling(4),
            AdditiveCoupling(4), AffineCoupling(4, volume_norm="channel"), Permute(4),
            InvConv1x1(4, volume_norm=True), MaskedCoupling(4, checkerboard_mask((4, 8, 8))),
            AffineCoupling(4, volume_norm="spatial"))
        x = torch.randn(2, 4, 8, 8)
    else:
        chain = Sequential(
            LiftingConv1x1(4, in_channels=3), LaplacianPyramid(3),
            PyramidCoupling(4, target=0, source=1, volume_norm="channel"),
            DualPyramidCoupling(4, target=1), PyramidCoupling(4, target=2, source=1),
            PyramidCoupling(4, target=1, source=0, volume_norm="spatial"))
        x = torch.randn(2, 3, 16, 16)
    return randomize_conditioner(chain, scale=0.3), x


def autocast_gradients(chain: Sequential, x: Tensor, saving: bool, dtype) -> list[Tensor]:
    chain.memory_saving = saving
    x = x.clone().requires_grad_()
    generator = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y, logdet = chain(x)
        loss = sum((t.float() * torch.randn(t.shape, generator=generator)).sum()
                   for t in (y if isinstance(y, tuple) else (y,)))
        if logdet is not None:
            loss = loss + logdet.float().sum()
    assert torch.isfinite(loss)
    return list(torch.autograd.grad(loss, [x, *chain.parameters()]))


def worst(a: list[Tensor], b: list[Tensor]) -> float:
    return max(relative_error(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["flat", "pyramid"])
def test_autocast_through_every_primitive_matches_plain_autocast(kind, dtype):
    chain, x = autocast_chain(kind)
    exact = autocast_gradients(chain, x, False, None)
    plain = autocast_gradients(chain, x, False, dtype)
    engine = autocast_gradients(chain, x, True, dtype)
    reached = worst(plain, exact)  # what plain autocast reaches against float32
    assert worst(engine, exact) <= 1.25 * reached
    # The engine reproduces plain autocast far more closely than autocast reproduces float32:
    # a reconstruction without the forward pass's autocast state is off by about `reached`.
    assert worst(engine, plain) <= 0.5 * reached


def test_a_non_floating_tensor_in_the_state_passes_through():
    from autoflow import OnFirst

    chain = perturb(Sequential(OnFirst(ToyCoupling(4)), OnFirst(Flip()),
                               OnFirst(ToyCoupling(4)))).double()
    labels = torch.arange(2)  # rides along in the state, takes no gradient
    assert_engine_gradients_match(chain, (torch.randn(2, 4, 3, 3, dtype=torch.float64), labels))


class SloppyInverse(ToyCoupling):
    """Its inverse is off by 1e-3: only an anchored input makes the engine exact."""

    def inverse(self, y):
        x, logdet = super().inverse(y)
        return x * 1.001, logdet


def test_anchored_modules_are_rebuilt_from_their_kept_input():
    chain = perturb(Sequential(SloppyInverse(4), Flip(), SloppyInverse(4))).double()
    chain.engine_options.anchor_every = 1  # every input kept: nothing is inverted
    assert_engine_gradients_match(chain, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    chain.engine_options.anchor_every = None
    with pytest.raises(AssertionError, match="differs from plain autograd"):
        assert_engine_gradients_match(chain, torch.randn(2, 4, 3, 3, dtype=torch.float64))
