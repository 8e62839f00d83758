"""Side by side: FrEIA's plain-autograd training step against autoflow's memory-saving engine.

The Glow-digits architecture of ``benchmarks/flows_vs_freia.py`` (3 levels x depth 16 of
ActNorm, fixed permutation, affine coupling; conditioner width 32; batch 64 of 8x8 digits),
built by that script's own ``_build``. Both models live in one process; their training steps
(forward, backward, Adam) run interleaved round-robin, so a change in the machine's load hits
both alike, and the ratio of the medians is reported. One torch thread. Run from the
repository root::

    PYTHONPATH=. python benchmarks/engine_step_side_by_side.py --steps 40

``--configs`` picks the rows (``freia``, ``autoflow``, ``autoflow-engine``,
``autoflow-glow-engine``); ``--profile`` runs cProfile over the last one's steps instead.
``--baseline DIR`` adds a row ``baseline-engine``: the engine of another version of the
package, imported from ``DIR/autoflow`` under another name (extract one with
``git archive <commit> autoflow | tar -x -C DIR``), so old and new run in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _baseline(directory: Path, args: argparse.Namespace):
    """The benchmark's engine model built by the package found in ``directory/autoflow``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "autoflow_baseline", directory / "autoflow" / "__init__.py",
        submodule_search_locations=[str(directory / "autoflow")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["autoflow_baseline"] = package
    spec.loader.exec_module(package)
    torch.manual_seed(args.seed)
    transform = package.glow(1, levels=args.levels, depth_per_level=args.depth,
                             hidden_channels=args.hidden, mixing="permute",
                             learned_prior=False, memory_saving=True)
    flow = package.Flow(transform, (1, 8, 8))
    return flow, flow.log_prob


def make_step(config: str, args: argparse.Namespace, batches: list[torch.Tensor]):
    """One training step (forward, backward, clipping, Adam) of ``config``'s model, ActNorm
    initialised on ``batches[0]``; ``args`` gives levels, depth, hidden, seed and baseline."""
    from flows_vs_freia import _build, training_step

    if config == "baseline-engine":
        model, log_prob = _baseline(args.baseline, args)
    else:
        model, log_prob = _build(config, args.levels, args.depth, args.hidden, args.seed)
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        model.train()
        log_prob(batches[0])
    params = [p for p in model.parameters() if p.requires_grad]
    return training_step(log_prob, params, torch.optim.Adam(params, lr=1e-4))


def digit_batches(batch_size: int, count: int = 8) -> list[torch.Tensor]:
    """``count`` fixed batches of dequantised 8x8 training digits."""
    from examples.density.digits import dequantise, load_digits

    train, _ = load_digits(seed=0)
    generator = torch.Generator().manual_seed(1)
    return [dequantise(train[torch.randint(len(train), (batch_size,), generator=generator)],
                       generator) for _ in range(count)]


def round_robin(steps: dict, batches: list[torch.Tensor], warmup: int, count: int
                ) -> dict[str, list[float]]:
    """Step times (ms) of every configuration, the steps interleaved so load hits all alike."""
    times: dict[str, list[float]] = {c: [] for c in steps}
    for i in range(warmup + count):
        x = batches[i % len(batches)]
        for c, step in steps.items():
            start = time.perf_counter()
            step(x)
            if i >= warmup:
                times[c].append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default="freia,autoflow-engine")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = digit_batches(args.batch_size)
    configs = args.configs.split(",") + (["baseline-engine"] if args.baseline else [])
    steps = {c: make_step(c, args, batches) for c in configs}
    if args.profile:
        import cProfile
        import pstats

        step = steps[configs[-1]]
        for x in batches[: args.warmup]:
            step(x)
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(args.steps):
            step(batches[i % len(batches)])
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
        return
    times = round_robin(steps, batches, args.warmup, args.steps)
    base = statistics.median(times[configs[0]])
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"{args.steps} steps each, round-robin, 1 thread; load average {' '.join(load)}")
    print(f"| configuration | median step (ms) | ratio vs {configs[0]} |")
    print("| --- | ---: | ---: |")
    for c in configs:
        median = statistics.median(times[c])
        print(f"| {c} | {median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
