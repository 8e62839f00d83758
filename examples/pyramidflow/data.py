"""Every data source of the PyramidFlow example behind one import.

File-based datasets (MVTec AD, BTAD, a user's own folders) live in
:mod:`examples.pyramidflow.datasets`, the procedural :class:`SyntheticDefects` in
:mod:`examples.pyramidflow.synthetic`; all of them yield the same :class:`Sample`.

Example:
    >>> from examples.pyramidflow.data import SyntheticDefects
    >>> SyntheticDefects("texture", "train", num_images=2, image_size=32)[0]["image"].shape
    torch.Size([3, 32, 32])
"""

from .datasets import (
    BTAD,
    IMAGE_EXTENSIONS,
    AnomalyImageDataset,
    ImageFolder,
    ImageReadError,
    ImageRecord,
    ImageSize,
    MaskMatchError,
    MVTecAD,
    Sample,
    as_image_size,
)
from .synthetic import DEFECT_KINDS, MIN_VISIBLE_CHANGE, Rendering, SyntheticDefects

__all__ = [
    "BTAD",
    "DEFECT_KINDS",
    "IMAGE_EXTENSIONS",
    "MIN_VISIBLE_CHANGE",
    "AnomalyImageDataset",
    "ImageFolder",
    "ImageReadError",
    "ImageRecord",
    "ImageSize",
    "MVTecAD",
    "MaskMatchError",
    "Rendering",
    "Sample",
    "SyntheticDefects",
    "as_image_size",
]
