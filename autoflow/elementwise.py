"""Elementwise bijections ``y = f(x; theta)``: the maps a coupling applies to its target.

A coupling computes parameters ``theta`` for every element of the part it transforms from the
part it keeps, then applies a strictly monotone scalar map to each element. An
:class:`ElementwiseTransform` is such a map; its contract, for a target ``x`` of any shape
``(B, ...)`` and parameters of shape ``x.shape + (P,)`` (``P = params_per_element``), is

.. math::

    y_i = f(x_i; \\theta_i), \\qquad
    \\ell_i = \\log\\left|\\frac{\\partial y_i}{\\partial x_i}\\right|,

    x_i = f^{-1}(y_i; \\theta_i), \\qquad
    \\log\\left|\\frac{\\partial x_i}{\\partial y_i}\\right| = -\\ell_i,

returned elementwise (shape ``x.shape``): the coupling sums them to its per-sample log-det.
Because ``theta`` does not depend on the transformed elements, the coupling's Jacobian is
triangular and its log-det is exactly that sum.

Built in: :class:`AffineTransform` (RealNVP, ``P = 2``), :class:`AdditiveTransform` (NICE,
``P = 1``) and :class:`~autoflow.spline.SplineTransform` (rational-quadratic spline,
``P = 3K - 1``). This module also holds the clamped-affine helpers :func:`soft_clamp`,
:func:`affine_apply` and :func:`affine_invert` (also importable from
:mod:`autoflow.coupling`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import AutoflowError, ShapeError

__all__ = [
    "CLAMP_KINDS",
    "AdditiveTransform",
    "AffineTransform",
    "ElementwiseTransform",
    "affine_apply",
    "affine_invert",
    "soft_clamp",
]


CLAMP_KINDS = ("tanh", "atan")
"""Soft-clamp functions of :func:`soft_clamp`."""


def soft_clamp(s: Tensor, clamp: float, kind: str = "tanh") -> Tensor:
    """Smoothly limit a log-scale to ``(-clamp, clamp)``.

    ``kind="tanh"``: ``clamp * tanh(s / clamp)``; ``kind="atan"``:
    ``clamp * (2 / pi) * atan(s / clamp)`` (the PyramidFlow public code, whose factor 0.636
    rounds ``2 / pi``), which approaches the bound more slowly. Both keep ``exp(s)`` within
    ``[e^-clamp, e^clamp]`` so the inverse stays well conditioned, and both are the identity to
    first order near zero.

    Raises:
        AutoflowError: If ``kind`` is not one of :data:`CLAMP_KINDS`.

    Example:
        >>> import torch
        >>> from autoflow.coupling import soft_clamp
        >>> soft_clamp(torch.tensor([0.0, 100.0]), 2.0).tolist()
        [0.0, 2.0]
        >>> round(soft_clamp(torch.tensor(100.0), 2.0, kind="atan").item(), 2)
        1.97
    """
    if kind == "tanh":
        return clamp * torch.tanh(s / clamp)
    if kind == "atan":
        return clamp * (2.0 / math.pi) * torch.atan(s / clamp)
    raise AutoflowError(f"soft_clamp kind must be one of {CLAMP_KINDS}, received {kind!r}")


def affine_apply(x: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
    """Eq. 3: ``exp(s) * x + t``; ``s=None`` is the additive case ``x + t``.

    Example:
        >>> import torch
        >>> from autoflow.coupling import affine_apply
        >>> affine_apply(torch.ones(2), torch.zeros(2), torch.ones(2)).tolist()
        [2.0, 2.0]
    """
    s, t = _at_precision_of(x, s, t)
    return x + t if s is None else torch.exp(s) * x + t


def affine_invert(y: Tensor, s: Tensor | None, t: Tensor) -> Tensor:
    """Eq. 4: ``exp(-s) * (y - t)``; ``s=None`` is the additive case ``y - t``.

    Example:
        >>> import torch
        >>> from autoflow.coupling import affine_invert
        >>> affine_invert(torch.full((2,), 2.0), torch.zeros(2), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    s, t = _at_precision_of(y, s, t)
    return y - t if s is None else torch.exp(-s) * (y - t)


def _at_precision_of(x: Tensor, s: Tensor | None, t: Tensor) -> tuple[Tensor | None, Tensor]:
    # Under autocast the conditioner returns s and t in half precision; the affine map and its
    # log-det run in the transformed tensor's precision (at least float32), so that the inverse
    # undoes the forward map exactly enough for the memory-saving engine to rebuild inputs.
    if not torch.is_autocast_enabled(x.device.type):
        return s, t
    dtype = torch.promote_types(torch.promote_types(x.dtype, t.dtype), torch.float32)
    return (None if s is None else s.to(dtype)), t.to(dtype)


def check_clamp(clamp: object, owner: str) -> float:
    """Return ``clamp`` as a float if it is a positive finite number, else raise.

    Raises:
        AutoflowError: ``"<owner> clamp must be a positive finite number, received <clamp>"``.
    """
    if (
        isinstance(clamp, bool)
        or not isinstance(clamp, (int, float))
        or not math.isfinite(clamp)
        or clamp <= 0
    ):
        raise AutoflowError(f"{owner} clamp must be a positive finite number, received {clamp!r}")
    return float(clamp)


class ElementwiseTransform(nn.Module):
    """Base class of the elementwise bijections a coupling applies (see the module docstring).

    A subclass sets :attr:`params_per_element` (``P``) and implements ``forward`` and
    ``inverse``; both take the tensor to map, of any shape ``(B, ...)``, and its parameters of
    shape ``x.shape + (P,)``, and return the mapped tensor with the elementwise
    log-derivative of the map they apply (shape ``x.shape``). ``inverse`` must undo
    ``forward`` for every parameter value the conditioner can produce, and report
    ``-log|f'(x)|`` on the same point. The parameters come straight from the conditioner
    (unconstrained real numbers): the transform maps them to valid ones (a positive scale, an
    increasing spline).

    A :class:`~autoflow.MaskedCoupling` or a :class:`~autoflow.Coupling` built with
    ``transform=`` sums the log-derivatives to its log-det, checks the shapes, and gives the
    transform the conditioner's output in at least float32 under autocast.

    Attributes:
        params_per_element: ``P``, the parameters of one element's map.
        volume_preserving: ``True`` if the log-derivative is exactly zero everywhere.

    Example:
        A scale-and-shift with the scale ``softplus(a) + 1e-3`` (strictly positive):

        >>> import torch, autoflow
        >>> import torch.nn.functional as F
        >>> class SoftplusAffine(autoflow.ElementwiseTransform):
        ...     params_per_element = 2
        ...     def forward(self, x, params):
        ...         scale = F.softplus(params[..., 0]) + 1e-3
        ...         return scale * x + params[..., 1], scale.log()
        ...     def inverse(self, y, params):
        ...         scale = F.softplus(params[..., 0]) + 1e-3
        ...         return (y - params[..., 1]) / scale, -scale.log()
        >>> layer = autoflow.MaskedCoupling(4, autoflow.checkerboard_mask((4, 6, 6)),
        ...                                 transform=SoftplusAffine())
        >>> y, logdet = layer(torch.randn(2, 4, 6, 6))
        >>> tuple(logdet.shape)
        (2,)
    """

    params_per_element: int = 0
    volume_preserving: bool = False

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Return ``(y, log|dy/dx|)``, both shaped like ``x``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Return ``(x, log|dx/dy|)``, both shaped like ``y``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement inverse")

    def check_params(self, x: Tensor, params: Tensor) -> None:
        """Check that ``params`` has shape ``x.shape + (P,)``.

        Raises:
            ShapeError: Naming the transform, the expected and the received shape.
        """
        expected = (*x.shape, self.params_per_element)
        if not isinstance(params, Tensor) or tuple(params.shape) != expected:
            got = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
            raise ShapeError(
                f"{type(self).__name__} expected parameters of shape x.shape + "
                f"({self.params_per_element},) = {expected}, received {got}"
            )


class AffineTransform(ElementwiseTransform):
    """The RealNVP map ``y = exp(s) x + t`` with ``s`` soft-clamped; ``P = 2``.

    ``params[..., 0]`` is the raw log-scale (soft-clamped to ``(-clamp, clamp)`` by
    :func:`soft_clamp`), ``params[..., 1]`` the shift; the log-derivative is ``s``. Zero
    parameters give the identity.

    Args:
        clamp: Soft-clamp bound of the log-scale.
        clamp_kind: ``"tanh"`` or ``"atan"`` (see :func:`soft_clamp`).

    Raises:
        AutoflowError: If ``clamp`` is not a positive finite number or ``clamp_kind`` is
            unknown.

    Example:
        >>> import torch, autoflow
        >>> affine = autoflow.AffineTransform()
        >>> params = torch.tensor([[0.0, 1.0], [100.0, 0.0]])  # (s, t) for two elements
        >>> y, log_derivative = affine(torch.ones(2), params)
        >>> [round(v, 3) for v in log_derivative.tolist()]  # s clamped to 2
        [0.0, 2.0]
    """

    params_per_element = 2

    def __init__(self, *, clamp: float = 2.0, clamp_kind: str = "tanh") -> None:
        super().__init__()
        self.clamp = check_clamp(clamp, "AffineTransform")
        if clamp_kind not in CLAMP_KINDS:
            raise AutoflowError(
                f"AffineTransform clamp_kind must be one of {CLAMP_KINDS}, received "
                f"{clamp_kind!r}"
            )
        self.clamp_kind = clamp_kind

    def extra_repr(self) -> str:
        return f"clamp={self.clamp}, clamp_kind={self.clamp_kind!r}"

    def _scale_shift(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self.check_params(x, params)
        return soft_clamp(params[..., 0], self.clamp, self.clamp_kind), params[..., 1]

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(exp(s) x + t, s)``."""
        s, t = self._scale_shift(x, params)
        return affine_apply(x, s, t), s

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(exp(-s) (y - t), -s)``."""
        s, t = self._scale_shift(y, params)
        return affine_invert(y, s, t), -s


class AdditiveTransform(ElementwiseTransform):
    """The NICE map ``y = x + t``; ``P = 1``, log-derivative exactly zero.

    Example:
        >>> import torch, autoflow
        >>> y, log_derivative = autoflow.AdditiveTransform()(torch.ones(3), torch.ones(3, 1))
        >>> y.tolist(), log_derivative.tolist()
        ([2.0, 2.0, 2.0], [0.0, 0.0, 0.0])
    """

    params_per_element = 1
    volume_preserving = True

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(x + t, 0)``."""
        self.check_params(x, params)
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(y - t, 0)``."""
        self.check_params(y, params)
        return y - params[..., 0], torch.zeros_like(y)
