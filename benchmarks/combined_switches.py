"""The ablation's three best switches together, at the main table's scale, on data seed 0.

``real_defects_ablation.md`` (64², 16 images) ranks this project's former loss, block order
and clamp above the public code's, but there the untrained model beats every trained row. This
trains the reference preset with all three switched (``loss="fourier_channels"``,
``order="even_first"``, ``clamp_kind="tanh"``) at the main table's scale (128², 32 training
images, 10 epochs, batch 2, the per-group recipe) on the selection images (data seed 0), to
compare with the reference models of ``real_defects_selection.md`` scored the same way; the
untrained baseline rows of ``real_defects_combined.md`` are ``run_job`` with ``epochs=0``.

Reproduce (2 cores, about 35 min idle)::

    python benchmarks/combined_switches.py > combined.jsonl
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_defects import run_job  # noqa: E402

SWITCHES = {"loss": "fourier_channels", "order": "even_first", "clamp_kind": "tanh"}
CLASSES = ("hubble", "ihc", "moon", "rocket", "camera", "flower")

if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        # epochs, threads, train images, test images, explore, image size, data seed
        futures = [pool.submit(run_job, c, "paper-code", SWITCHES, 10, 1, 32, 32, False, 128, 0)
                   for c in CLASSES]
        for future in futures:
            job = future.result()
            print(json.dumps({"category": job["category"], "seconds": job["seconds"],
                              "scores": job["scores"]}), flush=True)
