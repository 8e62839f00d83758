"""Small user-style invertible modules that the engine tests run through the kit."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autoflow import InvertibleModule


class ToyCoupling(InvertibleModule):
    """An affine coupling written the way a user would, with a configurable conditioner."""

    def __init__(self, channels: int, *, dropout: float = 0.0, batch_norm: bool = False,
                 skip: bool = False) -> None:
        super().__init__()
        half = channels // 2
        layers: list[nn.Module] = [nn.Conv2d(half, 2 * (channels - half), 3, padding=1)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        if batch_norm:
            layers.append(nn.BatchNorm2d(2 * (channels - half)))
        self.net = nn.Sequential(*layers)
        self.skip = nn.Conv2d(half, 2 * (channels - half), 1) if skip else None
        self.half = half

    def _scale_shift(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x0)
        if self.skip is not None:
            h = h + self.skip(x0)
        s, t = h.chunk(2, 1)
        return torch.tanh(s), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x0, x1 = x[:, : self.half], x[:, self.half:]
        s, t = self._scale_shift(x0)
        return torch.cat([x0, x1 * s.exp() + t], 1), s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y0, y1 = y[:, : self.half], y[:, self.half:]
        s, t = self._scale_shift(y0)
        return torch.cat([y0, (y1 - t) * (-s).exp()], 1), -s.flatten(1).sum(1)


class Flip(InvertibleModule):
    """Reverse the channel order; volume-preserving."""

    volume_preserving = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.flip(1), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y.flip(1), y.new_zeros(y.shape[0])


class LevelMix(InvertibleModule):
    """Shift the finer of two pyramid levels by a function of the upsampled coarser level."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Conv2d(channels, 2 * channels, 3, padding=1)

    def _scale_shift(self, coarse: Tensor, size) -> tuple[Tensor, Tensor]:
        h = self.net(nn.functional.interpolate(coarse, size=size, mode="bilinear"))
        s, t = h.chunk(2, 1)
        return 0.5 * torch.tanh(s), t

    def forward(self, x: tuple[Tensor, Tensor]):
        fine, coarse = x
        s, t = self._scale_shift(coarse, fine.shape[-2:])
        return (fine * s.exp() + t, coarse), s.flatten(1).sum(1)

    def inverse(self, y: tuple[Tensor, Tensor]):
        fine, coarse = y
        s, t = self._scale_shift(coarse, fine.shape[-2:])
        return ((fine - t) * (-s).exp(), coarse), -s.flatten(1).sum(1)


class NoInverse(InvertibleModule):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(x.shape[0])


class ShapeChanger(Flip):
    """A broken module whose inverse returns the wrong shape."""

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[:, :-1], y.new_zeros(y.shape[0])


def perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Randomise every parameter, so zero-initialised layers do not hide errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def randomize_conditioner(module: nn.Module, scale: float = 0.5, seed: int = 0) -> nn.Module:
    """Give every conditioner's zero-initialised last layer random weights, in place.

    The default conditioners start as the identity map (s = t = 0), under which inverses,
    log-dets and gradients would be checked only trivially.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            conditioner = getattr(sub, "conditioner", None)
            if isinstance(conditioner, nn.Sequential):
                for p in conditioner[-1].parameters():
                    p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module
