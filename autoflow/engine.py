"""Memory-saving backpropagation through a chain of invertible modules.

A chain ``x_0 -> f_1 -> x_1 -> ... -> f_D -> x_D`` normally keeps every ``x_i`` and every
intermediate of every ``f_i`` for the backward pass, so training memory grows with the depth
``D``. Because each ``f_i`` is invertible, the engine keeps only ``x_D``: the forward pass runs
without a graph, and the backward pass walks the chain in reverse, asking each module to rebuild
its input ``x_{i-1}`` from ``x_i`` together with its local graph
(:meth:`~autoflow.InvertibleModule.reconstruct`, one conditioner evaluation for couplings)
and back-propagating through that module alone.
Memory is then the state plus one module's graph, whatever ``D`` is; the price is about one extra
forward evaluation per step.

What the engine guarantees:

* gradients equal those of plain autograd for inputs, parameters and log-dets;
* parameters are looked up at call time, so freezing or adding parameters just works;
* module state (running statistics, data-dependent initialisation) is updated once, by the
  forward pass: every buffer is restored after a reconstruction, and the random-number state
  each module saw is replayed, so dropout masks match;
* the autocast state of the forward pass is restored for the reconstruction.

Reconstruction error. Rebuilding inputs from outputs accumulates floating-point error through
the chain: each inverse subtracts the shift ``t`` and divides by ``exp(s)``, so what is lost is
relative to the size of the *outputs*. It stays near float precision when the chain does not
amplify its input much: log-scales soft-clamped, 1×1 convolutions far from singular, volume
normalisation keeping log-scales centred. It grows when a deep chain amplifies its input by
orders of magnitude (for instance cross-level shifts that feed back on each other in an
untrained, randomly weighted pyramid stack): then the small input is recovered from large
outputs by cancellation. Set ``debug=True`` to measure the error per module (see
:class:`EngineOptions`) and ``anchor_every=k`` to keep the true input of every ``k``-th module,
which bounds the drift at the cost of ``D / k`` saved states.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import (
    InvertibleModule,
    Reconstruction,
    State,
    flatten_state,
    pack_like,
    recompute,
    same_randomness,
    state_shape,
    structure_of,
    sum_logdets,
)
from .errors import EngineError

__all__ = ["EngineOptions", "run_memory_saving", "run_plain"]

logger = logging.getLogger(__name__)


@dataclass
class EngineOptions:
    """Settings of the memory-saving engine.

    Attributes:
        anchor_every: Keep the true input of every ``k``-th module (module ``0, k, 2k, ...``)
            instead of reconstructing it; ``None`` keeps none. Bounds reconstruction drift.
        debug: Keep every module's true input, compare it with the reconstruction during
            backward and record the worst relative error per module in ``errors``; also check
            for non-finite values in the forward pass. Costs the memory the engine saves.
        preserve_rng_state: Replay each module's random-number state during reconstruction,
            so randomness (dropout) in conditioners is identical to the forward pass.
        errors: Worst relative reconstruction error seen per module name (debug mode).
    """

    anchor_every: int | None = None
    debug: bool = False
    preserve_rng_state: bool = True
    errors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.anchor_every is not None and (
            not isinstance(self.anchor_every, int) or self.anchor_every < 1
        ):
            raise EngineError(
                f"anchor_every must be a positive int or None, received {self.anchor_every!r}"
            )


def run_memory_saving(
    blocks: Sequence[tuple[str, InvertibleModule]],
    x: State,
    options: EngineOptions,
    *,
    inverse: bool = False,
) -> tuple[State, Tensor | None]:
    """Run ``blocks`` in order on ``x`` without storing intermediate activations.

    Args:
        blocks: ``(name, module)`` pairs, in the order they are applied.
        x: The input state.
        options: Engine settings.
        inverse: Apply ``module.inverse`` to each block instead of ``forward`` (the caller
            passes the blocks already in reverse order).

    Returns:
        The output state and the summed log-det (``None`` if a module reports none).
    """
    params: list[Tensor] = []
    seen: set[int] = set()
    for _, block in blocks:
        for p in block.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    inputs = flatten_state(x)
    if not torch.is_grad_enabled() or not (params or any(t.requires_grad for t in inputs)):
        return run_plain(blocks, x, inverse=inverse, debug=options.debug)
    plan = _Plan(blocks, x, params, options, inverse)
    results = _MemorySavingChain.apply(plan, *inputs, *params)
    outputs, logdet = results[:-1], results[-1]
    return pack_like(list(outputs), plan.output_like), (logdet if plan.has_logdet else None)


def _step(block: InvertibleModule, state: State, inverse: bool) -> tuple[State, Tensor | None]:
    return block.inverse(state) if inverse else block(state)


def run_plain(
    blocks: Sequence[tuple[str, InvertibleModule]], x: State, *, inverse: bool = False,
    debug: bool = False,
) -> tuple[State, Tensor | None]:
    """Apply ``(name, module)`` pairs with ordinary autograd, summing their log-dets."""
    logdets = []
    for name, block in blocks:
        x, logdet = _step(block, x, inverse)
        if debug:
            _check_finite(name, x)
        logdets.append(logdet)
    return x, sum_logdets(logdets)


def _check_finite(name: str, state: State) -> None:
    for t in flatten_state(state):
        if not torch.isfinite(t).all():
            raise EngineError(f"module '{name}' produced NaN or inf (debug check)")


class _Plan:
    """Everything the autograd function needs besides tensors, resolved at call time."""

    def __init__(self, blocks, x, params, options, inverse):
        self.blocks = list(blocks)
        # Only the structure of the input is kept, not its tensors, so nothing stays alive.
        self.input_like = structure_of(x)
        self.input_requires_grad = [t.requires_grad for t in flatten_state(x)]
        self.n_inputs = len(self.input_requires_grad)
        self.params = params
        self.options = options
        self.inverse = inverse
        self.output_like: State = x
        self.has_logdet = True
        self.input_shapes: list = []
        self.rng_states: list = []
        self.kept_inputs: dict[int, State] = {}
        device = flatten_state(x)[0].device
        self.device_type = device.type
        self.autocast = (
            torch.is_autocast_enabled(self.device_type),
            torch.get_autocast_dtype(self.device_type),
        )


@contextlib.contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` on exit, so a reconstruction leaves no trace."""
    saved = [(owner, name, buf.clone()) for owner in module.modules()
             for name, buf in owner._buffers.items() if buf is not None]
    try:
        yield
    finally:
        for owner, name, value in saved:
            current = owner._buffers.get(name)
            if current is not None and current.shape == value.shape:
                current.copy_(value)
            else:
                owner._buffers[name] = value


class _MemorySavingChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: Tensor):
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        state = pack_like(list(tensors[: plan.n_inputs]), plan.input_like)
        owned = {t.untyped_storage().data_ptr() for t in tensors}
        logdets = []
        keep_all = plan.options.debug
        anchor = plan.options.anchor_every
        with torch.no_grad():
            for i, (name, block) in enumerate(plan.blocks):
                plan.input_shapes.append(state_shape(state))
                if keep_all or (anchor is not None and i % anchor == 0):
                    plan.kept_inputs[i] = pack_like([t.detach() for t in flatten_state(state)],
                                                    state)
                plan.rng_states.append(_rng_state(state) if plan.options.preserve_rng_state
                                       else None)
                state, logdet = _step(block, state, plan.inverse)
                if keep_all:
                    _check_finite(name, state)
                logdets.append(logdet)
        total = sum_logdets(logdets)
        plan.output_like = structure_of(state)
        plan.has_logdet = total is not None
        # An output sharing storage with an input (a pass-through level) must be a new tensor:
        # autograd outputs may not alias the function's inputs.
        outputs = [t.clone() if t.untyped_storage().data_ptr() in owned else t
                   for t in flatten_state(state)]
        ctx.save_for_backward(*outputs)
        if total is None:
            total = outputs[0].new_zeros(outputs[0].shape[0])
        return (*outputs, total)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        plan: _Plan = ctx.plan
        try:
            outputs = ctx.saved_tensors
        except RuntimeError as error:
            raise EngineError(
                "backward ran twice through a memory-saving chain whose saved outputs were "
                "already freed; pass retain_graph=True to the first backward to run it again"
            ) from error
        state = pack_like([t.detach() for t in outputs], plan.output_like)
        grad_state = [g if g is not None else torch.zeros_like(t)
                      for g, t in zip(grads[:-1], outputs)]
        grad_logdet = grads[-1] if plan.has_logdet else None
        index = {id(p): k for k, p in enumerate(plan.params)}
        param_grads: list[Tensor | None] = [None] * len(plan.params)
        enabled, dtype = plan.autocast
        for i in reversed(range(len(plan.blocks))):
            name, block = plan.blocks[i]
            # Buffers are restored only after the local backward: autograd checks that tensors
            # it saved (batch-norm running statistics) were not modified in between.
            with _frozen_buffers(block):
                with torch.enable_grad(), _replay_rng(plan.rng_states[i], state), torch.autocast(
                    plan.device_type, dtype=dtype, enabled=enabled
                ):
                    rec = _reconstruct(plan, i, block, state)
                rebuilt = rec.input_from_leaves([leaf.detach() for leaf in rec.leaves])
                _check_reconstruction(plan, i, name, rebuilt)
                block_params = [p for p in block.parameters() if id(p) in index]
                leaf_grads, grads_of_params = _local_backward(
                    rec, grad_state, grad_logdet, block_params
                )
            for p, g in zip(block_params, grads_of_params):
                if g is not None:
                    k = index[id(p)]
                    param_grads[k] = g if param_grads[k] is None else param_grads[k] + g
            state = rebuilt
            grad_state = flatten_state(rec.input_from_leaves(leaf_grads))
            del rec
        input_grads = [g if wanted else None
                       for g, wanted in zip(grad_state, plan.input_requires_grad)]
        return (None, *input_grads, *param_grads)


def _reconstruct(plan: _Plan, i: int, block: InvertibleModule, state: State) -> Reconstruction:
    kept = plan.kept_inputs.get(i)
    if kept is not None and not plan.options.debug:
        return recompute(block.inverse if plan.inverse else block, kept)
    return block.reconstruct_inverse(state) if plan.inverse else block.reconstruct(state)


def _check_reconstruction(plan: _Plan, i: int, name: str, rebuilt: State) -> None:
    if state_shape(rebuilt) != plan.input_shapes[i]:
        raise EngineError(
            f"module '{name}' reconstructed an input of shape {state_shape(rebuilt)}, but its "
            f"forward pass received {plan.input_shapes[i]}: its inverse does not undo forward"
        )
    if plan.options.debug:
        worst = 0.0
        for r, t in zip(flatten_state(rebuilt), flatten_state(plan.kept_inputs[i])):
            scale = t.abs().max().item() if t.numel() else 0.0
            worst = max(worst, (r - t).abs().max().item() / max(scale, 1e-30))
        plan.options.errors[name] = max(worst, plan.options.errors.get(name, 0.0))
        logger.debug("reconstruction error of module '%s': %.3e", name, worst)


def _local_backward(rec, grad_state, grad_logdet, params):
    outputs, out_grads = [], []
    for out, g in zip(flatten_state(rec.output), grad_state):
        if out.requires_grad:
            outputs.append(out)
            out_grads.append(g.to(out.dtype))
    if grad_logdet is not None and rec.logdet is not None and rec.logdet.requires_grad:
        outputs.append(rec.logdet)
        out_grads.append(grad_logdet.to(rec.logdet.dtype))
    wanted = [leaf for leaf in rec.leaves if leaf.requires_grad] + params
    found = torch.autograd.grad(outputs, wanted, out_grads, allow_unused=True) if outputs else (
        [None] * len(wanted))
    found = list(found)
    leaf_grads = []
    for leaf in rec.leaves:
        g = found.pop(0) if leaf.requires_grad else None
        leaf_grads.append(torch.zeros_like(leaf) if g is None else g)
    return leaf_grads, found


def _rng_state(state: State):
    device = flatten_state(state)[0].device
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(saved, state: State) -> Iterator[None]:
    if saved is None:
        yield
        return
    with same_randomness(state):
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1], flatten_state(state)[0].device)
        yield
