"""Memory and time of a training step, plain autograd vs the memory-saving engine (Fig. 5).

Reproduces the paper's complexity setting on this machine: a PyramidFlow stack with L = 8
pyramid levels, C = 24 channels, 256×256 inputs, batch 2, kernel 7, depth D in {1, 2, 4, 8}.
Each configuration runs in a fresh process: model set-up, one warm-up step, then the measured
steps (forward, Fourier loss, backward, Adam step).

Peak memory on CPU is the peak resident set size during a measured step minus the resident
set size before it (after set-up and warm-up); the peak is reset through
``/proc/self/clear_refs`` and read from ``VmHWM``. ``MALLOC_MMAP_THRESHOLD_`` makes glibc return
freed tensors to the system, so the resident size follows live memory; as that slows
allocation, step times come from separate processes with the default allocator. On CUDA memory
is ``torch.cuda.max_memory_allocated`` minus the allocation before the steps.

Usage::

    python benchmarks/engine_memory.py                # writes benchmarks/results/engine_memory.*
    python benchmarks/engine_memory.py --depths 1 2 --steps 2 --size 128   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))


def worker(args: argparse.Namespace) -> dict:
    """One configuration in this process; returns the measurements."""
    import torch

    sys.path.insert(0, str(ROOT))
    import autoflow
    from examples.pyramidflow.config import PyramidFlowConfig
    from examples.pyramidflow.model import PyramidFlow

    if args.mode == "naive":
        # For comparison only: the generic reconstruction (invert without a graph, then run
        # forward again) evaluates every conditioner a third time.
        autoflow.Coupling.reconstruct = autoflow.InvertibleModule.reconstruct
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = PyramidFlowConfig(channels=args.channels, levels=args.levels, depth=args.depth,
                               kernel_size=args.kernel, image_size=args.size,
                               memory_saving=args.mode != "autograd")
    model = PyramidFlow(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(model(images))
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: allocator, optimizer state, lazily sized buffers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    return {"depth": args.depth, "mode": args.mode, "peak_mib": peak / 2**20,
            "median_s": statistics.median(times), "times": times,
            "parameters": sum(p.numel() for p in model.parameters())}


def _spawn(args: argparse.Namespace, mode: str, depth: int, steps: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--depth", str(depth),
           "--steps", str(steps)]
    for name in ("size", "channels", "levels", "kernel", "batch", "device"):
        cmd += [f"--{name}", str(getattr(args, name))]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(args: argparse.Namespace) -> list[dict]:
    """Time and memory of every configuration, each from fresh processes.

    Times come from processes with the default allocator; memory from processes where glibc
    returns freed tensors to the system (so that the resident size follows live memory). The
    allocator setting slows allocation-heavy runs, so it is kept out of the timings.
    """
    memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    rows = []
    for depth in args.depths:
        for mode in ("autograd", "engine"):  # side by side, so drift hits both alike
            row = _spawn(args, mode, depth, args.steps, dict(os.environ))
            row["peak_mib"] = _spawn(args, mode, depth, 1, memory_env)["peak_mib"]
            print(f"D={depth} {mode:8s} peak {row['peak_mib']:8.1f} MiB  "
                  f"median {row['median_s']:.3f} s", flush=True)
            rows.append(row)
        row = _spawn(args, "naive", depth, args.steps, dict(os.environ))
        print(f"D={depth} naive    median {row['median_s']:.3f} s", flush=True)
        rows.append(row)
    return rows


def write_results(args: argparse.Namespace, rows: list[dict], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    by = {(r["depth"], r["mode"]): r for r in rows}
    first = min(args.depths)
    lines = [
        "# Training-step memory and time: plain autograd vs the memory-saving engine",
        "",
        f"Command: `{command}`",
        "",
        f"Setting: PyramidFlow stack, L={args.levels}, C={args.channels}, "
        f"{args.size}×{args.size}, batch {args.batch}, kernel {args.kernel}; device "
        f"{args.device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores). Peak = peak memory during a step minus memory before it; "
        f"time = median of {args.steps} step times. Every number comes from a fresh process; "
        "the autograd and engine runs of a row ran back to back.",
        "",
        "| D | params | autograd peak (MiB) | engine peak (MiB) | engine / autograd memory "
        "| autograd step (s) | engine step (s) | engine / autograd time "
        "| naive engine / autograd time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in args.depths:
        a, e, n = by[(d, "autograd")], by[(d, "engine")], by[(d, "naive")]
        lines.append(
            f"| {d} | {a['parameters']:,} | {a['peak_mib']:.0f} | {e['peak_mib']:.0f} | "
            f"{e['peak_mib'] / a['peak_mib']:.2f} | {a['median_s']:.2f} | {e['median_s']:.2f} | "
            f"{e['median_s'] / a['median_s']:.2f} | {n['median_s'] / a['median_s']:.2f} |"
        )
    last = max(args.depths)
    growth_a = by[(last, "autograd")]["peak_mib"] / by[(first, "autograd")]["peak_mib"]
    growth_e = by[(last, "engine")]["peak_mib"] / by[(first, "engine")]["peak_mib"]
    versus = by[(last, "engine")]["peak_mib"] / by[(last, "autograd")]["peak_mib"]
    worst = max(by[(d, "engine")]["median_s"] / by[(d, "autograd")]["median_s"]
                for d in args.depths)
    lines += [
        "",
        f"Memory growth from D={first} to D={last}: autograd {growth_a:.2f}×, "
        f"engine {growth_e:.2f}×.",
        "",
        "Targets (issue 3):",
        "",
        f"* engine memory at D={last} ≤ 1.2× its own at D={first}: {growth_e:.2f}× — "
        f"{'met' if growth_e <= 1.2 else 'missed'};",
        f"* engine memory at D={last} ≤ 0.5× plain autograd's: {versus:.2f}× — "
        f"{'met' if versus <= 0.5 else 'missed'};",
        f"* engine step time ≤ 1.3× plain autograd at every D: worst {worst:.2f}× — "
        f"{'met' if worst <= 1.3 else 'missed'}. The engine evaluates every conditioner twice "
        "(once without a graph in the forward pass, once in the reconstruction that both "
        "inverts and rebuilds the graph); on this CPU a convolution's backward costs only about "
        "1.8× its forward, so one extra forward of a convolution-dominated step costs about "
        "1 / (1 + 1.8) ≈ 35 %. Going lower needs storing conditioner activations, i.e. memory "
        "that grows with depth again.",
        "",
        "The naive engine column is the same engine with the generic reconstruction (invert "
        "without a graph, then forward again), which evaluates every conditioner three times "
        "per step instead of two.",
        "",
        "Raw step times (s): " + "; ".join(
            f"D={r['depth']} {r['mode']}: " + ", ".join(f"{t:.2f}" for t in r["times"])
            for r in rows),
        "",
    ]
    (RESULTS / "engine_memory.md").write_text("\n".join(lines))
    (RESULTS / "engine_memory.json").write_text(json.dumps(rows, indent=1))
    _plot(args, by)


def _plot(args: argparse.Namespace, by: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return
    fig, (mem, tim) = plt.subplots(1, 2, figsize=(9, 3.4))
    for mode, colour in (("autograd", "tab:red"), ("engine", "tab:blue")):
        mem.plot(args.depths, [by[(d, mode)]["peak_mib"] for d in args.depths], "o-",
                 color=colour, label=mode)
        tim.plot(args.depths, [by[(d, mode)]["median_s"] for d in args.depths], "o-",
                 color=colour, label=mode)
    mem.set(xlabel="depth D", ylabel="peak training memory (MiB)", xticks=args.depths)
    tim.set(xlabel="depth D", ylabel="median step time (s)", xticks=args.depths)
    mem.legend()
    fig.suptitle(f"L={args.levels}, C={args.channels}, {args.size}², batch {args.batch}")
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_memory.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=24)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("autograd", "engine", "naive"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = run_all(args)
    write_results(args, rows, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
