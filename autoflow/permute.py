"""Fixed channel permutation: ``y[:, i] = x[:, perm[i]]``, log-det exactly 0.

Input and output are ``(B, C, H, W)`` or ``(B, C)``. The permutation is a buffer, so it is
saved with the ``state_dict``; the inverse applies ``argsort(perm)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    InvertibleModule,
    Shape,
    check_features,
    check_features_shape,
    check_int,
    per_sample,
    self_contained,
)
from .errors import AutoflowError

__all__ = ["Permute"]

_KINDS = ("random", "reverse")


@per_sample
@self_contained
class Permute(InvertibleModule):
    """Permute channels by a fixed random, reversing or given permutation.

    A random permutation is drawn from a local generator seeded from torch's global RNG, so
    ``torch.manual_seed`` makes it repeatable.

    Args:
        channels: Number of channels ``C``.
        kind: ``"random"`` (the default) or ``"reverse"``.
        order: A given permutation instead, ``y[:, i] = x[:, order[i]]``: a sequence or 1-D
            integer tensor holding each of ``0 .. C-1`` once (e.g. the same permutation as
            another library's model).

    Raises:
        AutoflowError: If ``channels`` is not a positive int, ``kind`` is unknown, ``order``
            is not a permutation of ``0 .. C-1``, or both ``kind`` and ``order`` are given.

    Example:
        >>> import torch, autoflow
        >>> perm = autoflow.Permute(3, kind="reverse")
        >>> y, logdet = perm(torch.arange(3.0).view(1, 3, 1, 1))
        >>> y.flatten().tolist(), logdet.tolist()
        ([2.0, 1.0, 0.0], [0.0])
    """

    volume_preserving = True
    perm: Tensor
    inverse_perm: Tensor

    def __init__(self, channels: int, *, kind: str | None = None,
                 order: Sequence[int] | Tensor | None = None) -> None:
        super().__init__()
        check_int(channels, "channels", "Permute")
        if order is not None:
            if kind is not None:
                raise AutoflowError(f"Permute takes a kind or an order, not both; received "
                                    f"kind={kind!r} and an order")
            perm = _permutation(order, channels)
            kind = "order"
        elif kind is None:
            kind = "random"
        elif kind not in _KINDS:
            raise AutoflowError(f"Permute kind must be one of {_KINDS}, received {kind!r}")
        self.channels = channels
        self.kind = kind
        if kind == "reverse":
            perm = torch.arange(channels - 1, -1, -1)
        elif kind == "random":
            seed = int(torch.randint(0, 2**62, (1,)).item())
            perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def extra_repr(self) -> str:
        if self.kind == "order":
            return f"{self.channels}, order={self.perm.tolist()}"
        return f"{self.channels}, kind={self.kind!r}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Permute the channels of ``x`` (``(B, C, H, W)`` or ``(B, C)``); log-det zeros ``(B,)``.

        Raises:
            ShapeError: If ``x`` is not ``(B, C, H, W)`` with the module's ``C``.
        """
        check_features(x, self.channels, self)
        # index_select rather than x[:, perm]: the same gather, without advanced indexing's
        # dispatch (about 3x faster on the small states of a multi-scale flow).
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Undo the permutation; log-det zeros ``(B,)``.

        Raises:
            ShapeError: If ``y`` is not ``(B, C, H, W)`` with the module's ``C``.
        """
        check_features(y, self.channels, self)
        return y.index_select(1, self.inverse_perm), y.new_zeros(y.shape[0])

    def output_shape(self, input_shape: Shape) -> Shape:
        return check_features_shape(input_shape, self.channels, self)

    def input_shape(self, output_shape: Shape) -> Shape:
        return check_features_shape(output_shape, self.channels, self)


def _permutation(order: object, channels: int) -> Tensor:
    """``order`` as a long tensor, after checking it holds each of ``0 .. channels-1`` once."""
    try:
        perm = torch.as_tensor(order)
    except (TypeError, ValueError, RuntimeError):
        perm = None
    if (perm is None or perm.dim() != 1 or perm.is_floating_point() or perm.is_complex()
            or perm.dtype == torch.bool
            or not torch.equal(perm.sort().values.long(), torch.arange(channels))):
        raise AutoflowError(
            f"Permute order must hold each of 0 .. {channels - 1} once (a permutation of the "
            f"{channels} channels), received {order!r}"
        )
    return perm.long().clone()
