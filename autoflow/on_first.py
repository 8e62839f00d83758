"""Apply a single-tensor invertible module to the first element of a tuple state.

For a state ``(h, z_1, ..., z_k)`` (a multi-scale flow after a :class:`~autoflow.split.Split`)::

    OnFirst(f)((h, z_1, ..., z_k)) = ((f(h), z_1, ..., z_k), log|det df/dh|)

The Jacobian is block diagonal with identity blocks for the latents, so the log-det is the
wrapped module's; shapes are ``h: (B, C, H, W)`` in and ``f``'s output shape out, latents
unchanged. The memory-saving engine hooks delegate to the wrapped module's, so a wrapped coupling
still evaluates its conditioner only once per reconstruction.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .base import (
    InvertibleModule,
    Reconstruction,
    Shape,
    State,
    call_with_context,
    per_sample,
    self_contained,
)
from .errors import AutoflowError, ShapeError

__all__ = ["OnFirst"]


@per_sample
@self_contained
class OnFirst(InvertibleModule):
    """Run ``module`` on the first tensor of a tuple state and pass the others through.

    Args:
        module: An invertible module mapping one tensor to one tensor.

    Raises:
        AutoflowError: If ``module`` is not an :class:`~autoflow.InvertibleModule`.

    Example:
        >>> import torch, autoflow
        >>> step = autoflow.OnFirst(autoflow.ActNorm(2))
        >>> (h, z), logdet = step((torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)))
        >>> tuple(h.shape), tuple(logdet.shape)
        ((4, 2, 3, 3), (4,))
        >>> step.output_shape(((2, 3, 3), (2, 3, 3)))
        ((2, 3, 3), (2, 3, 3))
    """

    def __init__(self, module: InvertibleModule) -> None:
        super().__init__()
        if not isinstance(module, InvertibleModule):
            raise AutoflowError(
                f"OnFirst expected an InvertibleModule to wrap, received {type(module).__name__}"
            )
        self.module = module

    @property
    def bijective(self) -> bool:  # type: ignore[override]
        return self.module.bijective

    @property
    def volume_preserving(self) -> bool:  # type: ignore[override]
        return self.module.volume_preserving

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        """Whether the wrapped module takes a context (which is then passed on to it)."""
        return self.module.conditional

    def _check(self, state: State, direction: str) -> tuple[Tensor, tuple[Tensor, ...]]:
        if not isinstance(state, tuple) or len(state) < 1:
            received = "an empty tuple" if isinstance(state, tuple) else type(state).__name__
            raise ShapeError(
                f"OnFirst({type(self.module).__name__}).{direction} expected a tuple state "
                f"(h, z_1, ..., z_k), received {received}"
            )
        return state[0], state[1:]

    def _wrap(self, result: tuple[State, Tensor | None], rest: tuple[Tensor, ...]):
        head, logdet = result
        if not isinstance(head, Tensor):
            raise ShapeError(
                f"OnFirst expects {type(self.module).__name__} to map a tensor to a tensor, "
                f"it returned {type(head).__name__}"
            )
        return (head, *rest), logdet

    def forward(self, x: State, *, context: Tensor | None = None
                ) -> tuple[State, Tensor | None]:
        """Apply the module to ``x[0]``; returns ``(state, logdet)``, ``logdet`` of shape (B,).

        Raises:
            ShapeError: If ``x`` is not a tuple, or the module rejects ``x[0]``.
        """
        head, rest = self._check(x, "forward")
        return self._wrap(call_with_context(self.module, head, context), rest)

    def inverse(self, y: State, *, context: Tensor | None = None
                ) -> tuple[State, Tensor | None]:
        """Apply the module's inverse to ``y[0]``; returns ``(state, logdet_inv)``.

        Raises:
            ShapeError: If ``y`` is not a tuple, or the module rejects ``y[0]``.
        """
        head, rest = self._check(y, "inverse")
        return self._wrap(call_with_context(self.module.inverse, head, context), rest)

    def reconstruct(self, y: State, *, context: Tensor | None = None) -> Reconstruction:
        """Engine hook: the wrapped module's reconstruction, latents passed through as leaves."""
        head, rest = self._check(y, "reconstruct")
        return self._extend(call_with_context(self.module.reconstruct, head, context), rest)

    def reconstruct_inverse(self, x: State, *, context: Tensor | None = None
                            ) -> Reconstruction:
        """Engine hook for the inverse direction; see :meth:`reconstruct`."""
        head, rest = self._check(x, "reconstruct_inverse")
        return self._extend(
            call_with_context(self.module.reconstruct_inverse, head, context), rest
        )

    def rebuilt_in_runs(self, inverse: bool = False) -> bool:
        """Whether the wrapped module is (carrying latents along changes nothing)."""
        return self.module.rebuilt_in_runs(inverse)

    @staticmethod
    def _extend(rec: Reconstruction, rest: tuple[Tensor, ...]) -> Reconstruction:
        # The latents are their own leaves: their gradient passes through unchanged.
        latents = [t.detach().requires_grad_(t.is_floating_point()) for t in rest]
        n = len(rec.leaves)

        def input_from_leaves(tensors: Sequence[Tensor]) -> State:
            return (rec.input_from_leaves(tensors[:n]), *tensors[n:])

        return Reconstruction(
            [*rec.leaves, *latents], (rec.output, *latents), rec.logdet, input_from_leaves
        )

    def output_shape(self, input_shape: Shape) -> Shape:
        """``(f.output_shape(s_0), s_1, ..., s_k)`` for a tuple of shapes.

        Raises:
            ShapeError: If ``input_shape`` is not a tuple of shapes or ``f`` rejects ``s_0``.
        """
        self._check_shapes(input_shape)
        return (self.module.output_shape(input_shape[0]), *input_shape[1:])

    def input_shape(self, output_shape: Shape) -> Shape:
        """``(f.input_shape(s_0), s_1, ..., s_k)`` for a tuple of shapes."""
        self._check_shapes(output_shape)
        return (self.module.input_shape(output_shape[0]), *output_shape[1:])

    def _check_shapes(self, shape: Shape) -> None:
        if not shape or not all(isinstance(s, tuple) for s in shape):
            raise ShapeError(
                f"OnFirst({type(self.module).__name__}) expected a tuple of shapes "
                f"((C, H, W), ...), received {shape}"
            )
