"""PyramidFlow (CVPR 2023): normalizing-flow defect localization without pre-trained models.

Fit a :class:`Detector` on normal images, then predict anomaly maps, scores and verdicts::

    from examples.pyramidflow import Detector, MVTecAD
    detector = Detector(image_size=256).fit(MVTecAD("data/mvtec", "bottle", "train"))
    print(detector.evaluate(MVTecAD("data/mvtec", "bottle", "test")))

or run ``python -m examples.pyramidflow demo`` (see :mod:`examples.pyramidflow.cli`).
"""

from .config import MVTEC_TEXTURES, PyramidFlowConfig, mvtec_defaults
from .datasets import (
    BTAD,
    AnomalyImageDataset,
    EmptyMaskError,
    ImageFolder,
    MaskMatchError,
    MVTecAD,
    Sample,
)
from .detector import Detector, Prediction
from .evaluate import evaluate_model, results_table, write_results
from .metrics import aupro, image_auroc, pixel_auroc
from .model import PyramidFlow
from .photos import PhotoDefects
from .synthetic import SyntheticDefects
from .train import Thresholds, TrainingResult, train

__all__ = [
    "BTAD",
    "MVTEC_TEXTURES",
    "AnomalyImageDataset",
    "EmptyMaskError",
    "MaskMatchError",
    "Detector",
    "ImageFolder",
    "MVTecAD",
    "PhotoDefects",
    "Prediction",
    "PyramidFlow",
    "PyramidFlowConfig",
    "Sample",
    "SyntheticDefects",
    "Thresholds",
    "TrainingResult",
    "aupro",
    "evaluate_model",
    "image_auroc",
    "mvtec_defaults",
    "pixel_auroc",
    "results_table",
    "train",
    "write_results",
]
