"""The module contract that every invertible primitive in autoflow follows."""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from .errors import AutoflowError, NotBijectiveError, ShapeError, SwitchError

__all__ = [
    "State",
    "Shape",
    "InvertibleModule",
    "Reconstruction",
    "flatten_state",
    "pack_like",
    "state_shape",
    "require_bijective",
    "check_logdet",
    "accepts_context",
    "call_with_context",
    "sum_logdets",
]

#: A flow state, one tensor or a tuple of tensors of different shapes (pyramid levels).
State = Tensor | tuple[Tensor, ...]
#: The shape of a state without its batch dimension, ``(C, H, W)`` or a tuple of such shapes.
Shape = tuple[int, ...] | tuple[tuple[int, ...], ...]


def flatten_state(state: State) -> list[Tensor]:
    """Return the tensors of a state as a list (one element for a plain tensor)."""
    return [state] if isinstance(state, Tensor) else list(state)


def pack_like(tensors: Sequence[Tensor], like: State) -> State:
    """Inverse of :func:`flatten_state`: give ``tensors`` the structure of ``like``."""
    return tensors[0] if isinstance(like, Tensor) else tuple(tensors)


def sum_logdets(logdets: Sequence[Tensor | None]) -> Tensor | None:
    """Sum per-sample log-dets; ``None`` if any term is ``None`` (no made-up totals)."""
    if not logdets or any(term is None for term in logdets):
        return None
    total = logdets[0]
    for term in logdets[1:]:
        total = total + term
    return total


def accepts_context(function: Callable) -> bool:
    """Whether ``function`` takes a ``context`` keyword (by name, or through ``**kwargs``).

    This is how containers tell a conditional module from an unconditional one: a module
    writer adds ``context=None`` to ``forward`` and ``inverse`` and declares nothing else.
    """
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature takes no context
        return False
    return any(p.name == "context" and p.kind is not p.POSITIONAL_ONLY
               or p.kind is p.VAR_KEYWORD for p in parameters)


def call_with_context(function: Callable[..., tuple[State, Tensor | None]], state: State,
                      context: object = None) -> tuple[State, Tensor | None]:
    """``function(state, context=context)``, or ``function(state)`` when ``context`` is None.

    Unconditional modules (whose ``forward`` has no ``context`` parameter) are called exactly
    as before conditioning existed.
    """
    if context is None:
        return function(state)
    return function(state, context=context)


def structure_of(state: State) -> State:
    """A tensor-free stand-in for ``state`` that :func:`pack_like` accepts as ``like``."""
    return _TENSOR if isinstance(state, Tensor) else ()


_TENSOR = torch.empty(0)


def state_shape(state: State) -> Shape:
    """The shape of a state without the batch dimension."""
    if isinstance(state, Tensor):
        return tuple(state.shape[1:])
    return tuple(tuple(t.shape[1:]) for t in state)


class Reconstruction(NamedTuple):
    """What a module returns to the memory-saving engine when it rebuilds its local graph.

    Attributes:
        leaves: Tensors that require grad and from which ``output`` was recomputed; together
            they hold the reconstructed input.
        output: The module's output recomputed from ``leaves`` with a graph to them and to the
            module's parameters (numerically equal to the output that was given).
        logdet: The log-determinant recomputed with a graph, or ``None``.
        input_from_leaves: Maps one tensor per leaf (values or gradients) to a state shaped like
            the module's input; used for the reconstructed input and for its gradient.
    """

    leaves: list[Tensor]
    output: State
    logdet: Tensor | None
    input_from_leaves: Callable[[Sequence[Tensor]], State]


class InvertibleModule(nn.Module):
    """Base class of every invertible module.

    The contract, for a state ``x`` (a tensor of shape ``(B, ...)`` or a tuple of such tensors)::

        y, logdet = module(x)              # logdet = log|det dy/dx|, shape (B,)
        x, logdet_inv = module.inverse(y)  # logdet_inv = log|det dx/dy|

    **Sign rule.** ``forward`` reports the log-determinant of the Jacobian of the map it applies,
    and so does ``inverse``; for a bijection ``logdet_inv == -logdet`` (on the same point), so a
    chain sums the log-dets of whatever direction it runs.

    **Flags.** ``bijective`` is ``False`` for modules that are only left-invertible
    (``inverse(forward(x)) == x`` but not every ``y`` has a preimage, e.g. the over-complete
    Laplacian pyramid). Such a module returns ``None`` as its log-det unless it has a documented
    volume factor of its own (the lifting convolution reports ``1/2 log det(W^T W)`` per pixel);
    it never invents one, and :func:`require_bijective` refuses it wherever a log-likelihood is
    asked for. ``volume_preserving`` is ``True`` when the log-det is exactly zero for every input.

    **Shapes.** :meth:`output_shape` states the output shape for an input shape (both without
    the batch dimension) and raises :class:`~autoflow.ShapeError` for an input the module cannot
    take; :meth:`input_shape` is its counterpart for :meth:`inverse`. Containers use them to
    check a chain before running it.

    **Engine hook.** :meth:`reconstruct` lets the memory-saving engine rebuild the input and the
    local graph from an output. The default inverts without a graph and runs ``forward`` again;
    couplings override it to evaluate their conditioner only once.

    **Context.** A conditional module takes a keyword ``context`` (a tensor with the batch
    dimension, e.g. a ``(B, K)`` one-hot class or a ``(B, K, H, W)`` image) in ``forward``
    and ``inverse``, and in ``reconstruct`` if it overrides it::

        y, logdet = module(x, context=c)
        x, logdet_inv = module.inverse(y, context=c)

    The map is a bijection of ``x`` for each fixed ``c``; the log-det is that of ``x -> y``.
    A keyword with default ``None``, rather than a state ``(x, c)`` or a separate class, keeps
    unconditional code unchanged: containers pass ``context`` only to members that take one
    (:attr:`conditional`), and the memory-saving engine passes it to forward and
    reconstruction alike, so the context gets its gradient (see :doc:`/concepts/conditioning`).
    """

    bijective: bool = True
    volume_preserving: bool = False

    def forward(self, x: State) -> tuple[State, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, y: State) -> tuple[State, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement inverse")

    @property
    def conditional(self) -> bool:
        """Whether the module takes a context: by default, whether ``forward`` has one."""
        return accepts_context(self.forward)

    def output_shape(self, input_shape: Shape) -> Shape:
        """Output shape (without batch) for ``input_shape``; identity unless overridden."""
        return input_shape

    def input_shape(self, output_shape: Shape) -> Shape:
        """Input shape (without batch) giving ``output_shape``; identity unless overridden."""
        return output_shape

    def reconstruct(self, y: State, *, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input of ``forward`` from its output ``y`` and the local graph.

        Called by the memory-saving engine with grad enabled; ``y`` carries no graph;
        ``context`` is the one the forward pass received (``None`` if none).
        """
        with torch.no_grad(), same_randomness(y):
            x, _ = call_with_context(self.inverse, y, context)
        return recompute(lambda s: call_with_context(self.forward, s, context), x)

    def reconstruct_inverse(self, x: State, *, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input of ``inverse`` from its output ``x`` and the local graph."""
        with torch.no_grad(), same_randomness(x):
            y, _ = call_with_context(self.forward, x, context)
        return recompute(lambda s: call_with_context(self.inverse, s, context), y)

    def rebuilt_in_runs(self, inverse: bool = False) -> bool:
        """Whether the memory-saving engine may fold this module into its neighbour's rebuild.

        The engine then inverts it without a graph, as the default hook does, but runs it
        again on the graph of the module before it instead of on fresh leaves, so that one
        local backward covers a whole run of such modules (ActNorm, a permutation, a 1×1
        convolution, a reshape after a coupling): each backward call has a fixed cost that
        dwarfs what these small maps compute. By default, true when the engine hook of that
        direction (:meth:`reconstruct` or :meth:`reconstruct_inverse`) is the default one, so
        that folding rebuilds exactly what the hook would, and the module has no submodules
        (no conditioner), so that running it again is cheap and its graph is about one state
        in size.

        Args:
            inverse: The direction the chain runs (``True``: the module's ``inverse`` is
                applied in the forward pass).
        """
        hook = "reconstruct_inverse" if inverse else "reconstruct"
        return (getattr(type(self), hook) is getattr(InvertibleModule, hook)
                and not self._modules)


class _RandomnessSwitch(threading.local):
    """Per thread: whether :func:`same_randomness` forks the random-number state.

    The memory-saving engine turns it off while it reconstructs a module whose forward pass drew
    no random numbers: the fork would cost two state copies and change nothing. Per thread
    because autograd may run the backward passes of chains on different devices in parallel.
    """

    fork = True


RANDOMNESS = _RandomnessSwitch()

# torch's stateless layers: self-contained and per-sample (the starting point of both sets).
_PLAIN_TORCH_LAYERS = (
    nn.Sequential, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Identity, nn.Dropout,
    nn.LeakyReLU, nn.ReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
)

#: Module classes whose own code (``forward``, ``inverse``, the reconstruction hooks) reads no
#: tensor requiring grad other than its arguments and the parameters and buffers registered in
#: the module and its submodules. The memory-saving engine then takes those as the tensors a
#: module's gradient flows to instead of watching every operation of its forward pass. Exact
#: classes only: a subclass may change that code, so it is not covered until it is added itself.
SELF_CONTAINED: set[type[nn.Module]] = set(_PLAIN_TORCH_LAYERS)


def self_contained(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: add ``cls`` (exactly, not its subclasses) to :data:`SELF_CONTAINED`.

    Only for classes whose code reads tensors requiring grad from nowhere but its arguments and
    its module tree; ``tests/test_engine_fast_paths.py`` checks every such class with the engine's
    operation recorder.
    """
    SELF_CONTAINED.add(cls)
    return cls


#: Module classes whose map treats every sample of a batch on its own, in both modes: one
#: sample's output depends on that sample (and the context's matching row) alone. The
#: memory-saving engine may then rebuild and differentiate a batch in slices
#: (``EngineOptions.backward_chunk``). Not batch or volume normalisation, which average over
#: the batch in training. Exact classes only, as for :data:`SELF_CONTAINED`.
PER_SAMPLE: set[type[nn.Module]] = set(_PLAIN_TORCH_LAYERS)


def per_sample(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: add ``cls`` (exactly, not its subclasses) to :data:`PER_SAMPLE`.

    Only for classes whose maps give each sample's output from that sample alone, in training
    mode too; :func:`autoflow.testing.assert_per_sample` checks an instance.
    """
    PER_SAMPLE.add(cls)
    return cls


def same_randomness(state: State) -> contextlib.AbstractContextManager:
    """Restore the random-number state on exit, so the next call draws the same numbers.

    A reconstruction runs a conditioner twice (to invert, then to rebuild the graph); both runs
    must see the dropout masks of the original forward pass. A no-op while the engine rebuilds a
    module that drew no random numbers (see ``RANDOMNESS``).
    """
    if not RANDOMNESS.fork:
        return contextlib.nullcontext()
    device = flatten_state(state)[0].device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


#: The default generators' states: the CPU's, and the GPU's of one device (``None`` off the GPU).
RngSnapshot = tuple[Tensor, Tensor | None, torch.device]


def rng_snapshot(device: torch.device) -> RngSnapshot:
    """The default generators' states: the CPU's, and ``device``'s when it is a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def restore_rng(saved: RngSnapshot) -> None:
    """Set the default generators back to a :func:`rng_snapshot`."""
    torch.set_rng_state(saved[0])
    if saved[1] is not None:
        torch.cuda.set_rng_state(saved[1], saved[2])


@contextlib.contextmanager
def replaying_rng(saved: RngSnapshot | None) -> Iterator[None]:
    """Draw the random numbers drawn after ``saved`` was taken again, and leave the caller's
    generators as they were on exit (nothing to do for ``None``)."""
    if saved is None:
        yield
        return
    devices = [saved[2]] if saved[1] is not None else []
    with torch.random.fork_rng(devices=devices):
        restore_rng(saved)
        yield


#: The autocast settings of the device types a computation runs on: per type, whether
#: autocast is on and its dtype, and whether its cast cache is on.
AutocastState = list[tuple[str, bool, torch.dtype, bool]]


def autocast_state(device_type: str) -> AutocastState:
    """The autocast settings of ``device_type`` and of the CPU, to run code again as it ran."""
    cache = torch.is_autocast_cache_enabled()
    return [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), cache)
            for kind in sorted({device_type, "cpu"})]


@contextlib.contextmanager
def autocast_as(states: AutocastState) -> Iterator[None]:
    """Run the block with the autocast settings of :func:`autocast_state`."""
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype, cache in states:
            stack.enter_context(
                torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache)
            )
        yield


def warn_caller(message: str) -> None:
    """``warnings.warn`` pointing at the first frame outside autoflow and torch: the user's
    line that called the model, however deep in modules the warning arose."""
    import sys
    import warnings

    package = str(Path(__file__).resolve().parent)
    torch_root = str(Path(torch.__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((package, torch_root)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)


def plain_autograd_reason(tensors: Callable[[], Iterator[Tensor]]) -> str | None:
    """Why a computation must run with plain autograd instead of a custom backward pass that
    rebuilds what it needs (the memory-saving engine's, the row bands'); ``None`` if it need not.

    ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``...) and forward-mode AD need rules
    (``setup_context``, ``vmap``, ``jvp``) that a backward pass rebuilding its inputs from its
    outputs does not have. Forward-mode AD is checked only while a dual level is open, on the
    tensors ``tensors()`` yields (the inputs, the context, the modules' parameters and
    buffers): one of them must carry a tangent.
    """
    # While torch.compile traces, the interpreter stack holds its own entries: not a transform.
    if (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None):
        return "a torch.func transform (grad, vmap, jvp...) is active"
    if forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in tensors()):
        return "forward-mode AD is active (a tensor carries a tangent)"
    return None


@contextlib.contextmanager
def outer_hooks_only(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Keep the tensor hooks (``register_hook``) and ``retain_grad`` of ``tensors`` out of an
    ``autograd.grad`` call inside a custom backward pass.

    A backward pass that rebuilds its graph (the memory-saving engine's, the row bands') reaches
    the tensors it uses from outside (parameters, a context) directly, so ``autograd.grad``
    would fire their hooks and fill a retained ``.grad``; the gradient then goes to the outer
    backward pass, which does both again: a hook scaling a gradient by 3 would scale it by 9.
    Within this block they do not fire, so they fire once, in the outer pass.
    """
    silenced = []
    for t in tensors:
        hooks = t._backward_hooks
        if hooks:
            silenced.append((hooks, dict(hooks)))
            hooks.clear()
    retained = [(t, t.grad) for t in tensors if t.retains_grad]
    try:
        yield
    finally:
        for hooks, items in silenced:
            hooks.update(items)
        for t, grad in retained:
            t.grad = grad


#: Where each parameter and buffer of a module tree sits: ``(its table, its name, the tensor)``.
TensorSlots = list[tuple[dict, str, Tensor]]


def tensor_slots(modules: Sequence[nn.Module]) -> TensorSlots:
    """The parameters and buffers of ``modules`` with the table entries that hold them."""
    return [(table, name, t) for m in modules
            for table in (m._parameters, m._buffers) for name, t in table.items()
            if t is not None]


def put_back(slots: TensorSlots) -> list[tuple[dict, str, Tensor | None]]:
    """Put each tensor of ``slots`` back where another replaced it since (a user's assignment,
    or ``torch.func.functional_call``, which swaps tensors in for one call only).

    Returns:
        What :func:`undo_put_back` needs to leave the tables as they were found.
    """
    replaced = []
    for table, name, t in slots:
        current = table.get(name)
        if current is not t:
            replaced.append((table, name, current))
            table[name] = t
    return replaced


def undo_put_back(replaced: list[tuple[dict, str, Tensor | None]]) -> None:
    """Undo a :func:`put_back`."""
    for table, name, current in replaced:
        if current is None:
            table.pop(name, None)
        else:
            table[name] = current


def set_modes(modules: Sequence[nn.Module], modes: Sequence[bool]) -> list[bool] | None:
    """Give each module its train/eval flag from ``modes`` (one per module, in order).

    Returns:
        The flags they had, for setting them back; ``None`` if nothing changed.
    """
    current = [m.training for m in modules]
    if current == list(modes):
        return None
    for m, mode in zip(modules, modes):
        m.training = mode
    return current


def recompute(function: Callable[[State], tuple[State, Tensor | None]], x: State) -> Reconstruction:
    """Run ``function`` again on leaves holding the values of ``x``, building a local graph."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in flatten_state(x)]
    output, logdet = function(pack_like(leaves, x))
    return Reconstruction(leaves, output, logdet, lambda tensors: pack_like(list(tensors), x))


def require_bijective(module: nn.Module, purpose: str = "a log-likelihood") -> None:
    """Raise :class:`~autoflow.NotBijectiveError` if ``module`` or any submodule is not bijective.

    Args:
        module: The module (often a container) to check.
        purpose: What the caller wants to compute, for the error message.

    Raises:
        NotBijectiveError: Naming the first offending submodule.
    """
    found = _deepest_non_bijective(module, "")
    if found is not None:
        name, sub = found
        where = name or type(module).__name__
        raise NotBijectiveError(
            f"{purpose} needs a bijection, but '{where}' ({type(sub).__name__}) is not one: "
            "it is only left-invertible or holds a module without an inverse, so its log-det "
            "is not a change of variables"
        )


def _deepest_non_bijective(module: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    # A container is non-bijective because of a member: name the member, not the container.
    if not (isinstance(module, InvertibleModule) and not module.bijective):
        return None
    for child_name, child in module.named_children():
        found = _deepest_non_bijective(child, f"{name}.{child_name}" if name else child_name)
        if found is not None:
            return found
    return name, module


def check_image(x: Tensor, channels: int | None, module: nn.Module, name: str = "input") -> None:
    """Check that ``x`` is a floating ``(B, channels, H, W)`` tensor, naming ``module``.

    Raises:
        ShapeError: For a non-tensor or a wrong shape.
        AutoflowError: For a tensor that is not floating-point (see :func:`check_floating`).
    """
    _check_channel_tensor(x, channels, module, name, (4,), f"a 4-D {name} (B, C, H, W)")


def check_features(x: Tensor, channels: int | None, module: nn.Module,
                   name: str = "input") -> None:
    """Check that ``x`` is a floating ``(B, channels)`` vector batch or ``(B, channels, H, W)``
    image batch, naming ``module``: the states of modules that act per position on channels.

    Raises:
        ShapeError: For a non-tensor or a wrong shape.
        AutoflowError: For a tensor that is not floating-point (see :func:`check_floating`).
    """
    _check_channel_tensor(x, channels, module, name, (2, 4),
                          f"a 4-D {name} (B, C, H, W) or a 2-D {name} (B, C) of vectors")


def _check_channel_tensor(x: Tensor, channels: int | None, module: nn.Module, name: str,
                          ranks: tuple[int, ...], expected: str) -> None:
    """The checks of :func:`check_image` and :func:`check_features`: a floating tensor of one
    of ``ranks`` dimensions (``expected`` says which) with ``channels`` in dimension 1."""
    if not isinstance(x, Tensor):
        raise ShapeError(
            f"{type(module).__name__} expected a tensor {name}, received {type(x).__name__}"
        )
    check_floating(x, module, name)
    if x.dim() not in ranks:
        raise ShapeError(
            f"{type(module).__name__} expected {expected}, received shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[1] != channels:
        raise ShapeError(
            f"{type(module).__name__} expected {channels} channels in its {name}, "
            f"received {x.shape[1]} (shape {tuple(x.shape)})"
        )


def check_features_shape(shape: Shape, channels: int | None, module: nn.Module
                         ) -> tuple[int, ...]:
    """Shape-level counterpart of :func:`check_features`: ``(C,)`` or ``(C, H, W)``."""
    return _check_shape(shape, channels, module, (1, 3), "a (C,) or (C, H, W)")


def positions(x: Tensor) -> int:
    """Positions per sample that a per-position map acts on: ``H W``, or 1 for vectors."""
    return math.prod(x.shape[2:])


def check_image_shape(shape: Shape, channels: int | None, module: nn.Module) -> tuple[int, ...]:
    """Shape-level counterpart of :func:`check_image` for ``(C, H, W)`` shapes."""
    return _check_shape(shape, channels, module, (3,), "a (C, H, W)")


def _check_shape(shape: Shape, channels: int | None, module: nn.Module,
                 ranks: tuple[int, ...], expected: str) -> tuple[int, ...]:
    """``shape`` as a tuple, after checking its rank is one of ``ranks`` and its channels."""
    if len(shape) not in ranks or not all(isinstance(s, int) for s in shape):
        raise ShapeError(f"{type(module).__name__} expected {expected} shape, received {shape}")
    if channels is not None and shape[0] != channels:
        raise ShapeError(
            f"{type(module).__name__} expected {channels} channels, received shape {shape}"
        )
    return tuple(shape)  # type: ignore[return-value]


def check_int(value: object, name: str, owner: str, *, minimum: int = 1, why: str = "") -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``, else raise.

    Raises:
        AutoflowError: ``"<owner> <name> must be an int >= <minimum><why>, received <value>"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AutoflowError(
            f"{owner} {name} must be an int >= {minimum}{why}, received {value!r}"
        )
    return value


def check_logdet(logdet: object, batch: int, where: str) -> None:
    """Check that a module's log-det is ``None`` or a tensor of shape ``(batch,)``.

    A ``(B, 1)`` log-det added to a ``(B,)`` one broadcasts to ``(B, B)``, and a scalar one
    adds the same number to every sample: both give wrong likelihoods without any error, so
    containers check every member's log-det as it is returned.

    Args:
        logdet: What the module returned as its log-det.
        batch: The batch size ``B`` of the state the module received.
        where: The module, as the message should name it (``"module '3' (MyCoupling)"``).

    Raises:
        ShapeError: ``"<where> returned a log-det of shape <shape>; ... shape (<batch>,)"``.
    """
    if logdet is None:
        return
    if not isinstance(logdet, Tensor):
        raise ShapeError(
            f"{where} returned a log-det of type {type(logdet).__name__}; the contract asks "
            f"for a tensor of shape ({batch},), one value per sample, or None"
        )
    if tuple(logdet.shape) != (batch,):
        raise ShapeError(
            f"{where} returned a log-det of shape {tuple(logdet.shape)}; the contract asks for "
            f"shape ({batch},), one value per sample (sum over every non-batch dimension)"
        )


def check_bool(value: object, name: str, owner: str) -> bool:
    """Return ``value`` if it is a bool, else raise: a switch is never read from truthiness.

    Raises:
        SwitchError: ``"<owner> <name> must be a bool, received <value>"``.
    """
    if not isinstance(value, bool):
        raise SwitchError(
            f"{owner} {name} must be a bool, received {value!r}"
        )
    return value


def check_dtype(
    x: Tensor, reference: Tensor, module: nn.Module, name: str = "input"
) -> torch.dtype:
    """Check ``x``'s dtype against ``module``'s parameter ``reference``; return the map's dtype.

    Outside autocast, ``x`` must have the parameters' dtype: mixing dtypes would either promote
    silently or fail deep inside ``F.conv2d`` with a bare ``RuntimeError``, and the module's
    dtype is the one the user chose. Under autocast (for ``x``'s device) any floating input is
    accepted, and the invertible map runs in at least float32 (``x``'s dtype promoted with the
    parameters' and float32), with autocast switched off inside it (see :func:`exact`): a
    1×1 convolution or affine map computed in bfloat16 would lose 8 bits per module, and the
    memory-saving engine could not rebuild its input from its output.

    Returns:
        The dtype the map computes in.

    Raises:
        AutoflowError: For a dtype mismatch outside autocast.
    """
    check_floating(x, module, name)
    if torch.is_autocast_enabled(x.device.type):
        return torch.promote_types(torch.promote_types(x.dtype, reference.dtype), torch.float32)
    if x.dtype != reference.dtype:
        raise AutoflowError(
            f"{type(module).__name__} expected a {reference.dtype} {name} (its parameters' "
            f"dtype), received {x.dtype}; convert the input with .to({reference.dtype}), or "
            f"the module with .to({x.dtype})"
        )
    return x.dtype


def check_floating(x: Tensor, module: nn.Module, name: str = "input") -> None:
    """Check that ``x`` is floating-point, naming ``module`` in the error.

    Every state of the library is real-valued: an integer image (e.g. uint8 pixels) would
    otherwise fail deep inside a convolution with a bare ``RuntimeError``, or, through a
    permutation, pass silently and break the next module.

    Raises:
        AutoflowError: ``"<module> expected a floating-point <name>, received <dtype>; ..."``.
    """
    if not x.is_floating_point():
        raise AutoflowError(
            f"{type(module).__name__} expected a floating-point {name}, received {x.dtype}; "
            f"convert it with .float() (and scale integer pixels to [0, 1] first)"
        )


def exact(x: Tensor) -> contextlib.AbstractContextManager:
    """Switch autocast off for ``x``'s device while an invertible map runs (see check_dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()
