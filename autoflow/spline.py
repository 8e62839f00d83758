"""Monotone rational-quadratic splines with linear tails (neural spline flows, Durkan et al. 2019).

On ``[-B, B]`` the map is a spline of ``K`` bins whose knots ``(x^k, y^k)``, ``k = 0..K``, run
from ``(-B, -B)`` to ``(B, B)``, with positive derivatives ``d^k`` at the knots
(``d^0 = d^K = 1``); outside ``[-B, B]`` it is the identity, so the map and its derivative are
continuous everywhere. In bin ``k``, with width :math:`w_k = x^{k+1} - x^k`, height
:math:`h_k = y^{k+1} - y^k`, slope :math:`s_k = h_k / w_k` and
:math:`\\xi = (x - x^k) / w_k \\in [0, 1]`,

.. math::

    y = y^k + \\frac{h_k \\left(s_k \\xi^2 + d^k \\xi (1 - \\xi)\\right)}
                    {s_k + (d^{k+1} + d^k - 2 s_k)\\, \\xi (1 - \\xi)},

    \\frac{dy}{dx} = \\frac{s_k^2 \\left(d^{k+1} \\xi^2 + 2 s_k \\xi (1 - \\xi)
                    + d^k (1 - \\xi)^2\\right)}
                   {\\left(s_k + (d^{k+1} + d^k - 2 s_k)\\, \\xi (1 - \\xi)\\right)^2}.

The inverse solves :math:`a \\xi^2 + b \\xi + c = 0` in the bin containing ``y``, with
:math:`\\delta = d^{k+1} + d^k - 2 s_k`,

.. math::

    a = h_k (s_k - d^k) + (y - y^k)\\, \\delta, \\quad
    b = h_k d^k - (y - y^k)\\, \\delta, \\quad
    c = -s_k (y - y^k), \\qquad
    \\xi = \\begin{cases}
        \\dfrac{2c}{-b - \\sqrt{b^2 - 4ac}} & b \\ge 0, \\\\
        \\dfrac{-b + \\sqrt{b^2 - 4ac}}{2a} & b < 0,
    \\end{cases}

the same root written so that neither form subtracts nearly equal numbers: the first does
not cancel when ``a`` is small, the second not when ``b`` is negative (a steep knot beside a
flat bin; ``a > h_k s_k > 0`` there). Its log-derivative is minus the forward one at that
point.

Each element's ``3K - 1`` parameters are unconstrained: ``K`` bin widths and ``K`` bin heights
(a softmax, each at least ``min_bin_width`` / ``min_bin_height`` of ``2B``) and ``K - 1``
interior derivatives (``min_derivative + softplus``, shifted so that zero gives ``1``). All zero
parameters give equal bins and unit derivatives: the identity, so a coupling whose conditioner
starts at zero starts as the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import check_int
from .elementwise import ElementwiseTransform
from .errors import AutoflowError, ShapeError

__all__ = ["SplineTransform", "rational_quadratic_spline", "spline_params"]


def spline_params(bins: int) -> int:
    """Parameters per element of a ``bins``-bin spline with linear tails: ``3 * bins - 1``.

    Example:
        >>> from autoflow.spline import spline_params
        >>> spline_params(8)
        23
    """
    return 3 * bins - 1


def _knots(unnormalised: Tensor, bound: float, minimum: float) -> tuple[Tensor, Tensor]:
    """Knot positions ``(..., K + 1)`` from ``-bound`` to ``bound`` and bin sizes ``(..., K)``."""
    bins = unnormalised.shape[-1]
    fractions = minimum + (1 - minimum * bins) * torch.softmax(unnormalised, dim=-1)
    inner = 2 * bound * torch.cumsum(fractions, dim=-1)[..., :-1] - bound
    # The end knots are set exactly, so that [-B, B] maps onto [-B, B] without rounding.
    ends = inner.new_full((*inner.shape[:-1], 1), bound)
    knots = torch.cat([-ends, inner, ends], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _gather(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-1, index)[..., 0]


def rational_quadratic_spline(
    x: Tensor,
    params: Tensor,
    *,
    bound: float = 3.0,
    inverse: bool = False,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Apply the spline (or its inverse) elementwise; see the module docstring for the maths.

    Args:
        x: Values of any shape ``S`` (inputs, or outputs when ``inverse``).
        params: Unconstrained parameters of shape ``S + (3K - 1,)``: ``K`` widths, ``K``
            heights, ``K - 1`` interior derivatives, in that order.
        bound: Tail bound ``B > 0``; the map is the identity outside ``[-B, B]``.
        inverse: Apply the inverse map.
        min_bin_width: Smallest bin width, as a fraction of ``2B``.
        min_bin_height: Smallest bin height, as a fraction of ``2B``.
        min_derivative: Smallest derivative at a knot.

    Returns:
        ``(y, log_derivative)``, both of shape ``S``: the mapped values and the elementwise
        ``log|dy/dx|`` of the map applied (``log|dx/dy|`` when ``inverse``).

    Example:
        >>> import torch
        >>> from autoflow.spline import rational_quadratic_spline
        >>> x = torch.tensor([-5.0, 0.3, 2.0])
        >>> params = torch.randn(3, 23, generator=torch.Generator().manual_seed(0))  # 8 bins
        >>> y, ld = rational_quadratic_spline(x, params)
        >>> x_back, ld_inv = rational_quadratic_spline(y, params, inverse=True)
        >>> bool(torch.allclose(x_back, x, atol=1e-5)), y[0].item()  # identity tail
        (True, -5.0)
    """
    if params.shape[-1] % 3 != 2 or tuple(params.shape[:-1]) != tuple(x.shape):
        raise ShapeError(
            f"rational_quadratic_spline expected parameters of shape x.shape + (3K - 1,) = "
            f"{tuple(x.shape)} + (3K - 1,), received {tuple(params.shape)}"
        )
    bins = (params.shape[-1] + 1) // 3
    widths_u, heights_u, derivatives_u = params.split([bins, bins, bins - 1], dim=-1)
    x_knots, widths = _knots(widths_u, bound, min_bin_width)
    y_knots, heights = _knots(heights_u, bound, min_bin_height)
    # softplus(u + shift) = 1 - min_derivative at u = 0: zero parameters give derivative 1.
    shift = math.log(math.expm1(1 - min_derivative))
    inner = min_derivative + F.softplus(derivatives_u + shift)
    ones = inner.new_ones((*inner.shape[:-1], 1))
    derivatives = torch.cat([ones, inner, ones], dim=-1)

    inside = (x >= -bound) & (x <= bound)
    # The spline is evaluated on clamped values everywhere (finite, so that torch.where passes
    # no NaN gradient from the discarded branch) and kept only inside [-B, B].
    clamped = x.clamp(-bound, bound)
    knots = y_knots if inverse else x_knots
    index = (clamped[..., None] >= knots[..., 1:-1]).sum(dim=-1, keepdim=True)
    x_k, w = _gather(x_knots, index), _gather(widths, index)
    y_k, h = _gather(y_knots, index), _gather(heights, index)
    d_k, d_k1 = _gather(derivatives, index), _gather(derivatives[..., 1:], index)
    slope = h / w
    delta = d_k1 + d_k - 2 * slope
    if inverse:
        dy = clamped - y_k
        a = h * (slope - d_k) + dy * delta
        b = h * d_k - dy * delta
        c = -slope * dy
        root = (b.square() - 4 * a * c).clamp_min(0).sqrt()
        # Each branch's denominator is replaced where the other is kept, so that the
        # discarded one passes no inf or NaN gradient through torch.where.
        stable_for_b = b >= 0
        xi = torch.where(stable_for_b,
                         2 * c / torch.where(stable_for_b, -b - root, -1.0),
                         (root - b) / torch.where(stable_for_b, 1.0, 2 * a))
        out = x_k + xi * w
    else:
        xi = (clamped - x_k) / w
    xi_1m = xi * (1 - xi)
    denominator = slope + delta * xi_1m
    if not inverse:
        out = y_k + h * (slope * xi.square() + d_k * xi_1m) / denominator
    numerator = slope.square() * (d_k1 * xi.square() + 2 * slope * xi_1m + d_k * (1 - xi).square())
    log_derivative = numerator.log() - 2 * denominator.log()
    if inverse:
        log_derivative = -log_derivative
    return torch.where(inside, out, x), torch.where(inside, log_derivative, 0.0)


class SplineTransform(ElementwiseTransform):
    """The rational-quadratic spline of :func:`rational_quadratic_spline` as an
    :class:`~autoflow.ElementwiseTransform`; ``P = 3 * bins - 1``.

    Args:
        bins: Number of bins ``K >= 1``.
        bound: Tail bound ``B``: the map is the identity outside ``[-B, B]``.
        min_bin_width: Smallest bin width, as a fraction of ``2B`` (``bins * min_bin_width``
            must stay below 1).
        min_bin_height: Smallest bin height, likewise.
        min_derivative: Smallest derivative at a knot (positive).

    Raises:
        AutoflowError: For a bad count or bound, or minimums that leave no room.

    Example:
        >>> import torch, autoflow
        >>> spline = autoflow.SplineTransform(bins=4, bound=2.0)
        >>> spline.params_per_element
        11
        >>> x = torch.linspace(-3, 3, 7)
        >>> y, log_derivative = spline(x, torch.zeros(7, 11))  # zero parameters: identity
        >>> bool(torch.allclose(y, x)), bool(log_derivative.abs().max() < 1e-6)
        (True, True)
    """

    def __init__(
        self,
        bins: int = 8,
        *,
        bound: float = 3.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__()
        self.bins = check_int(bins, "bins", "SplineTransform")
        self.bound = _positive(bound, "bound")
        for name, value in (("min_bin_width", min_bin_width),
                            ("min_bin_height", min_bin_height)):
            if _positive(value, name) * bins >= 1:
                raise AutoflowError(
                    f"SplineTransform {name} * bins must be below 1 (the bins share 2B), "
                    f"received {name}={value} with bins={bins}"
                )
        if _positive(min_derivative, "min_derivative") >= 1:
            raise AutoflowError(
                f"SplineTransform min_derivative must be below 1 (the tails' derivative), "
                f"received {min_derivative}"
            )
        self.min_bin_width = float(min_bin_width)
        self.min_bin_height = float(min_bin_height)
        self.min_derivative = float(min_derivative)
        self.params_per_element = spline_params(bins)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, bound={self.bound}"

    def _run(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        self.check_params(x, params)
        return rational_quadratic_spline(
            x, params, bound=self.bound, inverse=inverse, min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height, min_derivative=self.min_derivative,
        )

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(spline(x), log spline'(x))``."""
        return self._run(x, params, inverse=False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(spline^{-1}(y), -log spline'(spline^{-1}(y)))``."""
        return self._run(y, params, inverse=True)


def _positive(value: object, name: str) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise AutoflowError(
            f"SplineTransform {name} must be a positive finite number, received {value!r}"
        )
    return float(value)
