"""A procedural defect dataset: textures or objects with exactly known defects.

:class:`SyntheticDefects` needs no files, so the example's ``demo`` runs anywhere.
Like one MVTec AD category, a dataset has a single normal appearance fixed by its
``seed`` (a stripe, grid or mottled texture; or a disc or rounded square with a
printed ring and bar on a plain background), and every image is a new shot of it:
the texture's phase, angle and scale change, the object moves, turns and changes
size by a few percent, and each shot has its own light (gain and a falloff across
the image) and sensor noise (see the module's constants). The variation is large
enough that an image's distance to the mean normal image does not localise the
defects, so a detector has to learn what normal looks like: the demo's untrained
model scores far below its trained one.

Test images alternate between normal (even indices) and defective (odd indices),
and the defective ones cycle through :data:`DEFECT_CYCLE`. A defect is painted over
the normal image, and a pixel counts as defective only if the painting changed it
by at least :data:`MIN_VISIBLE_CHANGE` in some channel; other pixels keep their
normal value. The mask is therefore exactly the set of pixels that differ from the
defect-free rendering, which :meth:`SyntheticDefects.render` also returns.

Everything is drawn from NumPy generators seeded by (seed, kind, split, index), so
an item is the same whichever worker renders it and in whatever order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset

from .datasets import ImageSize, Sample, as_image_size

__all__ = [
    "DEFECT_CYCLE",
    "DEFECT_KINDS",
    "LIGHT_GAIN",
    "LIGHT_SLOPE",
    "MIN_VISIBLE_CHANGE",
    "NOISE",
    "OBJECT_SCALE",
    "OBJECT_SHIFT",
    "OBJECT_TURN",
    "TEXTURE_STRETCH",
    "TEXTURE_TURN",
    "Rendering",
    "SyntheticDefects",
]

DEFECT_KINDS = ("scratch", "stain", "hole", "cut", "misprint")
"""Defect types painted on defective test images. A misprint shows the pattern (texture)
or print (object) shifted and turned within a patch: the right colours in the wrong
place."""

DEFECT_CYCLE = ("scratch", "misprint", "stain", "misprint", "hole", "misprint", "cut",
                "misprint")
"""The order in which defective test images take their defect: every other one is a
misprint. Scratches, stains, holes and cuts change colours, so comparing an image with
the training images already finds them; a misprint is found only by a model that has
learned where the pattern belongs, so it is what shows whether training worked."""

MIN_VISIBLE_CHANGE = 0.12
"""Smallest change (largest over the RGB channels) of a pixel marked defective."""

TEXTURE_TURN = 0.15
"""Largest turn (radians) of a texture's pattern from one image to the next."""

TEXTURE_STRETCH = 0.1
"""Largest relative change of a texture's pattern frequency from one image to the next."""

OBJECT_SHIFT = 0.05
"""Largest shift of an object, as a fraction of the image side."""

OBJECT_TURN = 0.2
"""Largest turn (radians) of an object."""

OBJECT_SCALE = 0.05
"""Largest relative change of an object's size."""

LIGHT_GAIN = 0.12
"""Largest relative change of a shot's overall brightness."""

LIGHT_SLOPE = 0.3
"""Largest relative brightness difference across the image from uneven light."""

NOISE = 0.02
"""Standard deviation of the sensor noise."""

_KINDS = ("texture", "object")
_SPLITS = ("train", "test")
_DEFAULT_NUM_IMAGES = {"train": 128, "test": 64}
_MIN_SIDE = 16
_MIN_DEFECT_PIXELS = 4
_ATTEMPTS = 10
_STYLE_STREAM, _NORMAL_STREAM, _DEFECT_STREAM = range(3)

Grid = tuple[NDArray[np.float32], NDArray[np.float32]]


class Rendering(NamedTuple):
    """One synthetic image together with its defect-free version.

    Attributes:
        normal: (3, H, W) float32 image without the defect.
        image: (3, H, W) float32 image; equal to ``normal`` wherever ``mask`` is False.
        mask: (H, W) bool, True exactly where ``image`` differs from ``normal``.
        defect: The painted defect kind, or None for a normal image.
    """

    normal: NDArray[np.float32]
    image: NDArray[np.float32]
    mask: NDArray[np.bool_]
    defect: str | None


class SyntheticDefects(Dataset[Sample]):
    """Procedurally generated textures or objects with pixel-exact defect masks.

    Args:
        kind: ``"texture"`` or ``"object"``.
        split: ``"train"`` (normal images only) or ``"test"`` (odd indices defective).
        num_images: Number of images; defaults to 128 for train and 64 for test.
        image_size: Output size, a square side or (height, width), at least 16.
        seed: Fixes the normal appearance (shared by both splits) and every image.

    Raises:
        ValueError: On an unknown ``kind`` or ``split``, or a non-positive
            ``num_images``, negative ``seed`` or too small ``image_size``.

    Example:
        >>> test_set = SyntheticDefects("object", "test", num_images=4, image_size=32)
        >>> [sample["label"] for sample in test_set]
        [0, 1, 0, 1]
        >>> test_set[1]["path"]
        'synthetic/object/seed0/test/scratch/0001'
    """

    has_masks = True

    def __init__(
        self,
        kind: Literal["texture", "object"] = "texture",
        split: Literal["train", "test"] = "train",
        num_images: int | None = None,
        image_size: ImageSize = 64,
        seed: int = 0,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        num_images = _DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.image_size = as_image_size(image_size)
        if min(self.image_size) < _MIN_SIDE:
            raise ValueError(
                f"image_size must be at least {_MIN_SIDE} pixels per side, got {self.image_size}"
            )
        self.kind, self.split, self.num_images, self.seed = kind, split, num_images, seed
        height, width = self.image_size
        self._grid: Grid = tuple(np.mgrid[:height, :width].astype(np.float32))
        style = _TextureStyle if kind == "texture" else _ObjectStyle
        self._style = style.draw(self._rng(_STYLE_STREAM, 0))

    def __len__(self) -> int:
        return self.num_images

    @property
    def labels(self) -> list[int]:
        """The image labels, without rendering anything."""
        return [int(self._defect_kind(i) is not None) for i in range(self.num_images)]

    def render(self, index: int) -> Rendering:
        """Render image ``index`` together with its defect-free version.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index must be in [0, {self.num_images}), got {index}")
        index %= self.num_images
        surface = self._style.render(self._rng(_NORMAL_STREAM, index), self._grid)
        defect = self._defect_kind(index)
        if defect is None:
            return Rendering(surface.image, surface.image, np.zeros(self.image_size, bool), None)
        # A separate stream, so the defect never changes the normal image under it.
        rng = self._rng(_DEFECT_STREAM, index)
        if defect == "misprint":
            # The same shot (same normal draws) with its pattern or print misplaced.
            again = self._style.render(self._rng(_NORMAL_STREAM, index), self._grid, misprint=rng)
            surface = surface._replace(misprinted=again.image)
        for _ in range(_ATTEMPTS):
            image, mask = _paint(surface, *_DEFECTS[defect](rng, surface, self._grid))
            if mask.sum() >= _MIN_DEFECT_PIXELS:
                return Rendering(surface.image, image, mask, defect)
        # Unlucky draws (say, a hole on dark ink) fall back to a patch that always shows.
        image, mask = _paint(surface, *_recolour(rng, surface, self._grid))
        return Rendering(surface.image, image, mask, "misprint")

    def __getitem__(self, index: int) -> Sample:
        rendering = self.render(index)
        index %= self.num_images
        folder = rendering.defect or "good"
        return Sample(
            image=torch.from_numpy(rendering.image),
            mask=torch.from_numpy(rendering.mask.astype(np.float32))[None],
            label=int(rendering.defect is not None),
            path=f"synthetic/{self.kind}/seed{self.seed}/{self.split}/{folder}/{index:04d}",
        )

    def _rng(self, stream: int, index: int) -> np.random.Generator:
        # Both splits must show the same product, so its style ignores the split.
        split = 0 if stream == _STYLE_STREAM else _SPLITS.index(self.split)
        # Equal-length keys: SeedSequence pads short keys with zeros, so keys of
        # different lengths could collide.
        return np.random.default_rng([self.seed, _KINDS.index(self.kind), stream, split, index])

    def _defect_kind(self, index: int) -> str | None:
        if self.split == "train" or index % 2 == 0:
            return None
        return DEFECT_CYCLE[(index // 2) % len(DEFECT_CYCLE)]


class _Surface(NamedTuple):
    """A normal rendering plus the geometry that defects are placed with."""

    image: NDArray[np.float32]  # (3, H, W) in [0, 1]
    product: NDArray[np.bool_]  # where defects may appear
    centres: NDArray[np.bool_]  # where defects may be centred
    rim: NDArray[np.bool_]  # where cuts may be centred
    underlay: NDArray[np.float32]  # what a cut exposes
    misprinted: NDArray[np.float32] | None = None  # the same shot, printed wrong


@dataclass(frozen=True)
class _TextureStyle:
    low: NDArray[np.float32]  # colour where the pattern is 0
    high: NDArray[np.float32]  # colour where the pattern is 1
    backing: NDArray[np.float32]  # the dark layer under the fabric
    angles: NDArray[np.float32]  # one plane wave per angle ...
    frequencies: NDArray[np.float32]  # ... in cycles per pixel

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _TextureStyle:
        base = rng.uniform(0.35, 0.6, 3)
        pattern = rng.choice(["stripes", "grid", "mottled"])
        angle = rng.uniform(0.0, np.pi)
        frequency = 1.0 / rng.uniform(5.0, 10.0)
        if pattern == "stripes":
            angles, frequencies = np.array([angle]), np.array([frequency])
        elif pattern == "grid":
            angles, frequencies = np.array([angle, angle + np.pi / 2]), np.full(2, frequency)
        else:
            angles, frequencies = rng.uniform(0, np.pi, 6), frequency * rng.uniform(0.6, 1.4, 6)
        return cls(
            low=(base - 0.12).astype(np.float32),
            high=(base + rng.uniform(0.12, 0.25, 3)).astype(np.float32),
            backing=(0.7 * base).astype(np.float32),
            angles=angles.astype(np.float32),
            frequencies=frequencies.astype(np.float32),
        )

    def render(
        self, rng: np.random.Generator, grid: Grid, misprint: np.random.Generator | None = None
    ) -> _Surface:
        """One shot of the texture; with ``misprint``, the same shot with its pattern misplaced."""
        y, x = grid
        # Each shot sees the weave at its own phase, angle and scale, under its own light.
        angles = self.angles + rng.uniform(-TEXTURE_TURN, TEXTURE_TURN)
        frequencies = self.frequencies * rng.uniform(1 - TEXTURE_STRETCH, 1 + TEXTURE_STRETCH)
        phases = rng.uniform(0.0, 2 * np.pi, angles.size)
        light = _lighting(rng, grid)
        noise = rng.normal(0.0, NOISE, (3, *x.shape)).astype(np.float32)
        if misprint is not None:
            angles = angles + misprint.choice([-1.0, 1.0]) * misprint.uniform(0.3, 0.6)
            phases = phases + misprint.uniform(0.6 * np.pi, 1.4 * np.pi, angles.size)
        along = np.cos(angles)[:, None, None] * x + np.sin(angles)[:, None, None] * y
        waves = np.cos(2 * np.pi * frequencies[:, None, None] * along + phases[:, None, None])
        pattern = 0.5 + 0.5 * waves.mean(axis=0)
        image = light * (_col(self.low) * (1 - pattern) + _col(self.high) * pattern) + noise
        margin = 0.1 * min(x.shape)
        inner = (
            (y >= margin) & (y < y.shape[0] - margin) & (x >= margin) & (x < x.shape[1] - margin)
        )
        return _Surface(
            image=_unit(image),
            product=np.ones(x.shape, bool),
            centres=inner,
            rim=inner,
            underlay=_unit(light * _col(self.backing) + 2 * noise),
        )


@dataclass(frozen=True)
class _ObjectStyle:
    background: NDArray[np.float32]
    body: NDArray[np.float32]
    ink: NDArray[np.float32]
    rounded_square: bool

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _ObjectStyle:
        body = rng.uniform(0.55, 0.85, 3)
        return cls(
            background=rng.uniform(0.1, 0.3, 3).astype(np.float32),
            body=body.astype(np.float32),
            ink=(body * rng.uniform(0.2, 0.45)).astype(np.float32),
            rounded_square=bool(rng.integers(2)),
        )

    def render(
        self, rng: np.random.Generator, grid: Grid, misprint: np.random.Generator | None = None
    ) -> _Surface:
        """One shot of the object; with ``misprint``, the same shot with its print misplaced."""
        y, x = grid
        side = min(x.shape)
        # Each shot places, turns and sizes the part a little differently, under its own light.
        radius = 0.3 * side * rng.uniform(1 - OBJECT_SCALE, 1 + OBJECT_SCALE)
        shift = rng.uniform(-OBJECT_SHIFT, OBJECT_SHIFT, 2) * side
        turn = rng.uniform(-OBJECT_TURN, OBJECT_TURN)
        light = _lighting(rng, grid)
        noise = rng.normal(0.0, NOISE, (3, *x.shape)).astype(np.float32)
        u = x - (x.shape[1] - 1) / 2 - shift[0]
        v = y - (x.shape[0] - 1) / 2 - shift[1]
        across, down = _turn(u, v, turn)
        distance = np.hypot(u, v)
        if self.rounded_square:
            outline = _box_sdf(across, down, 0.9 * radius, 0.9 * radius, 0.3 * radius)
        else:
            outline = distance - radius
        # The print: a ring and a bar; a misprint turns the bar and moves the ring.
        print_turn, ring_offset = 0.0, np.zeros(2)
        if misprint is not None:
            print_turn = misprint.choice([-1.0, 1.0]) * misprint.uniform(0.5, 0.9)
            angle = misprint.uniform(0, 2 * np.pi)
            offset = misprint.uniform(0.12, 0.2) * radius
            ring_offset = offset * np.array([np.cos(angle), np.sin(angle)])
        bar_across, bar_down = _turn(u, v, turn + print_turn)
        ring_distance = np.hypot(u - ring_offset[0], v - ring_offset[1])
        body = _coverage(outline)
        ring = _coverage(np.abs(ring_distance - 0.55 * radius) - 0.06 * radius)
        bar = _coverage(_box_sdf(bar_across, bar_down, 0.35 * radius, 0.07 * radius, 0.0))
        ink = np.maximum(ring, bar) * body
        shading = 1 - 0.15 * np.minimum(distance / radius, 1.0) ** 2
        background = light * _col(self.background) + noise
        image = background * (1 - body) + (light * _col(self.body) * shading + noise) * body
        image = image * (1 - ink) + (light * _col(self.ink) + noise) * ink
        return _Surface(
            image=_unit(image),
            product=body >= 0.5,
            centres=outline < -0.35 * radius,
            rim=np.abs(outline) < 1.0,
            underlay=_unit(background),
        )


def _turn(u: NDArray, v: NDArray, angle: float) -> tuple[NDArray, NDArray]:
    """Coordinates (u, v) in a frame turned by ``angle`` radians."""
    return np.cos(angle) * u + np.sin(angle) * v, np.cos(angle) * v - np.sin(angle) * u


def _lighting(rng: np.random.Generator, grid: Grid) -> NDArray[np.float32]:
    """A shot's light: an overall gain times a linear falloff across the image, (1, H, W)."""
    y, x = grid
    gain = rng.uniform(1 - LIGHT_GAIN, 1 + LIGHT_GAIN)
    angle, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, LIGHT_SLOPE)
    height, width = x.shape
    across = (np.cos(angle) * (x - width / 2) + np.sin(angle) * (y - height / 2)) / max(x.shape)
    return (gain * (1 + slope * across))[None].astype(np.float32)


Painting = tuple[NDArray, NDArray[np.bool_]]
"""A defect's candidate image and the region it may change."""

Defect = Callable[[np.random.Generator, _Surface, Grid], Painting]


def _scratch(rng: np.random.Generator, surface: _Surface, grid: Grid) -> Painting:
    """A thin straight line, bright on dark surfaces and dark on bright ones."""
    y, x = grid
    cy, cx = _pick(rng, surface.centres)
    side = min(x.shape)
    angle = rng.uniform(0.0, np.pi)
    half_length = rng.uniform(0.12, 0.25) * side
    half_width = rng.uniform(0.6, 1.0) * max(1.0, side / 64)
    dx, dy = np.cos(angle), np.sin(angle)
    along = np.clip((x - cx) * dx + (y - cy) * dy, -half_length, half_length)
    off_line = np.hypot(x - cx - along * dx, y - cy - along * dy)
    depth = rng.uniform(0.18, 0.3)
    brighten = np.where(surface.image.mean(axis=0) < 0.55, depth, -depth)
    return surface.image + brighten, (off_line <= half_width) & surface.product


def _stain(rng: np.random.Generator, surface: _Surface, grid: Grid) -> Painting:
    """An irregular blob, tinted away from the colour under it and fading to its rim."""
    region, relative = _blob(rng, surface.centres, grid, rng.uniform(0.06, 0.12))
    region &= surface.product
    under = surface.image[:, region].mean(axis=1) if region.any() else surface.image.mean((1, 2))
    shift = rng.uniform(0.15, 0.5, 3)
    shift[rng.integers(3)] = 0.5
    # A full 0.5 away from the mean in one channel, so that the middle (strength 0.45)
    # changes by about 0.2, fading towards the rim until the change is no longer visible.
    colour = np.clip(under + np.where(under < 0.5, shift, -shift), 0.0, 1.0)
    strength = 0.45 * (1.0 - 0.5 * np.minimum(relative, 1.0) ** 2)
    return surface.image * (1 - strength) + _col(colour) * strength, region


def _hole(rng: np.random.Generator, surface: _Surface, grid: Grid) -> Painting:
    """A small shadowed pit, lighter towards its rim."""
    y, x = grid
    cy, cx = _pick(rng, surface.centres)
    radius = max(1.5, rng.uniform(0.05, 0.08) * min(x.shape))
    relative = np.hypot(y - cy, x - cx) / radius
    return surface.image * (0.45 + 0.3 * relative), (relative <= 1.0) & surface.product


def _cut(rng: np.random.Generator, surface: _Surface, grid: Grid) -> Painting:
    """A missing piece exposing what lies beneath (the backing, or the background)."""
    region, _ = _blob(rng, surface.rim, grid, rng.uniform(0.06, 0.11))
    return surface.underlay, region & surface.product


def _misprint(rng: np.random.Generator, surface: _Surface, grid: Grid) -> Painting:
    """A patch where the pattern or print is misplaced: the right colours in the wrong place."""
    assert surface.misprinted is not None, "render the misprinted shot first"
    region, _ = _blob(rng, surface.centres, grid, rng.uniform(0.08, 0.16))
    return surface.misprinted, region & surface.product


def _recolour(rng: np.random.Generator, surface: _Surface, grid: Grid) -> Painting:
    """A rectangle whose colour is shifted by at least 0.25 in one channel."""
    y, x = grid
    cy, cx = _pick(rng, surface.centres)
    half_height, half_width = rng.uniform(0.05, 0.12, 2) * min(x.shape)
    region = (np.abs(y - cy) <= half_height) & (np.abs(x - cx) <= half_width)
    shift = rng.uniform(0.1, 0.35, 3)
    shift[rng.integers(3)] = rng.uniform(0.25, 0.35)
    raised = surface.image + _col(shift)
    # Shifting down where up would clip keeps the full shift in every pixel.
    return np.where(raised <= 1.0, raised, surface.image - _col(shift)), region & surface.product


_DEFECTS: dict[str, Defect] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
    "cut": _cut,
    "misprint": _misprint,
}


def _paint(
    surface: _Surface, candidate: NDArray, region: NDArray[np.bool_]
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Apply a defect where it changes a pixel visibly; the mask is exactly those pixels."""
    candidate = _unit(candidate)
    mask = region & (np.abs(candidate - surface.image).max(axis=0) >= MIN_VISIBLE_CHANGE)
    return np.where(mask, candidate, surface.image), mask


def _blob(
    rng: np.random.Generator, allowed: NDArray[np.bool_], grid: Grid, size: float
) -> tuple[NDArray[np.bool_], NDArray[np.float32]]:
    """An irregular ellipse of radius ``size`` (fraction of the image side).

    Returns:
        The blob's pixels, and each pixel's distance from the centre relative to
        the blob's boundary in that direction (1 on the boundary).
    """
    y, x = grid
    cy, cx = _pick(rng, allowed)
    radius = size * min(x.shape)
    turn, squash = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    u = np.cos(turn) * (x - cx) + np.sin(turn) * (y - cy)
    v = (np.cos(turn) * (y - cy) - np.sin(turn) * (x - cx)) / squash
    theta = np.arctan2(v, u)
    wobble = rng.uniform(0, 2 * np.pi, 2)
    boundary = radius * (
        1 + 0.2 * np.sin(3 * theta + wobble[0]) + 0.1 * np.sin(5 * theta + wobble[1])
    )
    relative = np.hypot(u, v) / boundary
    return relative <= 1.0, relative


def _pick(rng: np.random.Generator, allowed: NDArray[np.bool_]) -> tuple[float, float]:
    """A random pixel (row, column) among the allowed ones."""
    rows, cols = np.nonzero(allowed)
    if rows.size == 0:
        return (allowed.shape[0] - 1) / 2, (allowed.shape[1] - 1) / 2
    i = rng.integers(rows.size)
    return float(rows[i]), float(cols[i])


def _box_sdf(u: NDArray, v: NDArray, half_u: float, half_v: float, corner: float) -> NDArray:
    """Signed distance to a rectangle with rounded corners (negative inside)."""
    qu, qv = np.abs(u) - (half_u - corner), np.abs(v) - (half_v - corner)
    outside = np.hypot(np.maximum(qu, 0.0), np.maximum(qv, 0.0))
    return outside + np.minimum(np.maximum(qu, qv), 0.0) - corner


def _coverage(signed_distance: NDArray) -> NDArray[np.float32]:
    """Pixel coverage of a shape from its signed distance: a one-pixel soft edge."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0).astype(np.float32)


def _col(colour: NDArray) -> NDArray[np.float32]:
    """An RGB triple shaped to broadcast over (3, H, W)."""
    return np.asarray(colour, dtype=np.float32)[:, None, None]


def _unit(image: NDArray) -> NDArray[np.float32]:
    return np.clip(image, 0.0, 1.0).astype(np.float32)
