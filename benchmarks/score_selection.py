"""How the default score was chosen: many scorings of the same trained reference models.

For each class of ``PhotoDefects`` (data seed 0, 32 training and 32 test images, 128×128), the
reference preset is trained for 10 epochs with the per-group recipe of ``real_defects.py``
(and, with ``--epochs 0``, left untrained), then scored every way below from the same latents:

* ``eq10``: ``|z - z̄|`` (the public code); ``std_ch``: over the per-level, per-channel spread
  (``score="standardized"``); ``std_pos``: over the per-position spread; ``std_shrink``: over
  the mean of the two variances; ``rms_ch``: root-mean-square standardised difference;
* ``nearest``: standardised distance to the nearest of 8192 training latents from any position
  (``score="nearest"``); ``std+nearest``: their sum;
* ``aligned{r}``: distance to the nearest latent of every training image within ``r``
  positions (``score="local_nearest"``, ``search_radius=r``);
* ``..._s{σ}``: the map blurred with a Gaussian of ``σ`` pixels.

This chose ``score="local_nearest"`` with ``search_radius=1`` as the default; the main table
(``real_defects.py``) then reports on data seed 1, images that played no part in the choice.

Reproduce (about 10 min per class on one core)::

    python benchmarks/score_selection.py hubble 10      # trains, saves, then scores

Results: ``benchmarks/results/real_defects_selection.md``.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from real_defects import group_settings  # noqa: E402

from examples.pyramidflow import PyramidFlowConfig, train  # noqa: E402
from examples.pyramidflow.evaluate import metrics_from_maps  # noqa: E402
from examples.pyramidflow.inference import image_batches  # noqa: E402
from examples.pyramidflow.model import PyramidFlow, gaussian_blur  # noqa: E402
from examples.pyramidflow.photos import PhotoDefects  # noqa: E402

S = 128


def trained_model(category: str, epochs: int) -> PyramidFlow:
    settings = {"image_size": S, "epochs": epochs, "batch_size": 2, "holdout": 0.0, "seed": 0,
                **group_settings(category)}
    config = PyramidFlowConfig.from_preset("paper-code", **settings)
    started = time.perf_counter()
    model = train(config, PhotoDefects(category, "train", 32, image_size=S),
                  progress=False).model
    print(category, epochs, f"{time.perf_counter() - started:.0f} s", flush=True)
    return model.eval()


def latents(model: PyramidFlow, dataset: PhotoDefects) -> tuple[list, torch.Tensor, torch.Tensor]:
    out, masks, labels = [], [], []
    with torch.no_grad():
        for batch in image_batches(dataset, S, 8):
            out.append(model(batch["image"]))
            masks.append(batch["mask"][:, 0] > 0.5)
            labels.append(torch.as_tensor(batch["label"]))
    return [torch.cat(level) for level in zip(*out)], torch.cat(masks), torch.cat(labels)


def aligned_nearest(z, gallery, sigma, r):
    """Minimum over training images and shifts within ``r`` of the standardised distance."""
    b, c, h, w = z.shape
    padded = torch.nn.functional.pad(gallery / sigma, (r, r, r, r), mode="replicate")
    queries = z / sigma
    best = torch.full((b, h, w), float("inf"))
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            shifted = padded[:, :, dy:dy + h, dx:dx + w]
            for i in range(b):
                found = (queries[i:i + 1] - shifted).square().sum(1).min(0).values
                best[i] = torch.minimum(best[i], found)
    return (best / c).sqrt()[:, None]


def global_nearest(z, gallery, sigma, k=8192):
    b, c, h, w = z.shape
    generator = torch.Generator().manual_seed(0)
    keys = (gallery / sigma).permute(0, 2, 3, 1).reshape(-1, c)
    keys = keys[torch.randperm(len(keys), generator=generator)[:k]]
    queries = (z / sigma).permute(0, 2, 3, 1).reshape(-1, c)
    found = torch.cat([torch.cdist(p, keys).min(1).values for p in queries.split(8192)])
    return (found / math.sqrt(c)).view(b, 1, h, w)


def score_all(model: PyramidFlow, category: str) -> dict[str, list[float]]:
    train_z, _, _ = latents(model, PhotoDefects(category, "train", 32, image_size=S))
    test_z, masks, labels = latents(model, PhotoDefects(category, "test", 32, image_size=S))
    mean = [t.mean(0, keepdim=True) for t in train_z]
    var_pos = [t.var(0, keepdim=True, unbiased=False) for t in train_z]
    var_ch = [v.mean((2, 3), keepdim=True) for v in var_pos]

    def compose(levels):
        return model.compose(tuple(levels))[:, 0]

    maps = {}
    with torch.no_grad():
        levels = list(zip(test_z, train_z, mean, var_pos, var_ch))
        maps["eq10"] = compose([(z - m).abs().mean(1, keepdim=True) for z, _, m, _, _ in levels])
        std_ch = [((z - m).abs() / vc.sqrt()).mean(1, keepdim=True) for z, _, m, _, vc in levels]
        maps["std_ch"] = compose(std_ch)
        maps["std_pos"] = compose([((z - m).abs() / (v + 1e-12).sqrt()).mean(1, keepdim=True)
                                   for z, _, m, v, _ in levels])
        maps["std_shrink"] = compose([((z - m).abs() / (0.5 * v + 0.5 * vc).sqrt())
                                      .mean(1, keepdim=True) for z, _, m, v, vc in levels])
        maps["rms_ch"] = compose([((z - m).square() / vc).mean(1, keepdim=True).sqrt()
                                  for z, _, m, _, vc in levels])
        nearest = [global_nearest(z, t, vc.sqrt()) for z, t, _, _, vc in levels]
        maps["nearest"] = compose(nearest)
        for r in (0, 1, 2):
            maps[f"aligned{r}"] = compose([aligned_nearest(z, t, vc.sqrt(), r)
                                           for z, t, _, _, vc in levels])
        maps["std+nearest"] = compose([a + b for a, b in zip(std_ch, nearest)])
        for sigma in (1.0, 2.0, 4.0):
            maps[f"std_ch_s{sigma}"] = gaussian_blur(maps["std_ch"][:, None], sigma)[:, 0]
            maps[f"nearest_s{sigma}"] = gaussian_blur(maps["nearest"][:, None], sigma)[:, 0]
    results = {}
    for name, found in maps.items():
        metrics = metrics_from_maps(found, masks, labels)
        results[name] = [round(metrics[k], 3) for k in ("pixel_auroc", "aupro_0.3",
                                                         "image_auroc")]
        print(f"{category:8s} {name:14s} " + " / ".join(f"{v:.3f}" for v in results[name]),
              flush=True)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    category, epochs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
    scores = score_all(trained_model(category, epochs), category)
    print(json.dumps(scores))
