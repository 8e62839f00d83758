"""PNG helpers without matplotlib: image grids and a perceptual colormap in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["colormap", "save_grid", "save_rgb"]

# Anchor colours of matplotlib's "viridis" at 0, 1/8, ..., 1; linear in between is close enough.
_VIRIDIS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` (any shape ``S``) to viridis RGB, ``uint8`` of shape ``S + (3,)``.

    Example:
        >>> colormap(np.array([0.0, 1.0])).tolist()
        [[68, 1, 84], [253, 231, 37]]
    """
    position = np.clip(values, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(position.astype(int), len(_VIRIDIS) - 2)
    frac = (position - low)[..., None]
    rgb = (1 - frac) * _VIRIDIS[low] + frac * _VIRIDIS[low + 1]
    return np.round(rgb).astype(np.uint8)


def save_grid(images: np.ndarray, path: str | Path, *, columns: int = 8, zoom: int = 4,
              pad: int = 1) -> Path:
    """Save grey images ``(N, H, W)`` with values in ``[0, 1]`` as one PNG grid.

    Args:
        images: The images; values outside ``[0, 1]`` are clipped.
        path: Output file.
        columns: Images per row.
        zoom: Nearest-neighbour upscaling factor, so 8x8 digits are visible.
        pad: Pixels of (white) padding around each image, before zooming.

    Returns:
        The path written.
    """
    n, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad))
    for i, image in enumerate(np.clip(images, 0.0, 1.0)):
        r, c = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top:top + h, left:left + w] = image
    canvas = np.kron(canvas, np.ones((zoom, zoom)))
    return save_rgb(np.repeat((canvas * 255).round().astype(np.uint8)[..., None], 3, axis=2), path)


def save_rgb(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W, 3)`` ``uint8`` array as a PNG, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path
