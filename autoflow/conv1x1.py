"""Invertible and lifting 1x1 convolutions (Glow; PyramidFlow, Sec. 3.1 and eqs. 6-7).

:class:`InvConv1x1` mixes channels with an invertible ``C x C`` matrix in PLU form,

.. math::

    A = P L (U + \\operatorname{diag}(\\sigma \\odot e^{s})), \\qquad
    \\log|\\det A| = \\textstyle\\sum_i s_i,

with a frozen permutation ``P``, a unit lower-triangular ``L``, a strictly upper-triangular
``U``, a frozen sign vector ``sigma`` and a learnt log-scale ``s``. Applied at every pixel of a
``(B, C, H, W)`` input its log-det is ``H * W * sum(s)`` per sample. With volume normalisation
``s`` is replaced by ``s - mean(s)`` and the map preserves volume. With ``lu=False`` the matrix
``A`` itself is the parameter (Glow's plain variant, initialised orthogonal), its log-det
``H * W * log|det A|`` from ``torch.linalg.slogdet``; volume normalisation then uses
``A / |det A|^{1/C}``.

:class:`LiftingConv1x1` embeds ``C_in`` channels into ``C >= C_in`` with ``W in R^{C x C_in}``
(the paper's ``x = W I``): ``(B, C_in, H, W) -> (B, C, H, W)``. It is injective, not bijective;
its inverse is the least-squares solution and its log-det is the volume factor of the embedding,
``H * W * 1/2 log det(W^T W)`` per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    InvertibleModule,
    Shape,
    check_bool,
    check_dtype,
    check_features,
    check_features_shape,
    check_image,
    check_image_shape,
    check_int,
    exact,
    per_sample,
    positions,
    self_contained,
)
from .errors import AutoflowError

__all__ = ["InvConv1x1", "LiftingConv1x1"]


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    return value.to(dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()


def _apply(x: Tensor, matrix: Tensor) -> Tensor:
    """``matrix`` at every position: a 1x1 convolution of images, a linear map of vectors."""
    if x.dim() == 2:
        return F.linear(x, matrix)
    return F.conv2d(x, matrix[:, :, None, None])


def _seeded_generator() -> torch.Generator:
    # A local generator keeps the draw reproducible under torch.manual_seed without depending on
    # how many numbers the draw itself consumes from the global stream.
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


@per_sample
@self_contained
class InvConv1x1(InvertibleModule):
    """Invertible 1x1 convolution with a PLU-parametrised weight, or a plain one.

    On ``(B, C)`` vectors it is the LU linear layer ``y = A x`` (log-det ``sum(s)``).

    Initialised from the LU factorisation of a random orthogonal matrix drawn from a local
    generator seeded from torch's global RNG (``torch.manual_seed`` makes it repeatable).

    The inverse never forms ``A^{-1}`` with a general matrix inverse: it solves the two
    triangular systems ``L Z = P^T`` and ``(U + diag) A^{-1} = Z`` on the ``C x C`` factors
    (cheap, exact up to rounding) and applies ``A^{-1}`` as a 1x1 convolution, which costs the
    same as the forward pass and stays in the input's dtype.

    **Plain variant** (``lu=False``): the parameter is the ``C x C`` matrix ``A`` itself,
    initialised to the same random orthogonal matrix; the log-det is
    ``H W log|det A|`` (``torch.linalg.slogdet``, ``O(C^3)`` per call) and the inverse uses
    ``torch.linalg.inv(A)``. Nothing keeps ``A`` invertible during training: a singular ``A``
    gives a log-det of ``-inf``. With ``volume_norm`` the matrix applied is
    ``A / |det A|^{1/C}``, whose log-det is zero.

    Args:
        channels: Number of channels ``C``.
        volume_norm: Use ``s - mean(s)`` as the log-scale (``A / |det A|^{1/C}`` when
            ``lu=False``) so the log-det is zero (the module is then ``volume_preserving``).
        lu: Parametrise ``A`` in PLU form (default); ``False`` learns ``A`` directly.

    Raises:
        AutoflowError: If ``channels`` is not a positive int, or a switch is not a bool.

    Example:
        >>> import torch, autoflow
        >>> conv = autoflow.InvConv1x1(4)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> y, logdet = conv(x)
        >>> x_back, logdet_inv = conv.inverse(y)
        >>> bool(torch.allclose(x, x_back, atol=1e-5)), tuple(logdet.shape)
        (True, (2,))
        >>> plain = autoflow.InvConv1x1(4, lu=False)  # A learnt as it is
        >>> _, logdet = plain(x)  # orthogonal at init: |det A| = 1
        >>> tuple(plain.matrix.shape), bool(logdet.abs().max() < 1e-4)
        ((4, 4), True)
    """

    perm: Tensor
    sign: Tensor
    lower_mask: Tensor
    upper_mask: Tensor

    def __init__(self, channels: int, *, volume_norm: bool = False, lu: bool = True) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "InvConv1x1")
        # A mode string such as "none" would otherwise read as True.
        self.volume_norm = check_bool(volume_norm, "volume_norm", "InvConv1x1")
        self.lu = check_bool(lu, "lu", "InvConv1x1")
        self.volume_preserving = self.volume_norm
        generator = _seeded_generator()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        if not lu:
            self.matrix = nn.Parameter(q)
            return
        p, lower, upper = torch.linalg.lu(q)
        diag = upper.diagonal()
        self.register_buffer("perm", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("upper_mask", torch.triu(torch.ones(channels, channels), 1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(upper * self.upper_mask)
        self.log_scale = nn.Parameter(diag.abs().log())

    def extra_repr(self) -> str:
        return f"{self.channels}, volume_norm={self.volume_norm}" + (
            "" if self.lu else ", lu=False")

    def _parameter(self) -> Tensor:
        """A parameter giving the module's dtype and device."""
        return self.log_scale if self.lu else self.matrix

    def effective_log_scale(self) -> Tensor:
        """The log-scale ``s`` in use (centred when ``volume_norm`` is set), shape ``(C,)``.

        Raises:
            AutoflowError: For ``lu=False``, which has no log-scale (its log-det is
                ``log|det A|``, see :meth:`log_abs_det`).
        """
        if not self.lu:
            raise AutoflowError(
                "InvConv1x1(lu=False) has no LU log-scale; log_abs_det() gives log|det A|"
            )
        s = self.log_scale
        return s - s.mean() if self.volume_norm else s

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.upper_mask + torch.diag(
            self.sign * self.effective_log_scale().exp()
        )
        return lower, upper

    def log_abs_det(self) -> Tensor:
        """``log|det A|`` of the matrix applied at each position, a scalar: ``sum(s)``, or
        ``torch.linalg.slogdet`` of ``A`` when ``lu=False`` (zero with ``volume_norm``)."""
        if self.lu:
            return self.effective_log_scale().sum()
        if self.volume_norm:
            return self.matrix.new_zeros(())
        return torch.linalg.slogdet(self.matrix).logabsdet

    def weight(self) -> Tensor:
        """The ``(C, C)`` matrix ``A = P L (U + diag(sign * exp(s)))`` (``lu=False``: ``A``,
        divided by ``|det A|^{1/C}`` with ``volume_norm``)."""
        if not self.lu:
            return self._plain_weight()
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def _plain_weight(self) -> Tensor:
        if not self.volume_norm:
            return self.matrix
        logabsdet = torch.linalg.slogdet(self.matrix).logabsdet
        return self.matrix * torch.exp(-logabsdet / self.channels)

    def inverse_weight(self) -> Tensor:
        """``A^{-1} = (U + diag)^{-1} L^{-1} P^T`` from two triangular solves, shape ``(C, C)``
        (``lu=False``: ``torch.linalg.inv`` of :meth:`weight`)."""
        if not self.lu:
            return torch.linalg.inv(self._plain_weight())
        lower, upper = self._factors()
        z = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, z, upper=True)

    def _logdet(self, x: Tensor) -> Tensor:
        return _per_sample(positions(x) * self.log_abs_det(), x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply ``A`` at every pixel.

        Args:
            x: Input of shape ``(B, C, H, W)`` in the module's dtype.

        Returns:
            ``(y, logdet)`` with ``y`` shaped like ``x`` and ``logdet = H W sum(s)``
            (``H W log|det A|``) of shape ``(B,)``.

        Raises:
            ShapeError: If ``x`` is not ``(B, C, H, W)`` with the module's ``C``.
            AutoflowError: If ``x``'s dtype differs from the parameters'.
        """
        check_features(x, self.channels, self)
        dtype = check_dtype(x, self._parameter(), self, "input")
        with exact(x):
            x = x.to(dtype)
            y = _apply(x, self.weight().to(dtype))
            return y, self._logdet(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Apply ``A^{-1}`` at every pixel.

        Args:
            y: Output-side tensor of shape ``(B, C, H, W)``.

        Returns:
            ``(x, logdet_inv)`` with ``logdet_inv = -H W sum(s)`` (``-H W log|det A|``) of
            shape ``(B,)``.

        Raises:
            ShapeError: If ``y`` is not ``(B, C, H, W)`` with the module's ``C``.
            AutoflowError: If ``y``'s dtype differs from the parameters'.
        """
        check_features(y, self.channels, self)
        dtype = check_dtype(y, self._parameter(), self, "input")
        with exact(y):
            y = y.to(dtype)
            x = _apply(y, self.inverse_weight().to(dtype))
            return x, -self._logdet(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        return check_features_shape(input_shape, self.channels, self)

    def input_shape(self, output_shape: Shape) -> Shape:
        return check_features_shape(output_shape, self.channels, self)


class LiftingConv1x1(InvertibleModule):
    """Semi-invertible lifting 1x1 convolution ``y = W x`` with ``W in R^{C x C_in}``.

    ``W`` is orthogonally initialised (``nn.init.orthogonal_``), so ``W^T W = I`` and the
    log-det starts at zero. The module is injective but not onto, so ``bijective`` is ``False``:

    * the inverse is the least-squares solution ``x = argmin ||W x - y||``, computed from the
      reduced QR factorisation ``W = Q R`` as ``x = R^{-1} Q^T y`` (what ``torch.linalg.lstsq``
      does for a full-rank ``W``, and better conditioned than the normal equations, whose
      matrix ``W^T W`` squares the condition number); ``R^{-1} Q^T`` is a ``C_in x C`` matrix
      applied as a 1x1 convolution;
    * the reported log-det ``H W * 1/2 log det(W^T W) = H W sum_i log|R_ii|`` is the volume
      factor of the embedding (the Gram determinant), not a change of variables; the inverse
      reports its negative.

    A numerically rank-deficient ``W`` (smallest singular value at or below
    ``max(C, C_in) * eps * largest``) raises :class:`~autoflow.AutoflowError` in both directions.

    Args:
        channels: Number of output channels ``C``.
        in_channels: Number of input channels ``C_in`` (3 for RGB images), at most ``C``.

    Raises:
        AutoflowError: If a count is not a positive int or ``channels < in_channels``.

    Example:
        >>> import torch, autoflow
        >>> lift = autoflow.LiftingConv1x1(8)
        >>> image = torch.randn(2, 3, 4, 4)
        >>> features, logdet = lift(image)
        >>> back, _ = lift.inverse(features)
        >>> tuple(features.shape), bool(torch.allclose(back, image, atol=1e-5))
        ((2, 8, 4, 4), True)
    """

    bijective = False

    def __init__(self, channels: int, *, in_channels: int = 3) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "LiftingConv1x1")
        self.in_channels = check_int(in_channels, "in_channels", "LiftingConv1x1")
        if channels < in_channels:
            raise AutoflowError(
                f"LiftingConv1x1 lifts to at least as many channels as it takes: expected "
                f"channels >= in_channels, received channels={channels}, in_channels={in_channels}"
            )
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(channels, in_channels)))

    def extra_repr(self) -> str:
        return f"{self.channels}, in_channels={self.in_channels}"

    def _check_rank(self) -> None:
        with torch.no_grad():
            sv = torch.linalg.svdvals(self.weight)
            tol = max(self.weight.shape) * torch.finfo(sv.dtype).eps * sv.max()
            smallest = float(sv.min())
            if smallest > tol:
                return
            rank = int((sv > tol).sum())
        raise AutoflowError(
            f"LiftingConv1x1 needs a weight of full column rank {self.in_channels} (smallest "
            f"singular value above {float(tol):.3g}); received rank {rank} with smallest "
            f"singular value {smallest:.3g}"
        )

    def _qr(self) -> tuple[Tensor, Tensor]:
        self._check_rank()
        return torch.linalg.qr(self.weight, mode="reduced")

    @staticmethod
    def _volume(r: Tensor, x: Tensor) -> Tensor:
        half_logdet_gram = r.diagonal().abs().log().sum()
        return _per_sample(x.shape[2] * x.shape[3] * half_logdet_gram, x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Lift ``x`` from ``C_in`` to ``C`` channels.

        Args:
            x: Input of shape ``(B, C_in, H, W)``.

        Returns:
            ``(y, logdet)`` with ``y`` of shape ``(B, C, H, W)`` and
            ``logdet = H W * 1/2 log det(W^T W)`` of shape ``(B,)``.

        Raises:
            ShapeError: If ``x`` is not ``(B, C_in, H, W)``.
            AutoflowError: If ``W`` is numerically rank-deficient or the dtype differs.
        """
        check_image(x, self.in_channels, self)
        dtype = check_dtype(x, self.weight, self, "input")
        with exact(x):
            x = x.to(dtype)
            _, r = self._qr()
            return F.conv2d(x, self.weight.to(dtype)[:, :, None, None]), self._volume(r, x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Least-squares preimage of ``y``.

        Args:
            y: Tensor of shape ``(B, C, H, W)``.

        Returns:
            ``(x, logdet_inv)`` with ``x`` of shape ``(B, C_in, H, W)`` minimising
            ``||W x - y||`` at every pixel and ``logdet_inv = -H W * 1/2 log det(W^T W)``.

        Raises:
            ShapeError: If ``y`` is not ``(B, C, H, W)``.
            AutoflowError: If ``W`` is numerically rank-deficient or the dtype differs.
        """
        check_image(y, self.channels, self)
        dtype = check_dtype(y, self.weight, self, "input")
        with exact(y):
            y = y.to(dtype)
            q, r = self._qr()
            pinv = torch.linalg.solve_triangular(r, q.T, upper=True)
            return F.conv2d(y, pinv.to(dtype)[:, :, None, None]), -self._volume(r, y)

    def output_shape(self, input_shape: Shape) -> Shape:
        _, h, w = check_image_shape(input_shape, self.in_channels, self)
        return (self.channels, h, w)

    def input_shape(self, output_shape: Shape) -> Shape:
        _, h, w = check_image_shape(output_shape, self.channels, self)
        return (self.in_channels, h, w)
