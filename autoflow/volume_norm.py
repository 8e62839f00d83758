"""Volume normalisation of a log-scale (PyramidFlow, Sec. 3.2 and Fig. 4).

An affine map ``y = exp(s) * x + t`` changes log-volume by ``sum(s)``. Volume normalisation
centres the log-scale before it is used, ``s' = s - mean(s)``, so that the map redistributes
volume instead of creating it:

* ``mode="channel"`` (CVN) averages over the batch and the channels, dims ``(0, 1)``: every pixel
  position's log-volume is centred. The running mean has shape ``(1, 1, H, W)``.
* ``mode="spatial"`` (SVN) averages over the batch and space, dims ``(0, 2, 3)``: every channel's
  log-volume is centred. The running mean has shape ``(1, C, 1, 1)``.

Like batch normalisation, training mode subtracts the batch mean and (when ``update`` is true)
tracks ``r <- (1 - momentum) * r + momentum * mean``; eval mode subtracts ``r``. Shapes:
``log_scale`` is ``(B, C, H, W)`` and the result has the same shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import check_image, self_contained
from .errors import AutoflowError, ShapeError

__all__ = ["VolumeNorm"]

_DIMS = {"channel": (0, 1), "spatial": (0, 2, 3)}


@self_contained
class VolumeNorm(nn.Module):
    """Subtract the mean of a log-scale so an affine map preserves volume on average.

    The running mean is a buffer ``running_mean`` created lazily (zeros) on first use with the
    shape the mode needs; until then it is an empty tensor. Like any buffer it keeps the
    module's dtype (set it with ``.to(dtype)``). Loading a state dict resizes it to the stored
    shape.

    Args:
        mode: ``"channel"`` (CVN, mean over batch and channels) or ``"spatial"`` (SVN, mean over
            batch and space).
        momentum: Weight of the new batch mean in the running mean, in ``[0, 1]``.

    Raises:
        AutoflowError: If ``mode`` is unknown or ``momentum`` is outside ``[0, 1]``.

    Example:
        >>> import torch, autoflow
        >>> norm = autoflow.VolumeNorm("spatial")
        >>> s = torch.randn(2, 3, 4, 4)
        >>> out = norm(s)
        >>> bool(out.mean(dim=(0, 2, 3)).abs().max() < 1e-6), tuple(norm.running_mean.shape)
        (True, (1, 3, 1, 1))
    """

    running_mean: Tensor

    def __init__(self, mode: str = "channel", *, momentum: float = 0.1) -> None:
        super().__init__()
        if mode not in _DIMS:
            raise AutoflowError(
                f"VolumeNorm mode must be one of {sorted(_DIMS)}, received {mode!r}"
            )
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise AutoflowError(
                f"VolumeNorm momentum must be a float in [0, 1], received {momentum!r}"
            )
        if not 0.0 <= float(momentum) <= 1.0:
            raise AutoflowError(f"VolumeNorm momentum must be in [0, 1], received {momentum}")
        self.mode = mode
        self.momentum = float(momentum)
        self.register_buffer("running_mean", torch.zeros(0))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, momentum={self.momentum}"

    def _stat_shape(self, log_scale: Tensor, height: int) -> tuple[int, ...]:
        _, c, _, w = log_scale.shape
        return (1, 1, height, w) if self.mode == "channel" else (1, c, 1, 1)

    def _check_running_shape(self, shape: tuple[int, ...], what: str) -> None:
        have = tuple(self.running_mean.shape)
        if have != shape:
            sizes = "H, W" if self.mode == "channel" else "C"
            raise ShapeError(
                f"VolumeNorm(mode={self.mode!r}) {what} needs a running mean of shape {shape} for "
                f"this input, but its running mean has shape {have} (built for a different "
                f"{sizes}); use one VolumeNorm per input size"
            )

    def forward(self, log_scale: Tensor, update: bool = True,
                rows: tuple[int, int, int] | None = None) -> Tensor:
        """Centre ``log_scale`` with the batch mean (training) or the running mean (eval).

        Args:
            log_scale: Log-scale of shape ``(B, C, H, W)``.
            update: In training mode, whether to update the running mean (couplings pass
                ``False`` in their inverse). Ignored in eval mode.
            rows: ``(start, stop, height)`` when ``log_scale`` holds only rows
                ``start:stop`` of a log-scale ``height`` rows tall (a coupling evaluated in
                row bands, :mod:`autoflow.banded`). Channel mode only: its mean is taken per
                position, so a band is centred, and its running mean updated, exactly as
                inside the whole map.

        Returns:
            The centred log-scale, same shape, dtype and device as ``log_scale``.

        Raises:
            ShapeError: If ``log_scale`` is not 4-D, or the running mean was built for another
                ``H, W`` (CVN) or ``C`` (SVN) and is needed here.
            AutoflowError: If ``rows`` is given in spatial mode, whose mean spans all rows.
            ValueError: If ``rows`` is not three ints with ``0 <= start < stop <= height``
                and ``stop - start`` equal to ``log_scale``'s height.
        """
        check_image(log_scale, None, self, name="log_scale")
        band, height = self.band_of(log_scale, rows)
        shape = self._stat_shape(log_scale, height)
        if self.running_mean.numel() == 0:
            # The empty placeholder follows module.to(), so the buffer keeps the module's dtype
            # and device like any other buffer.
            placeholder = self.running_mean
            self.running_mean = placeholder.new_zeros(shape)
        if self.training:
            mean = log_scale.mean(dim=_DIMS[self.mode], keepdim=True)
            if update:
                self._check_running_shape(shape, "update")
                with torch.no_grad():
                    self.running_mean[:, :, band].mul_(1.0 - self.momentum).add_(
                        mean.detach().to(self.running_mean.dtype), alpha=self.momentum
                    )
            return log_scale - mean
        self._check_running_shape(shape, "in eval mode")
        return log_scale - self.running_mean[:, :, band].to(log_scale.dtype)

    def band_of(self, log_scale: Tensor,
                rows: tuple[int, int, int] | None) -> tuple[slice, int]:
        """The rows of the running mean that ``log_scale`` covers, and the whole height.

        Args:
            log_scale: Log-scale of shape ``(B, C, H_band, W)``.
            rows: ``(start, stop, height)`` as in :meth:`forward`, or ``None`` (all rows).

        Returns:
            ``(slice(start, stop), height)``, or ``(slice(None), H_band)`` for ``None``.

        Raises:
            AutoflowError: If ``rows`` is given in spatial mode, whose mean spans all rows.
            ValueError: If ``rows`` is not three ints with ``0 <= start < stop <= height``
                and ``stop - start == H_band``.
        """
        band_height = log_scale.shape[2]
        if rows is None:
            return slice(None), band_height
        if self.mode != "channel":
            raise AutoflowError(
                f"VolumeNorm(mode={self.mode!r}) averages over all rows, so it cannot "
                f"centre a band of rows, received rows={rows!r}; use mode='channel'"
            )
        valid = (isinstance(rows, tuple) and len(rows) == 3
                 and all(isinstance(n, int) and not isinstance(n, bool) for n in rows))
        if not valid or not 0 <= rows[0] < rows[1] <= rows[2] or rows[1] - rows[0] != band_height:
            raise ValueError(
                f"VolumeNorm expected rows=(start, stop, height) as ints with "
                f"0 <= start < stop <= height and stop - start = {band_height} (the "
                f"log-scale's height), received {rows!r}"
            )
        return slice(rows[0], rows[1]), rows[2]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The buffer's size is state (it depends on the data seen), so adopt the stored size
        # before the default loader compares shapes.
        key = prefix + "running_mean"
        stored = state_dict.get(key)
        if isinstance(stored, Tensor) and stored.shape != self.running_mean.shape:
            if stored.numel() != 0 and not self._valid_running_shape(tuple(stored.shape)):
                expected = "(1, 1, H, W)" if self.mode == "channel" else "(1, C, 1, 1)"
                raise ShapeError(
                    f"VolumeNorm(mode={self.mode!r}) expected a stored running mean of shape "
                    f"{expected} (or empty), received {tuple(stored.shape)} under '{key}'"
                )
            self.running_mean = torch.empty(
                stored.shape, dtype=self.running_mean.dtype, device=self.running_mean.device
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _valid_running_shape(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != 4 or shape[0] != 1:
            return False
        return shape[1] == 1 if self.mode == "channel" else shape[2:] == (1, 1)
