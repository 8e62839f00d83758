"""Composition of invertible modules, with an optional memory-saving training mode."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from .base import InvertibleModule, Shape, State, check_bool, sum_logdets
from .engine import EngineOptions, run_memory_saving, run_plain
from .errors import AutoflowError, EngineError, ShapeError

__all__ = ["Sequential"]


class Sequential(InvertibleModule):
    """Apply modules in order, summing log-dets; invert them in reverse order.

    ``y = f_D(...f_1(x))`` with ``log|det dy/dx| = sum_i log|det df_i|``; the inverse applies
    ``f_D^{-1}`` first. If any module reports no log-det (an over-complete module) the chain
    reports ``None``. Plain ``nn.Module`` members (e.g. a frozen feature encoder) may appear in
    the chain: they map a state to a state, contribute no log-det, make the chain
    non-bijective and cannot be inverted.

    With ``memory_saving=True`` each run of consecutive invertible modules is trained by the
    memory-saving engine (:mod:`autoflow.engine`): intermediate activations are not stored but
    reconstructed during backward, so memory does not grow with depth. Gradients equal plain
    autograd's; the same module code runs either way.

    ``flow(x, context=c)`` passes ``c`` to every member that takes a context
    (:attr:`~autoflow.InvertibleModule.conditional`) and to no other, in both directions and
    in the engine, which gives ``c`` its gradient like any tensor a member uses.

    Args:
        *modules: The modules, in the order they are applied.
        memory_saving: Train through the memory-saving engine.
        anchor_every: Engine option: keep the true input of every ``k``-th module.
        debug: Engine option: measure reconstruction errors (see ``reconstruction_errors``) and
            check for NaN/inf; keeps all activations, so it saves no memory.
        preserve_rng_state: Engine option: replay random-number state during reconstruction.
        backward_chunk: Engine option: rebuild and differentiate runs of per-sample modules
            in slices of at most this many samples, for less memory at large batches (see
            :class:`~autoflow.engine.EngineOptions`).

    Example:
        >>> import torch, autoflow
        >>> flow = autoflow.Sequential(autoflow.ActNorm(4), autoflow.InvConv1x1(4),
        ...                            autoflow.AffineCoupling(4), memory_saving=True)
        >>> y, logdet = flow(torch.randn(2, 4, 8, 8))
        >>> flow.output_shape((4, 8, 8))
        (4, 8, 8)
    """

    def __init__(
        self,
        *modules: nn.Module,
        memory_saving: bool = False,
        anchor_every: int | None = None,
        debug: bool = False,
        preserve_rng_state: bool = True,
        backward_chunk: int | None = None,
    ) -> None:
        super().__init__()
        for value, name in ((memory_saving, "memory_saving"), (debug, "debug"),
                            (preserve_rng_state, "preserve_rng_state")):
            check_bool(value, name, "Sequential")
        for i, module in enumerate(modules):
            self.append(module) if isinstance(module, nn.Module) else self._reject(i, module)
        self.memory_saving = memory_saving
        if memory_saving:
            for name, module in self._modules.items():
                if isinstance(module, InvertibleModule) and (
                    type(module).inverse is InvertibleModule.inverse
                ):
                    raise EngineError(
                        f"memory_saving=True needs every invertible module to implement "
                        f"inverse, but module '{name}' ({type(module).__name__}) does not"
                    )
        self.engine_options = EngineOptions(anchor_every, debug, preserve_rng_state,
                                            backward_chunk)

    @staticmethod
    def _reject(index: int, module: object) -> None:
        raise TypeError(
            f"Sequential expects nn.Module members, received {type(module).__name__} at "
            f"position {index}"
        )

    def append(self, module: nn.Module) -> Sequential:
        """Add ``module`` at the end of the chain."""
        if not isinstance(module, nn.Module):
            self._reject(len(self), module)
        self.add_module(str(len(self)), module)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, index: int | slice) -> nn.Module:
        """The module at ``index``; a slice gives a chain of those modules (the same objects,
        not copies) with this chain's engine settings, e.g. ``flow[:2](x)`` for a prefix."""
        modules = list(self._modules.values())
        if not isinstance(index, slice):
            return modules[index]
        options = self.engine_options
        return Sequential(*modules[index], memory_saving=self.memory_saving,
                          anchor_every=options.anchor_every, debug=options.debug,
                          preserve_rng_state=options.preserve_rng_state,
                          backward_chunk=options.backward_chunk)

    @property
    def bijective(self) -> bool:  # type: ignore[override]
        return all(isinstance(m, InvertibleModule) and m.bijective for m in self)

    @property
    def volume_preserving(self) -> bool:  # type: ignore[override]
        return all(isinstance(m, InvertibleModule) and m.volume_preserving for m in self)

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        """Whether any member takes a context."""
        return any(isinstance(m, InvertibleModule) and m.conditional for m in self)

    @property
    def reconstruction_errors(self) -> dict[str, float]:
        """Worst relative reconstruction error per module seen by the engine in debug mode."""
        return self.engine_options.errors

    def forward(self, x: State, *, context: Tensor | None = None
                ) -> tuple[State, Tensor | None]:
        """Apply the members in order; ``context`` goes to those that take one.

        Raises:
            AutoflowError: If a context is given but no member takes one.
        """
        self._check_context(context)
        return self._run(list(self._modules.items()), x, inverse=False, context=context)

    def inverse(self, y: State, *, context: Tensor | None = None
                ) -> tuple[State, Tensor | None]:
        """Invert the members in reverse order; ``context`` goes to those that take one."""
        self._check_context(context)
        items = list(self._modules.items())[::-1]
        for name, module in items:
            if not isinstance(module, InvertibleModule):
                raise EngineError(
                    f"cannot invert the chain: module '{name}' ({type(module).__name__}) is not "
                    "an InvertibleModule"
                )
        return self._run(items, y, inverse=True, context=context)

    def _check_context(self, context: object) -> None:
        # A context no member reads would be ignored silently: a model the user believes
        # conditional would not be.
        if context is not None and not self.conditional:
            raise AutoflowError(
                "Sequential received a context, but none of its modules takes one; build the "
                "couplings with context_channels=... (or give your module's forward a "
                "context=None keyword)"
            )

    def _run(self, items, x: State, inverse: bool,
             context: Tensor | None = None) -> tuple[State, Tensor | None]:
        logdets = []
        for segment in self._segments(items):
            if isinstance(segment, tuple):  # a plain module, run with ordinary autograd
                x, logdet = segment[1](x), None
            elif self.memory_saving:
                x, logdet = run_memory_saving(segment, x, self.engine_options, inverse=inverse,
                                              context=context)
            else:
                x, logdet = run_plain(segment, x, inverse=inverse,
                                      debug=self.engine_options.debug, context=context)
            logdets.append(logdet)
        return x, sum_logdets(logdets)

    @staticmethod
    def _segments(items):
        """Split the chain into runs of invertible modules and single plain modules."""
        run: list = []
        for name, module in items:
            if isinstance(module, InvertibleModule):
                run.append((name, module))
                continue
            if run:
                yield run
                run = []
            yield (name, module)
        if run:
            yield run

    def output_shape(self, input_shape: Shape) -> Shape:
        """Propagate ``input_shape`` through the chain, naming the module that rejects it."""
        shape = input_shape
        for name, module in self._modules.items():
            if not isinstance(module, InvertibleModule):
                raise ShapeError(
                    f"cannot infer shapes through module '{name}' ({type(module).__name__}), "
                    "which is not an InvertibleModule"
                )
            try:
                shape = module.output_shape(shape)
            except ShapeError as error:
                raise ShapeError(
                    f"module '{name}' ({type(module).__name__}) cannot take the output of the "
                    f"module before it, of shape {shape}: {error}"
                ) from error
        return shape

    def input_shape(self, output_shape: Shape) -> Shape:
        shape = output_shape
        for name, module in reversed(self._modules.items()):
            try:
                shape = module.input_shape(shape)
            except ShapeError as error:
                raise ShapeError(
                    f"module '{name}' ({type(module).__name__}) cannot produce shape {shape}: "
                    f"{error}"
                ) from error
        return shape

    def check(self, input_shape: Shape) -> Shape:
        """Check that the chain fits together for ``input_shape``; return the output shape."""
        return self.output_shape(input_shape)

