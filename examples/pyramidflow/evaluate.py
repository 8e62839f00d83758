"""Metrics of a trained model on a labelled test set, and their JSON and markdown reports.

Three threshold-free metrics, as in the paper's tables: pixel AUROC, image AUROC (the image
score is the maximum of its anomaly map, before ``config.map_normalization``) and AUPRO
integrated up to a false-positive rate of 0.3, the MVTec AD definition. The full-range AUPRO
(``fpr_limit=1``, what the reference code reports) is computed only on request and labelled as
such: it is not comparable to AUPRO@0.3.

Maps are computed at the model's ``image_size`` and, when a dataset serves masks of another
size, resized bilinearly to the masks; the metrics are therefore at the ground truth's
resolution, which every result states. Pixel metrics are skipped, with a logged note, when a
dataset has no masks (``has_masks`` is False) or no defective pixel; image AUROC when the
test set lacks normal or defective images.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional
from torch.utils.data import Dataset

from .datasets import Sample
from .files import write_text_atomically
from .inference import batch_predictions, image_batches
from .metrics import aupro, image_auroc, pixel_auroc
from .model import PyramidFlow

__all__ = [
    "METRIC_NAMES",
    "collect_maps",
    "evaluate_model",
    "mean_metrics",
    "metrics_from_maps",
    "results_table",
    "write_results",
]

logger = logging.getLogger(__name__)

METRIC_NAMES = {
    "pixel_auroc": "Pixel AUROC",
    "image_auroc": "Image AUROC",
    "aupro_0.3": "AUPRO@0.3",
    "aupro_full_range": "AUPRO full range (not comparable)",
}
"""Result keys of the metrics and their table headers, in table order."""


def collect_maps(model: PyramidFlow, dataset: Dataset[Sample], *, batch_size: int = 8,
                 num_workers: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Anomaly maps, masks, labels and image scores of every test image, maps at the masks'
    resolution.

    Returns:
        ``maps (N, H, W)`` float, ``masks (N, H, W)`` bool, ``labels (N,)`` int64 and
        ``scores (N,)`` float (:meth:`~.model.PyramidFlow.localize`).
    """
    maps, masks, labels, scores = [], [], [], []
    for batch in image_batches(dataset, model.config.image_size, batch_size, num_workers):
        batch_masks = batch["mask"][:, 0] > 0.5
        found, found_scores = batch_predictions(model, batch["image"])
        if found.shape[-2:] != batch_masks.shape[-2:]:
            found = functional.interpolate(found[:, None], size=batch_masks.shape[-2:],
                                           mode="bilinear", align_corners=False)[:, 0]
        maps.append(found)
        masks.append(batch_masks)
        labels.append(torch.as_tensor(batch["label"]))
        scores.append(found_scores)
    if not maps:
        raise ValueError("the test set is empty: expected at least one image")
    return torch.cat(maps), torch.cat(masks), torch.cat(labels).long(), torch.cat(scores)


def metrics_from_maps(maps: Tensor, masks: Tensor, labels: Tensor, *,
                      image_scores: Tensor | None = None, has_masks: bool = True,
                      full_range_aupro: bool = False) -> dict[str, Any]:
    """The metrics of precomputed maps (see the module docstring for what is skipped).

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` ground truth, bool or 0/1.
        labels: ``(N,)`` image labels, 1 for defective.
        image_scores: ``(N,)`` image scores; ``None``: the maximum of each map.
        has_masks: False when the masks are placeholders (defects without ground truth).
        full_range_aupro: Also report the full-range AUPRO (``aupro_full_range``).

    Returns:
        ``pixel_auroc``, ``image_auroc``, ``aupro_0.3`` (and ``aupro_full_range``), each a
        float or None when skipped; ``resolution`` ``[H, W]``; ``images`` and ``defective``
        counts; ``notes``, the reasons for anything skipped.

    Example:
        >>> maps = torch.zeros(2, 4, 4); maps[1, :2, :2] = 1.0
        >>> masks = maps > 0
        >>> metrics_from_maps(maps, masks, torch.tensor([0, 1]))["pixel_auroc"]
        1.0
    """
    labels = np.asarray(labels)
    results: dict[str, Any] = {
        "resolution": list(maps.shape[-2:]),
        "images": int(len(labels)),
        "defective": int(labels.sum()),
    }
    notes = []
    if 0 < labels.sum() < len(labels):
        if image_scores is None:
            image_scores = maps.flatten(1).max(dim=1).values
        results["image_auroc"] = image_auroc(image_scores, labels)
    else:
        results["image_auroc"] = None
        notes.append("image AUROC skipped: the test set needs both normal and defective images")
    pixel_keys = ["pixel_auroc", "aupro_0.3"] + (["aupro_full_range"] if full_range_aupro else [])
    reason = None
    if not has_masks:
        reason = "the dataset has no defect masks"
    elif not bool(masks.any()):
        reason = "the masks mark no defective pixel"
    if reason is None:
        results["pixel_auroc"] = pixel_auroc(maps, masks)
        results["aupro_0.3"] = aupro(maps, masks, fpr_limit=0.3)
        if full_range_aupro:
            results["aupro_full_range"] = aupro(maps, masks, fpr_limit=1.0)
    else:
        results.update(dict.fromkeys(pixel_keys))
        notes.append(f"pixel metrics skipped: {reason}")
    for note in notes:
        logger.info("%s", note)
    results["notes"] = notes
    return results


def evaluate_model(model: PyramidFlow, dataset: Dataset[Sample], *,
                   full_range_aupro: bool = False, num_workers: int = 0) -> dict[str, Any]:
    """Pixel AUROC, image AUROC and AUPRO@0.3 of ``model`` on a labelled test set.

    Args:
        model: A trained model with its latent template.
        dataset: Test samples with masks and labels.
        full_range_aupro: Also report the full-range AUPRO, labelled as such.
        num_workers: DataLoader worker processes.

    Returns:
        As :func:`metrics_from_maps`.
    """
    maps, masks, labels, scores = collect_maps(model, dataset,
                                               batch_size=model.config.batch_size,
                                               num_workers=num_workers)
    return metrics_from_maps(maps, masks, labels, image_scores=scores,
                             has_masks=getattr(dataset, "has_masks", True),
                             full_range_aupro=full_range_aupro)


def mean_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The mean of each metric over the categories that have it (None if none has)."""
    means: dict[str, float | None] = {}
    for key in METRIC_NAMES:
        values = [r[key] for r in results.values() if r.get(key) is not None]
        if any(key in r for r in results.values()):
            means[key] = float(np.mean(values)) if values else None
    return means


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of per-category metrics (in %) with their mean, and the resolutions.

    Example:
        >>> print(results_table({"a": {"pixel_auroc": 0.9, "image_auroc": None,
        ...                            "aupro_0.3": 0.8, "resolution": [64, 64]}}))
        | Category | Pixel AUROC | Image AUROC | AUPRO@0.3 |
        | --- | ---: | ---: | ---: |
        | a | 90.0 | n/a | 80.0 |
        | **mean** | 90.0 | n/a | 80.0 |
        <BLANKLINE>
        Metrics in %, evaluated at 64×64 pixels.
    """
    keys = [k for k in METRIC_NAMES if any(k in r for r in results.values())]
    rows = [["Category", *(METRIC_NAMES[k] for k in keys)], ["---", *(["---:"] * len(keys))]]
    for name, metrics in results.items():
        rows.append([name, *(_percent(metrics.get(k)) for k in keys)])
    means = mean_metrics(results)
    rows.append(["**mean**", *(_percent(means.get(k)) for k in keys)])
    resolutions = sorted({"×".join(str(s) for s in r["resolution"]) for r in results.values()
                          if "resolution" in r})
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(f"Metrics in %, evaluated at {' and '.join(resolutions) or 'unknown'} pixels.")
    notes = [f"{name}: {note}" for name, r in results.items() for note in r.get("notes", [])]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def write_results(results: Mapping[str, Mapping[str, Any]], folder: str | os.PathLike[str],
                  *, extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``results.json`` (per category, the mean, and ``extra``) and ``results.md``.

    Returns:
        The two paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"categories": dict(results), "mean": mean_metrics(results), **(extra or {})}
    json_path, md_path = folder / "results.json", folder / "results.md"
    write_text_atomically(json_path, json.dumps(payload, indent=2) + "\n")
    write_text_atomically(md_path, results_table(results) + "\n")
    return json_path, md_path
