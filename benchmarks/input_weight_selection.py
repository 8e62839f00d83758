"""Choosing ``input_weight`` on the selection images (data seed 0), over three training seeds.

A trained flow scores some photographs worse than an untrained one (``training_trajectory.md``,
``real_defects_training_seeds.md``); the input pyramid the couplings start from keeps what
training may lose. ``PyramidFlowConfig.input_weight = w`` mixes the two scores level by level,
``(1 - w) · score(z_d) + w · score(x_d)``. This script measures ``w`` on data seed 0 (the seed
the defaults are chosen on; ``real_defects.py`` reports on seeds 1 and 2): every class of
``real_defects.py`` is trained with this project's defaults and the per-group recipe
(``group_settings``: 10 epochs, 128×128, batch 2, 32 training and 32 test images), with
training seeds 0, 1 and 2, and each trained model is scored at every weight of
:data:`WEIGHTS`. The map is linear in ``w`` (``tests/pyramidflow/test_scoring.py``), so the
maps at ``w = 0`` and ``w = 1`` give every other weight exactly.

Reproduce (2 cores; about 4 min per trained model, two at a time)::

    python benchmarks/input_weight_selection.py --models /tmp/input_weight_models

Trained models are saved in (and, when present, loaded from) the ``--models`` folder, so the
scoring can be rerun without training. Results: ``benchmarks/results/input_weight_selection.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
TRAINING_SEEDS = (0, 1, 2)


def run_job(category: str, training_seed: int, models: str, threads: int) -> dict[str, Any]:
    """Train (or load) one class's default model and score it at every weight of WEIGHTS."""
    import dataclasses

    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_defects import group_settings, table_metrics

    from examples.pyramidflow import PyramidFlow, PyramidFlowConfig, train
    from examples.pyramidflow.evaluate import collect_maps, metrics_from_maps
    from examples.pyramidflow.inference import latent_statistics
    from examples.pyramidflow.model import LatentStatistics
    from examples.pyramidflow.photos import PhotoDefects

    torch.set_num_threads(threads)
    # Raw maps (as when the weight was chosen): only they mix linearly between the weights.
    config = PyramidFlowConfig(image_size=128, epochs=10, batch_size=2, holdout=0.0,
                               seed=training_seed, map_normalization="none",
                               **group_settings(category))
    train_set = PhotoDefects(category, "train", 32, image_size=128, seed=0)
    test_set = PhotoDefects(category, "test", 32, image_size=128, seed=0)
    path = Path(models) / f"{category}_seed{training_seed}.pt"
    started = time.perf_counter()
    if path.exists():
        model = PyramidFlow(config)
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        model = train(config, train_set, progress=False).model
        torch.save(model.state_dict(), path)
    trained = time.perf_counter() - started
    model.eval()
    # Maps at w = 0 and w = 1 from one fit of both pyramids (the first L levels of the
    # statistics are the latents'); every other weight's map is their mix.
    model.config = dataclasses.replace(config, input_weight=1.0)
    both = latent_statistics(model, train_set, batch_size=2)
    levels = config.levels
    latents_only = LatentStatistics(both.sums[:levels], both.square_sums[:levels], both.count,
                                    both.bank[:levels])
    ends = {}
    for weight, statistics in ((0.0, latents_only), (1.0, both)):
        model.config = dataclasses.replace(config, input_weight=weight)
        model.set_template(statistics)
        ends[weight], masks, labels, _ = collect_maps(model, test_set, batch_size=2)
    scores = {}
    for weight in WEIGHTS:
        maps = (1 - weight) * ends[0.0] + weight * ends[1.0]
        scores[str(weight)] = table_metrics(metrics_from_maps(maps, masks, labels))
    return {"category": category, "training_seed": training_seed,
            "seconds": round(trained, 1), "scores": scores}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_table(results: list[dict[str, Any]], seconds: float) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_defects import METRICS

    from examples.pyramidflow.photos import PHOTO_OBJECTS, PHOTO_TEXTURES

    groups = {"textures": list(PHOTO_TEXTURES), "objects": list(PHOTO_OBJECTS)}
    by_class: dict[str, dict[str, dict[str, float]]] = {}
    for category in groups["textures"] + groups["objects"]:
        runs = [r for r in results if r["category"] == category]
        by_class[category] = {str(w): {m: _mean([r["scores"][str(w)][m] for r in runs])
                                       for m in METRICS} for w in WEIGHTS}
    lines = [
        "# Choosing `input_weight` (data seed 0, three training seeds)", "",
        "Command: `python benchmarks/input_weight_selection.py --models DIR` (see its "
        f"docstring). Wall time {seconds / 60:.0f} min for the scoring"
        + (" and training" if any(r["seconds"] > 60 for r in results) else
           ", the models loaded from DIR") + ".",
        "Each cell: AUPRO@0.3, mean over training seeds 0, 1, 2 (each seed's value in the "
        "JSON); `w = 0` is the map of the latents alone (the paper's), `w = 1` the input "
        "pyramid's alone. Textures score with `search_radius=0`, objects with 1.", "",
        "| class | " + " | ".join(f"w = {w}" for w in WEIGHTS) + " |",
        "|---" * (len(WEIGHTS) + 1) + "|",
    ]
    for category, cells in by_class.items():
        lines.append(f"| {category} | "
                     + " | ".join(f"{cells[str(w)]['aupro']:.3f}" for w in WEIGHTS) + " |")
    for name, members in groups.items():
        lines.append(f"| **mean {name}** | " + " | ".join(
            f"{_mean([by_class[c][str(w)]['aupro'] for c in members]):.3f}" for w in WEIGHTS)
            + " |")
    lines += ["", "Pixel AUROC, group means:", "",
              "| group | " + " | ".join(f"w = {w}" for w in WEIGHTS) + " |",
              "|---" * (len(WEIGHTS) + 1) + "|"]
    for name, members in groups.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{_mean([by_class[c][str(w)]['pixel_auroc'] for c in members]):.3f}"
            for w in WEIGHTS) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "input_weight_selection.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "input_weight_selection.json").write_text(
        json.dumps({"runs": results, "means": by_class}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", required=True, help="folder for the trained models")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from examples.pyramidflow.photos import PHOTO_OBJECTS, PHOTO_TEXTURES

    Path(args.models).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(c, s, args.models, args.threads) for s in TRAINING_SEEDS
            for c in (*PHOTO_TEXTURES, *PHOTO_OBJECTS)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = [f.result() for f in [pool.submit(run_job, *job) for job in jobs]]
    write_table(results, time.perf_counter() - started)


if __name__ == "__main__":
    main()
