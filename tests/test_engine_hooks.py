"""Hooks under the memory-saving engine: honoured as plain autograd honours them, or refused.

Tensor hooks and ``retain_grad`` on what a chain uses from outside (parameters, a context)
must act once, as in plain autograd, although the engine differentiates its local graphs with
``autograd.grad``. Module hooks on the chain's invertible modules are bypassed when the engine
rebuilds a module with its inverse: one that replaces an input or output would make the
gradients wrong, and a module backward hook would never fire, so both are refused; hooks that
only observe, and hooks on conditioners (rerun when the map is rebuilt), are honoured.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import autoflow
from autoflow import EngineError
from autoflow.base import flatten_state
from autoflow.testing import relative_error

from toys import perturb

CONTEXT = 5


def _chain(memory_saving: bool) -> autoflow.Sequential:
    torch.manual_seed(0)
    chain = autoflow.glow(4, levels=2, depth_per_level=2, hidden_channels=8,
                          memory_saving=memory_saving, context_channels=CONTEXT).double()
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        chain(_images(), context=torch.zeros(3, CONTEXT, dtype=torch.float64))
    return perturb(chain, scale=0.1)


def _images() -> Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)


def _couplings(chain: nn.Module) -> list[autoflow.AffineCoupling]:
    return [m for m in chain.modules() if isinstance(m, autoflow.AffineCoupling)]


def _step(memory_saving: bool, prepare=lambda chain, context: None):
    """Gradients of the input, the raw context, every parameter and the retained context."""
    chain = _chain(memory_saving)
    x = _images().requires_grad_()
    raw = torch.linspace(-1, 1, 3 * CONTEXT, dtype=torch.float64).view(3, CONTEXT)
    raw.requires_grad_()
    context = torch.tanh(raw)  # not a leaf: as an encoder's output
    prepare(chain, context)
    z, logdet = chain(x, context=context)
    (sum(t.square().sum() for t in flatten_state(z)) - logdet.sum()).backward()
    grads = [x.grad, raw.grad, *(p.grad for p in chain.parameters())]
    return grads, context.grad if context.retains_grad else None


def _assert_close(found: list[Tensor], expected: list[Tensor]) -> None:
    for a, b in zip(found, expected, strict=True):
        assert relative_error(a, b) < 1e-9  # the hooks' mistakes are factors, not roundings


def _assert_same(prepare) -> None:
    expected, expected_retained = _step(False, prepare)
    found, found_retained = _step(True, prepare)
    _assert_close(found, expected)
    if expected_retained is not None:
        _assert_close([found_retained], [expected_retained])


def test_tensor_hooks_on_parameters_act_once():
    def prepare(chain, context):
        coupling = _couplings(chain)[0]
        for p in coupling.parameters():
            p.register_hook(lambda g: 3 * g)

    _assert_same(prepare)


def test_tensor_hook_and_retain_grad_on_the_context_act_once():
    def prepare(chain, context):
        context.register_hook(lambda g: g * torch.arange(1.0, 1.0 + CONTEXT, dtype=g.dtype))
        context.retain_grad()

    _assert_same(prepare)


def test_observing_hooks_and_conditioner_hooks_are_honoured():
    calls = []

    def prepare(chain, context):
        calls.clear()
        coupling = _couplings(chain)[1]
        coupling.register_forward_pre_hook(lambda m, args: None)
        coupling.register_forward_hook(lambda m, args, out: out)  # hands the output back
        coupling.register_forward_pre_hook(lambda m, args, kwargs: (args, kwargs),
                                           with_kwargs=True)  # hands its arguments back
        # Changes what the conditioner computes: rerun with the map, so honoured.
        coupling.conditioner.register_forward_hook(lambda m, args, out: 1.5 * out)
        coupling.conditioner.register_full_backward_hook(lambda m, gi, go: calls.append(1))

    expected, _ = _step(False, prepare)
    plain_calls = len(calls)
    found, _ = _step(True, prepare)
    assert plain_calls == len(calls) == 1
    _assert_close(found, expected)


@pytest.mark.parametrize("kind", ["forward", "pre", "pre-with-kwargs"])
def test_a_hook_replacing_a_modules_output_or_input_is_refused(kind):
    chain = _chain(True)
    coupling = _couplings(chain)[0]
    if kind == "forward":
        handle = coupling.register_forward_hook(lambda m, args, out: (2 * out[0], out[1]))
    elif kind == "pre":
        handle = coupling.register_forward_pre_hook(lambda m, args: (2 * args[0],))
    else:
        handle = coupling.register_forward_pre_hook(
            lambda m, args, kwargs: ((2 * args[0],), kwargs), with_kwargs=True)
    context = torch.zeros(3, CONTEXT, dtype=torch.float64)
    with pytest.raises(EngineError, match="returned a value, replacing its input or output"):
        chain(_images().requires_grad_(), context=context)
    # The user's hook is back in place, unwrapped, and runs as before.
    table = coupling._forward_hooks if kind == "forward" else coupling._forward_pre_hooks
    assert table[handle.id].__name__ == "<lambda>"
    handle.remove()
    chain(_images().requires_grad_(), context=context)


def test_a_module_backward_hook_on_a_chain_member_is_refused():
    chain = _chain(True)
    _couplings(chain)[0].register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(EngineError, match="backward hook"):
        chain(_images().requires_grad_(), context=torch.zeros(3, CONTEXT, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["register_hook", "retain_grad"])
def test_a_gradient_hook_on_a_members_output_gets_an_engine_error(kind):
    """Torch refuses a tensor hook on a tensor without grad; under the engine the states between
    modules have none, and the error says why instead of leaving torch's bare message."""
    chain = _chain(True)

    def hook(module, args, out):
        if kind == "register_hook":
            out[0].register_hook(lambda g: g)
        else:
            out[0].retain_grad()

    _couplings(chain)[0].register_forward_hook(hook)
    with pytest.raises(EngineError, match="do not require grad") as caught:
        chain(_images().requires_grad_(), context=torch.zeros(3, CONTEXT, dtype=torch.float64))
    assert "memory_saving=False" in str(caught.value)
