"""File-based anomaly-detection datasets: MVTec AD, BTAD and a user's own image folders.

Every dataset yields the same :class:`Sample`: an RGB image in [0, 1], a binary
defect mask, an image label and the image's path. Files are read as image viewers show them:

* images are decoded with Pillow and turned upright by their EXIF orientation (a phone photo
  is stored sideways with a tag saying so); grayscale and palette images become RGB, the
  alpha channel of RGBA images is dropped; 8-bit values are divided by 255 and 16-bit
  grayscale values by 65535 (16-bit colour PNGs are read at 8 bits by Pillow);
* in a mask, **every non-zero pixel is a defect** (in any channel; in a palette mask, every
  non-zero index; fully transparent pixels are not), so 0/1 label images, 0/255 masks,
  soft or anti-aliased masks and 16-bit masks all mark what a viewer shows as not black.
  Lossy (JPEG) masks count their compression noise as defects: store masks losslessly;
* a defective image whose mask marks no pixel is an error (:class:`EmptyMaskError`) rather
  than a defect counted as normal.

Images are resized to the configured ``image_size`` with antialiased bilinear filtering;
masks with nearest-neighbour sampling, so they stay exactly 0/1. Models and metrics
therefore work at ``image_size`` resolution, and a source size that is not divisible by
the pyramid's 2^(L-1) is handled by that resize: pick an ``image_size`` divisible by it.

Masks pair with defective images by file stem, and the pairing must be one-to-one:
a defective image without a mask, or a mask without an image, is an error rather
than a silently all-normal mask that would corrupt the pixel metrics. Layouts are
checked when a dataset is built; :meth:`AnomalyImageDataset.validate` checks every image's
header and every mask (size, content) at once, and files are decoded when a sample is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = [
    "BTAD",
    "IMAGE_EXTENSIONS",
    "EmptyMaskError",
    "AnomalyImageDataset",
    "ImageFolder",
    "ImageReadError",
    "ImageRecord",
    "ImageSize",
    "MVTecAD",
    "MaskMatchError",
    "Sample",
    "as_image_size",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File extensions (matched case-insensitively) read as images and masks."""

ImageSize = int | tuple[int, int]
"""A square side length, or a (height, width) pair."""

Split = Literal["train", "test"]


class Sample(TypedDict):
    """One item of every dataset in this example; batches collate to the same keys.

    Attributes:
        image: float32 tensor (3, H, W) with values in [0, 1].
        mask: float32 tensor (1, H, W) with values 0 or 1; 1 marks defective pixels.
        label: 1 for a defective image, 0 for a normal one.
        path: Where the image came from (a file path, or a synthetic identifier).
    """

    image: torch.Tensor
    mask: torch.Tensor
    label: int
    path: str


class ImageReadError(ValueError):
    """An image or mask file exists but cannot be decoded."""


class MaskMatchError(ValueError):
    """Images and masks do not pair up one-to-one by stem, or a pair differs in size."""


class EmptyMaskError(MaskMatchError):
    """The mask of a defective image marks no defect pixel."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset, before decoding.

    Attributes:
        image: Path of the image file.
        mask: Path of its defect mask, or None for an all-normal mask.
        label: 1 for a defective image, 0 for a normal one.
    """

    image: Path
    mask: Path | None
    label: int


def as_image_size(image_size: ImageSize) -> tuple[int, int]:
    """Normalise an image size to a (height, width) pair of positive ints.

    Args:
        image_size: A positive int for a square, or a (height, width) pair.

    Returns:
        The (height, width) pair.

    Raises:
        ValueError: If ``image_size`` is not one of the accepted forms.

    Example:
        >>> as_image_size(256), as_image_size((192, 256))
        ((256, 256), (192, 256))
    """
    pair = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (
        isinstance(pair, Sequence)
        and len(pair) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair)
    ):
        return int(pair[0]), int(pair[1])
    raise ValueError(
        f"image_size must be a positive int or a (height, width) pair of positive ints, "
        f"got {image_size!r}"
    )


class AnomalyImageDataset(Dataset[Sample]):
    """Images, masks and labels listed as :class:`ImageRecord` s, decoded on access.

    The layout-specific datasets below only build the record list; this base does
    the decoding, validation and resizing they share.

    Args:
        records: The images in the order they are served.
        image_size: Output size, a square side or (height, width).

    Attributes:
        records: The records, in order.
        image_size: The output (height, width).
        has_masks: False when defective images come without masks (their mask is
            then all zero and must not be used for pixel metrics).

    Raises:
        ValueError: On a bad ``image_size``.

    Example:
        >>> dataset = AnomalyImageDataset([ImageRecord(Path("a.png"), None, 0)], 64)
        >>> len(dataset), dataset.labels
        (1, [0])
    """

    has_masks: bool = True

    def __init__(self, records: Iterable[ImageRecord], image_size: ImageSize = 256) -> None:
        self.records = list(records)
        self.image_size = as_image_size(image_size)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        """The image labels, without decoding any file."""
        return [record.label for record in self.records]

    def __getitem__(self, index: int) -> Sample:
        """Decode, validate and resize one image and its mask.

        Raises:
            ImageReadError: If the image or mask file cannot be decoded.
            MaskMatchError: If the mask's size differs from its image's size.
            EmptyMaskError: If a defective image's mask marks no pixel.
        """
        record = self.records[index]
        image = _open(record.image)
        if record.mask is None:
            defects = np.zeros((image.height, image.width), dtype=bool)
        else:
            defects = _read_mask(record, record.mask, image.size)

        height, width = self.image_size
        pixels = _resized_pixels(image, record.image, (width, height))
        mask_image = Image.fromarray(defects.astype(np.uint8))
        if mask_image.size != (width, height):
            # Interpolating then rounding a mask would move its edges; nearest keeps 0/1.
            mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)
        return Sample(
            image=torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
            mask=torch.from_numpy(np.asarray(mask_image, dtype=np.float32))[None],
            label=record.label,
            path=str(record.image),
        )

    def validate(self) -> None:
        """Check every file before any work: images readable, masks matching and non-empty.

        Reads each image's header (its size, turned by the EXIF orientation) and decodes
        each mask, so a run fails before training rather than after it. Pixel data of an
        image is decoded, and a corrupt one reported, only when the sample is read.

        Raises:
            ImageReadError: If an image or mask file cannot be read.
            MaskMatchError: If a mask's size differs from its image's size.
            EmptyMaskError: If a defective image's mask marks no pixel.
        """
        for record in self.records:
            size = _upright_size(record.image)
            if record.mask is not None:
                _read_mask(record, record.mask, size)


class MVTecAD(AnomalyImageDataset):
    """One category of the MVTec AD dataset.

    Expected layout (``<stem>`` is the image's file name without extension)::

        <root>/<category>/train/good/*.png
        <root>/<category>/test/good/*.png               normal, label 0
        <root>/<category>/test/<defect>/*.png           defective, label 1
        <root>/<category>/ground_truth/<defect>/<stem>_mask.png

    Images are served in sorted path order (test: by defect folder, then file).

    Args:
        root: Folder holding the category folders.
        category: Category folder name, e.g. ``"bottle"``.
        split: ``"train"`` (normal images only) or ``"test"``.
        image_size: Output size, a square side or (height, width).

    Raises:
        FileNotFoundError: If a required folder is missing or holds no images.
        MaskMatchError: If defective images and masks do not pair up by stem.
        ValueError: On a bad ``split`` or ``image_size``.

    Example:
        >>> test_set = MVTecAD("data/mvtec", "bottle", "test", 256)  # doctest: +SKIP
        >>> test_set[0]["mask"].shape  # doctest: +SKIP
        torch.Size([1, 256, 256])
    """

    def __init__(
        self,
        root: str | PathLike[str],
        category: str,
        split: Split = "train",
        image_size: ImageSize = 256,
    ) -> None:
        _check_split(split)
        category_dir = _require_dir(
            _require_dir(Path(root), "MVTec AD root") / category, "MVTec AD category"
        )
        if split == "train":
            train_dir = _require_dir(category_dir / "train" / "good", "training folder")
            records = [ImageRecord(path, None, 0) for path in _list_images(train_dir)]
        else:
            records = _mvtec_test_records(category_dir)
        super().__init__(records, image_size)
        self.category, self.split = category, split


class BTAD(AnomalyImageDataset):
    """One product of the BeanTech Anomaly Detection dataset (BTAD).

    Expected layout (masks share their image's stem; images and masks may be any
    of :data:`IMAGE_EXTENSIONS`, e.g. ``.bmp`` images with ``.png`` masks)::

        <root>/<product>/train/ok/*
        <root>/<product>/test/ok/*                      normal, label 0
        <root>/<product>/test/ko/*                      defective, label 1
        <root>/<product>/ground_truth/ko/<stem>.png

    Images are served in sorted path order (test: ``ko`` before ``ok``).

    Args:
        root: Folder holding the product folders.
        product: ``"01"``, ``"02"`` or ``"03"`` (or the ints 1 to 3).
        split: ``"train"`` (normal images only) or ``"test"``.
        image_size: Output size, a square side or (height, width).

    Raises:
        FileNotFoundError: If a required folder is missing or holds no images.
        MaskMatchError: If defective images and masks do not pair up by stem.
        ValueError: On a bad ``product``, ``split`` or ``image_size``.

    Example:
        >>> train_set = BTAD("data/btad", "01", "train", 256)  # doctest: +SKIP
    """

    PRODUCTS = ("01", "02", "03")

    def __init__(
        self,
        root: str | PathLike[str],
        product: str | int,
        split: Split = "train",
        image_size: ImageSize = 256,
    ) -> None:
        _check_split(split)
        name = f"{product:02d}" if isinstance(product, int) else str(product)
        if name not in self.PRODUCTS:
            raise ValueError(f"BTAD product must be one of {self.PRODUCTS}, got {product!r}")
        product_dir = _require_dir(_require_dir(Path(root), "BTAD root") / name, "BTAD product")
        if split == "train":
            train_dir = _require_dir(product_dir / "train" / "ok", "training folder")
            records = [ImageRecord(path, None, 0) for path in _list_images(train_dir)]
        else:
            defective_dir = _require_dir(product_dir / "test" / "ko", "defective test folder")
            normal_dir = _require_dir(product_dir / "test" / "ok", "normal test folder")
            mask_dir = _require_dir(product_dir / "ground_truth" / "ko", "ground-truth folder")
            records = _defective_records(defective_dir, mask_dir, ("",))
            records += [ImageRecord(path, None, 0) for path in _list_images(normal_dir)]
        super().__init__(records, image_size)
        self.product, self.split = name, split


class ImageFolder(AnomalyImageDataset):
    """A user's own product images: a folder of normal ones, optionally defective ones.

    Use ``ImageFolder(good_dir)`` for training and ``ImageFolder(good_dir,
    defective_dir, mask_dir)`` for testing. A mask pairs with the defective image
    of the same stem, named ``<stem>.<ext>`` or ``<stem>_mask.<ext>``. Without
    ``mask_dir`` the defective images get all-zero masks and ``has_masks`` is
    False: image-level metrics still work, pixel-level ones do not. Folders are
    not searched recursively; normal images come first, each folder sorted.

    Args:
        good_dir: Folder of normal images (label 0).
        defective_dir: Folder of defective images (label 1), if any.
        mask_dir: Folder of their defect masks, if any.
        image_size: Output size, a square side or (height, width).

    Raises:
        FileNotFoundError: If a given folder is missing or holds no images.
        MaskMatchError: If defective images and masks do not pair up by stem.
        ValueError: If ``mask_dir`` is given without ``defective_dir``, or on a bad
            ``image_size``.

    Example:
        >>> test_set = ImageFolder("parts/ok", "parts/ng", "parts/masks")  # doctest: +SKIP
    """

    def __init__(
        self,
        good_dir: str | PathLike[str],
        defective_dir: str | PathLike[str] | None = None,
        mask_dir: str | PathLike[str] | None = None,
        image_size: ImageSize = 256,
    ) -> None:
        if mask_dir is not None and defective_dir is None:
            raise ValueError(
                f"mask_dir {mask_dir} was given without defective_dir; masks belong to "
                f"defective images"
            )
        normal_dir = _require_dir(Path(good_dir), "good_dir")
        records = [ImageRecord(path, None, 0) for path in _list_images(normal_dir)]
        if defective_dir is not None:
            defective = _require_dir(Path(defective_dir), "defective_dir")
            if mask_dir is None:
                records += [ImageRecord(path, None, 1) for path in _list_images(defective)]
                self.has_masks = False
            else:
                masks = _require_dir(Path(mask_dir), "mask_dir")
                records += _defective_records(defective, masks, ("", "_mask"))
        super().__init__(records, image_size)


def _mvtec_test_records(category_dir: Path) -> list[ImageRecord]:
    """Records of an MVTec AD test split: ``good`` is normal, other folders defective."""
    test_dir = _require_dir(category_dir / "test", "test folder")
    truth_dir = category_dir / "ground_truth"
    kinds = sorted(path for path in test_dir.iterdir() if path.is_dir())
    if not kinds:
        raise FileNotFoundError(
            f"no defect-type folders in {test_dir}; expected good/ and one folder per defect"
        )
    records: list[ImageRecord] = []
    for kind in kinds:
        if kind.name == "good":
            records += [ImageRecord(path, None, 0) for path in _list_images(kind)]
        else:
            mask_dir = _require_dir(truth_dir / kind.name, f"ground-truth folder for {kind}")
            records += _defective_records(kind, mask_dir, ("_mask",))
    if truth_dir.is_dir():
        for folder in sorted(path for path in truth_dir.iterdir() if path.is_dir()):
            if not (test_dir / folder.name).is_dir():
                raise MaskMatchError(
                    f"ground-truth folder {folder} has no images: {test_dir / folder.name} "
                    f"does not exist"
                )
    return records


def _defective_records(
    image_dir: Path, mask_dir: Path, suffixes: tuple[str, ...]
) -> list[ImageRecord]:
    """Pair every image of ``image_dir`` with the mask named ``<stem><suffix>``.

    Raises:
        MaskMatchError: If an image has no mask or two, a mask has no image, or two
            masks share a stem.
    """
    images = _list_images(image_dir)
    masks: dict[str, Path] = {}
    for mask in _image_files(mask_dir):
        if mask.stem in masks:
            raise MaskMatchError(f"masks {masks[mask.stem]} and {mask} share a stem")
        masks[mask.stem] = mask

    records = []
    for image in images:
        wanted = [image.stem + suffix for suffix in suffixes]
        found = [masks.pop(stem) for stem in wanted if stem in masks]
        if not found:
            raise MaskMatchError(
                f"defective image {image} has no mask: looked for "
                f"{' or '.join(repr(stem) for stem in wanted)} with an extension in "
                f"{IMAGE_EXTENSIONS} in {mask_dir}"
            )
        if len(found) > 1:
            raise MaskMatchError(
                f"defective image {image} matches {len(found)} masks, expected one: "
                f"{' and '.join(str(mask) for mask in found)}"
            )
        records.append(ImageRecord(image, found[0], 1))
    if masks:
        orphan = next(iter(masks.values()))
        stems = [orphan.stem.removesuffix(s) for s in suffixes if orphan.stem.endswith(s)]
        raise MaskMatchError(
            f"mask {orphan} has no image: looked for "
            f"{' or '.join(repr(stem) for stem in stems) or 'a matching stem'} in {image_dir}"
            f" ({len(masks)} unmatched mask(s); mask names must be "
            f"{' or '.join(repr('<image stem>' + s) for s in suffixes)})"
        )
    return records


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else fail naming it and its siblings."""
    if path.is_dir():
        return path
    problem = "is not a folder" if path.exists() else "does not exist"
    hint = ""
    if path.parent.is_dir():
        siblings = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
        hint = f" ({path.parent} contains: {', '.join(siblings) or 'no folders'})"
    raise FileNotFoundError(f"{what} {path} {problem}{hint}")


def _image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _list_images(folder: Path) -> list[Path]:
    """Like :func:`_image_files`, but an empty folder is an error."""
    files = _image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} in {folder}")
    return files


_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# EXIF orientations 5 to 8 turn the stored image by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open(path: Path) -> Image.Image:
    """Fully decode an image file, upright as viewers show it; a corrupt file fails named."""
    try:
        with Image.open(path) as image:
            image.load()
            # The pixels are stored as the camera held them; the EXIF tag says how to turn them.
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise
    except _READ_ERRORS as error:
        raise ImageReadError(f"cannot decode image file {path}: {error}") from error


def _upright_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as viewers show it, from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS:
                return height, width
            return width, height
    except FileNotFoundError:
        raise
    except _READ_ERRORS as error:
        raise ImageReadError(f"cannot read image file {path}: {error}") from error


def _read_mask(record: ImageRecord, mask_path: Path,
               image_size: tuple[int, int]) -> NDArray[np.bool_]:
    """Decode a record's mask and check it against its image's upright ``(width, height)``."""
    mask = _open(mask_path)
    if mask.size != image_size:
        raise MaskMatchError(
            f"mask {mask_path} is {mask.width}x{mask.height} (width x height) but "
            f"its image {record.image} is {image_size[0]}x{image_size[1]}"
        )
    defects = _defect_pixels(mask)
    if record.label == 1 and not defects.any():
        raise EmptyMaskError(
            f"mask {mask_path} of defective image {record.image} marks no defect: every "
            f"pixel is 0 (masks mark defects by non-zero pixels); fix the mask, or move the "
            f"image to the normal ones if it has no defect"
        )
    return defects


def _resized_pixels(image: Image.Image, path: Path, size: tuple[int, int]) -> NDArray[np.float32]:
    """``(H, W, 3)`` float32 RGB in [0, 1] at ``size`` (width, height), bilinear."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # Pillow holds 16-bit grayscale as I;16 (or I); 65535 is white, as in viewers.
        scale = 1.0 if image.mode == "F" else 65535.0
        if values.min() < 0 or values.max() > scale:
            raise ImageReadError(
                f"image file {path} holds values in [{values.min():g}, {values.max():g}] "
                f"(mode {image.mode}); expected 8-bit, 16-bit or [0, 1] float pixels"
            )
        gray = Image.fromarray((values / scale).astype(np.float32), "F")
        if gray.size != size:
            gray = gray.resize(size, Image.Resampling.BILINEAR)
        return np.repeat(np.asarray(gray, dtype=np.float32)[:, :, None], 3, axis=2)
    rgb = image.convert("RGB")
    if rgb.size != size:
        # Pillow widens the bilinear kernel when shrinking, i.e. it antialiases.
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _defect_pixels(mask: Image.Image) -> NDArray[np.bool_]:
    """Binary defect map of a mask image: every non-zero pixel is a defect.

    Any threshold above zero would read soft, anti-aliased or 0/1 masks as partly or wholly
    empty, and count those defects as normal. Palette masks mark defects by a non-zero
    index; colour masks by any non-zero channel; fully transparent pixels mark nothing.
    """
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        values = np.asarray(mask.convert("RGBA"))
        return (values[:, :, :3].max(axis=2) > 0) & (values[:, :, 3] > 0)
    if mask.mode in ("P", "L", "1", "F", *_SIXTEEN_BIT_MODES):
        return np.asarray(mask) != 0
    return np.asarray(mask.convert("RGB")).max(axis=2) > 0
