"""autoflow against FrEIA: a multi-scale flow on 8x8 digits, same data, same architecture.

Run from the repository root (FrEIA is installed only for this: ``pip install FrEIA``)::

    python benchmarks/flows_vs_freia.py

Both flows are the same RealNVP/Glow-style multi-scale architecture: ``levels`` times
[squeeze (space-to-depth), ``depth`` x (ActNorm, fixed random channel permutation, one-sided
affine coupling), split off half the channels as a standard-normal latent]. The couplings use the
same conditioner (``autoflow.coupling.make_conditioner``: conv3x3 -> LeakyReLU -> conv3x3,
zero-initialised) and the same soft clamp ``2 tanh(s / 2)``; the parameter counts are equal.
FrEIA's pieces: ``IRevNetDownsampling``, ``ActNorm``, ``PermuteRandom``,
``AffineCouplingOneSided`` (``clamp_activation=tanh(u / 2)``), ``Split``, ``GraphINN``.
autoflow's: ``autoflow.glow.glow(..., mixing="permute", learned_prior=False)``. An extra row
trains autoflow's default Glow (learned 1x1 convolutions, learned split priors) for reference,
and another the engine rebuilding the batch in slices of ``SLICE`` samples
(``backward_chunk``), which trades step time for memory at large batches.

Every configuration runs in a fresh subprocess (``--worker``), with ``MALLOC_MMAP_THRESHOLD_``
set so that freed memory goes back to the system, one torch thread, the same seed, the same
data order and the same number of optimiser steps. It reports

* test bits/dim of the integer images (17 levels, uniform dequantisation, ``log 17`` scale
  term included), averaged over 4 noise draws, after the training budget;
* the median wall time of a training step (forward, backward, Adam), and again with the
  FrEIA, autoflow and engine steps interleaved round-robin in this process
  (``same_process_timing``), which the time targets use;
* peak memory: ``/proc/self/clear_refs`` is written with ``5`` right before the measured steps
  (after imports, data, model and ActNorm initialisation), which resets ``VmHWM`` to the current
  resident set; ``VmHWM`` after the steps is the peak resident set of the process, and its rise
  over ``VmRSS`` before the steps is the memory the training steps themselves needed; the
  median time of those large-batch steps too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "flows_vs_freia.md"
LEVELS = 17  # pixel values 0..16

CONFIGS = {
    "freia": "FrEIA GraphINN, plain autograd",
    "autoflow": "autoflow Sequential, plain autograd",
    "autoflow-engine": "autoflow Sequential, memory-saving engine",
    "autoflow-glow-engine": "autoflow default Glow (1x1 conv, learned priors), engine",
    "autoflow-engine-sliced": "autoflow Sequential, engine, backward_chunk=1024",
}
SLICE = 1024  # samples per slice of the sliced engine row


# Worker: one configuration in a fresh process ---------------------------------------------


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _build(config: str, levels: int, depth: int, hidden: int, seed: int):
    """``(module, log_prob)`` for a configuration; ``log_prob(x) -> (B,)`` in nats."""
    import torch

    torch.manual_seed(seed)
    if config == "freia":
        inn = _freia_graph(levels, depth, hidden, seed)

        def log_prob(x):
            z, log_jac = inn(x)
            z = z if isinstance(z, tuple) else (z,)
            base = sum(-0.5 * (t.flatten(1) ** 2 + math.log(2 * math.pi)).sum(1) for t in z)
            return base + log_jac

        return inn, log_prob
    from autoflow.flow import Flow
    from autoflow.glow import glow

    default = config == "autoflow-glow-engine"
    transform = glow(1, levels=levels, depth_per_level=depth, hidden_channels=hidden,
                     mixing="conv1x1" if default else "permute", learned_prior=default,
                     memory_saving=config != "autoflow",
                     backward_chunk=SLICE if config == "autoflow-engine-sliced" else None)
    flow = Flow(transform, (1, 8, 8))
    return flow, flow.log_prob


def _freia_graph(levels: int, depth: int, hidden: int, seed: int):
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm
    import torch

    from autoflow.coupling import make_conditioner

    def subnet(c_in: int, c_out: int):
        return make_conditioner(c_in, c_out, hidden)

    def clamp_activation(u):
        return torch.tanh(u / 2.0)  # FrEIA multiplies by clamp=2: 2 tanh(s / 2), as autoflow

    nodes = [Ff.InputNode(1, 8, 8, name="input")]
    latents = []
    current = nodes[0]
    channels = 1
    for level in range(levels):
        current = Ff.Node(current, Fm.IRevNetDownsampling, {})
        nodes.append(current)
        channels *= 4
        for k in range(depth):
            for module, args in (
                (Fm.ActNorm, {}),
                (Fm.PermuteRandom, {"seed": seed + 1000 * level + k}),
                (Fm.AffineCouplingOneSided, {"subnet_constructor": subnet, "clamp": 2.0,
                                             "clamp_activation": clamp_activation}),
            ):
                current = Ff.Node(current, module, args)
                nodes.append(current)
        if level < levels - 1:
            kept = channels - channels // 2
            split = Ff.Node(current, Fm.Split, {"section_sizes": [kept, channels // 2]})
            nodes.append(split)
            latents.append(Ff.OutputNode(split.out1, name=f"z{level}"))
            current, channels = split.out0, kept
    nodes.append(Ff.OutputNode(current, name="h"))
    return Ff.GraphINN(nodes + latents)


def training_step(log_prob, params: list, optimizer):
    """One training step on a batch ``x``: mean negative log-likelihood, backward, gradient
    clipping at norm 50, optimizer step; returns the loss."""
    import torch

    def step(x):
        loss = -log_prob(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 50.0)
        optimizer.step()
        return loss.item()

    return step


def worker(args: argparse.Namespace) -> dict:
    """Train one configuration; returns the measurements as a dict."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from examples.density.digits import dequantise, load_digits
    from examples.density.training import lr_factor

    train, test = load_digits(seed=0)
    model, log_prob = _build(args.worker, args.levels, args.depth, args.hidden, args.seed)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # ActNorm's data-dependent initialisation, identical for all
        model.train()
        log_prob(dequantise(train[:512], torch.Generator().manual_seed(args.seed)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.steps)
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    batches = [dequantise(train[torch.randint(len(train), (args.batch_size,),
                                              generator=generator)], generator)
               for _ in range(args.steps)]

    step = training_step(log_prob, params, optimizer)

    # The training budget, timed; the peak resident set over it at the training batch size.
    times, losses = [], []
    train_before = _status("VmRSS")
    _reset_peak()
    for x in batches:
        start = time.perf_counter()
        losses.append(step(x))
        schedule.step()
        times.append(time.perf_counter() - start)
    train_peak = _status("VmHWM")
    model.eval()
    evaluation = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        bpd = [((-log_prob(dequantise(test, evaluation)) / 64 + math.log(LEVELS))
                / math.log(2)).mean().item() for _ in range(4)]
    # A few more steps at a large batch, where activation memory dominates.
    model.train()
    memory_x = dequantise(train[torch.randint(len(train), (args.memory_batch_size,),
                                              generator=generator)], generator)
    memory_before = _status("VmRSS")
    _reset_peak()
    memory_times = []
    for _ in range(args.memory_steps):
        start = time.perf_counter()
        step(memory_x)
        memory_times.append(time.perf_counter() - start)
    memory_peak = _status("VmHWM")
    mib = 2.0**20
    return {
        "config": args.worker,
        "parameters": n_params,
        "test_bits_per_dim": float(np.mean(bpd)),
        "final_train_nll": float(np.mean(losses[-50:])),
        "median_step_ms": 1000 * float(np.median(times)),
        "train_s": float(np.sum(times)),
        "train_rss_before_mib": train_before / mib,
        "train_peak_rss_mib": train_peak / mib,
        "memory_rss_before_mib": memory_before / mib,
        "memory_peak_rss_mib": memory_peak / mib,
        "memory_step_s": float(np.median(memory_times)),
        "finite": all(math.isfinite(v) for v in losses),
    }


# Driver ---------------------------------------------------------------------------------


def run_config(config: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", config,
               *[f"--{k.replace('_', '-')}={v}" for k, v in _shared(args).items()]]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def _shared(args: argparse.Namespace) -> dict:
    keys = ("levels", "depth", "hidden", "steps", "batch_size", "memory_batch_size",
            "memory_steps", "lr", "seed", "threads")
    return {k: getattr(args, k) for k in keys}


def _rise(r: dict, phase: str) -> float:
    return r[f"{phase}_peak_rss_mib"] - r[f"{phase}_rss_before_mib"]


def same_process_timing(args: argparse.Namespace) -> dict:
    """Median step times (ms) of FrEIA, autoflow and its engine, measured round-robin in this
    process (``engine_step_side_by_side.py``), so that load hits every configuration alike; the
    rows of the main table run one after another and are not comparable for time on a shared
    machine."""
    import statistics

    import torch
    from engine_step_side_by_side import digit_batches, make_step, round_robin

    torch.set_num_threads(1)
    batches = digit_batches(args.batch_size)
    configs = ["freia", "autoflow", "autoflow-engine"]
    configs += ["baseline-engine"] if args.baseline else []
    steps = {c: make_step(c, args, batches) for c in configs}
    times = round_robin(steps, batches, 3, args.timing_steps)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"medians": {c: statistics.median(t) for c, t in times.items()}, "load": load}


def report(results: list[dict], timing: dict, args: argparse.Namespace, command: str,
           wall: float) -> str:
    import FrEIA
    import torch

    by = {r["config"]: r for r in results}
    freia, plain, engine = by["freia"], by["autoflow"], by["autoflow-engine"]
    sliced = by.get("autoflow-engine-sliced")
    sliced_peak_ratio = None if sliced is None else (
        sliced["memory_peak_rss_mib"] / freia["memory_peak_rss_mib"])
    lines = [
        "# autoflow vs FrEIA: multi-scale flow on 8x8 digits",
        "",
        "Command (from the repository root, FrEIA installed with `pip install FrEIA`):",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
        f"thread(s) per run; torch {torch.__version__}, FrEIA "
        f"{getattr(FrEIA, '__version__', '0.2')}, Python {platform.python_version()}. "
        f"Total wall time {wall:.0f} s.",
        "",
        f"Architecture: {args.levels} levels x depth {args.depth} per level "
        f"({args.levels * args.depth} flow steps), conditioner width {args.hidden}. "
        f"Training budget: {args.steps} Adam steps (peak lr {args.lr}, 50 warm-up steps, "
        f"cosine decay), batch {args.batch_size}, the same seed and batches for every "
        f"configuration. Memory: peak resident set (VmHWM after resetting it) over the "
        f"training budget (batch {args.batch_size}) and over {args.memory_steps} further "
        f"training steps at batch {args.memory_batch_size}; 'rise' is the peak minus the "
        "resident set just before those steps, i.e. the memory the steps themselves needed.",
        "",
        "| configuration | parameters | test bits/dim | median step (ms) "
        f"| peak RSS, batch {args.batch_size} (MiB) | rise (MiB) "
        f"| peak RSS, batch {args.memory_batch_size} (MiB) | rise (MiB) "
        f"| median step, batch {args.memory_batch_size} (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {CONFIGS[r['config']]} | {r['parameters']:,} | {r['test_bits_per_dim']:.4f} | "
            f"{r['median_step_ms']:.1f} | {r['train_peak_rss_mib']:.0f} | "
            f"{_rise(r, 'train'):.1f} | {r['memory_peak_rss_mib']:.0f} | "
            f"{_rise(r, 'memory'):.1f} | {r['memory_step_s']:.2f} |"
        )
    bpd_ratio = plain["test_bits_per_dim"] / freia["test_bits_per_dim"]
    engine_bpd_ratio = engine["test_bits_per_dim"] / freia["test_bits_per_dim"]
    medians = timing["medians"]
    time_ratio = medians["autoflow"] / medians["freia"]
    engine_time_ratio = medians["autoflow-engine"] / medians["freia"]
    peak_ratio = engine["memory_peak_rss_mib"] / freia["memory_peak_rss_mib"]
    rise_ratio = _rise(engine, "memory") / _rise(freia, "memory")
    train_rise_ratio = _rise(engine, "train") / max(_rise(freia, "train"), 1e-9)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines += [
        "",
        "## Step time, same process",
        "",
        "The table's step times come from rows run one after another, which a shared machine's "
        "load can skew. Here the three models are built in one process and their training steps "
        "(forward, backward, clipping, Adam; batch "
        f"{args.batch_size}) run interleaved round-robin, {args.timing_steps} steps each after "
        f"3 warm-up steps, one thread (`benchmarks/engine_step_side_by_side.py`); load average "
        f"{timing['load']} at the end. The time targets below use these medians.",
        "",
        "| configuration | median step (ms) | ratio vs FrEIA |",
        "| --- | ---: | ---: |",
        *(f"| {c} | {m:.1f} | {m / medians['freia']:.2f}x |" for c, m in medians.items()),
        "",
        "## Targets",
        "",
        f"* Bits/dim within 2% of FrEIA or better: autoflow / FrEIA = {bpd_ratio:.4f} "
        f"(with the engine: {engine_bpd_ratio:.4f}) — {verdict(bpd_ratio <= 1.02)}.",
        f"* Step time <= 1.1x FrEIA with plain autograd (same process): {time_ratio:.3f}x — "
        f"{verdict(time_ratio <= 1.1)}.",
        f"* Step time with the engine <= 1.5x FrEIA's (issue 14; same process): "
        f"{engine_time_ratio:.2f}x — "
        f"{verdict(engine_time_ratio <= 1.5)} ({engine_time_ratio / time_ratio:.2f}x autoflow's "
        "plain step). The backward pass rebuilds every module's input from its output: one "
        "extra inverse and forward per module, and one local autograd call per run (a "
        "coupling and the cheap modules folded after it).",
        f"* Peak memory with the engine <= 0.5x FrEIA's at depth {args.depth}, batch "
        f"{args.memory_batch_size}: memory the training steps needed (rise) "
        f"{rise_ratio:.3f}x — {verdict(rise_ratio <= 0.5)}; whole-process peak RSS "
        f"{peak_ratio:.3f}x — {verdict(peak_ratio <= 0.5)}. At the training batch "
        f"{args.batch_size} the rise ratio is {train_rise_ratio:.3f}x.",
        *([] if sliced is None else [
            f"* The same with the engine rebuilding slices of {SLICE} samples "
            f"(`backward_chunk={SLICE}`): rise "
            f"{_rise(sliced, 'memory') / _rise(freia, 'memory'):.3f}x, "
            f"whole-process peak RSS {sliced_peak_ratio:.3f}x — "
            f"{verdict(sliced_peak_ratio <= 0.5)}; its batch-{args.memory_batch_size} step takes "
            f"{sliced['memory_step_s'] / engine['memory_step_s']:.2f}x the unsliced engine's "
            f"({sliced['memory_step_s']:.2f} s against {engine['memory_step_s']:.2f} s). At the "
            f"training batch {args.batch_size} nothing is sliced (bits/dim "
            f"{sliced['test_bits_per_dim']:.4f}, as the engine row)."]),
        "",
        "## Notes",
        "",
        f"* The whole-process figure includes about {engine['memory_rss_before_mib']:.0f} MiB "
        "that no training engine can remove (interpreter, torch and its libraries, the data, "
        "the model). The engine's saving is in what the steps need on top: autoflow keeps only "
        "the chain's output and one run's local graph, FrEIA every intermediate activation. "
        f"At the training batch {args.batch_size} FrEIA's activations are about "
        f"{_rise(freia, 'memory') * args.batch_size / args.memory_batch_size:.0f} MiB (its "
        "large-batch rise scaled down), within the allocator's noise, so neither figure shows a "
        "difference there; the saving appears when activations dominate (large batches, large "
        "images, deep flows).",
        f"* The plain and engine rows train the same model on the same batches; their bits/dim "
        f"differ by {abs(plain['test_bits_per_dim'] - engine['test_bits_per_dim']):.1e}, the "
        "engine's floating-point reconstruction error carried through training. The FrEIA and "
        "autoflow rows differ in random initialisation (conditioner weights, permutations), so "
        "their gap mixes implementation and seed.",
        "* The main table's step times are medians over each row's whole budget, rows run one "
        "after another on a machine that may be shared with other jobs: they vary by several "
        "percent from run to run and more when the load changes between rows, hence the "
        "same-process timing above. One torch thread per run avoids the multi-second OpenMP "
        "stalls two threads suffer when a core is taken by another process.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--depth", type=int, default=16, help="flow steps per level")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--memory-batch-size", type=int, default=8192)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timing-steps", type=int, default=60,
                        help="steps per configuration in the same-process timing")
    parser.add_argument("--baseline", type=Path,
                        help="also time the engine of the package in DIR/autoflow (another "
                             "version, e.g. from git archive) in the same-process timing")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    command = "python benchmarks/flows_vs_freia.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    results = []
    for config in args.configs.split(","):
        result = run_config(config, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    timing = same_process_timing(args)
    text = report(results, timing, args, command, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
