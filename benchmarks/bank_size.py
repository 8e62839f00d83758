"""How many training images the ``local_nearest`` score should bank (``config.bank_images``).

The score compares each position with the same neighbourhood in the banked training images,
so more banked images cover more of the normal variation, at a proportional cost in memory
and scoring time. The main real-photograph tables train on 32 images and so bank all of them;
a user with more normal images banks at most ``bank_images``.

For each class of ``PhotoDefects`` (data seed ``--data-seed``): the default configuration with
the per-group recipe (``real_defects.group_settings``) is trained on the first 32 normal
images (the main table's recipe and cost: 10 epochs, 128², batch 2), and untrained; then, for
each bank size, the template, spread and bank are fitted on ``--normal-images`` normal images
(the 32 and more of the same class) and the 32 test images are scored. Training on all of
them would cost proportionally more; the bank's effect is a property of the score. Reported:
pixel AUROC / AUPRO@0.3 / image AUROC per class and group, and the scoring time per test
image.

Reproduce (2 cores, about 45 min each; the default ``bank_images`` was chosen on the mean
of both)::

    python benchmarks/bank_size.py --data-seed 0
    python benchmarks/bank_size.py --data-seed 1

Results: ``benchmarks/results/bank_size_seed{D}.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from real_defects import METRICS, group_settings, table_metrics  # noqa: E402

TRAIN_IMAGES = 32
TEST_IMAGES = 32


def run_class(category: str, data_seed: int, normal_images: int, banks: list[int],
              epochs: int) -> dict[str, Any]:
    """Scores of the untrained and the trained model of one class at every bank size."""
    import torch

    from examples.pyramidflow import PyramidFlowConfig, evaluate_model, train
    from examples.pyramidflow.inference import anomaly_maps, latent_statistics
    from examples.pyramidflow.photos import PhotoDefects

    torch.set_num_threads(1)
    normal = PhotoDefects(category, "train", normal_images, image_size=128, seed=data_seed)
    train_set = PhotoDefects(category, "train", TRAIN_IMAGES, image_size=128, seed=data_seed)
    test_set = PhotoDefects(category, "test", TEST_IMAGES, image_size=128, seed=data_seed)
    rows: dict[str, Any] = {}
    for row, row_epochs in (("untrained", 0), ("trained", epochs)):
        config = PyramidFlowConfig(image_size=128, epochs=row_epochs, batch_size=2, holdout=0.0,
                                   seed=0, **group_settings(category))
        model = train(config, train_set, progress=False).model
        for bank in banks:
            model.config = dataclasses.replace(config, bank_images=bank)
            model.set_template(latent_statistics(model, normal, batch_size=8))
            started = time.perf_counter()
            anomaly_maps(model, test_set)
            seconds = (time.perf_counter() - started) / TEST_IMAGES
            found = evaluate_model(model, test_set)
            rows[f"{row} {bank}"] = table_metrics(found) | {"seconds_per_image": seconds}
    return {"category": category, "rows": rows}


def main() -> None:
    from examples.pyramidflow.photos import PHOTO_OBJECTS, PHOTO_TEXTURES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--normal-images", type=int, default=128)
    parser.add_argument("--banks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--classes", nargs="+", default=[*PHOTO_TEXTURES, *PHOTO_OBJECTS])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        futures = [pool.submit(run_class, category, args.data_seed, args.normal_images,
                               args.banks, args.epochs) for category in args.classes]
        done = [future.result() for future in futures]
    wall = time.perf_counter() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    results = {job["category"]: job["rows"] for job in done}
    names = list(done[0]["rows"])
    groups = {"textures": [c for c in args.classes if c in PHOTO_TEXTURES],
              "objects": [c for c in args.classes if c in PHOTO_OBJECTS]}
    groups = {g: members for g, members in groups.items() if members}

    def cell(values: dict[str, float]) -> str:
        return " / ".join(f"{values[m]:.3f}" for m in METRICS)

    lines = [
        f"# Banked training images for `local_nearest` (data seed {args.data_seed})", "",
        f"Command: `python benchmarks/bank_size.py --data-seed {args.data_seed}` (commit "
        f"{commit}; wall time {wall / 60:.1f} min, two classes at a time, one thread each). "
        f"Each class trained on {TRAIN_IMAGES} normal images ({args.epochs} epochs, 128², the "
        f"per-group recipe) or not at all; template, spread and bank fitted on "
        f"{args.normal_images} normal images; {TEST_IMAGES} test images. A row `trained 64` "
        "banks 64 of them (`bank_images=64`), evenly spaced. Each cell: pixel AUROC / "
        "AUPRO@0.3 / image AUROC.", "",
        "| class | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for category, rows in results.items():
        lines.append(f"| {category} | " + " | ".join(cell(rows[n]) for n in names) + " |")
    for group, members in groups.items():
        means = {n: {m: sum(results[c][n][m] for c in members) / len(members)
                     for m in METRICS} for n in names}
        results.setdefault("groups", {})[group] = members
        lines.append(f"| **mean {group}** | " + " | ".join(cell(means[n]) for n in names)
                     + " |")
    seconds = {n: sum(job["rows"][n]["seconds_per_image"] for job in done) / len(done)
               for n in names}
    lines += ["", "Time per test image of its anomaly map (32 test images in batches of 8, "
              "one thread, mean over classes): " + ", ".join(f"{n}: {s * 1000:.0f} ms"
                                                  for n, s in seconds.items()) + "."]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bank_size_seed{args.data_seed}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
