"""Real photographs with synthetic defects, from photos that installed packages ship.

:class:`PhotoDefects` needs no download: it cuts its images from the sample photos
of scikit-image and scikit-learn, and paints defects on them whose masks are exact.
Two groups of classes, like MVTec AD's:

- Textures (:data:`PHOTO_TEXTURES`): crops at random positions of one photo
  (Hubble deep field, an immunohistochemistry slide, the moon's surface), resized
  so that one crop of ``crop`` source pixels fills the image. The photo is split in
  two: train crops come from its left 60% and test crops from its right 40%, each
  part resampled on its own, so no test pixel was ever seen in training.
- Objects (:data:`PHOTO_OBJECTS`): a fixed, centred square framing of a whole scene
  (a rocket on its launch pad, the cameraman, a dahlia), photographed again and
  again: each image is shifted by a few pixels and lit slightly differently.

Every image gets mild lighting changes (gain, contrast, gamma, a faint gradient)
and sensor noise. Test images alternate between normal (even indices) and
defective (odd indices), and defective ones cycle through
:data:`PHOTO_DEFECT_KINDS`. A pixel counts as defective only where the defect
changed it by at least :data:`MIN_VISIBLE_CHANGE` in some channel; elsewhere the
image keeps its normal value, so the mask is exactly where the image differs from
the defect-free rendering that :meth:`PhotoDefects.render` also returns.

Everything is drawn from NumPy generators seeded by (seed, category, split, index),
so an item is the same whichever worker renders it and in whatever order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Literal, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from .datasets import Sample
from .synthetic import Rendering

__all__ = [
    "MIN_VISIBLE_CHANGE",
    "PHOTO_CATEGORIES",
    "PHOTO_DEFECT_KINDS",
    "PHOTO_OBJECTS",
    "PHOTO_TEXTURES",
    "PhotoDefects",
]

PHOTO_TEXTURES = ("hubble", "ihc", "moon")
"""Texture classes: random crops of one photo each."""

PHOTO_OBJECTS = ("rocket", "camera", "flower")
"""Object classes: one registered scene each, shifted and relit between images."""

PHOTO_CATEGORIES = PHOTO_TEXTURES + PHOTO_OBJECTS
"""Every class of :class:`PhotoDefects`, textures first."""

PHOTO_DEFECT_KINDS = ("scratch", "spot", "cut", "stain", "patch", "blur")
"""Defect types painted on defective test images, in the order they cycle."""

MIN_VISIBLE_CHANGE = 0.08
"""Smallest change (largest over the RGB channels) of a pixel marked defective."""

_SPLITS = ("train", "test")
_DEFAULT_NUM_IMAGES = {"train": 48, "test": 48}
_MIN_SIZE, _MAX_SIZE = 32, 512
_TRAIN_FRACTION = 0.6  # of a texture photo's width; the rest is for testing
_SHIFT = 0.03  # largest shift of an object, as a fraction of the image side
_MIN_DEFECT_PIXELS = 8
_ATTEMPTS = 10
_NORMAL_STREAM, _DEFECT_STREAM = range(2)


def _load(name: str) -> NDArray[np.uint8]:
    """A photo as (H, W, 3) uint8; grayscale photos are replicated to RGB."""
    if name == "flower":
        from sklearn.datasets import load_sample_image

        photo = load_sample_image("flower.jpg")
    else:
        import skimage.data

        photo = getattr(skimage.data, name)()
    return np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo


@dataclass(frozen=True)
class _Source:
    photo: str  # the loader's name for it
    crop: int | None  # a texture crop's side in source pixels; None for an object
    turns: bool  # textures without a light direction may be flipped and rotated
    gray: bool


_SOURCES = {
    "hubble": _Source("hubble_deep_field", 192, turns=True, gray=False),
    "ihc": _Source("immunohistochemistry", 160, turns=True, gray=False),
    # The moon is lit from one side; turning it would change the light's direction.
    "moon": _Source("moon", 192, turns=False, gray=True),
    "rocket": _Source("rocket", None, turns=False, gray=False),
    "camera": _Source("camera", None, turns=False, gray=True),
    "flower": _Source("flower", None, turns=False, gray=False),
}
_FOREIGN = ("coffee", "brick", "chelsea", "astronaut")
"""Photos that foreign patches are cut from; none of them is a class."""


@cache
def _photo(name: str) -> NDArray[np.uint8]:
    # Decoding the Hubble photo takes about half a second, so each photo is read once.
    photo = _load(name)
    photo.setflags(write=False)
    return photo


def _resize(photo: NDArray[np.uint8], height: int, width: int) -> NDArray[np.float32]:
    """Antialiased bilinear resize (as the file datasets do) to (3, height, width) in [0, 1]."""
    resized = Image.fromarray(np.ascontiguousarray(photo)).resize((width, height), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0


@lru_cache(maxsize=64)
def _region(category: str, split: str, size: int) -> tuple[NDArray[np.float32], int, float]:
    """A texture's train or test part, scaled so that a crop is ``size`` pixels.

    Returns:
        The scaled part (3, h, w), its first column in the photo, and the scale
        (source pixels per image pixel).
    """
    source = _SOURCES[category]
    assert source.crop is not None
    photo = _photo(source.photo)
    split_column = round(_TRAIN_FRACTION * photo.shape[1])
    first = 0 if split == "train" else split_column
    part = photo[:, first:split_column] if split == "train" else photo[:, split_column:]
    scale = source.crop / size
    scaled = _resize(part, round(part.shape[0] / scale), round(part.shape[1] / scale))
    scaled.setflags(write=False)
    return scaled, first, scale


@lru_cache(maxsize=64)
def _scene(category: str, size: int) -> NDArray[np.float32]:
    """An object's centred square scene at ``size`` plus a margin for shifts on each side."""
    photo = _photo(_SOURCES[category].photo)
    side = min(photo.shape[:2])
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    margin = _margin(size)
    scene = _resize(photo[top : top + side, left : left + side], *(2 * [size + 2 * margin]))
    scene.setflags(write=False)
    return scene


@lru_cache(maxsize=64)
def _foreign(name: str, size: int) -> NDArray[np.float32]:
    """A foreign photo at roughly the classes' scale: its shorter side is 2.5 images."""
    photo = _photo(name)
    scale = 2.5 * size / min(photo.shape[:2])
    scaled = _resize(photo, round(photo.shape[0] * scale), round(photo.shape[1] * scale))
    scaled.setflags(write=False)
    return scaled


@lru_cache(maxsize=64)
def _structure(category: str, size: int) -> NDArray[np.bool_]:
    """Where an object's scene has structure: the top 40% of its smoothed edge strength."""
    luminance = _scene(category, size).mean(axis=0)
    sigma = size / 128
    edges = ndimage.gaussian_gradient_magnitude(luminance, 1.5 * sigma)
    strength = ndimage.gaussian_filter(edges, 4 * sigma)
    structure = strength >= np.quantile(strength, 0.6)
    structure.setflags(write=False)
    return structure


def _margin(size: int) -> int:
    return max(1, round(_SHIFT * size))


class PhotoDefects(Dataset[Sample]):
    """Real photographs (textures or registered objects) with pixel-exact synthetic defects.

    Args:
        category: One of :data:`PHOTO_TEXTURES` or :data:`PHOTO_OBJECTS`.
        split: ``"train"`` (normal images only) or ``"test"`` (odd indices defective).
        num_images: Number of images; 48 by default for either split.
        image_size: Side of the square images, from 32 to 512 pixels.
        seed: Fixes every image (crop positions, lighting, noise and defects).

    Raises:
        ValueError: On an unknown ``category`` or ``split``, a non-positive
            ``num_images``, a negative ``seed`` or an ``image_size`` out of range.

    Example:
        >>> test_set = PhotoDefects("moon", "test", num_images=4, image_size=32)
        >>> test_set.labels
        [0, 1, 0, 1]
        >>> sample = test_set[1]
        >>> tuple(sample["image"].shape), tuple(sample["mask"].shape), sample["path"]
        ((3, 32, 32), (1, 32, 32), 'photos/moon/seed0/test/scratch/0001')
    """

    has_masks = True

    def __init__(
        self,
        category: str,
        split: Literal["train", "test"] = "train",
        num_images: int | None = None,
        image_size: int = 128,
        seed: int = 0,
    ) -> None:
        if category not in PHOTO_CATEGORIES:
            raise ValueError(f"category must be one of {PHOTO_CATEGORIES}, got {category!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        num_images = _DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int)
            or not _MIN_SIZE <= image_size <= _MAX_SIZE
        ):
            # Above 512 pixels the images would only be upsampled photos.
            raise ValueError(
                f"image_size must be an int from {_MIN_SIZE} to {_MAX_SIZE}, got {image_size!r}"
            )
        self.category, self.split, self.num_images = category, split, num_images
        self.image_size, self.seed = image_size, seed
        self.is_texture = category in PHOTO_TEXTURES

    def __len__(self) -> int:
        return self.num_images

    @property
    def labels(self) -> list[int]:
        """The image labels, without rendering anything."""
        return [int(self._defect_kind(i) is not None) for i in range(self.num_images)]

    def source_box(self, index: int) -> tuple[int, int, int, int]:
        """Where image ``index`` lies in its photo: (top, left, bottom, right) source pixels.

        For a texture this is the crop (before any flip or rotation); for an object,
        the shifted framing within the photo's centred square.
        """
        index = self._check_index(index)
        rng = self._rng(_NORMAL_STREAM, index)
        top, left = self._window(rng)
        size = self.image_size
        if self.is_texture:
            region, first, scale = _region(self.category, self.split, size)
            # The part was resized to whole pixels, so its scale is a little off along each axis.
            height, width = _photo(_SOURCES[self.category].photo).shape[:2]
            split_column = round(_TRAIN_FRACTION * width)
            last = split_column if self.split == "train" else width
            scale_y, scale_x = height / region.shape[1], (last - first) / region.shape[2]
            return (
                int(np.floor(top * scale_y)),
                first + int(np.floor(left * scale_x)),
                min(height, int(np.ceil((top + size) * scale_y))),
                min(last, first + int(np.ceil((left + size) * scale_x))),
            )
        photo = _photo(_SOURCES[self.category].photo)
        side = min(photo.shape[:2])
        scale = side / (size + 2 * _margin(size))
        offset = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
        return (
            offset[0] + int(np.floor(top * scale)),
            offset[1] + int(np.floor(left * scale)),
            offset[0] + int(np.ceil((top + size) * scale)),
            offset[1] + int(np.ceil((left + size) * scale)),
        )

    def render(self, index: int) -> Rendering:
        """Render image ``index`` together with its defect-free version.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        index = self._check_index(index)
        normal = self._normal(self._rng(_NORMAL_STREAM, index))
        defect = self._defect_kind(index)
        size = self.image_size
        if defect is None:
            return Rendering(normal, normal, np.zeros((size, size), bool), None)
        # A separate stream, so that the defect never changes the normal image under it.
        rng = self._rng(_DEFECT_STREAM, index)
        scene = _Scene(normal, _grid(size), self._void(normal), self._centres(index))
        for _ in range(_ATTEMPTS):
            image, mask = self._paint(normal, *_DEFECTS[defect](rng, scene))
            if mask.sum() >= _MIN_DEFECT_PIXELS:
                return Rendering(normal, image, mask, defect)
        # Unlucky draws (say, a blur on a flat patch of sky) fall back to a spot that
        # always shows: it moves every channel of every pixel by 0.4.
        region, _ = _blob(rng, scene, 0.04, 0.06)
        candidate = np.where(normal < 0.5, normal + 0.4, normal - 0.4)
        image, mask = self._paint(normal, candidate, region)
        return Rendering(normal, image, mask, "spot")

    def __getitem__(self, index: int) -> Sample:
        rendering = self.render(index)
        index = self._check_index(index)
        folder = rendering.defect or "good"
        return Sample(
            image=torch.from_numpy(rendering.image),
            mask=torch.from_numpy(rendering.mask.astype(np.float32))[None],
            label=int(rendering.defect is not None),
            path=f"photos/{self.category}/seed{self.seed}/{self.split}/{folder}/{index:04d}",
        )

    def _check_index(self, index: int) -> int:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index must be in [0, {self.num_images}), got {index}")
        return index % self.num_images

    def _rng(self, stream: int, index: int) -> np.random.Generator:
        # Equal-length keys: SeedSequence pads short keys with zeros, so keys of
        # different lengths could collide.
        key = [self.seed, PHOTO_CATEGORIES.index(self.category), stream, _SPLITS.index(self.split)]
        return np.random.default_rng([*key, index])

    def _defect_kind(self, index: int) -> str | None:
        if self.split == "train" or index % 2 == 0:
            return None
        return PHOTO_DEFECT_KINDS[(index // 2) % len(PHOTO_DEFECT_KINDS)]

    def _window(self, rng: np.random.Generator) -> tuple[int, int]:
        """The top-left corner of the image in the scaled region or scene (the first draws)."""
        size = self.image_size
        if self.is_texture:
            region, _, _ = _region(self.category, self.split, size)
            return (
                int(rng.integers(region.shape[1] - size + 1)),
                int(rng.integers(region.shape[2] - size + 1)),
            )
        margin = _margin(size)
        return int(rng.integers(2 * margin + 1)), int(rng.integers(2 * margin + 1))

    def _normal(self, rng: np.random.Generator) -> NDArray[np.float32]:
        size = self.image_size
        top, left = self._window(rng)
        if self.is_texture:
            region, _, _ = _region(self.category, self.split, size)
            image = region[:, top : top + size, left : left + size]
            if _SOURCES[self.category].turns:
                image = np.rot90(image, int(rng.integers(4)), axes=(1, 2))
                image = image[:, :, ::-1] if rng.integers(2) else image
        else:
            image = _scene(self.category, size)[:, top : top + size, left : left + size]
        return _relight(rng, image, _SOURCES[self.category].gray)

    def _centres(self, index: int) -> NDArray[np.bool_]:
        """Where defects may be centred: inside an 8% margin and, for objects, on the object.

        An object's defects belong on the product, not on the sky behind it; the
        product is told from the backdrop by its structure (edges and texture).
        """
        size = self.image_size
        margin = round(0.08 * size)
        inner = np.zeros((size, size), bool)
        inner[margin : size - margin, margin : size - margin] = True
        if self.is_texture:
            return inner
        top, left = self._window(self._rng(_NORMAL_STREAM, index))
        structure = _structure(self.category, size)[top : top + size, left : left + size]
        return inner & structure if (inner & structure).any() else inner

    def _void(self, normal: NDArray[np.float32]) -> NDArray[np.float32]:
        """What a cut exposes: an object's backdrop, or a texture's dark or dim backing."""
        if not self.is_texture:
            edges = normal[:, 0], normal[:, -1], normal[:, :, 0], normal[:, :, -1]
            border = np.concatenate(edges, axis=1)
            return np.median(border, axis=1).astype(np.float32)
        # A hole in a bright texture shows darkness; in a dark one, a dim backing.
        mean = float(normal.mean())
        return np.full(3, min(1.0, mean + 0.25) if mean < 0.3 else 0.05, np.float32)

    def _paint(
        self, normal: NDArray[np.float32], candidate: NDArray, region: NDArray[np.bool_]
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Apply a defect where it changes a pixel visibly; the mask is exactly those pixels."""
        if _SOURCES[self.category].gray:
            # A grayscale camera sees a coloured stain or patch in gray.
            candidate = np.broadcast_to(candidate.mean(axis=0), candidate.shape)
        candidate = np.clip(candidate, 0.0, 1.0).astype(np.float32)
        mask = region & (np.abs(candidate - normal).max(axis=0) >= MIN_VISIBLE_CHANGE)
        return np.where(mask, candidate, normal), mask


Grid = tuple[NDArray[np.float32], NDArray[np.float32]]


@lru_cache(maxsize=16)
def _grid(size: int) -> Grid:
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def _relight(rng: np.random.Generator, image: NDArray, gray: bool) -> NDArray[np.float32]:
    """Mild lighting changes and sensor noise, as between two shots of the same thing."""
    size = image.shape[-1]
    rows, cols = _grid(size)
    mean = image.mean()
    contrast, gain, gamma = rng.uniform(0.9, 1.1), rng.uniform(0.88, 1.12), rng.uniform(0.85, 1.15)
    angle, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.08)
    ramp = slope * ((cols - size / 2) * np.cos(angle) + (rows - size / 2) * np.sin(angle)) / size
    lit = np.clip(mean + contrast * (image - mean), 0.0, 1.0) ** gamma * gain + ramp
    noise = rng.normal(0.0, rng.uniform(0.005, 0.025), (1 if gray else 3, size, size))
    return np.clip(lit + noise, 0.0, 1.0).astype(np.float32)


class _Scene(NamedTuple):
    normal: NDArray[np.float32]  # (3, H, W)
    grid: Grid
    void: NDArray[np.float32]  # (3,) what a cut exposes
    centres: NDArray[np.bool_]  # (H, W) where defects may be centred


Painting = tuple[NDArray, NDArray[np.bool_]]
"""A defect's candidate image and the region it may change."""


def _scratch(rng: np.random.Generator, scene: _Scene) -> Painting:
    """A thin curved line, 1 to 3 pixels wide, scraped bright or gouged dark."""
    rows, cols = scene.grid
    size = rows.shape[0]
    start = _centre(rng, scene)
    length = rng.uniform(0.1, 0.35) * size
    angle = rng.uniform(0, 2 * np.pi)
    end = start + length * np.array([np.sin(angle), np.cos(angle)])
    bend = (start + end) / 2 + rng.normal(0.0, 0.15 * length, 2)
    t = np.linspace(0.0, 1.0, max(8, int(2 * length)))[:, None]
    curve = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * end  # a quadratic Bézier
    half_width = rng.uniform(0.5, 1.5) * max(1.0, size / 128)
    distance = np.full((size, size), np.inf, np.float32)
    low = np.clip(np.floor(curve.min(0) - half_width - 1), 0, size).astype(int)
    high = np.clip(np.ceil(curve.max(0) + half_width + 2), 0, size).astype(int)
    box = (slice(low[0], high[0]), slice(low[1], high[1]))
    if high[0] > low[0] and high[1] > low[1]:
        dy = rows[box][..., None] - curve[:, 0]
        dx = cols[box][..., None] - curve[:, 1]
        distance[box] = np.sqrt((dy**2 + dx**2).min(axis=-1))
    coverage = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
    # Deeper in some places than others along the line.
    depth = rng.uniform(0.12, 0.35) * (0.75 + 0.25 * np.sin(cols / rng.uniform(3, 9) + rows / 7))
    brightness = scene.normal.mean(axis=0)
    target = np.where(brightness < 0.5, brightness + depth, brightness - depth)
    candidate = scene.normal + (coverage * (target - brightness))[None]
    return candidate, coverage > 0


def _spot(rng: np.random.Generator, scene: _Scene) -> Painting:
    """One to three small blobs of dirt, dark or bright, with soft edges."""
    size = scene.grid[0].shape[0]
    first = _centre(rng, scene)
    alpha = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        centre = first + rng.normal(0.0, 0.04 * size, 2)
        _, relative = _blob(rng, scene, 0.012, 0.045, centre)
        alpha = np.maximum(alpha, np.clip(3.0 * (1.0 - relative), 0.0, 1.0))
    # Soot or oil darkens what it covers, dust or lint lightens it; a tint varies the colour.
    change = rng.uniform(0.1, 0.35) * (1 if rng.integers(2) else -1) + rng.uniform(-0.05, 0.05, 3)
    candidate = scene.normal + _col(change) * alpha
    return candidate, alpha > 0


def _cut(rng: np.random.Generator, scene: _Scene) -> Painting:
    """Missing material: an irregular hole, or a notch from the image's edge, showing the void."""
    size = scene.grid[0].shape[0]
    centre = _centre(rng, scene)
    if rng.integers(2):
        # A notch: pull the centre onto the nearest image edge.
        edge = int(np.argmin([centre[0], size - 1 - centre[0], centre[1], size - 1 - centre[1]]))
        centre[edge // 2] = 0.0 if edge % 2 == 0 else size - 1.0
    region, _ = _blob(rng, scene, 0.025, 0.1, centre, wobble=0.35)
    noise = rng.normal(0.0, 0.01, (3, size, size))
    return _col(scene.void) + noise, region


def _stain(rng: np.random.Generator, scene: _Scene) -> Painting:
    """A translucent colour tint, strongest at its middle."""
    hue = rng.uniform(0.0, 1.0)
    colour = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    colour = rng.uniform(0.3, 0.9) * (0.3 + 0.7 * colour)
    region, relative = _blob(rng, scene, 0.06, 0.24)
    alpha = rng.uniform(0.3, 0.6) * np.clip(1.0 - relative**2, 0.0, 1.0)
    return scene.normal * (1 - alpha) + _col(colour) * alpha, region


def _patch(rng: np.random.Generator, scene: _Scene) -> Painting:
    """A piece of a different photo set in, toned to match what it replaces.

    Matching the mean and spread of the pixels it covers makes the patch stand out
    by its texture, not by a brightness that any distance to the mean image would see.
    """
    size = scene.grid[0].shape[0]
    region, _ = _blob(rng, scene, 0.03, 0.12)
    if not region.any():
        return scene.normal, region
    foreign = _foreign(_FOREIGN[int(rng.integers(len(_FOREIGN)))], size)
    top = int(rng.integers(foreign.shape[1] - size + 1))
    left = int(rng.integers(foreign.shape[2] - size + 1))
    piece = foreign[:, top : top + size, left : left + size]
    under, over = scene.normal[:, region], piece[:, region]
    spread = under.std(axis=1) * rng.uniform(1.0, 2.0) + 0.03
    toned = (piece - _col(over.mean(axis=1))) / _col(over.std(axis=1) + 1e-3)
    return _col(under.mean(axis=1)) + toned * _col(spread), region


def _blur(rng: np.random.Generator, scene: _Scene) -> Painting:
    """A locally out-of-focus or smeared region."""
    size = scene.grid[0].shape[0]
    sigma = rng.uniform(1.5, 3.0) * size / 128
    blurred = ndimage.gaussian_filter(scene.normal, (0, sigma, sigma), mode="nearest")
    region, _ = _blob(rng, scene, 0.06, 0.18)
    return blurred, region


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene], Painting]] = {
    "scratch": _scratch,
    "spot": _spot,
    "cut": _cut,
    "stain": _stain,
    "patch": _patch,
    "blur": _blur,
}


def _centre(rng: np.random.Generator, scene: _Scene) -> NDArray[np.float64]:
    """A random (row, column) among the scene's allowed centres."""
    rows, cols = np.nonzero(scene.centres)
    i = rng.integers(rows.size)
    return np.array([rows[i], cols[i]], np.float64) + rng.uniform(-0.5, 0.5, 2)


def _blob(
    rng: np.random.Generator,
    scene: _Scene,
    smallest: float,
    largest: float,
    centre: NDArray | None = None,
    wobble: float = 0.2,
) -> tuple[NDArray[np.bool_], NDArray[np.float32]]:
    """An irregular ellipse whose radius is drawn between two fractions of the image side.

    Returns:
        The blob's pixels, and each pixel's distance from the centre relative to
        the blob's boundary in that direction (1 on the boundary).
    """
    rows, cols = scene.grid
    size = rows.shape[0]
    cy, cx = _centre(rng, scene) if centre is None else centre
    radius = max(1.0, rng.uniform(smallest, largest) * size)
    turn, squash = rng.uniform(0, np.pi), rng.uniform(0.5, 1.0)
    u = np.cos(turn) * (cols - cx) + np.sin(turn) * (rows - cy)
    v = (np.cos(turn) * (rows - cy) - np.sin(turn) * (cols - cx)) / squash
    theta = np.arctan2(v, u)
    phases = rng.uniform(0, 2 * np.pi, 2)
    boundary = radius * (
        1 + wobble * np.sin(3 * theta + phases[0]) + 0.5 * wobble * np.sin(5 * theta + phases[1])
    )
    relative = (np.hypot(u, v) / boundary).astype(np.float32)
    return relative <= 1.0, relative


def _col(colour: NDArray) -> NDArray[np.float32]:
    """An RGB triple shaped to broadcast over (3, H, W)."""
    return np.asarray(colour, dtype=np.float32)[:, None, None]
