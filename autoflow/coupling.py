"""Affine (RealNVP) and additive (NICE) coupling layers (PyramidFlow Sec. 3.2, eqs. 3-5).

A ``(B, C, H, W)`` input is split along channels into ``x0`` (the first ``C // 2``) and ``x1``
(the remaining ``C - C // 2``). With ``s, t = conditioner(x0)``, ``s`` soft-clamped and
optionally volume-normalised, the forward map (eq. 3), its inverse (eq. 4) and its log-det
(eq. 5, one value per sample, shape ``(B,)``) are

.. math::

    y_0 = x_0, \\qquad y_1 = e^{s} \\odot x_1 + t,

    x_0 = y_0, \\qquad x_1 = e^{-s} \\odot (y_1 - t),

    \\log\\left|\\det \\frac{\\partial y}{\\partial x}\\right| = \\sum_{c,i,j} s_{c,i,j}.

The additive coupling is the special case ``s = 0`` (volume preserving, log-det exactly zero).
The spline coupling replaces the affine map by a monotone rational-quadratic spline
(:mod:`autoflow.spline`), ``y_1 = g(x_1; theta(x_0))`` elementwise, with log-det
``sum log g'``.

This module also holds what every coupling shares: :class:`Coupling`, the base class that
implements eqs. 3-5 or any :class:`~autoflow.ElementwiseTransform` (plus an optional
invertible mixing of the transformed part) and the memory-saving engine hooks once for all
couplings; :func:`make_conditioner`, the default conditioner network; and the clamped-affine
helpers :func:`soft_clamp`, :func:`affine_apply`, :func:`affine_invert` (defined in
:mod:`autoflow.elementwise`) and :func:`log_scale_sum`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .banded import map_in_bands
from .base import (
    RANDOMNESS,
    InvertibleModule,
    Reconstruction,
    Shape,
    State,
    check_bool,
    check_features,
    check_features_shape,
    check_floating,
    check_int,
    exact,
    per_sample,
    rng_snapshot,
    self_contained,
)
from .elementwise import (
    CLAMP_KINDS,
    ElementwiseTransform,
    _at_precision_of,
    affine_apply,
    affine_invert,
    check_clamp,
    soft_clamp,
)
from .errors import AutoflowError, ShapeError
from .spline import SplineTransform
from .volume_norm import VolumeNorm

__all__ = [
    "CLAMP_KINDS",
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "SplineCoupling",
    "affine_apply",
    "affine_invert",
    "log_scale_sum",
    "make_conditioner",
    "soft_clamp",
]


def make_conditioner(
    in_channels: int,
    out_channels: int,
    hidden_channels: int,
    *,
    kernel_size: int = 3,
    bias: bool = True,
) -> nn.Sequential:
    """The default coupling conditioner: conv k×k -> LeakyReLU -> conv k×k ("same" padding).

    The last convolution is zero-initialised (weight and bias), so a coupling using it starts
    as the identity map.

    Args:
        in_channels: Channels of the conditioning input.
        out_channels: Channels of the output (``2 * len(x1)`` for ``s`` and ``t``).
        hidden_channels: Channels between the two convolutions.
        kernel_size: Odd kernel size of both convolutions.
        bias: Give both convolutions a bias (the PyramidFlow public code uses none).

    Returns:
        An ``nn.Sequential`` mapping ``(B, in, H, W)`` to ``(B, out, H, W)``, and ``(B, in)``
        vectors to ``(B, out)`` (as 1×1 images: with ``kernel_size=1`` it is the MLP
        Linear -> LeakyReLU -> Linear; a larger kernel uses only its centre taps there).

    Raises:
        AutoflowError: If a channel count is not a positive int or ``kernel_size`` is not a
            positive odd int.

    Example:
        >>> import torch
        >>> from autoflow.coupling import make_conditioner
        >>> net = make_conditioner(2, 4, 8)
        >>> net(torch.randn(1, 2, 5, 5)).abs().max().item()
        0.0
    """
    for value, what in (
        (in_channels, "in_channels"),
        (out_channels, "out_channels"),
        (hidden_channels, "hidden_channels"),
    ):
        check_int(value, what, "make_conditioner")
    if check_int(kernel_size, "kernel_size", "make_conditioner") % 2 == 0:
        # An even kernel cannot keep H and W with symmetric padding.
        raise AutoflowError(f"kernel_size must be odd, received {kernel_size}")
    check_bool(bias, "bias", "make_conditioner")
    padding = kernel_size // 2
    last = nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=padding, bias=bias)
    nn.init.zeros_(last.weight)
    if bias:
        nn.init.zeros_(last.bias)
    return _Conditioner(
        nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding, bias=bias),
        # In place: the first convolution's output is not needed by its backward, and the
        # activation's backward needs only its result (slope > 0), so autograd keeps one hidden
        # tensor instead of two (at 1024² in PyramidFlow's finest coupling, 256 MiB less).
        nn.LeakyReLU(inplace=True),
        last,
    )


@per_sample
@self_contained
class _Conditioner(nn.Sequential):
    """The default conditioner; a ``(B, C)`` vector batch runs through it as 1×1 images."""

    @property
    def receptive_radius(self) -> int:
        """How many rows (and columns) on each side of a position its output reads: the sum
        of the convolutions' ``dilation * (kernel_size - 1) / 2``."""
        return sum(m.dilation[0] * (m.kernel_size[0] - 1) // 2
                   for m in self if isinstance(m, nn.Conv2d))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return super().forward(x[:, :, None, None]).flatten(1)
        return super().forward(x)


def log_scale_sum(s: Tensor | None, like: Tensor) -> Tensor:
    """Eq. 5: the per-sample log-det ``sum s`` of shape ``(B,)``; exact zeros when ``s=None``.

    Args:
        s: Log-scale of shape ``(B, ...)``, or ``None`` for an additive map.
        like: The transformed tensor, giving batch size, dtype and device for the zeros.

    Example:
        >>> import torch
        >>> from autoflow.coupling import log_scale_sum
        >>> log_scale_sum(torch.ones(2, 3, 1, 1), torch.empty(2, 3, 1, 1)).tolist()
        [3.0, 3.0]
    """
    if s is None:
        return like.new_zeros(like.shape[0])
    return _at_precision_of(like, s, s)[0].flatten(1).sum(1)


def _make_volume_norm(volume_norm: str | VolumeNorm | None, owner: str) -> VolumeNorm | None:
    if volume_norm is None or isinstance(volume_norm, VolumeNorm):
        return volume_norm
    if isinstance(volume_norm, str):
        return VolumeNorm(volume_norm)
    raise AutoflowError(
        f"{owner} volume_norm must be None, a mode string ('channel' or 'spatial') or a "
        f"VolumeNorm, received {type(volume_norm).__name__}"
    )


class Coupling(InvertibleModule):
    """Base class of couplings: a transformed part driven by a part the map leaves unchanged.

    A subclass says how its state divides into ``kept`` tensors (unchanged, they include the
    conditioning input) and one ``target`` tensor, by implementing :meth:`_split`,
    :meth:`_merge` and :meth:`_conditioner_input`. The base then applies::

        s, t = conditioner(_conditioner_input(kept))   # s soft-clamped, volume-normalised
        new_target = mixer(exp(s) * target + t)        # mixer optional (e.g. InvConv1x1)
        logdet = sum(s) + logdet(mixer)

    and overrides the engine hooks so the conditioner runs exactly once per reconstruction.

    **Any elementwise bijection.** With ``transform=`` (an
    :class:`~autoflow.ElementwiseTransform` with ``P`` parameters per element) the affine map
    is replaced by that transform::

        theta = conditioner(_conditioner_input(kept))   # (B, P * C_target, ...)
        theta = theta.unflatten(1, (P, C_target)).movedim(1, -1)   # target.shape + (P,)
        new_target, log_derivative = transform(target, theta)
        logdet = sum(log_derivative) + logdet(mixer)

    (for ``P = 2`` the two chunks of the conditioner's output are ``s`` and ``t`` as above).
    To choose which elements are kept without subclassing, use
    :class:`~autoflow.MaskedCoupling`.

    **Context.** With ``context_channels = K > 0`` the coupling is conditional: ``forward``,
    ``inverse`` and the engine hooks take ``context=c`` and the conditioner sees the context
    concatenated to its input along channels::

        s, t = conditioner(cat([_conditioner_input(kept), fit(c)], dim=1))

    where ``fit`` leaves a ``(B, K)`` context as it is for a ``(B, D)`` input, and for a
    ``(B, C, H, W)`` input broadcasts a ``(B, K)`` context to ``(B, K, H, W)`` or resizes a
    ``(B, K, h, w)`` one to ``(H, W)`` (bilinear, antialiased). The map of the target stays
    the same elementwise map, so the inverse and the log-det ``sum(s)`` do not change: for each
    fixed ``c`` the coupling is a bijection. An embedding of the context (a class embedding,
    a CNN over an image) belongs in the user's model, before the flow: the engine gives its
    output, and so the embedding's weights, their gradient.

    Args:
        conditioner: Network mapping the conditioning input to ``2 * C_target`` channels
            (``s`` then ``t``), ``C_target`` channels (``t``) when ``additive``, or
            ``P * C_target`` channels with a ``transform``.
        clamp: Soft-clamp bound of ``s`` (ignored when ``additive`` or with a
            ``transform``, which clamps its own parameters).
        volume_norm: Volume normalisation of ``s``: ``None``, a :class:`VolumeNorm` mode
            string, or a :class:`VolumeNorm` instance.
        additive: Use ``s = 0`` (NICE); the module is then volume preserving unless ``mixer``
            is not.
        mixer: Optional invertible module applied to the transformed target afterwards.
        clamp_kind: Soft-clamp function, ``"tanh"`` or ``"atan"`` (see :func:`soft_clamp`).
        context_channels: Channels ``K`` of the context (``0``: unconditional); the
            conditioner then takes ``K`` more input channels.
        transform: An :class:`~autoflow.ElementwiseTransform` to apply instead of the
            built-in affine map (``None``: the affine map of eqs. 3-5).

    Raises:
        AutoflowError: If ``clamp`` is not a positive finite number, ``clamp_kind`` or
            ``volume_norm`` is invalid, ``additive`` is combined with ``volume_norm``,
            ``context_channels`` is not an int ``>= 0``, or ``transform`` is not an
            ``ElementwiseTransform`` or is combined with ``additive`` or ``volume_norm``.

    Example:
        The engine hook rebuilds the input from the output, one leaf per part:

        >>> import torch, autoflow
        >>> layer = autoflow.AffineCoupling(4)
        >>> y, _ = layer(torch.randn(1, 4, 2, 2))
        >>> rec = layer.reconstruct(y)
        >>> len(rec.leaves), tuple(rec.input_from_leaves(rec.leaves).shape)
        (2, (1, 4, 2, 2))
    """

    _bandable = True
    """Whether :attr:`band_rows` may be set: the target can be an image whose rows the
    conditioner's output rows match."""

    def __init__(
        self,
        conditioner: nn.Module,
        *,
        clamp: float = 2.0,
        volume_norm: str | VolumeNorm | None = None,
        additive: bool = False,
        mixer: InvertibleModule | None = None,
        clamp_kind: str = "tanh",
        context_channels: int = 0,
        transform: ElementwiseTransform | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if clamp_kind not in CLAMP_KINDS:
            raise AutoflowError(
                f"{name} clamp_kind must be one of {CLAMP_KINDS}, received {clamp_kind!r}"
            )
        if not isinstance(conditioner, nn.Module):
            raise AutoflowError(
                f"{name} conditioner must be an nn.Module, received {type(conditioner).__name__}"
            )
        check_bool(additive, "additive", name)
        if additive and volume_norm is not None:
            raise AutoflowError(f"{name} is additive (s = 0): volume_norm has nothing to normalise")
        if transform is not None and not isinstance(transform, ElementwiseTransform):
            raise AutoflowError(
                f"{name} transform must be an ElementwiseTransform or None, received "
                f"{type(transform).__name__}"
            )
        if transform is not None and (additive or volume_norm is not None):
            raise AutoflowError(
                f"{name} transform= replaces the built-in affine map, so additive and "
                "volume_norm do not apply; pass AdditiveTransform() for an additive map"
            )
        self.conditioner = conditioner
        self.clamp = check_clamp(clamp, name)
        self.volume_norm = _make_volume_norm(volume_norm, name)
        self.additive = additive
        self.mixer = mixer
        self.clamp_kind = clamp_kind
        self.context_channels = check_int(context_channels, "context_channels", name,
                                          minimum=0)
        self.transform = transform
        if transform is not None:
            self.volume_preserving = transform.volume_preserving and (
                mixer is None or mixer.volume_preserving)
        self._band_rows: int | None = None

    @property
    def band_rows(self) -> int | None:
        """Evaluate the coupling in bands of at most this many rows (``None``: all at once).

        For image states whose conditioner input has the target's height and width (a
        :class:`~autoflow.PyramidCoupling` with ``condition_at="target"``, a
        :class:`~autoflow.DualPyramidCoupling`, a channel coupling), taller than
        ``band_rows``: the conditioner then runs on one band and its ``receptive_radius``
        rows around it at a time, and backward rebuilds each band instead of keeping the
        conditioner's activations (:mod:`autoflow.banded`). The result is the same up to
        float rounding; the memory of the conditioner's activations falls to a band's, for
        one more conditioner evaluation in backward. Setting it needs a conditioner with a
        ``receptive_radius`` (:func:`make_conditioner`'s) and no normalisation layer
        (batch, instance or group norm), and no volume normalisation or the channel mode (the
        spatial mode averages over all rows).

        Raises:
            AutoflowError: On setting a value that is not ``None`` or an int ``>= 1``, or
                on a coupling that cannot be evaluated in bands.
        """
        return self._band_rows

    @band_rows.setter
    def band_rows(self, rows: int | None) -> None:
        name = type(self).__name__
        if rows is not None:
            check_int(rows, "band_rows", name)
            if not self._bandable:
                raise AutoflowError(
                    f"{name} cannot be evaluated in bands of rows (its target is not an image "
                    f"of the conditioner input's size), received band_rows={rows}"
                )
            radius = getattr(self.conditioner, "receptive_radius", None)
            if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
                raise AutoflowError(
                    f"{name} band_rows needs a conditioner with an int receptive_radius (how "
                    f"many rows around a position its output reads, as make_conditioner's "
                    f"has), received a {type(self.conditioner).__name__} with "
                    f"receptive_radius={radius!r}"
                )
            if self.volume_norm is not None and self.volume_norm.mode != "channel":
                raise AutoflowError(
                    f"{name} band_rows needs volume_norm None or 'channel', received "
                    f"{self.volume_norm.mode!r}, whose mean spans all rows"
                )
            norms = [type(m).__name__ for m in self.conditioner.modules()
                     if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))]
            if norms:
                raise AutoflowError(
                    f"{name} band_rows needs a conditioner whose outputs depend on nearby rows "
                    f"only, received one holding {', '.join(norms)}, whose statistics span "
                    "all rows (and a band's would differ from the whole image's)"
                )
            if any(_spectral_norm(m) for m in self.conditioner.modules()):
                raise AutoflowError(
                    f"{name} band_rows needs a conditioner that computes every band with the "
                    "same weights, received one with spectral norm, whose power iteration "
                    "updates its vectors (and so the weight) at every call: at every band"
                )
        self._band_rows = rows

    def _in_bands(self, features: Tensor, target: Tensor) -> bool:
        return (self._band_rows is not None and target.dim() == 4 and features.dim() == 4
                and features.shape[2:] == target.shape[2:] and target.shape[2] > self._band_rows)

    @property
    def params_per_element(self) -> int:
        """Conditioner outputs per transformed element: ``P`` of the transform, else 2 (``s``
        and ``t``) or 1 (``t``, additive)."""
        if self.transform is not None:
            return self.transform.params_per_element
        return 1 if self.additive else 2

    @property
    def conditional(self) -> bool:  # type: ignore[override]
        """Whether the coupling takes a context (``context_channels > 0``)."""
        return self.context_channels > 0

    # Subclass interface ------------------------------------------------------------------

    def _split(self, state: State) -> tuple[list[Tensor], Tensor]:  # pragma: no cover
        """Validate ``state`` and return ``(kept, target)``."""
        raise NotImplementedError

    def _merge(self, kept: Sequence[Tensor], target: Tensor) -> State:  # pragma: no cover
        """Inverse of :meth:`_split` (no validation)."""
        raise NotImplementedError

    def _conditioner_input(self, kept: Sequence[Tensor], target: Tensor) -> Tensor:
        """The conditioner's input, built from ``kept`` (``target`` gives the output size)."""
        raise NotImplementedError  # pragma: no cover

    def _fit_to_target(self, out: Tensor, target: Tensor) -> Tensor:
        """Bring the conditioner's output to the target's size; identity unless overridden."""
        return out

    # Shared maths ------------------------------------------------------------------------

    def _with_context(self, features: Tensor, context: Tensor | None) -> Tensor:
        """The conditioner's input: ``features`` with the context concatenated, if any."""
        name = type(self).__name__
        if not self.context_channels:
            if context is not None:
                got = tuple(context.shape) if isinstance(context, Tensor) else type(
                    context).__name__
                raise AutoflowError(
                    f"{name} was built without context_channels, but received a context "
                    f"({got}); build it with context_channels=K to condition on one"
                )
            return features
        k, batch = self.context_channels, features.shape[0]
        if not isinstance(context, Tensor):
            raise AutoflowError(
                f"{name} was built with context_channels={k} and expects a context tensor "
                f"(B, {k}) or (B, {k}, h, w), received "
                f"{'None' if context is None else type(context).__name__}"
            )
        check_floating(context, self, "context")
        spatial = features.dim() == 4
        if context.dim() not in ((2, 4) if spatial else (2,)) or context.shape[:2] != (
            batch, k
        ):
            expected = f"(B, {k}) or (B, {k}, h, w)" if spatial else f"(B, {k})"
            raise ShapeError(
                f"{name} expected a context of shape {expected} with B = {batch}, received "
                f"{tuple(context.shape)}"
            )
        context = context.to(features.dtype)
        if spatial and context.dim() == 2:
            context = context[:, :, None, None].expand(-1, -1, *features.shape[2:])
        elif spatial and context.shape[2:] != features.shape[2:]:
            context = F.interpolate(context, size=tuple(features.shape[2:]), mode="bilinear",
                                    align_corners=False, antialias=True)
        return torch.cat([features, context], dim=1)

    def _features(self, kept: Sequence[Tensor], target: Tensor,
                  context: Tensor | None) -> Tensor:
        """What the conditioner reads: its input with the context, if any."""
        return self._with_context(self._conditioner_input(kept, target), context)

    def _params(self, features: Tensor, target: Tensor, *, update: bool
                ) -> tuple[Tensor | None, ...]:
        """The map's parameters: ``(s, t)`` (``s`` None when additive), or ``(theta,)`` of
        shape ``target.shape + (P,)`` with a transform, from the conditioner's input."""
        out = self._fit_to_target(self.conditioner(features), target)
        return self._params_from(out, target, update=update)

    def _params_from(self, out: Tensor, target: Tensor, *, update: bool,
                     rows: tuple[int, int, int] | None = None) -> tuple[Tensor | None, ...]:
        """The map's parameters from the conditioner's output ``out`` for ``target``, which
        is rows ``rows = (start, stop, height)`` of the whole target when given."""
        factor = self.params_per_element
        expected = (target.shape[0], factor * target.shape[1], *target.shape[2:])
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            if self.transform is not None:
                what = (f"the {factor} parameters per element of its "
                        f"{type(self.transform).__name__}")
            else:
                what = "t" if self.additive else "s and t"
            raise ShapeError(
                f"{type(self).__name__}'s conditioner must return {what} as one tensor of shape "
                f"{expected}, received {got}"
            )
        if self.transform is not None:
            return (out.unflatten(1, (factor, target.shape[1])).movedim(1, -1),)
        if self.additive:
            return None, out
        s, t = out.chunk(2, dim=1)
        s = soft_clamp(s, self.clamp, self.clamp_kind)
        if self.volume_norm is not None and s.dim() != 4:
            raise ShapeError(
                f"{type(self).__name__} volume_norm normalises (B, C, H, W) log-scales, "
                f"received a state of shape {tuple(target.shape)}; build it with "
                "volume_norm=None for vector data"
            )
        if self.volume_norm is not None:
            # rows only when banded: a VolumeNorm subclass written before it keeps working.
            s = (self.volume_norm(s, update=update) if rows is None
                 else self.volume_norm(s, update=update, rows=rows))
        return s, t

    def _transform_target(self, x: Tensor, theta: Tensor, *, inverse: bool
                          ) -> tuple[Tensor, Tensor]:
        """Apply the transform (or its inverse) to ``x``; returns the result and its per-sample
        log-det, after checking the shapes the transform returned."""
        assert self.transform is not None
        if torch.is_autocast_enabled(x.device.type):
            # As for the affine map (see _at_precision_of): the bijection runs in at least
            # float32, so the inverse undoes the forward map exactly enough for the engine.
            dtype = torch.promote_types(torch.promote_types(x.dtype, theta.dtype),
                                        torch.float32)
            x, theta = x.to(dtype), theta.to(dtype)
        with exact(x):
            function = self.transform.inverse if inverse else self.transform
            out, log_derivative = function(x, theta)
        for value, what in ((out, "an output"), (log_derivative, "a log-derivative")):
            if not isinstance(value, Tensor) or value.shape != x.shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                direction = "inverse" if inverse else "forward"
                raise ShapeError(
                    f"{type(self.transform).__name__}.{direction} must return {what} shaped "
                    f"like its input {tuple(x.shape)}, received {got}"
                )
        return out, log_derivative.flatten(1).sum(1)

    def _forward_target(self, x: Tensor, *params: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.transform is not None:
            y, logdet = self._transform_target(x, params[0], inverse=False)
        else:
            s, t = params
            y, logdet = affine_apply(x, s, t), log_scale_sum(s, x)
        if self.mixer is not None:
            y, mixer_logdet = self.mixer(y)
            logdet = logdet + mixer_logdet
        return y, logdet

    def _inverse_target(self, y: Tensor, *params: Tensor | None) -> tuple[Tensor, Tensor]:
        mixer_logdet = None
        if self.mixer is not None:
            y, mixer_logdet = self.mixer.inverse(y)
        if self.transform is not None:
            x, logdet = self._transform_target(y, params[0], inverse=True)
        else:
            s, t = params
            x = affine_invert(y, s, t)
            logdet = -log_scale_sum(s, x)
        return x, logdet if mixer_logdet is None else logdet + mixer_logdet

    def forward(self, x: State, *, context: Tensor | None = None) -> tuple[State, Tensor]:
        """Apply the coupling; returns ``(y, logdet)`` with ``logdet`` of shape ``(B,)``.

        In training mode the volume normalisation (if any) updates its running mean.

        Raises:
            ShapeError: If ``x`` does not have the structure and channels the module expects,
                or the context has the wrong shape.
            AutoflowError: If a context is given to an unconditional coupling or missing
                for a conditional one.
        """
        kept, target = self._split(x)
        y, logdet = self._map_target(kept, target, inverse=False, update=True, context=context)
        return self._merge(kept, y), logdet

    def inverse(self, y: State, *, context: Tensor | None = None) -> tuple[State, Tensor]:
        """Invert the coupling (eq. 4); returns ``(x, logdet_inv)`` with ``logdet_inv = -logdet``.

        Never updates running statistics.

        Raises:
            ShapeError: If ``y`` does not have the structure and channels the module expects.
        """
        kept, target = self._split(y)
        x, logdet = self._map_target(kept, target, inverse=True, update=False, context=context)
        return self._merge(kept, x), logdet

    def _map_target(self, kept: Sequence[Tensor], target: Tensor, *, inverse: bool,
                    update: bool, context: Tensor | None) -> tuple[Tensor, Tensor]:
        features = self._features(kept, target, context)
        if self._in_bands(features, target):
            return map_in_bands(self, features, target, inverse=inverse, update=update)
        params = self._params(features, target, update=update)
        step = self._inverse_target if inverse else self._forward_target
        return step(target, *params)

    # Engine hooks ------------------------------------------------------------------------

    def reconstruct(self, y: State, *, context: Tensor | None = None) -> Reconstruction:
        """Rebuild the input of ``forward`` from ``y``, evaluating the conditioner once."""
        return self._rebuild(y, given_is_output=True, context=context)

    def reconstruct_inverse(self, x: State, *, context: Tensor | None = None
                            ) -> Reconstruction:
        """Rebuild the input of ``inverse`` from ``x``, evaluating the conditioner once."""
        return self._rebuild(x, given_is_output=False, context=context)

    def _rebuild(self, state: State, *, given_is_output: bool,
                 context: Tensor | None = None) -> Reconstruction:
        # The kept part is the same on both sides of the map, so it can be taken from the given
        # state as leaves; the parameters computed from them (s and t, or theta) serve both to
        # invert the target (detached) and to recompute the map with a graph.
        kept, given = self._split(state)
        kept = [k.detach().requires_grad_() for k in kept]
        n_kept = len(kept)

        def input_from_leaves(tensors: Sequence[Tensor]) -> State:
            return self._merge(list(tensors[:n_kept]), tensors[n_kept])

        features = self._features(kept, given, context)
        if self._in_bands(features, given):
            # The backward pass draws the random numbers of the sweep below again.
            rng = rng_snapshot(features.device) if RANDOMNESS.fork else None
            with torch.no_grad():
                other, back_logdet = map_in_bands(self, features, given,
                                                  inverse=given_is_output, update=False)
            leaf = other.detach().requires_grad_()
            output, logdet = map_in_bands(self, features, leaf, inverse=not given_is_output,
                                          update=False, known=(given, -back_logdet), rng=rng)
            return Reconstruction([*kept, leaf], self._merge(kept, output), logdet,
                                  input_from_leaves)
        params = self._params(features, given, update=False)
        values = tuple(None if p is None else p.detach() for p in params)
        back, forth = (
            (self._inverse_target, self._forward_target)
            if given_is_output
            else (self._forward_target, self._inverse_target)
        )
        with torch.no_grad():
            other, _ = back(given, *values)
        leaf = other.detach().requires_grad_()
        output, logdet = forth(leaf, *params)
        return Reconstruction([*kept, leaf], self._merge(kept, output), logdet, input_from_leaves)


def _spectral_norm(module: nn.Module) -> bool:
    """Whether ``module`` is spectral-normalised, by either of torch's two ways."""
    from torch.nn.utils import parametrizations
    from torch.nn.utils.spectral_norm import SpectralNorm

    return isinstance(module, parametrizations._SpectralNorm) or any(
        isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values())


class _ChannelCoupling(Coupling):
    """Couplings on (B, C, H, W) or (B, C) tensors split into the first C // 2 channels and
    the rest."""

    def __init__(
        self,
        channels: int,
        *,
        conditioner: nn.Module | None,
        hidden_channels: int | None,
        kernel_size: int,
        clamp: float,
        volume_norm: str | VolumeNorm | None,
        additive: bool,
        context_channels: int,
        transform: ElementwiseTransform | None = None,
    ) -> None:
        name = type(self).__name__
        check_int(channels, "channels", name, minimum=2,
                  why=" (one to condition on, one to transform)")
        kept_channels = channels // 2
        target_channels = channels - kept_channels
        check_int(context_channels, "context_channels", name, minimum=0)
        if conditioner is None:
            hidden = channels if hidden_channels is None else hidden_channels
            factor = transform.params_per_element if transform is not None else (
                1 if additive else 2)
            conditioner = make_conditioner(
                kept_channels + context_channels, factor * target_channels, hidden,
                kernel_size=kernel_size
            )
        elif hidden_channels is not None:
            raise AutoflowError(
                f"{name} got both a conditioner and hidden_channels; hidden_channels only "
                "configures the default conditioner"
            )
        super().__init__(conditioner, clamp=clamp, volume_norm=volume_norm, additive=additive,
                         context_channels=context_channels, transform=transform)
        self.channels = channels
        self.kept_channels = kept_channels

    def extra_repr(self) -> str:
        context = f", context_channels={self.context_channels}" if self.context_channels else ""
        return f"channels={self.channels}{context}"

    def _split(self, state: State) -> tuple[list[Tensor], Tensor]:
        check_features(state, self.channels, self)
        return [state[:, : self.kept_channels]], state[:, self.kept_channels :]

    def _merge(self, kept: Sequence[Tensor], target: Tensor) -> Tensor:
        return torch.cat([kept[0], target], dim=1)

    def _conditioner_input(self, kept: Sequence[Tensor], target: Tensor) -> Tensor:
        return kept[0]

    def output_shape(self, input_shape: Shape) -> Shape:
        """``input_shape`` itself, after checking it is ``(channels, H, W)`` or ``(channels,)``."""
        return check_features_shape(input_shape, self.channels, self)

    def input_shape(self, output_shape: Shape) -> Shape:
        """``output_shape`` itself, after checking it is ``(channels, H, W)`` or ``(channels,)``."""
        return check_features_shape(output_shape, self.channels, self)


@per_sample
@self_contained
class AffineCoupling(_ChannelCoupling):
    """RealNVP affine coupling (eqs. 3-5) on ``(B, channels, H, W)`` or ``(B, channels)``.

    Vector data ``(B, D)`` goes in as it is: the default conditioner then runs as an MLP
    (pass ``kernel_size=1``, or only the centre taps of its kernels are used); a custom
    conditioner receives ``(B, D // 2)`` and returns ``(B, 2 * (D - D // 2))``.

    ``x0`` is the first ``channels // 2`` channels, ``x1`` the rest; ``s, t`` are the two
    halves of ``conditioner(x0)``, ``s`` soft-clamped to ``(-clamp, clamp)`` and then
    optionally volume-normalised. The default conditioner starts at zero, so the layer starts
    as the identity.

    Args:
        channels: Number of channels ``C >= 2``.
        conditioner: Network mapping ``(B, C // 2, H, W)`` to ``(B, 2 * (C - C // 2), H, W)``
            (``s`` first, then ``t``). Default: :func:`make_conditioner` with ``kernel_size``
            and ``hidden_channels``.
        hidden_channels: Hidden width of the default conditioner; default ``channels``.
        kernel_size: Kernel size of the default conditioner (odd).
        clamp: Soft-clamp bound of ``s``.
        volume_norm: ``None``, ``"channel"`` (CVN), ``"spatial"`` (SVN), or a
            :class:`~autoflow.volume_norm.VolumeNorm`. In training mode its batch mean makes
            each sample's output depend on the other samples' ``x0``.
        context_channels: Channels ``K`` of a context to condition on (``0``: none); the
            conditioner then takes ``C // 2 + K`` channels, the context concatenated to
            ``x0`` (see :class:`Coupling`).

    Raises:
        AutoflowError: For invalid arguments, or ``hidden_channels`` given with a custom
            ``conditioner``.

    Example:
        >>> import torch, autoflow
        >>> layer = autoflow.AffineCoupling(4)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> y, logdet = layer(x)
        >>> tuple(logdet.shape), bool(torch.equal(y, x))  # zero-initialised: identity
        ((2,), True)
        >>> x_back, logdet_inv = layer.inverse(y)
        >>> bool(torch.allclose(x_back, x))
        True
    """

    def __init__(
        self,
        channels: int,
        *,
        conditioner: nn.Module | None = None,
        hidden_channels: int | None = None,
        kernel_size: int = 3,
        clamp: float = 2.0,
        volume_norm: str | VolumeNorm | None = None,
        context_channels: int = 0,
    ) -> None:
        super().__init__(
            channels,
            conditioner=conditioner,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            clamp=clamp,
            volume_norm=volume_norm,
            additive=False,
            context_channels=context_channels,
        )


@per_sample
@self_contained
class AdditiveCoupling(_ChannelCoupling):
    """NICE additive coupling ``y1 = x1 + t(x0)``: the volume-preserving case ``s = 0``.

    Same split and default conditioner as :class:`AffineCoupling`, but the conditioner outputs
    only ``t`` (``C - C // 2`` channels) and the log-det is exactly zero.

    Args:
        channels: Number of channels ``C >= 2``.
        conditioner: Network mapping ``(B, C // 2, H, W)`` to ``(B, C - C // 2, H, W)``.
        hidden_channels: Hidden width of the default conditioner; default ``channels``.
        kernel_size: Kernel size of the default conditioner (odd).
        context_channels: Channels ``K`` of a context to condition on (``0``: none), as in
            :class:`AffineCoupling`.

    Raises:
        AutoflowError: For invalid arguments.

    Example:
        >>> import torch, autoflow
        >>> layer = autoflow.AdditiveCoupling(3)
        >>> y, logdet = layer(torch.randn(2, 3, 4, 4))
        >>> logdet.tolist()
        [0.0, 0.0]
    """

    volume_preserving = True

    def __init__(
        self,
        channels: int,
        *,
        conditioner: nn.Module | None = None,
        hidden_channels: int | None = None,
        kernel_size: int = 3,
        context_channels: int = 0,
    ) -> None:
        super().__init__(
            channels,
            conditioner=conditioner,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            clamp=2.0,
            volume_norm=None,
            additive=True,
            context_channels=context_channels,
        )


class SplineCoupling(_ChannelCoupling):
    """Neural-spline coupling (Durkan et al., 2019) on ``(B, channels, H, W)`` or
    ``(B, channels)``: ``y1 = g(x1; theta(x0))`` with ``g`` a monotone rational-quadratic
    spline applied elementwise.

    Same split as :class:`AffineCoupling` (``x0`` the first ``channels // 2`` channels, kept;
    ``x1`` the rest, transformed). The conditioner maps ``x0`` (with the context, if any) to
    ``3 * bins - 1`` parameters for every element of ``x1``: ``bins`` widths, ``bins`` heights
    and ``bins - 1`` interior knot derivatives, as ``(B, (3 * bins - 1) * (C - C // 2), H, W)``
    (parameter-major: the first ``C - C // 2`` channels are every element's first width).
    Inside ``[-bound, bound]`` each element goes through its own spline
    (:func:`~autoflow.spline.rational_quadratic_spline`), outside it is left as it is
    (linear tails). The inverse is exact (the root of a quadratic per element) and the
    log-det is ``sum log g'(x1)`` per sample, shape ``(B,)``. The default conditioner starts
    at zero, which gives equal bins and unit derivatives: the layer starts as the identity.

    Args:
        channels: Number of channels ``C >= 2``.
        bins: Number of spline bins ``K``.
        bound: Tail bound ``B``: elements outside ``[-B, B]`` are not changed.
        conditioner: Network mapping ``(B, C // 2 + K_ctx, H, W)`` to
            ``(B, (3 * bins - 1) * (C - C // 2), H, W)``. Default: :func:`make_conditioner`.
        hidden_channels: Hidden width of the default conditioner; default ``channels``.
        kernel_size: Kernel size of the default conditioner (odd; ``1`` for vectors).
        context_channels: Channels of a context to condition on (``0``: none), as in
            :class:`AffineCoupling`.

    Raises:
        AutoflowError: For invalid arguments (``bins`` not an int ``>= 1``, ``bound`` not a
            positive finite number, ...).

    Example:
        >>> import torch, autoflow
        >>> layer = autoflow.SplineCoupling(4, bins=8, bound=3.0)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> y, logdet = layer(x)
        >>> bool(torch.allclose(y, x, atol=1e-6)), tuple(logdet.shape)  # starts as identity
        (True, (2,))
        >>> vectors = autoflow.SplineCoupling(2, kernel_size=1)  # an MLP conditioner
        >>> tuple(vectors(torch.randn(5, 2))[0].shape)
        (5, 2)
    """

    def __init__(
        self,
        channels: int,
        *,
        bins: int = 8,
        bound: float = 3.0,
        conditioner: nn.Module | None = None,
        hidden_channels: int | None = None,
        kernel_size: int = 3,
        context_channels: int = 0,
    ) -> None:
        super().__init__(
            channels,
            conditioner=conditioner,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            clamp=2.0,
            volume_norm=None,
            additive=False,
            context_channels=context_channels,
            transform=SplineTransform(bins, bound=bound),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.transform.bins}, bound={self.transform.bound}"
