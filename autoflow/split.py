"""Factor-out split for multi-scale flows (RealNVP Sec. 3.6, Glow's ``split2d``).

**State design.** A multi-scale flow carries the latents it has factored out along in a tuple
state, so that every module stays a bijection of the whole state::

    x                         (B, C, H, W)                  a tensor state
    (x, z_1, ..., z_k)        x: (B, C, H, W), z_j: latents  a tuple state

:class:`Split` maps ``x -> (h, z)`` for a tensor and ``(x, z_1, ..., z_k) ->
(h, z_1, ..., z_k, z)`` for a tuple, with ``h = x[:, :C - C // 2]`` (``(B, C - C // 2, H, W)``,
it goes on through the flow) and ``z`` from ``x[:, C - C // 2:]`` (``(B, C // 2, H, W)``,
appended). Later modules act on the first element only, through
:class:`~autoflow.on_first.OnFirst`, which passes the latents through unchanged. The last state of
a multi-scale flow, ``(h_L, z_1, ..., z_{L-1})``, therefore holds every latent, and
:class:`~autoflow.flow.Flow` evaluates its base density (standard normal by default) over all
its tensors. Because the latents stay in the state, a :class:`~autoflow.Sequential` (plain or
memory-saving) chains splits like any other module and nothing has to be collected on the side.

**Learned prior, kept honest.** Glow evaluates a factored-out ``z`` under a prior
``N(mu(h), sigma(h)^2)`` learned from the kept part. Adding that log-density to the log-det slot
would break the contract (the log-det must be ``log|det J|`` of the map applied). Instead, with
``learned_prior=True`` the split *whitens* ``z`` conditioned on ``h``, an affine coupling of ``z``
on ``h``::

    s, t  = conditioner(h)          s soft-clamped: clamp * tanh(s / clamp)
    z_out = exp(s) * z + t
    log|det J| = sum_{c,i,j} s,     shape (B,)

Then ``log N(z_out; 0, I) + sum s = log N(z; -t e^{-s}, e^{-2s})``: exactly Glow's learned-prior
term, while the module's log-det is still the log-determinant of the map it applies and the
base density stays a plain standard normal. The conditioner is zero-initialised, so the prior
starts as ``N(0, I)``. Without a learned prior the split is a volume-preserving rearrangement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    InvertibleModule,
    Reconstruction,
    Shape,
    State,
    check_bool,
    check_features,
    check_features_shape,
    check_int,
    per_sample,
    self_contained,
)
from .coupling import Coupling, make_conditioner
from .errors import AutoflowError, ShapeError

__all__ = ["Split"]


@per_sample
@self_contained
class _LatentPrior(Coupling):
    """Affine coupling of the last tensor of a tuple state on its first tensor."""

    def __init__(self, kept_channels: int, latent_channels: int, hidden_channels: int,
                 kernel_size: int, clamp: float, context_channels: int = 0) -> None:
        conditioner = make_conditioner(
            kept_channels + context_channels, 2 * latent_channels, hidden_channels,
            kernel_size=kernel_size
        )
        super().__init__(conditioner, clamp=clamp, context_channels=context_channels)

    def _split(self, state: State) -> tuple[list[Tensor], Tensor]:
        return list(state[:-1]), state[-1]

    def _merge(self, kept: Sequence[Tensor], target: Tensor) -> State:
        return (*kept, target)

    def _conditioner_input(self, kept: Sequence[Tensor], target: Tensor) -> Tensor:
        return kept[0]


@per_sample
@self_contained
class Split(InvertibleModule):
    """Factor out ``C // 2`` channels as a latent; keep ``C - C // 2`` going on.

    Forward takes a ``(B, C, H, W)`` tensor (or a ``(B, C)`` batch of vectors) or a tuple
    ``(x, z_1, ..., z_k)`` with ``x`` of that shape, and returns ``(h, z)`` or
    ``(h, z_1, ..., z_k, z)`` (see the module docstring). The inverse takes that tuple back; a
    2-tuple always inverts to a plain tensor, which is why a 1-tuple input is refused.

    Args:
        channels: Channels ``C >= 2`` of the tensor being split.
        learned_prior: Whiten the factored-out latent with an affine map conditioned on the kept
            channels (Glow's learned prior, as an honest bijection); otherwise the split is a
            volume-preserving rearrangement.
        hidden_channels: Hidden width of the prior's conditioner; default ``channels``.
        kernel_size: Odd kernel size of the prior's conditioner (``1`` for vectors: an MLP).
        clamp: Soft-clamp bound of the prior's log-scale.
        context_channels: Channels ``K`` of a context the learned prior is conditioned on
            too (``0``: none), concatenated to the kept part as in a conditional coupling:
            the prior becomes ``N(mu(h, c), sigma(h, c)^2)``.

    Raises:
        AutoflowError: If ``channels`` is not an int ``>= 2``, a prior option is invalid, or
            ``context_channels`` is given without ``learned_prior``.

    Example:
        >>> import torch, autoflow
        >>> split = autoflow.Split(4)
        >>> (h, z), logdet = split(torch.randn(2, 4, 3, 3))
        >>> tuple(h.shape), tuple(z.shape), tuple(logdet.shape)
        ((2, 2, 3, 3), (2, 2, 3, 3), (2,))
        >>> (h2, z_a, z_b), _ = autoflow.Split(2)((h, z))
        >>> tuple(h2.shape), tuple(z_b.shape)
        ((2, 1, 3, 3), (2, 1, 3, 3))
        >>> split.output_shape((4, 3, 3))
        ((2, 3, 3), (2, 3, 3))
    """

    def __init__(
        self,
        channels: int,
        *,
        learned_prior: bool = True,
        hidden_channels: int | None = None,
        kernel_size: int = 3,
        clamp: float = 2.0,
        context_channels: int = 0,
    ) -> None:
        super().__init__()
        check_int(context_channels, "context_channels", "Split", minimum=0)
        check_int(channels, "channels", "Split", minimum=2, why=" (one to keep, one to factor out)")
        self.channels = channels
        self.latent_channels = channels // 2
        self.kept_channels = channels - self.latent_channels
        self.learned_prior = check_bool(learned_prior, "learned_prior", "Split")
        if learned_prior:
            hidden = channels if hidden_channels is None else hidden_channels
            self.prior: _LatentPrior | None = _LatentPrior(
                self.kept_channels, self.latent_channels, hidden, kernel_size, clamp,
                context_channels
            )
        else:
            if hidden_channels is not None or context_channels:
                option = "hidden_channels" if hidden_channels is not None else "context_channels"
                raise AutoflowError(
                    f"Split got {option} without learned_prior; it only configures the "
                    "prior's conditioner"
                )
            self.prior = None
        self.volume_preserving = self.prior is None

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        """Whether the learned prior takes a context."""
        return self.prior is not None and self.prior.conditional

    def extra_repr(self) -> str:
        return f"{self.channels}, learned_prior={self.learned_prior}"

    # Structure ---------------------------------------------------------------------------

    def _factor(self, x: State) -> tuple[Tensor, ...]:
        """``x`` or ``(x, *latents)`` -> ``(h, *latents, z)``, with checks."""
        if isinstance(x, Tensor):
            head, latents = x, ()
        elif isinstance(x, tuple) and len(x) >= 2:
            head, latents = x[0], x[1:]
        else:
            received = f"a {len(x)}-tuple" if isinstance(x, tuple) else type(x).__name__
            raise ShapeError(
                "Split expected a (B, C, H, W) or (B, C) tensor or a tuple (x, z_1, ..., z_k) "
                f"with at least one factored-out latent, received {received}"
            )
        check_features(head, self.channels, self, name="input (first element)")
        return (head[:, : self.kept_channels], *latents, head[:, self.kept_channels :])

    def _unfactor(self, y: Sequence[Tensor]) -> State:
        """``(h, *latents, z)`` -> ``x`` or ``(x, *latents)`` (no checks)."""
        x = torch.cat([y[0], y[-1]], dim=1)
        return x if len(y) == 2 else (x, *y[1:-1])

    def _check_output(self, y: State) -> None:
        if not isinstance(y, tuple) or len(y) < 2:
            received = f"a {len(y)}-tuple" if isinstance(y, tuple) else type(y).__name__
            raise ShapeError(
                "Split.inverse expected a tuple (h, ..., z) of at least 2 tensors, received "
                f"{received}"
            )
        check_features(y[0], self.kept_channels, self, name="kept part (first element)")
        check_features(y[-1], self.latent_channels, self, name="latent (last element)")
        if y[0].shape[2:] != y[-1].shape[2:] or y[0].shape[0] != y[-1].shape[0]:
            raise ShapeError(
                f"Split.inverse expected the kept part and the latent to share batch and "
                f"spatial size, received {tuple(y[0].shape)} and {tuple(y[-1].shape)}"
            )

    # Maps --------------------------------------------------------------------------------

    def forward(self, x: State, *, context: Tensor | None = None
                ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Factor out the latent; returns ``(state, logdet)`` with ``logdet`` of shape ``(B,)``.

        Raises:
            ShapeError: If ``x`` is not a ``(B, channels, H, W)`` tensor or a tuple of 2 or more
                tensors starting with one.
        """
        state = self._factor(x)
        if self.prior is None:
            self._no_context(context)
            return state, state[0].new_zeros(state[0].shape[0])
        return self.prior(state, context=context)

    def _no_context(self, context: object) -> None:
        if context is not None:
            raise AutoflowError(
                "Split without learned_prior takes no context; build it with "
                "learned_prior=True and context_channels=K to condition its prior"
            )

    def inverse(self, y: State, *, context: Tensor | None = None) -> tuple[State, Tensor]:
        """Put the latent back; returns ``(x, logdet_inv)`` with ``logdet_inv = -logdet``.

        Raises:
            ShapeError: If ``y`` is not a tuple ``(h, ..., z)`` with the split's channel counts.
        """
        self._check_output(y)
        if self.prior is None:
            self._no_context(context)
            return self._unfactor(y), y[0].new_zeros(y[0].shape[0])
        state, logdet = self.prior.inverse(y, context=context)
        return self._unfactor(state), logdet

    def reconstruct(self, y: State, *, context: Tensor | None = None) -> Reconstruction:
        """Engine hook: rebuild the input from ``y`` with the prior's conditioner run once."""
        if self.prior is None:
            return super().reconstruct(y, context=context)
        self._check_output(y)
        rec = self.prior.reconstruct(y, context=context)
        return Reconstruction(
            rec.leaves,
            rec.output,
            rec.logdet,
            lambda tensors: self._unfactor(rec.input_from_leaves(tensors)),
        )

    # Shapes ------------------------------------------------------------------------------

    def output_shape(self, input_shape: Shape) -> Shape:
        """``(C, H, W) -> ((C - C//2, H, W), (C//2, H, W))`` (``(C,)`` likewise); a tuple of
        shapes keeps its tail.

        Raises:
            ShapeError: If the (first) shape is not ``(channels, H, W)``.
        """
        if input_shape and all(isinstance(s, tuple) for s in input_shape):
            if len(input_shape) < 2:
                raise ShapeError(
                    f"Split expected a (C, H, W) or (C,) shape or a tuple of 2 or more shapes, "
                    f"received {input_shape}"
                )
            head, latents = input_shape[0], tuple(input_shape[1:])
        else:
            head, latents = input_shape, ()
        spatial = check_features_shape(head, self.channels, self)[1:]
        return ((self.kept_channels, *spatial), *latents, (self.latent_channels, *spatial))

    def input_shape(self, output_shape: Shape) -> Shape:
        """Inverse of :meth:`output_shape`.

        Raises:
            ShapeError: If ``output_shape`` is not a tuple of 2 or more matching shapes.
        """
        if len(output_shape) < 2 or not all(isinstance(s, tuple) for s in output_shape):
            raise ShapeError(
                f"Split expected a tuple of 2 or more (C, H, W) or (C,) shapes, received "
                f"{output_shape}"
            )
        spatial = check_features_shape(output_shape[0], self.kept_channels, self)[1:]
        if check_features_shape(output_shape[-1], self.latent_channels, self)[1:] != spatial:
            raise ShapeError(
                f"Split expected the kept part and the latent to share a spatial size, "
                f"received {output_shape}"
            )
        head = (self.channels, *spatial)
        return head if len(output_shape) == 2 else (head, *output_shape[1:-1])
