"""Running a PyramidFlow model over many images: input checks, resizing and batching.

Training, calibration, prediction and evaluation all feed images through the same path:
anything that is not already ``(B, 3, S, S)`` at the configured ``image_size`` ``S`` is resized
with antialiased bilinear interpolation (like the datasets' Pillow resize), and values must
be floats in ``[0, 1]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.nn import functional
from torch.utils.data import DataLoader, Dataset

from .datasets import Sample
from .model import BANK_SIZE, LatentStatistics, PyramidFlow

__all__ = [
    "ImageSource",
    "ImageTensors",
    "anomaly_maps",
    "as_dataset",
    "batch_maps",
    "batch_predictions",
    "image_batches",
    "latent_statistics",
    "predictions",
    "to_image_batch",
]

# Rounding in a resize or a colour conversion may step just outside [0, 1].
_RANGE_TOLERANCE = 1e-3

ImageSource = Dataset[Sample] | Tensor | Sequence[Tensor]
"""A dataset of :class:`Sample` s, an ``(N, 3, H, W)`` tensor or a list of ``(3, H, W)``."""


def to_image_batch(images: Tensor, image_size: int, *, what: str = "images") -> Tensor:
    """Check a batch of RGB images and resize it to ``image_size × image_size``.

    Args:
        images: ``(B, 3, H, W)`` floats in ``[0, 1]``.
        image_size: The model's square input side.
        what: How to name the input in error messages.

    Returns:
        ``(B, 3, image_size, image_size)`` float tensor (the input itself when no resize is due).

    Raises:
        TypeError: If ``images`` is not a floating-point tensor.
        ValueError: If its shape is not ``(B, 3, H, W)`` or its values leave ``[0, 1]``.

    Example:
        >>> to_image_batch(torch.rand(2, 3, 20, 30), 16).shape
        torch.Size([2, 3, 16, 16])
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, received {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be floats in [0, 1], received dtype {images.dtype}"
                        + (" (divide 8-bit images by 255)" if images.dtype == torch.uint8 else ""))
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must have shape (N, 3, H, W), received {tuple(images.shape)}")
    if images.numel():
        low, high = images.min().item(), images.max().item()
        if not (-_RANGE_TOLERANCE <= low and high <= 1 + _RANGE_TOLERANCE):
            raise ValueError(f"{what} must have values in [0, 1], received values in "
                             f"[{low:.4g}, {high:.4g}]")
    if tuple(images.shape[-2:]) == (image_size, image_size):
        return images
    return functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                  align_corners=False, antialias=True).clamp_(0.0, 1.0)


class ImageTensors(Dataset[Sample]):
    """Images given as tensors, served as unlabelled :class:`Sample` s at ``image_size``.

    Args:
        images: An ``(N, 3, H, W)`` tensor, or a sequence of ``(3, H, W)`` tensors (sizes may
            differ; each is resized on its own).
        image_size: Output side length.

    Raises:
        TypeError, ValueError: As :func:`to_image_batch`, naming the offending image.

    Example:
        >>> ImageTensors(torch.rand(2, 3, 8, 8), 4)[1]["image"].shape
        torch.Size([3, 4, 4])
    """

    has_masks = False

    def __init__(self, images: Tensor | Sequence[Tensor], image_size: int) -> None:
        if isinstance(images, Tensor):
            self.images = to_image_batch(images, image_size)
        else:
            resized = []
            for index, image in enumerate(images):
                if not isinstance(image, Tensor) or image.dim() != 3:
                    shape = tuple(image.shape) if isinstance(image, Tensor) else type(image)
                    raise ValueError(f"images[{index}] must be a (3, H, W) tensor, "
                                     f"received {shape}")
                resized.append(to_image_batch(image[None], image_size, what=f"images[{index}]"))
            if not resized:
                raise ValueError("images is empty: expected at least one (3, H, W) image")
            self.images = torch.cat(resized)
        self.images = self.images.detach().to("cpu", torch.float32)
        if len(self.images) == 0:
            raise ValueError("images is empty: expected at least one (3, H, W) image")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        height, width = self.images.shape[-2:]
        return Sample(image=self.images[index], mask=torch.zeros(1, height, width), label=0,
                      path=f"tensor/{index:06d}")


def as_dataset(data: ImageSource, image_size: int) -> Dataset[Sample]:
    """A dataset of samples for ``data``: datasets pass through, tensors are wrapped.

    Raises:
        TypeError: If ``data`` is neither a dataset nor tensors.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, Tensor) or (isinstance(data, Sequence) and not isinstance(data, str)):
        return ImageTensors(data, image_size)
    raise TypeError("expected a Dataset of samples, an (N, 3, H, W) tensor or a list of "
                    f"(3, H, W) tensors, received {type(data).__name__}")


def image_batches(data: ImageSource, image_size: int, batch_size: int,
                  num_workers: int = 0) -> Iterator[Sample]:
    """Batches of samples in order, their ``image`` checked and resized to ``image_size``."""
    loader = DataLoader(as_dataset(data, image_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    for batch in loader:
        batch["image"] = to_image_batch(batch["image"], image_size)
        yield batch


def _device(model: PyramidFlow) -> torch.device:
    return next(model.parameters()).device


def _scored_states(model: PyramidFlow, images: Tensor) -> tuple[Tensor, ...]:
    """The states the model scores (:meth:`PyramidFlow.scored_states`), contiguous.

    The model computes them channels-last on the CPU (see :meth:`PyramidFlow.forward`); they
    are made contiguous again because the ``local_nearest`` score reads them one channel at a
    time, which channels-last makes slower (``benchmarks/results/pyramidflow_speed.md``).
    """
    return tuple(z.contiguous() for z in model.scored_states(images))


@torch.no_grad()
def batch_predictions(model: PyramidFlow, images: Tensor) -> tuple[Tensor, Tensor]:
    """Anomaly maps ``(B, S, S)`` and image scores ``(B,)`` of one batch, on the CPU, in eval
    mode (restored after); see :meth:`PyramidFlow.localize` for how the two are made.

    Raises:
        RuntimeError: If the model has no latent template yet.
    """
    was_training = model.training
    model.eval()
    try:
        size = model.config.image_size
        images = to_image_batch(images, size).to(_device(model))
        if not model.config.test_time_flips:
            maps = model.anomaly_map(_scored_states(model, images), (size, size))
        else:
            maps = torch.zeros(len(images), size, size, device=images.device)
            for turns, flip in itertools.product(range(4), (False, True)):
                def view(x: Tensor, turns: int = turns, flip: bool = flip) -> Tensor:
                    x = x.flip(-1) if flip else x
                    return x.rot90(turns, (-2, -1))
                found = model.anomaly_map(_scored_states(model, view(images)), (size, size))
                # Undo the view on the map: rotate back, then flip back.
                found = found.rot90(-turns, (-2, -1))
                maps += found.flip(-1) if flip else found
            maps = maps / 8
        maps, scores = model.localize(maps.float())
        return maps.cpu(), scores.cpu()
    finally:
        model.train(was_training)


def batch_maps(model: PyramidFlow, images: Tensor) -> Tensor:
    """The anomaly maps of :func:`batch_predictions` alone."""
    return batch_predictions(model, images)[0]


def predictions(model: PyramidFlow, data: ImageSource, *, batch_size: int = 8,
                num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Anomaly maps ``(N, S, S)`` and image scores ``(N,)`` of every image of ``data``, in
    order."""
    size = model.config.image_size
    found = [batch_predictions(model, batch["image"])
             for batch in image_batches(data, size, batch_size, num_workers)]
    return torch.cat([m for m, _ in found]), torch.cat([s for _, s in found])


def anomaly_maps(model: PyramidFlow, data: ImageSource, *, batch_size: int = 8,
                 num_workers: int = 0) -> Tensor:
    """The anomaly maps of :func:`predictions` alone."""
    return predictions(model, data, batch_size=batch_size, num_workers=num_workers)[0]


@torch.no_grad()
def latent_statistics(model: PyramidFlow, data: ImageSource, *, batch_size: int = 8,
                      num_workers: int = 0) -> LatentStatistics:
    """Per-level sums of the eval-mode scored states of ``data`` and of their squares.

    The states are :meth:`PyramidFlow.scored_states`: the latents, and with
    ``config.input_weight > 0`` the input pyramid too.

    The input of :meth:`PyramidFlow.set_template`; float64 sums keep the mean and the spread
    exact enough over thousands of images.

    Raises:
        ValueError: If ``data`` holds no image.
    """
    was_training = model.training
    model.eval()
    sums: list[Tensor] | None = None
    square_sums: list[Tensor] | None = None
    samples: list[list[Tensor]] = []
    count = 0
    dataset = as_dataset(data, model.config.image_size)
    # With score="nearest", every image gives the same number of random positions per level
    # to the bank, drawn from a generator seeded by the run's seed.
    per_image = -(-BANK_SIZE // max(len(dataset), 1))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(model.config.seed)
    # With score="local_nearest", the whole states of config.bank_images images evenly
    # spaced through the set (not the first ones: folders are often sorted by capture).
    kept = model.config.bank_images
    banked = set(torch.linspace(0, len(dataset) - 1, kept).round().long().tolist()
                 if len(dataset) > kept else range(len(dataset)))  # type: ignore[arg-type]
    try:
        size = model.config.image_size
        for batch in image_batches(dataset, size, batch_size, num_workers):
            images = batch["image"].to(_device(model))
            states = [z.double() for z in _scored_states(model, images)]
            parts = [z.sum(0) for z in states]
            squares = [z.square().sum(0) for z in states]
            sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
            square_sums = squares if square_sums is None else [
                s + p for s, p in zip(square_sums, squares)]
            if model.config.score == "nearest":
                samples.append([_sample_vectors(z, per_image, generator) for z in states])
            elif model.config.score == "local_nearest":
                keep = [i for i in range(len(batch["image"])) if count + i in banked]
                samples.append([z[keep].float() for z in states])
            count += len(batch["image"])
    finally:
        model.train(was_training)
    if sums is None or square_sums is None:
        raise ValueError("cannot compute a latent template from an empty image set")
    bank = None
    if samples:
        bank = tuple(torch.cat(level)[:BANK_SIZE].float() for level in zip(*samples))
    return LatentStatistics(tuple(sums), tuple(square_sums), count, bank)


def _sample_vectors(z: Tensor, per_image: int, generator: torch.Generator) -> Tensor:
    """``(B * k, C)``: the latent vectors of ``k`` random positions of every image of ``z``."""
    b, c, h, w = z.shape
    k = min(per_image, h * w)
    picks = torch.stack([torch.randperm(h * w, generator=generator)[:k] for _ in range(b)])
    flat = z.flatten(2)  # (B, C, H*W)
    chosen = flat.gather(2, picks.to(z.device)[:, None].expand(b, c, k))
    return chosen.permute(0, 2, 1).reshape(-1, c)
