"""Volume-preserving 2x downsampling: orthonormal Haar transform and space-to-depth squeeze.

Both map ``(B, C, H, W) -> (B, 4C, H/2, W/2)`` with even ``H`` and ``W`` and have log-det 0.

:class:`HaarDownsample` applies to every 2x2 block ``[[a, b], [c, d]]`` of every channel the
orthonormal (hence self-inverse, since it is symmetric) matrix

.. math::

    \\begin{pmatrix} ll \\\\ lh \\\\ hl \\\\ hh \\end{pmatrix} = \\frac{1}{2}
    \\begin{pmatrix} 1 & 1 & 1 & 1 \\\\ 1 & -1 & 1 & -1 \\\\ 1 & 1 & -1 & -1 \\\\
    1 & -1 & -1 & 1 \\end{pmatrix}
    \\begin{pmatrix} a \\\\ b \\\\ c \\\\ d \\end{pmatrix},

and orders the output channels by sub-band: ``[ll (C), lh (C), hl (C), hh (C)]``, so
``y[:, :C]`` is the low-pass image (twice the 2x2 average).

:class:`Squeeze` only rearranges: ``'b c (h h2) (w w2) -> b (c h2 w2) h w'``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .base import (
    InvertibleModule,
    Shape,
    check_image,
    check_image_shape,
    check_int,
    per_sample,
    self_contained,
)
from .errors import AutoflowError, ShapeError

__all__ = ["HaarDownsample", "Squeeze"]

_HAAR = 0.5 * torch.tensor(
    [[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]],
    dtype=torch.float64,
)


class _Downsample2x(InvertibleModule):
    """Shared validation and shape logic of the 2x, log-det-free downsamplers."""

    volume_preserving = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_int(channels, "channels", type(self).__name__)
        self.channels = channels

    def extra_repr(self) -> str:
        return f"{self.channels}"

    def _check_even(self, h: int, w: int, shape: object) -> None:
        if h % 2 or w % 2:
            raise ShapeError(
                f"{type(self).__name__} expected an even height and width, received "
                f"H={h}, W={w} (shape {shape})"
            )

    def _check_input(self, x: Tensor) -> None:
        check_image(x, self.channels, self)
        self._check_even(x.shape[2], x.shape[3], tuple(x.shape))

    def output_shape(self, input_shape: Shape) -> Shape:
        c, h, w = check_image_shape(input_shape, self.channels, self)
        self._check_even(h, w, input_shape)
        return (4 * c, h // 2, w // 2)

    def input_shape(self, output_shape: Shape) -> Shape:
        c, h, w = check_image_shape(output_shape, 4 * self.channels, self)
        return (c // 4, 2 * h, 2 * w)


@per_sample
@self_contained
class HaarDownsample(_Downsample2x):
    """Orthonormal 2-D Haar wavelet transform per channel; a bijection with log-det 0.

    Args:
        channels: Number of input channels ``C``; the output has ``4C``.

    Raises:
        AutoflowError: If ``channels`` is not a positive int.

    Example:
        >>> import torch, autoflow
        >>> haar = autoflow.HaarDownsample(1)
        >>> x = torch.ones(1, 1, 2, 2)
        >>> y, logdet = haar(x)
        >>> y.flatten().tolist(), logdet.tolist()
        ([2.0, 0.0, 0.0, 0.0], [0.0])
    """

    def _check_floating(self, x: Tensor) -> None:
        # The 1/2 factors would be truncated in an integer dtype.
        if not x.is_floating_point():
            raise AutoflowError(
                f"HaarDownsample expected a floating-point tensor, received dtype {x.dtype}"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Transform ``(B, C, H, W)`` into sub-bands ``(B, 4C, H/2, W/2)``; log-det zeros ``(B,)``.

        Raises:
            ShapeError: If ``x`` is not ``(B, C, H, W)`` with even ``H`` and ``W``.
            AutoflowError: If ``x`` is not floating-point.
        """
        self._check_input(x)
        self._check_floating(x)
        blocks = rearrange(x, "b c (h h2) (w w2) -> b (h2 w2) c h w", h2=2, w2=2)
        bands = torch.einsum("kj,bjchw->bkchw", _HAAR.to(x), blocks)
        return rearrange(bands, "b k c h w -> b (k c) h w"), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Rebuild ``(B, C, H, W)`` from sub-bands ``(B, 4C, H/2, W/2)``; log-det zeros ``(B,)``.

        Raises:
            ShapeError: If ``y`` does not have ``4C`` channels.
            AutoflowError: If ``y`` is not floating-point.
        """
        check_image(y, 4 * self.channels, self)
        self._check_floating(y)
        bands = rearrange(y, "b (k c) h w -> b k c h w", k=4)
        # The Haar matrix is symmetric and orthonormal, so it is its own inverse.
        blocks = torch.einsum("kj,bjchw->bkchw", _HAAR.to(y), bands)
        x = rearrange(blocks, "b (h2 w2) c h w -> b c (h h2) (w w2)", h2=2, w2=2)
        return x, y.new_zeros(y.shape[0])


@per_sample
@self_contained
class Squeeze(_Downsample2x):
    """Space-to-depth: move each 2x2 block of a channel into 4 channels; log-det 0.

    Args:
        channels: Number of input channels ``C``; the output has ``4C``, ordered
            ``(c, h2, w2)`` (the four pixels of a channel's block are adjacent).

    Raises:
        AutoflowError: If ``channels`` is not a positive int.

    Example:
        >>> import torch, autoflow
        >>> squeeze = autoflow.Squeeze(1)
        >>> y, _ = squeeze(torch.arange(4.0).view(1, 1, 2, 2))
        >>> y.flatten().tolist()
        [0.0, 1.0, 2.0, 3.0]
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Squeeze ``(B, C, H, W)`` into ``(B, 4C, H/2, W/2)``; log-det zeros ``(B,)``.

        Raises:
            ShapeError: If ``x`` is not ``(B, C, H, W)`` with even ``H`` and ``W``.
        """
        self._check_input(x)
        y = rearrange(x, "b c (h h2) (w w2) -> b (c h2 w2) h w", h2=2, w2=2)
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Unsqueeze ``(B, 4C, H/2, W/2)`` into ``(B, C, H, W)``; log-det zeros ``(B,)``.

        Raises:
            ShapeError: If ``y`` does not have ``4C`` channels.
        """
        check_image(y, 4 * self.channels, self)
        x = rearrange(y, "b (c h2 w2) h w -> b c (h h2) (w w2)", h2=2, w2=2)
        return x, y.new_zeros(y.shape[0])
