"""The invertible (over-complete) Laplacian pyramid of PyramidFlow (Sec. 3.1, eqs. 1-2).

Decomposition of ``x`` of shape ``(B, C, H, W)`` into ``L`` levels (eq. 1), level ``d`` of shape
``(B, C, H / 2^d, W / 2^d)``, with a downsampling operator ``D`` and an upsampling operator ``U``:

.. math::

    x_d = D^d(x) - U\\big(D^{d+1}(x)\\big) \\quad (d < L - 1), \\qquad x_{L-1} = D^{L-1}(x).

Composition, computed recursively from the coarsest level:

.. math::

    g_{L-1} = x_{L-1}, \\qquad g_d = x_d + U(g_{d+1}) \\quad (d = L-2, \\dots, 0),
    \\qquad x = g_0.

Each step restores ``g_d = D^d(x)`` because it adds back exactly the ``U(D^{d+1}(x))`` that the
decomposition subtracted, so composition inverts decomposition for *any* pair of operators ``D``
and ``U``, linear or not. For linear ``U`` the recursion unrolls to eq. 2,
:math:`x = \\sum_d U^d(x_d)`.

The pyramid is over-complete (more numbers out than in), hence only left-invertible: it reports
no log-det (``None``) in either direction and has ``bijective = False``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import InvertibleModule, Shape, check_image, check_image_shape, check_int
from .errors import AutoflowError, ShapeError

__all__ = [
    "LaplacianPyramid",
    "bilinear_up",
    "blur_maxpool_down",
    "gaussian_down",
    "gaussian_up",
    "maxpool_down",
    "nearest_blur_up",
]

Resampler = Callable[[Tensor], Tensor]

_KINDS = ("gaussian", "maxpool", "blur_maxpool")
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _reflect_indices(n: int, pad: int, device: torch.device) -> Tensor:
    # Mirror without repeating the edge sample, folding again when the pad exceeds the size, so
    # tiny coarse levels (1 or 2 pixels, where F.pad(mode="reflect") refuses) are still blurred.
    index = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index.remainder(period)
    return torch.where(index >= n, period - index, index)


def _binomial_blur(x: Tensor, padding: str = "reflect") -> Tensor:
    """Depthwise 5×5 binomial blur (``[1, 4, 6, 4, 1] / 16`` outer product).

    ``padding`` is ``"reflect"`` (mirror, edges kept) or ``"zeros"`` (what the PyramidFlow
    public code does; it darkens a 2-pixel border). Applied as two 1-D passes (the kernel is
    separable): 10 instead of 25 taps per pixel.
    """
    taps = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    channels, pad = x.shape[1], len(_BINOMIAL) // 2
    if padding == "zeros":
        padded = F.pad(x, (pad, pad, pad, pad))
    elif x.shape[2] > pad and x.shape[3] > pad:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    else:
        padded = x.index_select(2, _reflect_indices(x.shape[2], pad, x.device))
        padded = padded.index_select(3, _reflect_indices(x.shape[3], pad, x.device))
    rows = F.conv2d(padded, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def gaussian_down(x: Tensor) -> Tensor:
    """Burt–Adelson reduce: binomial blur, then keep every second row and column.

    Args:
        x: A ``(B, C, H, W)`` tensor with even ``H`` and ``W``.

    Returns:
        A ``(B, C, H / 2, W / 2)`` tensor.

    Example:
        >>> import torch
        >>> from autoflow.pyramid import gaussian_down
        >>> gaussian_down(torch.ones(1, 2, 4, 4)).shape
        torch.Size([1, 2, 2, 2])
    """
    return _binomial_blur(x)[:, :, ::2, ::2]


def gaussian_up(x: Tensor) -> Tensor:
    """Burt–Adelson expand: insert zeros between samples, then blur with 4× the kernel.

    The factor 4 compensates for the three zeros inserted per sample, so constants are kept.

    Args:
        x: A ``(B, C, h, w)`` tensor.

    Returns:
        A ``(B, C, 2h, 2w)`` tensor.

    Example:
        >>> import torch
        >>> from autoflow.pyramid import gaussian_up
        >>> gaussian_up(torch.ones(1, 1, 2, 2)).shape
        torch.Size([1, 1, 4, 4])
    """
    b, c, h, w = x.shape
    spread = x.new_zeros(b, c, 2 * h, 2 * w)
    spread[:, :, ::2, ::2] = x
    return 4.0 * _binomial_blur(spread)


def maxpool_down(x: Tensor) -> Tensor:
    """2×2 max-pooling with stride 2: ``(B, C, H, W) -> (B, C, H / 2, W / 2)``.

    Example:
        >>> import torch
        >>> from autoflow.pyramid import maxpool_down
        >>> maxpool_down(torch.arange(16.0).reshape(1, 1, 4, 4)).flatten().tolist()
        [5.0, 7.0, 13.0, 15.0]
    """
    return F.max_pool2d(x, 2)


def bilinear_up(x: Tensor) -> Tensor:
    """Bilinear ×2 upsampling (``align_corners=False``): ``(B, C, h, w) -> (B, C, 2h, 2w)``.

    Example:
        >>> import torch
        >>> from autoflow.pyramid import bilinear_up
        >>> bilinear_up(torch.ones(1, 1, 1, 2)).shape
        torch.Size([1, 1, 2, 4])
    """
    return F.interpolate(
        x, size=(2 * x.shape[2], 2 * x.shape[3]), mode="bilinear", align_corners=False
    )


def blur_maxpool_down(x: Tensor) -> Tensor:
    """Binomial 5×5 blur with zero padding, then 2×2 max-pooling (the public PyramidFlow code).

    Example:
        >>> import torch
        >>> from autoflow.pyramid import blur_maxpool_down
        >>> blur_maxpool_down(torch.ones(1, 1, 8, 8))[0, 0, 1:3, 1:3].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    return F.max_pool2d(_binomial_blur(x, padding="zeros"), 2)


def nearest_blur_up(x: Tensor) -> Tensor:
    """Nearest-neighbour ×2 upsampling, then the binomial 5×5 blur with zero padding.

    The partner of :func:`blur_maxpool_down` in the public PyramidFlow code: constants are
    kept away from the 2-pixel border, where the zero padding darkens them.

    Example:
        >>> import torch
        >>> from autoflow.pyramid import nearest_blur_up
        >>> nearest_blur_up(torch.ones(1, 1, 4, 4))[0, 0, 2:6, 2:6].unique().tolist()
        [1.0]
    """
    return _binomial_blur(F.interpolate(x, scale_factor=2.0, mode="nearest"), padding="zeros")


_OPERATORS: dict[str, tuple[Resampler, Resampler]] = {
    "gaussian": (gaussian_down, gaussian_up),
    "maxpool": (maxpool_down, bilinear_up),
    "blur_maxpool": (blur_maxpool_down, nearest_blur_up),
}


class LaplacianPyramid(InvertibleModule):
    """Laplacian pyramid decomposition (``forward``) and exact composition (``inverse``).

    ``forward`` maps a ``(B, C, H, W)`` tensor to a tuple of ``levels`` tensors, level ``d`` of
    shape ``(B, C, H / 2^d, W / 2^d)``; ``inverse`` maps such a tuple back. Both return ``None``
    as their log-det: the decomposition is over-complete, so there is no change-of-variables
    factor to report. Any channel count works, e.g. 1-channel anomaly maps.

    Args:
        levels: Number of levels ``L >= 1`` (``1`` is the identity, wrapped in a 1-tuple).
        kind: Default operators: ``"gaussian"`` (5×5 binomial blur with reflect padding, stride 2
            down; zero insertion then the same blur ×4 up — Burt–Adelson) or ``"maxpool"``
            (2×2 max-pool down; bilinear ×2 up, ``align_corners=False``) or
            ``"blur_maxpool"`` (5×5 binomial blur with zero padding then 2×2 max-pool down;
            nearest ×2 then the same blur up — the operators of the public PyramidFlow code).
        down: Optional callable ``(B, C, H, W) -> (B, C, H/2, W/2)`` replacing ``kind``'s
            downsampling. An ``nn.Module`` is registered as a submodule.
        up: Optional callable ``(B, C, h, w) -> (B, C, 2h, 2w)`` replacing ``kind``'s upsampling.

    Raises:
        AutoflowError: If ``levels`` is not an int ``>= 1``, ``kind`` is unknown, or ``down`` /
            ``up`` is not callable.

    Example:
        >>> import torch, autoflow
        >>> pyramid = autoflow.LaplacianPyramid(levels=3)
        >>> x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
        >>> parts, logdet = pyramid(x)
        >>> [tuple(p.shape) for p in parts], logdet
        ([(2, 1, 8, 8), (2, 1, 4, 4), (2, 1, 2, 2)], None)
        >>> restored, _ = pyramid.inverse(parts)
        >>> bool(torch.allclose(restored, x, rtol=0, atol=1e-12))
        True
    """

    bijective = False

    def __init__(
        self,
        levels: int = 4,
        *,
        kind: str = "gaussian",
        down: Resampler | None = None,
        up: Resampler | None = None,
    ) -> None:
        super().__init__()
        check_int(levels, "levels", "LaplacianPyramid")
        if kind not in _OPERATORS:
            raise AutoflowError(
                f"LaplacianPyramid kind must be one of {list(_KINDS)}, received {kind!r}"
            )
        for name, op in (("down", down), ("up", up)):
            if op is not None and not callable(op):
                raise AutoflowError(
                    f"LaplacianPyramid {name} must be callable or None, "
                    f"received {type(op).__name__}"
                )
        default_down, default_up = _OPERATORS[kind]
        self.levels = levels
        self.kind = kind
        self.down = down if down is not None else default_down
        self.up = up if up is not None else default_up

    def extra_repr(self) -> str:
        return f"levels={self.levels}, kind={self.kind!r}"

    @property
    def divisor(self) -> int:
        """``2^(levels-1)``: H and W of the input must be multiples of it."""
        return 2 ** (self.levels - 1)

    def _check_size(self, height: int, width: int, received: object) -> None:
        if height < 1 or width < 1 or height % self.divisor or width % self.divisor:
            raise ShapeError(
                f"LaplacianPyramid with {self.levels} levels needs H and W to be positive "
                f"multiples of 2^{self.levels - 1} = {self.divisor}, received {received}"
            )

    def _resample(self, op: Resampler, x: Tensor, size: tuple[int, int], name: str) -> Tensor:
        out = op(x)
        expected = (*x.shape[:2], *size)
        if not isinstance(out, Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(
                f"LaplacianPyramid's {name} operator mapped shape {tuple(x.shape)} to {got}, "
                f"expected {expected}"
            )
        return out

    def _down(self, x: Tensor) -> Tensor:
        return self._resample(self.down, x, (x.shape[2] // 2, x.shape[3] // 2), "down")

    def _up(self, x: Tensor) -> Tensor:
        return self._resample(self.up, x, (2 * x.shape[2], 2 * x.shape[3]), "up")

    def forward(self, x: Tensor) -> tuple[tuple[Tensor, ...], None]:
        """Decompose ``x`` into pyramid levels (eq. 1).

        Args:
            x: A ``(B, C, H, W)`` tensor, ``H`` and ``W`` multiples of ``2^(levels-1)``.

        Returns:
            ``(levels_tuple, None)``; level ``d`` has shape ``(B, C, H / 2^d, W / 2^d)``.

        Raises:
            ShapeError: If ``x`` is not 4-D or its size is not divisible by ``2^(levels-1)``,
                or a custom operator returns the wrong shape.
        """
        check_image(x, None, self)
        self._check_size(x.shape[2], x.shape[3], f"shape {tuple(x.shape)}")
        gaussians = [x]
        for _ in range(self.levels - 1):
            gaussians.append(self._down(gaussians[-1]))
        details = [fine - self._up(coarse) for fine, coarse in zip(gaussians, gaussians[1:])]
        return (*details, gaussians[-1]), None

    def inverse(self, levels: Sequence[Tensor]) -> tuple[Tensor, None]:
        """Compose pyramid levels back into one tensor (recursive form of eq. 2).

        Args:
            levels: A tuple of ``levels`` tensors, level ``d`` of shape
                ``(B, C, H / 2^d, W / 2^d)``.

        Returns:
            ``(x, None)`` with ``x`` of shape ``(B, C, H, W)``.

        Raises:
            ShapeError: If the tuple has the wrong length, a level is not 4-D, or batch size,
                channels or sizes are inconsistent.
        """
        if not isinstance(levels, (tuple, list)):
            raise ShapeError(
                f"LaplacianPyramid.inverse expected a tuple of {self.levels} levels, "
                f"received {type(levels).__name__}"
            )
        for d, level in enumerate(levels):
            check_image(level, None, self, name=f"level {d}")
        batches = [level.shape[0] for level in levels]
        # Compared pairwise, not hashed: a traced or symbolic batch size has no hash.
        if any(b != batches[0] for b in batches[1:]):
            raise ShapeError(
                f"LaplacianPyramid.inverse expected the same batch size in every level, "
                f"received {batches}"
            )
        self.input_shape(tuple(tuple(level.shape[1:]) for level in levels))
        composed = levels[-1]
        for detail in reversed(levels[:-1]):
            composed = detail + self._up(composed)
        return composed, None

    def output_shape(self, input_shape: Shape) -> Shape:
        """Level shapes ``((C, H, W), (C, H/2, W/2), ...)`` for an input shape ``(C, H, W)``.

        Raises:
            ShapeError: If ``input_shape`` is not ``(C, H, W)`` or not divisible.
        """
        c, h, w = check_image_shape(input_shape, None, self)
        self._check_size(h, w, f"shape {tuple(input_shape)}")
        return tuple((c, h >> d, w >> d) for d in range(self.levels))

    def input_shape(self, output_shape: Shape) -> Shape:
        """The ``(C, H, W)`` shape that decomposes into the level shapes ``output_shape``.

        Raises:
            ShapeError: If there are not ``levels`` shapes, channels differ, or a level is not
                exactly half the size of the previous one.
        """
        shapes = tuple(output_shape)
        if len(shapes) != self.levels or not all(isinstance(s, tuple) for s in shapes):
            raise ShapeError(
                f"LaplacianPyramid with {self.levels} levels expected {self.levels} level "
                f"shapes, received {output_shape}"
            )
        first = check_image_shape(shapes[0], None, self)
        expected = self.output_shape(first)
        for d in range(1, self.levels):
            if tuple(shapes[d]) != expected[d]:
                raise ShapeError(
                    f"LaplacianPyramid level {d} should have shape {expected[d]} (the channels "
                    f"of level 0, half the size of level {d - 1}), received {tuple(shapes[d])}"
                )
        return first
