"""Activation normalisation (Glow): a per-channel affine map with data-dependent init.

.. math::

    y = (x + b) \\odot e^{\\ell}, \\qquad \\log|\\det J| = H W \\textstyle\\sum_c \\ell_c,

with ``b`` and ``ell`` of shape ``(1, C, 1, 1)``, input and output ``(B, C, H, W)``. On the first
forward call in training mode, ``b = -mean(x)`` and ``ell = -log(std(x) + eps)`` per channel
(over batch and space), so that first batch comes out with zero mean and unit standard
deviation; a boolean buffer ``initialized`` records this so it survives ``state_dict`` and is
never redone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import (
    InvertibleModule,
    Reconstruction,
    Shape,
    check_dtype,
    check_features,
    check_features_shape,
    check_int,
    exact,
    per_sample,
    positions,
    recompute,
    self_contained,
)
from .errors import AutoflowError

__all__ = ["ActNorm"]


@per_sample
@self_contained
class ActNorm(InvertibleModule):
    """Per-channel affine normalisation ``y = (x + b) * exp(log_scale)``.

    Takes ``(B, C, H, W)`` images or ``(B, C)`` vectors (``H W = 1``); the log-det is
    ``H W sum(log_scale)`` per sample.

    The inverse never initialises: before the first training forward it uses the current
    parameters (the identity map).

    Args:
        channels: Number of channels ``C``.
        eps: Added to the standard deviation at initialisation, so a constant channel gets a
            large but finite scale.

    Raises:
        AutoflowError: If ``channels`` is not a positive int or ``eps`` is not positive.

    Example:
        >>> import torch, autoflow
        >>> norm = autoflow.ActNorm(3)
        >>> x = 5 + 2 * torch.randn(4, 3, 8, 8)
        >>> y, logdet = norm(x)
        >>> bool(y.mean().abs() < 1e-5), bool(norm.initialized), tuple(logdet.shape)
        (True, True, (4,))
    """

    initialized: Tensor

    def __init__(self, channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        check_int(channels, "channels", "ActNorm")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise AutoflowError(f"ActNorm expected a positive float eps, received {eps!r}")
        self.channels = channels
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, initialized={bool(self.initialized)}"

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``b`` and ``log_scale`` so ``x`` maps to zero mean, unit std per channel.

        Args:
            x: A batch of shape ``(B, C, H, W)`` or ``(B, C)``.
        """
        check_features(x, self.channels, self)
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dim=dims).reshape(self.bias.shape)
        std = x.std(dim=dims, correction=0).reshape(self.bias.shape)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-(std + self.eps).log())
        self.initialized.fill_(True)

    def _shaped(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Parameters are stored (1, C, 1, 1); a vector batch needs them (1, C).
        shape = (1, self.channels, *([1] * (x.dim() - 2)))
        return self.bias.to(dtype).reshape(shape), self.log_scale.to(dtype).reshape(shape)

    def _logdet(self, x: Tensor) -> Tensor:
        total = positions(x) * self.log_scale.sum()
        return total.to(dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalise ``x``, initialising from it first if training and not yet initialised.

        Args:
            x: Input of shape ``(B, C, H, W)``.

        Returns:
            ``(y, logdet)`` with ``y`` shaped like ``x`` and ``logdet`` of shape ``(B,)``.

        Raises:
            ShapeError: If ``x`` is not ``(B, C, H, W)`` with the module's ``C``.
            AutoflowError: If ``x``'s dtype differs from the parameters'.
        """
        check_features(x, self.channels, self)
        dtype = check_dtype(x, self.log_scale, self)
        with exact(x):
            x = x.to(dtype)
            if self.training and not bool(self.initialized):
                self.initialize(x)
            return self._normalize(x, dtype), self._logdet(x)

    def _normalize(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        bias, log_scale = self._shaped(x, dtype)
        return (x + bias) * log_scale.exp()

    def reconstruct_inverse(self, x: Tensor, *, context: Tensor | None = None
                            ) -> Reconstruction:
        """Rebuild the input of ``inverse`` with the current parameters.

        ``inverse`` never initialises, so neither may its rebuild: the default one runs
        ``forward``, which in training mode would initialise from ``x`` in the middle of a
        backward pass and give gradients of a map that was never applied.
        """
        check_features(x, self.channels, self)
        dtype = check_dtype(x, self.log_scale, self)
        with torch.no_grad(), exact(x):
            y = self._normalize(x.to(dtype), dtype)
        return recompute(self.inverse, y)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the affine map with the current parameters (never initialises).

        Args:
            y: Tensor of shape ``(B, C, H, W)``.

        Returns:
            ``(x, logdet_inv)`` with ``logdet_inv = -H W sum(log_scale)`` of shape ``(B,)``.

        Raises:
            ShapeError: If ``y`` is not ``(B, C, H, W)`` with the module's ``C``.
            AutoflowError: If ``y``'s dtype differs from the parameters'.
        """
        check_features(y, self.channels, self)
        dtype = check_dtype(y, self.log_scale, self)
        with exact(y):
            y = y.to(dtype)
            bias, log_scale = self._shaped(y, dtype)
            x = y * (-log_scale).exp() - bias
            return x, -self._logdet(y)

    def output_shape(self, input_shape: Shape) -> Shape:
        return check_features_shape(input_shape, self.channels, self)

    def input_shape(self, output_shape: Shape) -> Shape:
        return check_features_shape(output_shape, self.channels, self)
