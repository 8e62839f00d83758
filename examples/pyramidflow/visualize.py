"""PNG figures like the paper's Fig. 7: image, image template, heatmap overlay, ground truth.

Drawn with Pillow and a small jet-like colormap in NumPy (no plotting library). Tiles are
enlarged with nearest-neighbour sampling to at least ``min_side`` pixels, so small images stay
legible and every pixel of the model's resolution remains visible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image, ImageDraw

from .files import write_atomically

__all__ = ["colormap", "color_range", "heatmap_overlay", "panel", "save_image", "save_panel",
           "to_rgb8"]

# Dark blue -> blue -> cyan -> yellow -> red -> dark red, evenly spaced on [0, 1].
_ANCHORS = np.array([
    [0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0],
    [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0],
])
_CAPTION_HEIGHT = 14
_GAP = 4


def colormap(values: ArrayLike) -> NDArray[np.uint8]:
    """Map values in ``[0, 1]`` (clipped) to jet-like RGB colours.

    Args:
        values: Any shape ``(...)``.

    Returns:
        ``(..., 3)`` uint8 colours.

    Example:
        >>> colormap([0.0, 1.0]).tolist()
        [[0, 0, 128], [128, 0, 0]]
    """
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_ANCHORS))
    channels = [np.interp(values, positions, _ANCHORS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def color_range(maps: ArrayLike) -> tuple[float, float]:
    """A shared colour scale for a set of maps: their 1st and 99.9th percentiles.

    Percentiles rather than extremes, so one outlier pixel does not wash out the others.
    """
    low, high = np.quantile(np.asarray(maps, dtype=np.float64), [0.01, 0.999])
    return float(low), float(max(high, low + 1e-12))


def to_rgb8(image: ArrayLike) -> NDArray[np.uint8]:
    """A ``(3, H, W)`` or ``(H, W)`` float image in ``[0, 1]`` (clipped) as ``(H, W, 3)`` uint8."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = np.repeat(array[None], 3, axis=0)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) or (H, W) image, received shape {array.shape}")
    return np.round(np.clip(array, 0.0, 1.0).transpose(1, 2, 0) * 255).astype(np.uint8)


def heatmap_overlay(image: ArrayLike, anomaly_map: ArrayLike, low: float, high: float,
                    alpha: float = 0.5) -> NDArray[np.uint8]:
    """Blend a colour-mapped anomaly map over an image.

    Args:
        image: ``(3, H, W)`` float image in ``[0, 1]``.
        anomaly_map: ``(H, W)`` scores.
        low, high: Scores shown as the coldest and hottest colours.
        alpha: Weight of the heatmap.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    scores = np.asarray(anomaly_map, dtype=np.float64)
    rgb = to_rgb8(image).astype(np.float64)
    if scores.shape != rgb.shape[:2]:
        raise ValueError(f"anomaly_map has shape {scores.shape}, expected the image's "
                         f"{rgb.shape[:2]}")
    heat = colormap((scores - low) / max(high - low, 1e-12)).astype(np.float64)
    return np.round((1 - alpha) * rgb + alpha * heat).astype(np.uint8)


def panel(
    image: ArrayLike,
    anomaly_map: ArrayLike,
    *,
    template: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    mask_title: str = "ground truth",
    color_scale: tuple[float, float] | None = None,
    min_side: int = 128,
) -> Image.Image:
    """One row of Fig. 7: image, image template, heatmap overlay, ground truth.

    Args:
        image: ``(3, H, W)`` float image in ``[0, 1]``.
        anomaly_map: ``(H, W)`` scores.
        template: ``(3, H, W)`` image template, or None to leave its tile out.
        mask: ``(H, W)`` binary mask (ground truth or predicted), or None to leave it out.
        mask_title: Caption of the mask tile.
        color_scale: ``(low, high)`` of the heatmap; the map's own range when None.
        min_side: Tiles are enlarged (nearest neighbour) to at least this height.

    Returns:
        The panel as an RGB Pillow image.
    """
    scores = np.asarray(anomaly_map, dtype=np.float64)
    low, high = color_scale if color_scale is not None else (scores.min(), scores.max())
    tiles = [("image", to_rgb8(image))]
    if template is not None:
        tiles.append(("image template", to_rgb8(template)))
    tiles.append(("anomaly map", heatmap_overlay(image, scores, low, high)))
    if mask is not None:
        tiles.append((mask_title, to_rgb8(np.asarray(mask, dtype=np.float64))))
    return _row(tiles, min_side)


def _row(tiles: Sequence[tuple[str, NDArray[np.uint8]]], min_side: int) -> Image.Image:
    height, width = tiles[0][1].shape[:2]
    scale = max(1, -(-min_side // height))  # ceiling division
    side_h, side_w = height * scale, width * scale
    canvas = Image.new("RGB", (len(tiles) * (side_w + _GAP) - _GAP, side_h + _CAPTION_HEIGHT),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for index, (title, pixels) in enumerate(tiles):
        left = index * (side_w + _GAP)
        tile = Image.fromarray(pixels).resize((side_w, side_h), Image.Resampling.NEAREST)
        canvas.paste(tile, (left, _CAPTION_HEIGHT))
        draw.text((left + 2, 1), title, fill="black")
    return canvas


def save_panel(path: str | os.PathLike[str], image: ArrayLike, anomaly_map: ArrayLike,
               **options: object) -> Path:
    """Write :func:`panel` as a PNG (options as there), creating the folder; atomic.

    Returns:
        The file's path.
    """
    drawn = panel(image, anomaly_map, **options)  # type: ignore[arg-type]
    return write_atomically(path, lambda partial: drawn.save(partial, format="PNG"))


def save_image(path: str | os.PathLike[str], image: ArrayLike, min_side: int = 0) -> Path:
    """Write a ``(3, H, W)`` image in ``[0, 1]`` as a PNG enlarged to ``min_side``; atomic.

    Returns:
        The file's path.
    """
    pixels = Image.fromarray(to_rgb8(image))
    scale = max(1, -(-min_side // pixels.height)) if min_side else 1
    if scale > 1:
        pixels = pixels.resize((pixels.width * scale, pixels.height * scale),
                               Image.Resampling.NEAREST)
    return write_atomically(path, lambda partial: pixels.save(partial, format="PNG"))
