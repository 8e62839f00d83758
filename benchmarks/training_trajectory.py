"""What each epoch of training does to the default's accuracy on the real-photograph classes.

The main table (``real_defects.md``) shows the trained default barely above, or below, the
untrained model on the textures. This trains the default once per class with the main table's
recipe (128², 32 training and 32 test images of data seed 0, batch 2, 10 epochs, the per-group
settings of ``real_defects.py``), keeps every epoch's checkpoint, and scores the untrained model
and the checkpoints of epochs 1, 2, 3, 5, 7 and 10 (template, spread and bank recomputed from
the training images for each), with the training loss beside them.

Reproduce (2 cores, about 20 min idle)::

    python benchmarks/training_trajectory.py > benchmarks/results/training_trajectory.md
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("hubble", "ihc", "moon", "rocket", "camera", "flower")
EPOCHS = (0, 1, 2, 3, 5, 7, 10)


def trajectory(category: str) -> dict[str, Any]:
    """AUPRO@0.3 / pixel AUROC after each epoch in :data:`EPOCHS`, and the mean loss per epoch."""
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_defects import group_settings

    from examples.pyramidflow import PyramidFlowConfig, evaluate_model, train
    from examples.pyramidflow.inference import latent_statistics
    from examples.pyramidflow.photos import PhotoDefects
    from examples.pyramidflow.train import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(1)
    config = PyramidFlowConfig(image_size=128, epochs=EPOCHS[-1], batch_size=2, holdout=0.0,
                               seed=0, **group_settings(category))
    train_set = PhotoDefects(category, "train", 32, image_size=128, seed=0)
    test_set = PhotoDefects(category, "test", 32, image_size=128, seed=0)

    def score(model: Any) -> tuple[float, float]:
        model.set_template(latent_statistics(model, train_set, batch_size=config.batch_size))
        found = evaluate_model(model, test_set)
        return found["aupro_0.3"], found["pixel_auroc"]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, train_set, checkpoint_dir=folder, progress=False)
        untrained = train(PyramidFlowConfig.from_dict(config.to_dict() | {"epochs": 0}),
                          train_set, progress=False).model
        scores = {0: score(untrained)}
        for epoch in EPOCHS[1:]:
            checkpoint = load_checkpoint(Path(folder) / f"epoch-{epoch:03d}.pt")
            scores[epoch] = score(model_from_checkpoint(checkpoint))
    steps = len(result.losses) // EPOCHS[-1]
    losses = [sum(result.losses[e * steps:(e + 1) * steps]) / steps for e in range(EPOCHS[-1])]
    return {"category": category, "scores": scores, "losses": losses,
            "seconds": time.perf_counter() - started}


def main() -> None:
    started = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(trajectory, CLASSES))
    print("# AUPRO after each epoch of training: the default on the real-photograph classes\n")
    print("Command: `python benchmarks/training_trajectory.py > "
          "benchmarks/results/training_trajectory.md`. The default config with the main "
          "table's recipe (128², 32 training and 32 test images of data seed 0, batch 2, the "
          "per-group settings), trained once per class for 10 epochs; each epoch's checkpoint "
          "is scored with its own template and bank. Wall time "
          f"{time.perf_counter() - started:.0f} s (two classes at a time, one thread each).\n")
    print("## AUPRO@0.3 / pixel AUROC after epoch\n")
    print("| class | " + " | ".join(str(e) for e in EPOCHS) + " |")
    print("|---|" + "---|" * len(EPOCHS))
    for row in rows:
        cells = [f"{a:.3f} / {p:.3f}" for a, p in (row["scores"][e] for e in EPOCHS)]
        print(f"| {row['category']} | " + " | ".join(cells) + " |")
    print("\n## Mean training loss in epoch\n")
    print("| class | " + " | ".join(str(e + 1) for e in range(EPOCHS[-1])) + " |")
    print("|---|" + "---|" * EPOCHS[-1])
    for row in rows:
        print(f"| {row['category']} | " + " | ".join(f"{v:.4f}" for v in row["losses"]) + " |")


if __name__ == "__main__":
    main()
