"""Memory-saving backpropagation through a chain of invertible modules.

A chain ``x_0 -> f_1 -> x_1 -> ... -> f_D -> x_D`` normally keeps every ``x_i`` and every
intermediate of every ``f_i`` for the backward pass, so training memory grows with the depth
``D``. Because each ``f_i`` is invertible, the engine keeps only ``x_D``: the forward pass runs
without a graph, and the backward pass walks the chain in reverse, asking each module to rebuild
its input ``x_{i-1}`` from ``x_i`` together with its local graph
(:meth:`~autoflow.InvertibleModule.reconstruct`, one conditioner evaluation for couplings)
and back-propagating through that module alone.
Memory is then the state plus one module's graph, whatever ``D`` is; the price is about one extra
forward evaluation per step. Cheap modules without a conditioner (ActNorm, a permutation, a 1×1
convolution, a reshape) are folded into the rebuild of the module before them: inverted without a
graph, then run again on that module's rebuilt output, so that one local backward covers a run
of up to :data:`_RUN_LENGTH` modules (a Glow step is one call, not three; see
:meth:`_Plan.runs_of`). Memory is then bounded by the largest run's graph, still independent of
``D``.

What the engine guarantees (otherwise it raises :class:`~autoflow.EngineError`):

* gradients equal those of plain autograd for inputs, log-dets and every tensor requiring grad
  that a module's forward pass touches: its parameters, but also parameters of other modules it
  reaches through a reference, and captured tensors (a condition computed by another network, a
  hypernetwork's weight). They are found while the forward pass runs, by a
  :class:`~torch.overrides.TorchFunctionMode` that notes every tensor argument requiring grad
  (under ``no_grad`` nothing the module computes requires grad, so whatever does came from
  outside); module writers declare nothing. A self-contained module (every class in its tree
  declared with :func:`~autoflow.base.self_contained`, no hooks, only plain data in its
  attributes: checked at every call) is not watched, its registered tensors are taken instead;
* what a reconstruction needs is what the forward pass saw: the version counter of every such
  tensor and of every buffer the module read without updating it is recorded, and a change
  before backward (an optimizer step, an in-place edit) is refused, as autograd refuses;
  train/eval mode of every submodule and the autocast state are recorded and restored;
* module state (running statistics, data-dependent initialisation) is updated once, by the
  forward pass: buffers changed by a reconstruction are restored, and the random-number state
  of each module that drew random numbers is replayed, so dropout masks match (the caller's
  state is put back after the backward pass); such a module whose rebuild, drawing those
  numbers again, does not give its output back (an inverse that draws them in another order)
  is refused;
* ``create_graph=True`` (double backward) is refused: rebuilt inputs carry no graph to the
  chain's output, so second-order gradients cannot be right;
* under a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``: per-sample gradients, say) or
  with forward-mode AD, whose rules a backward pass rebuilding its inputs does not have, the
  chain runs with plain autograd and a warning says so: the derivatives are right, the
  activations are stored;
* tensor hooks and ``retain_grad`` on tensors the chain uses from outside (parameters, a
  context) act once, in the outer backward pass, as with plain autograd; a forward hook or
  pre-hook of an invertible module in the chain that replaces its output or input (the
  inverse would not undo it), and a module backward hook on a module of the chain (the
  rebuild bypasses ``__call__``, so it would never fire), are refused;
* anchored inputs and the saved output are held by autograd and freed by the backward pass.

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
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .base import (
    PER_SAMPLE,
    RANDOMNESS,
    SELF_CONTAINED,
    InvertibleModule,
    Reconstruction,
    RngSnapshot,
    State,
    TensorSlots,
    accepts_context,
    autocast_as,
    autocast_state,
    call_with_context,
    check_logdet,
    flatten_state,
    outer_hooks_only,
    pack_like,
    plain_autograd_reason,
    put_back,
    recompute,
    restore_rng,
    rng_snapshot,
    set_modes,
    state_shape,
    structure_of,
    sum_logdets,
    tensor_slots,
    undo_put_back,
    warn_caller,
)
from .errors import EngineError

__all__ = ["EngineOptions", "run_memory_saving", "run_plain"]

logger = logging.getLogger(__name__)

# Version increments made by reconstructions themselves (a module's forward re-run in training
# mode updates running statistics before the engine restores them), per tensor and across all
# chains: they are not changes the backward pass has to refuse.
_ENGINE_WRITES: WeakIdKeyDictionary = WeakIdKeyDictionary()


#: The most modules one local backward covers (see _Plan.runs_of): the modules folded into a
#: rebuild keep their graphs until that backward, so a cap keeps memory flat with depth.
_RUN_LENGTH = 8


def _user_version(t: Tensor) -> int:
    # The dictionary is empty unless a reconstruction wrote a buffer: skip the weak lookup then.
    return t._version - _ENGINE_WRITES.get(t, 0) if len(_ENGINE_WRITES) else t._version


@dataclass
class EngineOptions:
    """Settings of the memory-saving engine.

    Attributes:
        anchor_every: Keep the true input of every ``k``-th module (module ``0, k, 2k, ...``)
            instead of reconstructing it; ``None`` keeps none. Bounds reconstruction drift.
        debug: Keep every module's true input, compare it with the reconstruction during
            backward and record the worst relative error per module in ``errors``; also check
            for non-finite values in the forward pass. Costs the memory the engine saves.
        preserve_rng_state: Replay the random-number state of each module that drew random
            numbers during its reconstruction, so randomness (dropout) in conditioners is
            identical to the forward pass.
        backward_chunk: Rebuild and differentiate each run of modules in slices of at most
            this many samples, so the backward pass's local graph holds one slice's
            activations instead of the batch's; ``None`` does the whole batch at once. Only
            runs whose every module treats samples alone (:data:`~autoflow.base.PER_SAMPLE`,
            self-contained, no random numbers drawn, a context with one row per sample or one
            for all) are sliced; the others run whole. Costs time per slice.
        errors: Worst relative reconstruction error seen per module name (debug mode).
    """

    anchor_every: int | None = None
    debug: bool = False
    preserve_rng_state: bool = True
    backward_chunk: int | None = None
    errors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backward_chunk is not None and (
            type(self.backward_chunk) is not int or self.backward_chunk < 1
        ):
            raise EngineError(
                "backward_chunk must be a positive int or None, received "
                f"{self.backward_chunk!r}"
            )
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
    context: Tensor | None = None,
) -> tuple[State, Tensor | None]:
    """Run ``blocks`` in order on ``x`` without storing intermediate activations.

    Args:
        blocks: ``(name, module)`` pairs, in the order they are applied.
        x: The input state.
        options: Engine settings.
        inverse: Apply ``module.inverse`` to each block instead of ``forward`` (the caller
            passes the blocks already in reverse order).
        context: Passed to every conditional block, in the forward pass and in its
            reconstruction; if it requires grad it gets its gradient like any tensor a block
            uses.

    Returns:
        The output state and the summed log-det (``None`` if a module reports none).

    Raises:
        EngineError: In debug mode, if a module produces NaN or infinity. During backward: if
            a tensor the reconstruction needs changed in place after the forward pass, a
            module's inverse does not undo its forward, backward runs twice without
            ``retain_graph=True``, or ``create_graph=True`` is asked for.
    """
    if not torch.is_grad_enabled():
        return run_plain(blocks, x, inverse=inverse, debug=options.debug, context=context)
    inputs = flatten_state(x)
    reason = plain_autograd_reason(lambda: itertools.chain(
        inputs, [] if context is None else [context],
        *(itertools.chain(block.parameters(), block.buffers()) for _, block in blocks)))
    if reason is not None:
        warn_caller(f"memory-saving engine: {reason}, and a backward pass that rebuilds "
                    "activations cannot serve it; the chain runs with plain autograd (right "
                    "derivatives, activations stored)")
        return run_plain(blocks, x, inverse=inverse, debug=options.debug, context=context)
    plan = _Plan(blocks, x, options, inverse, context)
    outputs, logdet = plan.run_forward(x)
    if not plan.externals and not any(t.requires_grad for t in inputs):
        # Nothing requires grad, so plain autograd would build no graph either.
        plan.pending = None
        return pack_like(outputs, plan.output_like), logdet
    results = _MemorySavingChain.apply(plan, *inputs, *plan.externals)
    outputs, logdet = list(results[:-1]), results[-1]
    return pack_like(outputs, plan.output_like), (logdet if plan.has_logdet else None)


def _context_for(block: InvertibleModule, context: Tensor | None) -> Tensor | None:
    return context if context is not None and block.conditional else None


def _step(name: str, block: InvertibleModule, state: State, inverse: bool,
          context: Tensor | None = None) -> tuple[State, Tensor | None]:
    batch = flatten_state(state)[0].shape[0]
    state, logdet = call_with_context(block.inverse if inverse else block, state,
                                      _context_for(block, context))
    check_logdet(logdet, batch, f"module '{name}' ({type(block).__name__})")
    return state, logdet


def run_plain(
    blocks: Sequence[tuple[str, InvertibleModule]], x: State, *, inverse: bool = False,
    debug: bool = False, context: Tensor | None = None,
) -> tuple[State, Tensor | None]:
    """Apply ``(name, module)`` pairs with ordinary autograd, summing their log-dets.

    ``context`` goes to the conditional modules only.
    """
    logdets = []
    for name, block in blocks:
        x, logdet = _step(name, block, x, inverse, context)
        if debug:
            _check_finite(name, block, x, logdet)
        logdets.append(logdet)
    return x, sum_logdets(logdets)


def _check_finite(name: str, block: nn.Module, state: State, logdet: Tensor | None) -> None:
    for what, tensors in (("output", flatten_state(state)),
                          ("log-det", [] if logdet is None else [logdet])):
        for t in tensors:
            if not torch.isfinite(t).all():
                raise EngineError(
                    f"module '{name}' ({type(block).__name__}) produced NaN or inf in its "
                    f"{what} (debug check)"
                )


class _GradTensorRecorder(TorchFunctionMode):
    """Note every tensor argument that requires grad, in order of first use.

    Run around a module's forward under ``no_grad``: nothing computed there requires grad, so
    each tensor found is a leaf or a captured tensor from outside the module, the set of tensors
    the module's gradient flows to.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, Tensor):
                if arg.requires_grad:
                    self.found.setdefault(id(arg), arg)
            elif isinstance(arg, (list, tuple)):  # torch.cat, torch.stack, ...
                for item in arg:
                    if isinstance(item, Tensor) and item.requires_grad:
                        self.found.setdefault(id(item), item)
        return func(*args, **kwargs)


# Keys of a bare nn.Module's __dict__ (flags, parameter/buffer/submodule tables, hook tables).
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _global_hooks_present() -> bool:
    """Whether a module hook is registered for all modules (it could read any tensor)."""
    from torch.nn.modules import module

    return any(getattr(module, table, None) for table in _GLOBAL_HOOKS)


_PLAIN_TYPES = frozenset(_PLAIN)


def _is_plain(value: object) -> bool:
    # Run for every attribute of every module at every call: the exact-type lookup settles the
    # common cases (flags, sizes, tuples of ints) without a call per item.
    if type(value) in _PLAIN_TYPES:
        return True
    if isinstance(value, (list, tuple)):
        return all(type(item) in _PLAIN_TYPES or _is_plain(item) for item in value)
    return isinstance(value, _PLAIN)


def _own_grad_tensors(modules: list[nn.Module]) -> list[Tensor] | None:
    """The tensors requiring grad that a self-contained module tree can read, or ``None``.

    A tree is self-contained when every module in it is exactly of a class in
    :data:`~autoflow.base.SELF_CONTAINED` (whose code reads tensors requiring grad only from its
    arguments and its module tree), has no hooks, and holds nothing in its attributes but plain
    data: a tensor, a function or another object there could bring in a tensor from outside
    (a hypernetwork's weight assigned over a parameter, a patched ``forward``, a borrowed
    module). Its gradient then flows to nothing but its registered parameters and buffers that
    require grad, and the engine need not watch every operation to find them; for any other
    tree it returns ``None`` and the :class:`_GradTensorRecorder` finds them.
    """
    found: dict[int, Tensor] = {}
    for m in modules:
        if type(m) not in SELF_CONTAINED:
            return None
        attributes = vars(m)
        if any(attributes[table] for table in _HOOK_TABLES):
            return None
        for key, value in attributes.items():
            if key not in _MODULE_INTERNALS and not _is_plain(value):
                return None
        for table in (m._parameters, m._buffers):
            for t in table.values():
                if t is not None and t.requires_grad:
                    found.setdefault(id(t), t)
    return list(found.values())


def _same_values(result: object, given: object) -> bool:
    """Whether a hook's ``result`` hands back what it was ``given`` (the same objects)."""
    if result is given:
        return True
    result = result if isinstance(result, tuple) else (result,)
    given = given if isinstance(given, tuple) else (given,)
    return len(result) == len(given) and all(r is g or (
        isinstance(r, tuple) and isinstance(g, tuple) and _same_values(r, g))
        for r, g in zip(result, given))


class _HookWatch:
    """Refuses module hooks the engine cannot honour, around one module's forward pass.

    The engine rebuilds a module's input with its inverse and reruns its map without going
    through ``__call__``, so hooks on the invertible modules of the tree are bypassed there:

    * a forward hook or pre-hook that returns a value (replacing the module's output or input)
      makes the applied map another one than the module's, which its inverse does not undo:
      the gradients would be wrong. Such hooks are wrapped for the call and caught when they
      return something other than what they were given;
    * a backward hook on the chain's module itself would never fire: refused before the call;
    * a hook that puts a tensor hook (or ``retain_grad``) on the module's input or output fails
      in torch, as nothing between the chain's modules requires grad in the engine's forward
      pass: the failure is given back as an :class:`~autoflow.EngineError` saying why.

    Hooks that only observe (return ``None``) run as usual; hooks on other submodules
    (conditioners) run again when the map is rebuilt, with the right values.
    """

    def __init__(self, name: str, block: nn.Module, modules: list[nn.Module],
                 global_hooks: bool) -> None:
        self.name, self.block, self.modules = name, block, modules
        self.global_hooks = global_hooks
        self.tables: list[tuple[dict, dict]] = []
        self.changed: list[nn.Module] = []

    def __enter__(self) -> None:
        from torch.nn.modules import module

        block = self.block
        if block._backward_hooks or block._backward_pre_hooks or (
                self.global_hooks and (module._global_backward_hooks
                                       or module._global_backward_pre_hooks)):
            raise EngineError(
                f"memory-saving engine: module '{self.name}' ({type(block).__name__}) has a "
                "module backward hook (register_full_backward_hook or a global one), which the "
                "engine cannot call: it rebuilds the module without __call__, so the hook "
                "would never fire. Use tensor hooks on its outputs, or memory_saving=False"
            )
        tables = [t for m in self.modules if isinstance(m, InvertibleModule)
                  for t in (m._forward_pre_hooks, m._forward_hooks) if t]
        if self.global_hooks:
            tables += [t for t in (module._global_forward_pre_hooks,
                                   module._global_forward_hooks) if t]
        pre_tables = {id(m._forward_pre_hooks) for m in self.modules} | {
            id(module._global_forward_pre_hooks)}
        for table in tables:
            original = dict(table)
            self.tables.append((table, original))
            for key, hook in original.items():
                table[key] = self._watched(hook, pre=id(table) in pre_tables)

    def _watched(self, hook: Callable, *, pre: bool) -> Callable:
        def watched(module: nn.Module, *args: object, **kwargs: object) -> object:
            try:
                result = hook(module, *args, **kwargs)
            except RuntimeError as error:
                if "require" not in str(error) or "grad" not in str(error):
                    raise
                # torch's "cannot register a hook on a tensor that doesn't require gradient"
                # (or retain_grad's): a gradient hook on a member's input or output.
                raise EngineError(
                    f"memory-saving engine: module '{self.name}' ({type(self.block).__name__})"
                    f": a forward hook or pre-hook of {type(module).__name__} failed ({error}). "
                    "The engine's forward pass runs without a graph, so the states between "
                    "the chain's modules do not require grad and their gradients are never "
                    "formed as tensors: a tensor hook or retain_grad cannot be put on them. "
                    "Put it on the chain's input or output, or run with memory_saving=False"
                ) from error
            # A pre-hook is given (args,) or (args, kwargs) and may return a replacement of
            # the same form; a forward hook is given (args[, kwargs], output) and may return
            # a replacement output.
            given = (args[0] if len(args) == 1 else args) if pre else args[-1]
            if (result is not None and isinstance(module, InvertibleModule)
                    and not _same_values(result, given)):
                self.changed.append(module)
            return result
        return watched

    def __exit__(self, kind: type | None, *exc_info: object) -> None:
        for table, original in self.tables:
            for key, hook in original.items():
                if key in table:  # a hook removed during the call stays removed
                    table[key] = hook
        if self.changed and kind is None:
            names = {id(m): n for n, m in self.block.named_modules()}
            where = ", ".join(f"'{names.get(id(m), '?') or self.name}' ({type(m).__name__})"
                              for m in dict.fromkeys(self.changed))
            raise EngineError(
                f"memory-saving engine: module '{self.name}' ({type(self.block).__name__}): a "
                f"forward hook or pre-hook of {where} returned a value, replacing its input or "
                "output; the engine rebuilds inputs with the modules' inverses, which do not "
                "undo the hook, so the gradients would be wrong. Let the hook return None, "
                "make the change a module of the chain, or run with memory_saving=False"
            )


class _Plan:
    """Everything the autograd function needs besides tensors, recorded by the forward pass."""

    def __init__(self, blocks, x, options: EngineOptions, inverse: bool,
                 context: Tensor | None = None) -> None:
        self.blocks = list(blocks)
        self.context = context
        self.input_requires_grad = [t.requires_grad for t in flatten_state(x)]
        self.options = options
        self.inverse = inverse
        self.output_like: State = x
        self.has_logdet = True
        self.input_shapes: list = []
        self.rng_states: list = []
        # Per module, whether its tree is self-contained and of PER_SAMPLE classes only.
        self.per_sample: list[bool] = []
        self.training: list[list[bool]] = []
        # Per module, the buffers its forward pass updated and their values before it (not
        # for a module that wrote its parameters too: a data-dependent initialisation).
        self.rewind: list[list[tuple[Tensor, Tensor]]] = []
        self.slots: list[TensorSlots] = []
        # Per module, the parameter tensors of its tree in the forward pass (those it has again
        # during its reconstruction, see _AsInForward), to check none is written.
        self.parameters: list[list[Tensor]] = []
        # Tensors requiring grad that the modules touched (inputs of the autograd function),
        # and for each module the positions of those it touched.
        self.externals: list[Tensor] = []
        self.block_externals: list[list[int]] = []
        # Per module, (tensor, version) pairs that must be unchanged when it is reconstructed.
        self.watched: list[list[tuple[Tensor, int]]] = []
        # Modules whose input is kept (anchors, or all in debug mode), with tensor counts.
        self.kept: list[tuple[int, int, State]] = []
        # The chain cut into runs ``(first, last)``: module ``first`` rebuilt by its engine
        # hook, the others folded into its local graph (see _Plan.runs_of).
        self.runs: list[tuple[int, int]] = []
        # The first module that uses a tensor requiring grad (None: none does).
        self.first_wanting_grad: int | None = None
        self.pending: tuple | None = None
        self.device_type = flatten_state(x)[0].device.type
        self.autocast = autocast_state(self.device_type)

    def gradient_reaches(self, i: int) -> bool:
        """Whether the backward pass must go on to the input of module ``i``: some module up
        to ``i`` uses a tensor requiring grad, or the chain's input requires grad (always in
        debug mode, which measures every module's reconstruction)."""
        return self.options.debug or any(self.input_requires_grad) or (
            self.first_wanting_grad is not None and self.first_wanting_grad <= i)

    def keeps_input(self, i: int) -> bool:
        anchor = self.options.anchor_every
        return self.options.debug or (anchor is not None and i % anchor == 0)

    def run_forward(self, x: State) -> tuple[list[Tensor], Tensor | None]:
        """The graph-free forward pass; records what the backward pass will need."""
        state = pack_like([t.detach() for t in flatten_state(x)], x)
        position: dict[int, int] = {}
        kept_tensors: list[Tensor] = []
        logdets = []
        global_hooks = _global_hooks_present()
        rng = _rng_state(state) if self.options.preserve_rng_state else None
        with torch.no_grad():
            for i, (name, block) in enumerate(self.blocks):
                self.input_shapes.append(state_shape(state))
                if self.keeps_input(i):
                    tensors = flatten_state(state)
                    self.kept.append((i, len(tensors), structure_of(state)))
                    kept_tensors += tensors
                modules = list(block.modules())
                self.training.append([m.training for m in modules])
                self.slots.append(tensor_slots(modules))
                self.parameters.append([t for m in modules for t in m._parameters.values()
                                        if t is not None])
                buffers = [b for m in modules for b in m._buffers.values() if b is not None]
                before = [b._version for b in buffers]
                values = [b.clone() for b in buffers]
                parameter_versions = [t._version for t in self.parameters[-1]]
                found = None if global_hooks else _own_grad_tensors(modules)
                # Only a run to be sliced needs to know (EngineOptions.backward_chunk).
                self.per_sample.append(self.options.backward_chunk is not None
                                       and found is not None
                                       and all(type(m) in PER_SAMPLE for m in modules))
                if found is None:
                    recorder = _GradTensorRecorder()
                    with recorder, _HookWatch(name, block, modules, global_hooks):
                        state, logdet = _step(name, block, state, self.inverse, self.context)
                    found = list(recorder.found.values())
                else:
                    state, logdet = _step(name, block, state, self.inverse, self.context)
                    context = _context_for(block, self.context)
                    if isinstance(context, Tensor) and context.requires_grad:
                        found.append(context)
                if rng is not None:
                    # Replay only what was drawn: most modules draw nothing, and then the
                    # backward pass skips the random-number state (two copies per module).
                    after = _rng_state(state)
                    self.rng_states.append(None if _same_rng(rng, after) else rng)
                    rng = after
                else:
                    self.rng_states.append(None)
                ids = []
                for t in found:
                    k = position.setdefault(id(t), len(self.externals))
                    if k == len(self.externals):
                        self.externals.append(t)
                    ids.append(k)
                self.block_externals.append(ids)
                # A buffer the forward pass updated is state (running statistics, an init
                # flag), not an input of the map; any other buffer must stay as it was. The
                # reconstruction starts from its value before the update, so that an update
                # the output depends on (spectral norm's power iteration) is made again alike.
                wrote = any(t._version != v
                            for t, v in zip(self.parameters[-1], parameter_versions))
                self.rewind.append([] if wrote else [
                    (b, value) for b, value, v in zip(buffers, values, before)
                    if b._version != v])
                watched = [(t, _user_version(t)) for t in found]
                watched += [(b, _user_version(b)) for b, v in zip(buffers, before)
                            if b._version == v]
                context = _context_for(block, self.context)
                if isinstance(context, Tensor):  # even one without grad must stay as it was
                    watched.append((context, _user_version(context)))
                self.watched.append(watched)
                if self.options.debug:
                    _check_finite(name, block, state, logdet)
                logdets.append(logdet)
        total = sum_logdets(logdets)
        self.first_wanting_grad = next(
            (i for i, found in enumerate(self.block_externals) if found), None)
        self.runs = self.runs_of()
        self.output_like = structure_of(state)
        self.has_logdet = total is not None
        outputs = [t.detach() for t in flatten_state(state)]
        self.pending = (outputs, None if total is None else total.detach(), kept_tensors)
        return outputs, total

    def runs_of(self) -> list[tuple[int, int]]:
        """Cut the chain into runs ``(first, last)`` that each share one local backward.

        Module ``first`` is rebuilt by its engine hook; each later module of the run is one
        that :meth:`~autoflow.InvertibleModule.rebuilt_in_runs` allows to be inverted without a
        graph and run again on the graph of the module before it. Every ``autograd.grad`` call
        costs the same fixed overhead, larger than ActNorm or a permutation compute on small
        states, and a Glow step (ActNorm, mixing, coupling) then needs one call instead of
        three. A module starts a run of its own when folding it would change what its rebuild
        means: its input is kept (anchors, debug mode, which also measures the error per
        module), its forward pass drew random numbers (replayed per module), the random-number
        state is not preserved (its default hook would fork it around the inverse), or the same
        module object is already in the run. Runs are at most :data:`_RUN_LENGTH` modules long,
        so the memory of a backward step stays bounded whatever the depth.
        """
        runs: list[tuple[int, int]] = []
        members: set[int] = set()
        for i, (_, block) in enumerate(self.blocks):
            if (runs and not self.keeps_input(i) and self.options.preserve_rng_state
                    and self.rng_states[i] is None and id(block) not in members
                    and i - runs[-1][0] < _RUN_LENGTH and block.rebuilt_in_runs(self.inverse)):
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
                members = set()
            members.add(id(block))
        return runs

    def check_versions(self, i: int) -> None:
        name, block = self.blocks[i]
        for t, expected in self.watched[i]:
            if _user_version(t) != expected:
                raise EngineError(
                    f"memory-saving engine: module '{name}' ({type(block).__name__}) cannot be "
                    f"reconstructed: {self._describe(block, t)} was modified in place after the "
                    f"forward pass (version {expected} then, {_user_version(t)} now), so the "
                    "backward pass would use other values than the forward pass did. Run backward "
                    "before changing it (call optimizer.step() after backward), or change a copy"
                )

    def _describe(self, block: nn.Module, tensor: Tensor) -> str:
        for kind, named in (("parameter", block.named_parameters()),
                            ("buffer", block.named_buffers())):
            for n, t in named:
                if t is tensor:
                    return f"its {kind} '{n}'"
        for other, module in self.blocks:
            for n, t in module.named_parameters():
                if t is tensor:
                    return f"parameter '{n}' of module '{other}', which it uses,"
        return (f"a tensor of shape {tuple(tensor.shape)} that requires grad and that it uses "
                "(not one of its own parameters)")

class _AsInForward:
    """Put a module as its forward pass found it for the reconstruction, and back afterwards.

    * every submodule gets the train/eval mode it had in the forward pass;
    * the parameter and buffer tensors the forward pass used are put back if they were
      replaced: ``torch.func.functional_call`` swaps tensors in only for the forward call, and
      a user may assign a new parameter before backward;
    * every buffer the forward pass updated starts from its value before that update
      (``rewind``), so that the reconstruction updates it as the forward pass did and computes
      with what the forward pass computed with (spectral norm's power iteration);
    * every buffer the reconstruction writes (running statistics) is restored on exit, so the
      reconstruction leaves no trace. Buffers are restored only after the local backward:
      autograd checks that tensors it saved (batch-norm running statistics) were not modified
      in between.

    A plain class rather than three generator context managers: it runs for every module of
    every step, and mostly finds nothing to change but the buffers.
    """

    def __init__(self, name: str, block: nn.Module, flags: list[bool],
                 slots: TensorSlots, rewind: list[tuple[Tensor, Tensor]]) -> None:
        self.name, self.block, self.flags, self.slots = name, block, flags, slots
        self.rewind = rewind

    def __enter__(self) -> None:
        modules = list(self.block.modules())
        if len(modules) != len(self.flags):
            raise EngineError(
                f"memory-saving engine: module '{self.name}' ({type(self.block).__name__}) "
                f"had {len(self.flags)} submodules in the forward pass and has "
                f"{len(modules)} now; its structure may not change between forward and "
                "backward"
            )
        previous = set_modes(modules, self.flags)
        self.training = None if previous is None else (modules, previous)
        self.replaced = put_back(self.slots)
        self.buffers = [(m._buffers, name, buf, buf._version, buf.clone()) for m in modules
                        for name, buf in m._buffers.items() if buf is not None]
        for buf, value in self.rewind:
            buf.data.copy_(value)  # through .data: no version change for autograd to see

    def __exit__(self, *exc_info: object) -> None:
        for table, name, buf, version, value in self.buffers:
            if table.get(name) is not buf:
                table[name] = buf  # replaced by the reconstruction: put it back
            if buf._version != version:
                _ENGINE_WRITES[buf] = _ENGINE_WRITES.get(buf, 0) + buf._version - version
            # Copied back whatever its version says (batch norm updates running statistics
            # without incrementing it), through .data so that the restore itself does not.
            buf.data.copy_(value)
        undo_put_back(self.replaced)
        if self.training is not None:
            set_modes(*self.training)


class _MemorySavingChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: Tensor):
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        outputs, total, kept = plan.pending
        plan.pending = None
        owned = {t.untyped_storage().data_ptr() for t in tensors}
        # An output sharing storage with an input (a pass-through level) must be a new tensor:
        # autograd outputs may not alias the function's inputs.
        outputs = [t.clone() if t.untyped_storage().data_ptr() in owned else t for t in outputs]
        # Saved through autograd, so the backward pass frees them (unless retain_graph=True).
        ctx.save_for_backward(*outputs, *kept)
        if total is None:
            total = outputs[0].new_zeros(outputs[0].shape[0])
        return (*outputs, total)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        plan: _Plan = ctx.plan
        if torch.is_grad_enabled():
            first, last = plan.blocks[0][0], plan.blocks[-1][0]
            raise EngineError(
                f"memory-saving engine (modules '{first}' to '{last}'): create_graph=True "
                "(double backward, e.g. a gradient penalty) is not supported, because rebuilt "
                "inputs carry no graph to the chain's output and second-order gradients would "
                "be wrong; run this step with memory_saving=False"
            )
        try:
            saved = ctx.saved_tensors
        except RuntimeError as error:
            if "freed" not in str(error):
                raise EngineError(
                    "memory-saving engine: the chain's output or a kept input was modified in "
                    f"place after the forward pass ({error})"
                ) from error
            raise EngineError(
                "backward ran twice through a memory-saving chain whose saved outputs were "
                "already freed; pass retain_graph=True to the first backward to run it again"
            ) from error
        n_out = len(grads) - 1
        outputs, rest = saved[:n_out], list(saved[n_out:])
        kept: dict[int, State] = {}
        for i, count, like in plan.kept:
            kept[i] = pack_like(rest[:count], like)
            rest = rest[count:]
        state = pack_like([t.detach() for t in outputs], plan.output_like)
        grad_state = [g if g is not None else torch.zeros_like(t)
                      for g, t in zip(grads[:-1], outputs)]
        grad_logdet = grads[-1] if plan.has_logdet else None
        external_grads: list[Tensor | None] = [None] * len(plan.externals)
        # Autocast is entered per module only if the forward pass had another state than now.
        autocast = None if plan.autocast == autocast_state(plan.device_type) else plan.autocast
        # Modules that drew random numbers get their state replayed; the state found here is
        # put back once at the end, so that the backward pass draws nothing for the caller.
        outer_rng = _rng_state(state) if plan.options.preserve_rng_state else None
        try:
            for first, last in reversed(plan.runs):
                if not plan.gradient_reaches(last):
                    # Nothing at or before this run wants a gradient (frozen first modules
                    # on an input without grad): rebuilding them would be wasted work and
                    # memory, often the step's peak, as they run at the input's size.
                    break
                state, grad_state = _backward_run_in_slices(
                    plan, first, last, state, grad_state, grad_logdet, kept.get(first),
                    autocast, external_grads
                )
        finally:
            if outer_rng is not None:
                restore_rng(outer_rng)
        input_grads = [g if wanted else None
                       for g, wanted in zip(grad_state, plan.input_requires_grad)]
        return (None, *input_grads, *external_grads)


def _backward_run_in_slices(plan: _Plan, first: int, last: int, state: State,
                            grad_state: list[Tensor], grad_logdet: Tensor | None,
                            kept: State | None, autocast: list | None,
                            external_grads: list[Tensor | None]) -> tuple[State, list[Tensor]]:
    """:func:`_backward_run` over slices of ``options.backward_chunk`` samples, where the run
    allows it (see :class:`EngineOptions`), else over the whole batch.

    Each slice rebuilds its part of module ``first``'s input and its gradient, which are
    concatenated; the gradients of external tensors (parameters, the context, whose slice is
    taken inside each local graph) add up over the slices as they do over runs.
    """
    chunk = plan.options.backward_chunk
    tensors = flatten_state(state)
    batch = tensors[0].shape[0]
    context = plan.context
    if (chunk is None or batch <= chunk or not all(plan.per_sample[first:last + 1])
            or any(plan.rng_states[i] is not None for i in range(first, last + 1))
            or any(t.shape[0] != batch for t in tensors)
            or (context is not None and context.shape[0] not in (1, batch))):
        return _backward_run(plan, first, last, state, grad_state, grad_logdet, kept, autocast,
                             external_grads)
    rebuilt_parts, grad_parts = [], []
    try:
        for start in range(0, batch, chunk):
            part = slice(start, start + chunk)

            def sliced(whole: State, part: slice = part) -> State:
                return pack_like([t[part] for t in flatten_state(whole)], whole)

            if context is not None and context.shape[0] == batch:
                with torch.enable_grad():  # the slice joins the local graph
                    plan.context = context[part]
            rebuilt, grads = _backward_run(
                plan, first, last, sliced(state), [g[part] for g in grad_state],
                None if grad_logdet is None else grad_logdet[part],
                None if kept is None else sliced(kept), autocast, external_grads)
            rebuilt_parts.append(rebuilt)
            grad_parts.append(grads)
    finally:
        plan.context = context
    joined = [torch.cat(ts) for ts in zip(*(flatten_state(r) for r in rebuilt_parts))]
    return (pack_like(joined, rebuilt_parts[0]),
            [torch.cat(gs) for gs in zip(*grad_parts)])


def _backward_run(plan: _Plan, first: int, last: int, state: State, grad_state: list[Tensor],
                  grad_logdet: Tensor | None, kept: State | None, autocast: list | None,
                  external_grads: list[Tensor | None]) -> tuple[State, list[Tensor]]:
    """Back-propagate through modules ``first`` to ``last`` with one local backward.

    The modules after ``first`` (folded, see :meth:`_Plan.runs_of`) are inverted without a
    graph, last to first, as their default engine hook would; module ``first`` is rebuilt by
    its hook, with leaves; the folded modules then run again on its output with a graph, and a
    single ``autograd.grad`` call takes the gradient from the run's output to those leaves and
    to every tensor requiring grad that the run's modules used. Each module keeps the checks it
    would have on its own: versions of what it read, train/eval mode and tensors as in the
    forward pass, buffers restored after the local backward, no parameter written, the shape
    of its rebuilt input.

    Args:
        plan: The chain's plan.
        first, last: The run's first and last module.
        state: The output of module ``last``, without a graph.
        grad_state: The gradient of the loss with respect to it, one tensor per state tensor.
        grad_logdet: The gradient with respect to the chain's log-det, or ``None``.
        kept: Module ``first``'s true input, if it was kept.
        autocast: The autocast state to enter, or ``None`` to leave it as it is.
        external_grads: Gradients of ``plan.externals``, accumulated in place.

    Returns:
        Module ``first``'s rebuilt input (no graph) and the gradient with respect to it.
    """
    with contextlib.ExitStack() as stack:
        for i in range(last, first - 1, -1):
            plan.check_versions(i)
        folded = []
        for i in range(last, first, -1):
            name, block = plan.blocks[i]
            stack.enter_context(_AsInForward(name, block, plan.training[i], plan.slots[i],
                                             plan.rewind[i]))
            versions = [p._version for p in plan.parameters[i]]
            with torch.no_grad(), _autocast_or_not(autocast):
                state, _ = call_with_context(block.forward if plan.inverse else block.inverse,
                                             state, _context_for(block, plan.context))
            _check_reconstruction(plan, i, name, state, None)
            folded.append((i, versions))
        name, block = plan.blocks[first]
        stack.enter_context(_AsInForward(name, block, plan.training[first], plan.slots[first],
                                         plan.rewind[first]))
        versions = [p._version for p in plan.parameters[first]]
        rec = _rebuild(plan, first, state, kept, autocast)
        _check_parameters_kept(name, block, plan.parameters[first], versions)
        rebuilt = rec.input_from_leaves([leaf.detach() for leaf in rec.leaves])
        _check_reconstruction(plan, first, name, rebuilt, kept)
        wanted = dict.fromkeys(plan.block_externals[first])
        if plan.options.debug:
            _check_graph_leaves(name, block, rec, [plan.externals[k] for k in wanted])
        output, logdets = rec.output, [rec.logdet]
        with torch.enable_grad(), _autocast_or_not(autocast):
            for i, versions in reversed(folded):
                name, block = plan.blocks[i]
                output, logdet = call_with_context(
                    block.inverse if plan.inverse else block.forward, output,
                    _context_for(block, plan.context)
                )
                _check_parameters_kept(name, block, plan.parameters[i], versions)
                logdets.append(logdet)
                wanted.update(dict.fromkeys(plan.block_externals[i]))
        leaf_grads, found = _local_backward(rec.leaves, output, logdets, grad_state,
                                            grad_logdet, [plan.externals[k] for k in wanted])
    for k, g in zip(wanted, found):
        if g is not None:
            # A tensor used by several runs gets the sum of their contributions.
            external_grads[k] = g if external_grads[k] is None else external_grads[k] + g
    return rebuilt, flatten_state(rec.input_from_leaves(leaf_grads))


def _autocast_or_not(autocast: list | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if autocast is None else autocast_as(autocast)


def _check_parameters_kept(name: str, block: nn.Module, parameters: list[Tensor],
                           versions: list[int]) -> None:
    """Refuse a reconstruction that wrote to the module's parameters (a data-dependent
    initialisation run by ``forward`` while rebuilding an ``inverse``, say): the local graph would
    then belong to a map the forward pass never applied, and every gradient would be wrong.

    ``parameters`` are the tensors the module's tree had in the forward pass (put back for the
    reconstruction), with their ``versions`` before it: no traversal of the tree unless one
    changed, to name it.
    """
    written = {id(p) for p, v in zip(parameters, versions) if p._version != v}
    changed = [n for n, p in block.named_parameters() if id(p) in written] if written else []
    if changed:
        raise EngineError(
            f"memory-saving engine: module '{name}' ({type(block).__name__}) changed its "
            f"parameters {changed} while being reconstructed for the backward pass, so its "
            "gradients would be those of another map; make its reconstruct (or "
            "reconstruct_inverse) leave the parameters alone, or run with memory_saving=False"
        )


def _reconstruct(plan: _Plan, name: str, block: InvertibleModule, state: State,
                 kept: State | None) -> Reconstruction:
    context = _context_for(block, plan.context)
    if kept is not None and not plan.options.debug:
        function = block.inverse if plan.inverse else block
        return recompute(lambda s: call_with_context(function, s, context), kept)
    hook = block.reconstruct_inverse if plan.inverse else block.reconstruct
    if context is None:
        return hook(state)
    if not accepts_context(hook):
        raise EngineError(
            f"memory-saving engine: module '{name}' ({type(block).__name__}) takes a context, "
            f"but its {hook.__name__} does not; add a context=None keyword to it and use the "
            "context as forward does"
        )
    return hook(state, context=context)


def _check_reconstruction(plan: _Plan, i: int, name: str, rebuilt: State,
                          kept: State | None) -> None:
    if state_shape(rebuilt) != plan.input_shapes[i]:
        raise EngineError(
            f"module '{name}' reconstructed an input of shape {state_shape(rebuilt)}, but its "
            f"forward pass received {plan.input_shapes[i]}: its inverse does not undo forward"
        )
    if plan.options.debug:
        worst = 0.0
        for r, t in zip(flatten_state(rebuilt), flatten_state(kept)):
            scale = t.abs().max().item() if t.numel() else 0.0
            worst = max(worst, (r - t).abs().max().item() / max(scale, 1e-30))
        plan.options.errors[name] = max(worst, plan.options.errors.get(name, 0.0))
        logger.debug("reconstruction error of module '%s': %.3e", name, worst)


def _check_graph_leaves(name: str, block: nn.Module, rec: Reconstruction,
                        externals: list[Tensor]) -> None:
    """Debug check: the local graph reaches no leaf requiring grad that forward did not use.

    Such a leaf (a tensor a custom ``reconstruct`` uses but ``forward`` does not) would get no
    gradient from the engine.
    """
    known = {id(t) for t in (*rec.leaves, *externals)}
    stop = {t.grad_fn for t in externals if t.grad_fn is not None}
    roots = [*flatten_state(rec.output), *([] if rec.logdet is None else [rec.logdet])]
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None and id(leaf) not in known:
            raise EngineError(
                f"module '{name}' ({type(block).__name__}): its reconstruction reaches a tensor "
                f"of shape {tuple(leaf.shape)} that requires grad but that its forward pass did "
                "not use, so the engine would give it no gradient; reconstruct with the tensors "
                "forward uses (debug check)"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)


def _local_backward(leaves: list[Tensor], output: State, logdets: list[Tensor | None],
                    grad_state: list[Tensor], grad_logdet: Tensor | None,
                    externals: list[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
    """One ``autograd.grad`` call from a run's output and log-dets to its leaves and externals.

    Returns the gradient of every leaf (zeros where none flows) and of every external
    (``None`` where none flows).
    """
    outputs, out_grads = [], []
    for out, g in zip(flatten_state(output), grad_state):
        if out.requires_grad:
            outputs.append(out)
            out_grads.append(g.to(out.dtype))
    if grad_logdet is not None:
        for logdet in logdets:  # each enters the chain's sum, so each gets its gradient
            if logdet is not None and logdet.requires_grad:
                outputs.append(logdet)
                out_grads.append(grad_logdet.to(logdet.dtype))
    wanted = [leaf for leaf in leaves if leaf.requires_grad] + externals
    try:
        with outer_hooks_only(externals):
            found = torch.autograd.grad(outputs, wanted, out_grads, allow_unused=True) if (
                outputs) else [None] * len(wanted)
    except RuntimeError as error:
        if "use_reentrant=True" not in str(error):
            raise
        raise EngineError(
            "memory-saving engine: a module of the chain runs torch.utils.checkpoint with "
            "use_reentrant=True, which cannot run inside the engine's local backward (an "
            "autograd.grad call, whatever the caller used); pass use_reentrant=False (what "
            "PyTorch recommends; it works under the engine) or run with memory_saving=False"
        ) from error
    found = list(found)
    leaf_grads = []
    for leaf in leaves:
        g = found.pop(0) if leaf.requires_grad else None
        leaf_grads.append(torch.zeros_like(leaf) if g is None else g)
    return leaf_grads, found


def _rng_state(state: State) -> RngSnapshot:
    """The default generators' states: the CPU's, and the GPU's where ``state`` lives."""
    return rng_snapshot(flatten_state(state)[0].device)


def _same_rng(a: RngSnapshot, b: RngSnapshot) -> bool:
    """Whether no random number was drawn between two :func:`_rng_state` snapshots.

    Any draw moves a generator's state (the Mersenne twister's position, the Philox offset).
    """
    return torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) and (
        a[1] is None or torch.equal(a[1], b[1]))


def _rebuild(plan: _Plan, i: int, state: State, kept: State | None,
             autocast: list | None) -> Reconstruction:
    """Reconstruct module ``i`` with a local graph, with the randomness and autocast state its
    forward pass had.

    A module that drew random numbers gets the generator state it started from, and its
    reconstruction forks it (:func:`~autoflow.base.same_randomness`) so that inverting and
    recomputing both see it. A module that drew none needs neither: its reconstruction runs
    with forks switched off.
    """
    name, block = plan.blocks[i]
    saved = plan.rng_states[i]
    fork = RANDOMNESS.fork
    if saved is not None:
        restore_rng(saved)
    elif plan.options.preserve_rng_state:
        RANDOMNESS.fork = False
    try:
        with torch.enable_grad(), _autocast_or_not(autocast):
            rec = _reconstruct(plan, name, block, state, kept)
            low_precision = torch.is_autocast_enabled(plan.device_type)
    finally:
        RANDOMNESS.fork = fork
    if saved is not None:
        _check_replayed_output(name, block, rec.output, state, low_precision=low_precision)
    return rec


def _check_replayed_output(name: str, block: nn.Module, rebuilt: State, given: State, *,
                           low_precision: bool) -> None:
    """A module that drew random numbers must give its output back when rebuilt with them.

    Replaying the generator state makes the rebuild draw what the forward pass drew, in the
    order it drew them; an inverse that draws in another order (several random submodules
    inverted last to first by the default ``reconstruct``) gets other numbers, so it neither
    rebuilds the input nor, through that, the gradients. Its recomputed output then differs
    from the one the forward pass gave, far beyond rounding: that is checked here, cheaply,
    for random modules only.
    """
    for r, g in zip(flatten_state(rebuilt), flatten_state(given)):
        if not g.is_floating_point() or g.numel() == 0:
            continue
        tol = 5e-2 if low_precision or g.dtype not in (torch.float32, torch.float64) else (
            1e-6 if g.dtype == torch.float64 else 1e-3)
        scale = g.abs().max().item()
        error = (r.detach() - g).abs().max().item() / max(scale, 1e-30)
        if not error <= tol:
            raise EngineError(
                f"memory-saving engine: module '{name}' ({type(block).__name__}) drew random "
                f"numbers in its forward pass, and rebuilt with the same ones it does not give "
                f"its output back (relative difference {error:.2e}, tolerance {tol:.0e}): its "
                "reconstruction draws them in another order, as the default reconstruct does "
                "for a module holding several random submodules (couplings with dropout), "
                "whose inverse runs them last to first. Make those submodules members of the "
                "memory-saving Sequential themselves, or give the module a reconstruct that "
                "draws as its forward pass does"
            )
