"""A frozen ResNet-18 stem (conv1 ... layer1) in plain torch, loading torchvision-format weights.

Maps ``(B, 3, H, W)`` images in ``[0, 1]`` to ``(B, 64, H / 4, W / 4)`` features. Nothing is
downloaded: the weights come from a local file holding a torchvision ``resnet18`` state dict
(other keys, e.g. ``fc.weight``, are ignored).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ResNet18Stem"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class _BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class ResNet18Stem(nn.Module):
    """Frozen ResNet-18 ``conv1``, ``bn1``, max-pool and ``layer1``, always in eval mode.

    Args:
        weights: Path to a torchvision-format ResNet-18 state dict (``torch.save``'d).

    Raises:
        FileNotFoundError: If ``weights`` does not exist.
        ValueError: If the file lacks a stem parameter or has one of the wrong shape.
    """

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(_BasicBlock(64), _BasicBlock(64))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self._load(Path(weights))
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"ResNet-18 weights not found at '{path}': pass a local file holding a "
                "torchvision resnet18 state dict (nothing is downloaded)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = {k: v for k, v in self.state_dict().items() if k not in ("mean", "std")}
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise ValueError(f"'{path}' is not a ResNet-18 state dict: missing {missing[:4]}...")
        for key, value in own.items():
            if state[key].shape != value.shape:
                raise ValueError(f"'{path}': {key} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(value.shape)}")
        self.load_state_dict({k: state[k] for k in own} | {"mean": self.mean, "std": self.std})

    def train(self, mode: bool = True) -> ResNet18Stem:
        # Frozen: batch norm keeps its ImageNet statistics whatever the surrounding model does.
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.mean) / self.std
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer1(x)
