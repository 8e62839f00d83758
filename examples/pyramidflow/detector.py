"""A defect detector in a few lines: fit on normal images, predict maps, scores and verdicts.

Example:
    >>> import torch
    >>> detector = Detector(channels=4, levels=2, depth=1, kernel_size=3, image_size=16,
    ...                     epochs=1, holdout=0.25)
    >>> detector = detector.fit(torch.rand(8, 3, 16, 16))
    >>> prediction = detector.predict(torch.rand(2, 3, 32, 32))  # resized to 16 × 16
    >>> tuple(prediction.maps.shape), prediction.verdicts.dtype
    ((2, 16, 16), torch.bool)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .config import PyramidFlowConfig
from .datasets import Sample
from .evaluate import evaluate_model
from .inference import ImageSource, predictions
from .model import PyramidFlow
from .train import (
    Thresholds,
    check_device,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    train,
)

__all__ = ["Detector", "Prediction"]


@dataclass
class Prediction:
    """The detector's output for ``N`` images, at the model's ``image_size`` ``S``.

    Attributes:
        maps: ``(N, S, S)`` float anomaly maps (eq. 10, each divided by its own mean with
            ``config.map_normalization="image_mean"``); higher is more anomalous.
        scores: ``(N,)`` image scores, the maximum of each map before that division.
        masks: ``(N, S, S)`` bool, True where a map exceeds the pixel threshold; None when
            the detector has no thresholds (``config.holdout == 0``).
        verdicts: ``(N,)`` bool, True for a defective image (score above the image
            threshold); None without thresholds.
    """

    maps: Tensor
    scores: Tensor
    masks: Tensor | None
    verdicts: Tensor | None


class Detector:
    """PyramidFlow as a detector: training, thresholds, prediction, evaluation and files.

    Inputs are floats in ``[0, 1]``; images whose size differs from ``config.image_size``
    are resized to it with antialiased bilinear interpolation, so maps and masks come at
    ``image_size × image_size``.

    Args:
        config: The settings; the paper's defaults when None.
        device: Where the model runs (keyword only).
        **overrides: Config fields to replace, e.g. ``image_size=128, epochs=5``.

    Raises:
        ValueError: On an unknown config field or a bad value (by name), or a device this
            machine does not have (e.g. ``"cuda"`` without CUDA).
    """

    def __init__(self, config: PyramidFlowConfig | None = None, *,
                 device: str | torch.device = "cpu", **overrides: Any) -> None:
        if config is not None and not isinstance(config, PyramidFlowConfig):
            raise TypeError(f"config must be a PyramidFlowConfig or None, received "
                            f"{type(config).__name__}")
        base = (config or PyramidFlowConfig()).to_dict()
        self.config = PyramidFlowConfig.from_dict(base | overrides)
        self.device = check_device(device)
        self.model: PyramidFlow | None = None
        self.thresholds: Thresholds | None = None

    def __repr__(self) -> str:
        state = "fitted" if self.model is not None else "not fitted"
        return f"Detector({state}, {self.config})"

    def fit(self, data: ImageSource, *, checkpoint_dir: str | os.PathLike[str] | None = None,
            resume: str | os.PathLike[str] | None = None, num_workers: int = 0,
            progress: bool = False) -> Detector:
        """Train on normal images; set the template and the held-out thresholds.

        Args:
            data: Normal images: a dataset of samples, an ``(N, 3, H, W)`` tensor or a list
                of ``(3, H, W)`` tensors. ``config.holdout`` of them calibrate the thresholds
                and are never trained on.
            checkpoint_dir: Folder for per-epoch checkpoints, if any.
            resume: A checkpoint to continue from.
            num_workers: DataLoader worker processes.
            progress: Show progress bars.

        Returns:
            ``self``, fitted.
        """
        result = train(self.config, data, checkpoint_dir=checkpoint_dir, resume=resume,
                       device=self.device, num_workers=num_workers, progress=progress)
        self.model, self.thresholds = result.model, result.thresholds
        return self

    def _fitted(self) -> PyramidFlow:
        if self.model is None:
            raise RuntimeError("the detector is not fitted: call fit(normal_images) or "
                               "Detector.load(path) first")
        return self.model

    def predict(self, images: ImageSource, *, batch_size: int = 8) -> Prediction:
        """Anomaly maps, image scores and (with thresholds) masks and verdicts.

        Args:
            images: ``(N, 3, H, W)`` floats in ``[0, 1]``, a list of ``(3, H, W)`` or a
                dataset of samples; resized to ``config.image_size`` if needed.
            batch_size: Images per forward pass.

        Returns:
            A :class:`Prediction` on the CPU.

        Raises:
            RuntimeError: If the detector is not fitted.
            TypeError, ValueError: On images of the wrong type, shape or range.
        """
        maps, scores = predictions(self._fitted(), images, batch_size=batch_size)
        if self.thresholds is None:
            return Prediction(maps, scores, None, None)
        return Prediction(maps, scores, maps > self.thresholds.pixel,
                          scores > self.thresholds.image)

    def evaluate(self, dataset: Dataset[Sample], *, full_range_aupro: bool = False,
                 num_workers: int = 0) -> dict[str, Any]:
        """Threshold-free metrics on a labelled test set (see :func:`evaluate_model`)."""
        return evaluate_model(self._fitted(), dataset, full_range_aupro=full_range_aupro,
                              num_workers=num_workers)

    def image_template(self) -> Tensor:
        """The image template (Fig. 7), ``(3, S, S)`` clipped to ``[0, 1]`` for display.

        Raises:
            RuntimeError: If the detector is not fitted.
            ValueError: With the ResNet-18 front, which has no inverse.
        """
        return self._fitted().image_template().clamp(0.0, 1.0).cpu()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write weights, template, thresholds and config to one checkpoint file.

        Returns:
            The file's path.
        """
        return save_checkpoint(path, self._fitted(), epoch=self.config.epochs,
                               thresholds=self.thresholds)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *,
             device: str | torch.device = "cpu") -> Detector:
        """A detector from a file of :meth:`save` or a training checkpoint.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If it is not a PyramidFlow checkpoint, or its weights do not fit its
                config (naming the first tensor that differs).
        """
        checkpoint = load_checkpoint(path)
        detector = cls(checkpoint["config"], device=device)
        detector.model = model_from_checkpoint(checkpoint, detector.device, source=path)
        detector.thresholds = checkpoint["thresholds"]
        return detector
