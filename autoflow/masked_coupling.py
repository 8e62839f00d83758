"""Couplings with any mask and any elementwise bijection, without subclassing.

With a boolean mask ``m`` (``True`` where the coupling transforms, ``False`` where it keeps
and conditions) and an :class:`~autoflow.ElementwiseTransform` ``f`` with ``P`` parameters per
element, :class:`MaskedCoupling` computes

.. math::

    \\theta = \\mathrm{NN}\\big((1 - m) \\odot x\\big), \\qquad
    y = (1 - m) \\odot x + m \\odot f(x; \\theta),

    \\log\\left|\\det \\frac{\\partial y}{\\partial x}\\right|
        = \\sum_{i:\\, m_i} \\log |f'(x_i; \\theta_i)|,

one log-det per sample. The conditioner sees the whole input with the transformed elements
zeroed (RealNVP's masked convolution), so it keeps the spatial layout of an image; it returns
``P`` parameters for every element, of which those of the transformed elements are used.
``theta`` does not depend on the transformed elements, so the inverse is
``x = (1 - m) y + m f^{-1}(y; NN((1 - m) y))`` and the log-det above is exact.

:func:`checkerboard_mask` makes RealNVP's spatial checkerboard (or alternating features for
vectors); a channel mask is ``(torch.arange(C) >= C // 2)[:, None, None]``; any other
boolean tensor that broadcasts to the input works too. Alternate a mask with its complement
``~mask`` so that every element gets transformed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Shape, State, check_bool, check_features, check_features_shape, check_int
from .coupling import Coupling, make_conditioner
from .elementwise import AffineTransform, ElementwiseTransform
from .errors import AutoflowError, ShapeError

__all__ = ["MaskedCoupling", "checkerboard_mask"]


def checkerboard_mask(shape: Sequence[int], *, invert: bool = False) -> Tensor:
    """RealNVP's checkerboard mask for ``(C, H, W)`` images, or alternating ``(D,)`` features.

    For an image shape the mask is ``True`` where ``h + w`` is even, the same for every
    channel; for a vector shape ``(D,)``, where the feature index is even. ``invert=True``
    gives the complement (``~mask``).

    Args:
        shape: ``(C, H, W)`` or ``(D,)``, positive ints.
        invert: Return the complement.

    Returns:
        A bool tensor of shape ``shape``, for :class:`MaskedCoupling`.

    Raises:
        AutoflowError: If ``shape`` is not a ``(C, H, W)`` or ``(D,)`` tuple of positive
            ints, or ``invert`` is not a bool.

    Example:
        >>> import autoflow
        >>> autoflow.checkerboard_mask((1, 2, 3)).int().tolist()
        [[[1, 0, 1], [0, 1, 0]]]
        >>> autoflow.checkerboard_mask((4,), invert=True).tolist()
        [False, True, False, True]
    """
    check_bool(invert, "invert", "checkerboard_mask")
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) not in (1, 3):
        raise AutoflowError(
            f"checkerboard_mask expected a shape (C, H, W) or (D,), received {shape!r}"
        )
    for size in shape:
        check_int(size, "sizes", "checkerboard_mask")
    if len(shape) == 1:
        mask = torch.arange(shape[0]) % 2 == 0
    else:
        c, h, w = shape
        parity = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0
        mask = parity.expand(c, h, w).clone()
    return ~mask if invert else mask


class MaskedCoupling(Coupling):
    """A coupling that transforms the elements a boolean mask marks with any elementwise
    bijection, conditioned on the others (see the module docstring for the maths).

    Works on ``(B, channels, H, W)`` images with a mask of shape ``(C_m, H_m, W_m)`` that
    broadcasts to ``(channels, H, W)`` (``C_m`` is 1 or ``channels``; ``H_m``, ``W_m`` are 1
    or the input's size: a ``(C, 1, 1)`` channel mask takes any image size, a checkerboard
    the size it was made for), and on ``(B, channels)`` vectors with a ``(channels,)`` mask.
    Everything else is :class:`~autoflow.Coupling`'s: context, the memory-saving engine's
    reconstruction with one conditioner call, the shape checks.

    Args:
        channels: Number of channels (features for vectors) ``C``.
        mask: Bool tensor, ``True`` where the coupling transforms, ``False`` where it keeps
            (and conditions); it needs both. It is stored as a buffer (saved with the
            model) and must not be changed afterwards.
        transform: The elementwise bijection, an :class:`~autoflow.ElementwiseTransform`
            (default :class:`~autoflow.AffineTransform`, the RealNVP map); e.g.
            :class:`~autoflow.AdditiveTransform` or :class:`~autoflow.SplineTransform`.
        conditioner: Network mapping ``(B, C + K, H, W)`` (the masked input, with the
            context's ``K`` channels) to ``(B, P * C, H, W)``, parameter-major (channels
            ``p * C .. (p + 1) * C - 1`` hold parameter ``p``); vectors ``(B, C + K)`` to
            ``(B, P * C)``. Default: :func:`~autoflow.coupling.make_conditioner`, whose last
            layer starts at zero.
        hidden_channels: Hidden width of the default conditioner; default ``channels``.
        kernel_size: Kernel size of the default conditioner (odd; ``1`` for vectors).
        context_channels: Channels ``K`` of a context to condition on (``0``: none).

    Raises:
        AutoflowError: If ``mask`` is not a bool tensor of a fitting shape with both values,
            ``transform`` is not an ``ElementwiseTransform``, or another argument is invalid.

    Example:
        A spline coupling on a checkerboard, then one on its complement:

        >>> import torch, autoflow
        >>> mask = autoflow.checkerboard_mask((3, 4, 4))
        >>> flow = autoflow.Sequential(
        ...     autoflow.MaskedCoupling(3, mask, transform=autoflow.SplineTransform()),
        ...     autoflow.MaskedCoupling(3, ~mask, transform=autoflow.SplineTransform()),
        ... )
        >>> y, logdet = flow(torch.randn(2, 3, 4, 4))
        >>> tuple(y.shape), tuple(logdet.shape)
        ((2, 3, 4, 4), (2,))
    """

    mask: Tensor
    _bandable = False  # the target is a flat selection of elements, not rows of an image

    def __init__(
        self,
        channels: int,
        mask: Tensor,
        *,
        transform: ElementwiseTransform | None = None,
        conditioner: nn.Module | None = None,
        hidden_channels: int | None = None,
        kernel_size: int = 3,
        context_channels: int = 0,
    ) -> None:
        name = type(self).__name__
        check_int(channels, "channels", name)
        check_int(context_channels, "context_channels", name, minimum=0)
        _check_mask(mask, channels, name)
        transform = AffineTransform() if transform is None else transform
        if not isinstance(transform, ElementwiseTransform):
            raise AutoflowError(
                f"{name} transform must be an ElementwiseTransform (AffineTransform, "
                f"AdditiveTransform, SplineTransform or your own), received "
                f"{type(transform).__name__}"
            )
        if conditioner is None:
            hidden = channels if hidden_channels is None else hidden_channels
            conditioner = make_conditioner(channels + context_channels,
                                           transform.params_per_element * channels, hidden,
                                           kernel_size=kernel_size)
        elif hidden_channels is not None:
            raise AutoflowError(
                f"{name} got both a conditioner and hidden_channels; hidden_channels only "
                "configures the default conditioner"
            )
        super().__init__(conditioner, context_channels=context_channels, transform=transform)
        self.channels = channels
        self.register_buffer("mask", mask.detach().clone())

    def extra_repr(self) -> str:
        context = f", context_channels={self.context_channels}" if self.context_channels else ""
        return f"channels={self.channels}, mask={tuple(self.mask.shape)}{context}"

    def _expanded(self, shape: Sequence[int]) -> Tensor:
        """The mask broadcast to a state shape without batch (checked)."""
        mask = self.mask
        fits = len(shape) == mask.dim() and all(
            m in (1, s) for m, s in zip(mask.shape, shape)
        )
        if not fits:
            raise ShapeError(
                f"{type(self).__name__}'s mask of shape {tuple(mask.shape)} does not broadcast "
                f"to an input of shape (B, {', '.join(str(s) for s in shape)}); it fits "
                f"{_fits(mask)}"
            )
        return mask.expand(*shape)

    def _index(self, shape: Sequence[int]) -> Tensor:
        """Flat positions (within one sample) of the transformed elements."""
        return self._expanded(shape).reshape(-1).nonzero().squeeze(1)

    def _split(self, state: State) -> tuple[list[Tensor], Tensor]:
        check_features(state, self.channels, self)
        mask = self._expanded(state.shape[1:])
        kept = state.masked_fill(mask, 0)
        target = state.flatten(1).index_select(1, self._index(state.shape[1:]))
        return [kept], target

    def _merge(self, kept: Sequence[Tensor], target: Tensor) -> Tensor:
        whole = kept[0]
        index = self._index(whole.shape[1:])
        return whole.flatten(1).index_copy(1, index, target).reshape(whole.shape)

    def _conditioner_input(self, kept: Sequence[Tensor], target: Tensor) -> Tensor:
        return kept[0]

    def _fit_to_target(self, out: Tensor, target: Tensor) -> Tensor:
        # The conditioner gives P parameters for every element; keep the transformed ones,
        # as (B, P * N) parameter-major like the target (B, N).
        p = self.params_per_element
        expected = f"(B, {p} * {self.channels}{', H, W' if self.mask.dim() == 3 else ''})"
        if isinstance(out, Tensor) and out.dim() == self.mask.dim() + 1 and (
            out.shape[0] == target.shape[0] and out.shape[1] == p * self.channels
        ):
            shape = (self.channels, *out.shape[2:])
            try:
                index = self._index(shape)
            except ShapeError:
                index = None
            if index is not None and index.numel() == target.shape[1]:
                per_element = out.unflatten(1, (p, self.channels)).flatten(2)
                return per_element.index_select(2, index).flatten(1)
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ShapeError(
            f"{type(self).__name__}'s conditioner must return the {p} parameters per element "
            f"of its {type(self.transform).__name__} as one tensor of shape {expected} "
            f"(B = {target.shape[0]}, the input's own H and W), received {got}"
        )

    def output_shape(self, input_shape: Shape) -> Shape:
        """``input_shape`` itself, after checking it has ``channels`` and fits the mask."""
        shape = check_features_shape(input_shape, self.channels, self)
        self._expanded(shape)
        return shape

    def input_shape(self, output_shape: Shape) -> Shape:
        """``output_shape`` itself, checked like :meth:`output_shape`."""
        return self.output_shape(output_shape)


def _fits(mask: Tensor) -> str:
    """The inputs a mask fits, in words."""
    if mask.dim() == 1:
        return f"(B, {mask.shape[0]}) vectors"
    c, h, w = mask.shape
    return (f"(B, {'C' if c == 1 else c}, {'H' if h == 1 else h}, {'W' if w == 1 else w}) "
            "images")


def _check_mask(mask: object, channels: int, owner: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise AutoflowError(
            f"{owner} mask must be a bool tensor (True where the coupling transforms), "
            f"received {got}"
        )
    if mask.dim() == 1:
        ok = mask.shape[0] == channels
        expected = f"({channels},) for vectors"
    else:
        ok = mask.dim() == 3 and mask.shape[0] in (1, channels)
        expected = f"({channels} or 1, H or 1, W or 1) for images"
        if mask.dim() != 3:
            expected = f"({channels},) for vectors or {expected}"
    if not ok:
        raise AutoflowError(
            f"{owner} mask must have shape {expected} with channels={channels}, received "
            f"{tuple(mask.shape)}"
        )
    if bool(mask.all()) or not bool(mask.any()):
        raise AutoflowError(
            f"{owner} mask must mark some elements to transform (True) and some to keep "
            f"(False), received all {bool(mask.any())}"
        )
