"""Cross-scale couplings over pyramid levels (PyramidFlow Sec. 3.2, Fig. 3c and 3d).

The state is a tuple of levels ``(x_0, ..., x_{L-1})``, level ``d`` of shape
``(B, C, H_d, W_d)`` (any sizes; a Laplacian pyramid halves them level by level). One level,
the *target* ``x_t``, is transformed by an affine map (eqs. 3-5) whose parameters come from
other levels and are matched to the target's size with bilinear (``align_corners=False``)
or nearest interpolation, followed by an invertible 1×1 convolution ``A`` that mixes the
target's channels (eqs. 6-7). With one source level ``k`` the conditioner (NN below) runs at
the source's resolution and its output is resized (or, with ``condition_at="target"``, the
source is resized first); with two source levels the sources are resized and concatenated
first:

.. math::

    (s, t) = \\operatorname{resize}\\big(\\operatorname{NN}(x_k), (H_t, W_t)\\big)
    \\quad\\text{or}\\quad
    (s, t) = \\operatorname{NN}\\big(\\operatorname{cat}_k\\,
    \\operatorname{resize}(x_k, (H_t, W_t))\\big),

    y_t = A\\,\\big(e^{s} \\odot x_t + t\\big), \\qquad y_d = x_d \\quad (d \\ne t),

    \\log|\\det J| = \\sum_{c,i,j} s_{c,i,j} + H_t W_t \\log|\\det A|,

with ``s`` soft-clamped and optionally volume-normalised; the log-det has shape ``(B,)``.

:class:`PyramidCoupling` conditions on one source level (Fig. 3c); :class:`DualPyramidCoupling`
conditions the middle level on both neighbours (Fig. 3d, the reparameterised dual block).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Shape, State, check_image, check_image_shape, check_int
from .conv1x1 import InvConv1x1
from .coupling import Coupling, make_conditioner
from .errors import AutoflowError, ShapeError
from .volume_norm import VolumeNorm

__all__ = ["RESIZE_MODES", "DualPyramidCoupling", "PyramidCoupling"]


RESIZE_MODES = ("bilinear", "nearest")
"""How levels and affine parameters are brought to another level's size."""


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _LevelCoupling(Coupling):
    """A coupling whose target is one pyramid level and whose condition is other levels."""

    def __init__(
        self,
        channels: int,
        *,
        target: int,
        sources: tuple[int, ...],
        kernel_size: int,
        hidden_channels: int | None,
        clamp: float,
        volume_norm: str | VolumeNorm | None,
        resize: str,
        bias: bool,
        clamp_kind: str,
        condition_at: str = "source",
    ) -> None:
        name = type(self).__name__
        check_int(channels, "channels", name)
        for what, value, allowed in (("resize", resize, RESIZE_MODES),
                                     ("condition_at", condition_at, ("source", "target"))):
            if value not in allowed:
                raise AutoflowError(f"{name} {what} must be one of {allowed}, received {value!r}")
        hidden = channels if hidden_channels is None else hidden_channels
        conditioner = make_conditioner(
            len(sources) * channels, 2 * channels, hidden, kernel_size=kernel_size, bias=bias
        )
        # The 1×1 convolution is volume-normalised together with s, so that one switch makes
        # the whole block volume preserving as in the paper.
        mixer = InvConv1x1(channels, volume_norm=volume_norm is not None)
        super().__init__(conditioner, clamp=clamp, volume_norm=volume_norm, mixer=mixer,
                         clamp_kind=clamp_kind)
        self.channels = channels
        self.target = target
        self.sources = sources
        self.resize = resize
        self.condition_at = condition_at

    def extra_repr(self) -> str:
        text = (f"channels={self.channels}, target={self.target}, sources={self.sources}, "
                f"resize={self.resize!r}")
        # Two sources are always resized to the target first; the choice is a one-source one.
        return text + (f", condition_at={self.condition_at!r}" if len(self.sources) == 1 else "")

    @property
    def min_levels(self) -> int:
        """The number of levels a state needs for the levels this coupling references."""
        return max(self.target, *self.sources) + 1

    def _check_count(self, count: int, received: object) -> None:
        if count < self.min_levels:
            raise ShapeError(
                f"{type(self).__name__} with target level {self.target} and source levels "
                f"{list(self.sources)} needs at least {self.min_levels} pyramid levels, "
                f"received {received}"
            )

    def _referenced(self) -> tuple[int, ...]:
        return (self.target, *self.sources)

    def _split(self, state: State) -> tuple[list[Tensor], Tensor]:
        if not isinstance(state, (tuple, list)):
            raise ShapeError(
                f"{type(self).__name__} expected a tuple of pyramid levels, each (B, C, H, W), "
                f"received {type(state).__name__}"
            )
        self._check_count(len(state), f"{len(state)}")
        for d, level in enumerate(state):
            check_image(level, self.channels if d in self._referenced() else None, self,
                        name=f"level {d}")
        batches = [level.shape[0] for level in state]
        # Compared pairwise, not hashed: a traced or symbolic batch size has no hash.
        if any(b != batches[0] for b in batches[1:]):
            raise ShapeError(
                f"{type(self).__name__} expected the same batch size in every level, "
                f"received {batches}"
            )
        kept = [level for d, level in enumerate(state) if d != self.target]
        return kept, state[self.target]

    def _merge(self, kept: Sequence[Tensor], target: Tensor) -> tuple[Tensor, ...]:
        return (*kept[: self.target], target, *kept[self.target :])

    def _conditioner_input(self, kept: Sequence[Tensor], target: Tensor) -> Tensor:
        # kept lacks the target level, so levels after it sit one position earlier.
        parts = [kept[d - (d > self.target)] for d in self.sources]
        if len(parts) == 1 and self.condition_at == "source":
            # The conditioner runs at the source's own resolution and its output (the affine
            # parameters) is resized; for the finest level this evaluates the network on a
            # quarter of the pixels.
            return parts[0]
        size = (target.shape[2], target.shape[3])
        resized = [_resize(part, size, self.resize) for part in parts]
        # cat copies even one tensor: a full-resolution copy for the finest level.
        return resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)

    def _fit_to_target(self, out: Tensor, target: Tensor) -> Tensor:
        return _resize(out, (target.shape[2], target.shape[3]), self.resize)

    def output_shape(self, input_shape: Shape) -> Shape:
        """``input_shape`` itself, after checking it is a tuple of level shapes that fits.

        Raises:
            ShapeError: If there are too few levels, a level is not ``(C, H, W)``, or a
                referenced level does not have ``channels`` channels.
        """
        if not isinstance(input_shape, tuple) or not all(
            isinstance(s, tuple) for s in input_shape
        ):
            raise ShapeError(
                f"{type(self).__name__} expected a tuple of level shapes (C, H, W), "
                f"received {input_shape}"
            )
        self._check_count(len(input_shape), f"shapes {input_shape}")
        for d, shape in enumerate(input_shape):
            check_image_shape(shape, self.channels if d in self._referenced() else None, self)
        return input_shape

    def input_shape(self, output_shape: Shape) -> Shape:
        """``output_shape`` itself, checked like :meth:`output_shape`."""
        return self.output_shape(output_shape)


class PyramidCoupling(_LevelCoupling):
    """Scale-wise coupling (Fig. 3c): level ``target`` transformed given level ``source``.

    The conditioner (conv k×k -> LeakyReLU -> conv k×k, last layer zero-initialised so the
    affine part starts as the identity) runs on the source level at its own resolution; its
    output, ``s, t`` for all channels of the target, is resized to the target's spatial size
    (bilinear, ``align_corners=False``); an :class:`~autoflow.conv1x1.InvConv1x1` then mixes
    the target's channels. Other levels pass through unchanged.

    Args:
        channels: Channels ``C`` of the target and source levels.
        target: Index of the transformed level.
        source: Index of the conditioning level (different from ``target``).
        kernel_size: Odd kernel size of the conditioner.
        hidden_channels: Hidden width of the conditioner; default ``channels``.
        clamp: Soft-clamp bound of ``s``.
        volume_norm: ``None``, ``"channel"`` (CVN), ``"spatial"`` (SVN) or a
            :class:`~autoflow.volume_norm.VolumeNorm` for ``s``; when set, the 1×1 convolution
            is volume-normalised too (``InvConv1x1(volume_norm=True)``).
        resize: Interpolation between level sizes, ``"bilinear"`` (``align_corners=False``)
            or ``"nearest"`` (the public code's choice).
        condition_at: ``"source"`` runs the conditioner at the source's resolution and resizes
            its output; ``"target"`` resizes the source to the target's size first and runs
            the conditioner there (the public code does this when the target is the finer
            level).
        bias: Give the conditioner's convolutions a bias.
        clamp_kind: Soft-clamp function of ``s``, ``"tanh"`` or ``"atan"``.

    Raises:
        AutoflowError: If ``channels`` is not a positive int, an index is not a non-negative
            int, ``target == source``, or another argument is invalid.

    Example:
        >>> import torch, autoflow
        >>> block = autoflow.PyramidCoupling(2, target=0, source=1)
        >>> levels = (torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4))
        >>> out, logdet = block(levels)
        >>> [tuple(t.shape) for t in out], tuple(logdet.shape)
        ([(1, 2, 8, 8), (1, 2, 4, 4)], (1,))
        >>> back, _ = block.inverse(out)
        >>> bool(torch.allclose(back[0], levels[0], atol=1e-5))
        True
    """

    def __init__(
        self,
        channels: int,
        *,
        target: int = 0,
        source: int = 1,
        kernel_size: int = 3,
        hidden_channels: int | None = None,
        clamp: float = 2.0,
        volume_norm: str | VolumeNorm | None = None,
        resize: str = "bilinear",
        condition_at: str = "source",
        bias: bool = True,
        clamp_kind: str = "tanh",
    ) -> None:
        name = type(self).__name__
        target = check_int(target, "target", name, minimum=0)
        source = check_int(source, "source", name, minimum=0)
        if target == source:
            raise AutoflowError(
                f"{name} needs distinct target and source levels, received both = {target}"
            )
        super().__init__(
            channels,
            target=target,
            sources=(source,),
            kernel_size=kernel_size,
            hidden_channels=hidden_channels,
            clamp=clamp,
            volume_norm=volume_norm,
            resize=resize,
            bias=bias,
            clamp_kind=clamp_kind,
            condition_at=condition_at,
        )
        self.source = source


class DualPyramidCoupling(_LevelCoupling):
    """Dual coupling (Fig. 3d): level ``target`` transformed given both neighbouring levels.

    Levels ``target - 1`` and ``target + 1`` are each resized to the target's size (bilinear,
    ``align_corners=False``) and concatenated, so the conditioner takes ``2 * channels``
    channels; it outputs ``s, t`` for the target, followed by an
    :class:`~autoflow.conv1x1.InvConv1x1`. This is the paper's reparameterisation of the
    reverse-parallel pair of Fig. 3c blocks into one block conditioned on concatenated features.

    Args:
        channels: Channels ``C`` of the three levels involved.
        target: Index of the transformed (middle) level, at least 1.
        kernel_size: Odd kernel size of the conditioner.
        hidden_channels: Hidden width of the conditioner; default ``channels``.
        clamp: Soft-clamp bound of ``s``.
        volume_norm: As in :class:`PyramidCoupling`.
        resize: Interpolation of the neighbours to the target's size, ``"bilinear"`` or
            ``"nearest"``.
        bias: Give the conditioner's convolutions a bias.
        clamp_kind: Soft-clamp function of ``s``, ``"tanh"`` or ``"atan"``.

    Raises:
        AutoflowError: If ``channels`` is not a positive int, ``target < 1``, or another
            argument is invalid.

    Example:
        >>> import torch, autoflow
        >>> block = autoflow.DualPyramidCoupling(1)
        >>> levels = tuple(torch.randn(2, 1, 2 ** (3 - d), 2 ** (3 - d)) for d in range(3))
        >>> out, logdet = block(levels)
        >>> bool(torch.equal(out[0], levels[0])), tuple(logdet.shape)
        (True, (2,))
    """

    def __init__(
        self,
        channels: int,
        *,
        target: int = 1,
        kernel_size: int = 3,
        hidden_channels: int | None = None,
        clamp: float = 2.0,
        volume_norm: str | VolumeNorm | None = None,
        resize: str = "bilinear",
        bias: bool = True,
        clamp_kind: str = "tanh",
    ) -> None:
        name = type(self).__name__
        if check_int(target, "target", name, minimum=0) < 1:
            raise AutoflowError(
                f"{name} target must be at least 1 (it needs levels target - 1 and target + 1), "
                f"received {target}"
            )
        super().__init__(
            channels,
            target=target,
            sources=(target - 1, target + 1),
            kernel_size=kernel_size,
            hidden_channels=hidden_channels,
            clamp=clamp,
            volume_norm=volume_norm,
            resize=resize,
            bias=bias,
            clamp_kind=clamp_kind,
        )
