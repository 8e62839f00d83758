"""autoflow against zuko, normflows and FrEIA on two moons and 8x8 digits, under one budget.

Run from the repository root, with the peers installed (``pip install "torch==2.13.0"
-e ".[example,peers]"``; a peer that cannot be imported is skipped with a note)::

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/flows_vs_peers.py

What is measured, per data set:

* **Test NLL** in nats per dimension of the *raw* data, on a held-out split. The flows see the
  data standardised with training-split statistics; the standardisation's log-det is added
  back, so every row is a density of the same raw data. Two moons: the points of
  ``sklearn.datasets.make_moons(noise=0.05)``. Digits: the integer 8x8 images ``v`` of
  ``sklearn.datasets.load_digits``, flattened to 64 features and dequantised to ``v + u``,
  ``u ~ U[0, 1)^64``; ``E_u[-log p(v + u)]`` is an upper bound on ``-log P(v)`` in nats, so the
  number is a bound on the discrete images' NLL (the test value averages ``--test-draws``
  noise draws, the same draws for every model). The digits are preferred to scikit-learn's
  breast-cancer table because they have three times the samples (1497 training and 300 test
  images, the split of ``examples.density.digits``) and twice the dimensions: with the 114 test
  rows of the 569-row breast-cancer table, differences of a few percent would drown in the
  choice of split and in over-fitting.
* **Step time**: the median over the training budget of one optimiser step (forward, loss,
  backward, gradient clipping, Adam, schedule), as CPU time of the training thread
  (``time.thread_time``) and as wall time. All models of a data set train in one process, step
  by step in turn (the order rotates every step), so a disturbance from other jobs hits every
  model alike; each model's step is timed on its own. With one torch thread the CPU time is
  what the step costs; on a shared machine at ``nice 19`` the wall time is mostly time spent
  waiting for a core, so the ratios use the CPU time. The two data sets run in two processes
  at once (``--worker``), one per core.

Every model of a data set gets the same budget: the same training batches (one shared stream
of indices and dequantisation noise), the same number of Adam steps and batch size
(``--moons-steps``, ``--digits-batch-size``, ...), peak learning rate ``--lr`` with the warm-up
and cosine decay of ``examples.density.training.lr_factor``, gradient norm clipped to 50,
``--transforms`` transforms, conditioners with two hidden layers of ``--moons-hidden`` /
``--digits-hidden`` units (ReLU), splines with ``--bins`` bins on ``[-5, 5]`` (zuko's fixed
domain). Coupling flows put a fixed permutation between transforms (random; a swap in 2-D).
The rows:

* a full-covariance Gaussian fitted to the training split (maximum likelihood): the floor;
* autoflow affine and spline couplings (``AffineCoupling``, ``SplineCoupling`` with an MLP
  conditioner, ``Permute``, ``Flow``; plain autograd);
* zuko's ``MAF`` and ``NSF`` (autoregressive, its default) and ``NSF(passes=2)`` (coupling, the
  same model class as autoflow's spline; left out in 2-D, where it is the autoregressive NSF);
* normflows' RealNVP (``AffineCouplingBlock`` with its ``MLP``) and NSF
  (``CoupledRationalQuadraticSpline``, whose conditioner is its ``ResidualNet`` with one
  residual block);
* FrEIA's one-sided affine coupling with ``PermuteRandom`` (FrEIA has no spline coupling).

Each data set's table gives the parameter count, test and final training NLL, median step time
and both ratios to the *best peer* (the peer row with the lowest test NLL). The target of
issue 11: autoflow's spline flow within 2% of the best peer's test NLL at <= 1.2x its step time;
the comparison with the best spline peer is printed beside it.
A hand-written ``## Reading`` section at the end of the results file is kept when the file is
rewritten.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.density.digits import load_digits  # noqa: E402
from examples.density.training import lr_factor  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "flows_vs_peers.md"
SPLINE_BOUND = 5.0  # zuko's MonotonicRQSTransform domain is fixed to [-5, 5]; all use it
GRADIENT_CLIP = 50.0
READING_HEADING = "## Reading"
NLL_TARGET = 1.02
TIME_TARGET = 1.2
TARGET_ROW = "autoflow-spline"

LogProb = Callable[[Tensor], Tensor]


# Data ---------------------------------------------------------------------------------------


@dataclass
class DataSet:
    """A data set as the flows see it: standardised, with what turns NLLs back to raw units.

    ``training_batch(indices, generator)`` returns standardised training rows (dequantised
    afresh for the digits); ``test_draws`` are standardised test sets (one per noise draw);
    ``log_std_sum`` is ``sum(log std)`` of the standardisation, the nats to add to a standardised
    NLL to get the raw data's NLL.
    """

    name: str
    description: str
    features: int
    train_size: int
    training_batch: Callable[[Tensor, torch.Generator], Tensor]
    training_reference: Tensor
    test_draws: list[Tensor]
    log_std_sum: float


def two_moons(train_size: int, test_size: int, seed: int) -> DataSet:
    """``make_moons(noise=0.05)`` points, split at random, standardised with training stats."""
    from sklearn.datasets import make_moons

    points, _ = make_moons(n_samples=train_size + test_size, noise=0.05, random_state=seed)
    points = torch.from_numpy(points).float()
    order = torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))
    train, test = points[order[:train_size]], points[order[train_size:]]
    mean, std = train.mean(0), train.std(0)
    train, test = (train - mean) / std, (test - mean) / std
    return DataSet(
        name="two moons",
        description=f"make_moons(noise=0.05, random_state={seed}): {train_size} training and "
        f"{test_size} test points, 2 features",
        features=2,
        train_size=train_size,
        training_batch=lambda indices, generator: train[indices],
        training_reference=train,
        test_draws=[test],
        log_std_sum=float(std.log().sum()),
    )


def flat_digits(seed: int, test_draws: int) -> DataSet:
    """The 8x8 digits as 64 integer features, dequantised ``v + u`` and standardised.

    The mean and standard deviation are those of ``v + u`` over the training split: the pixel
    mean plus 1/2 and ``sqrt(var(v) + 1/12)``, so even an always-zero pixel has a finite scale.
    """
    train_images, test_images = load_digits(seed=seed)
    train = train_images.flatten(1).double()
    test = test_images.flatten(1).double()
    mean = train.mean(0) + 0.5
    std = (train.var(0, unbiased=False) + 1.0 / 12.0).sqrt()

    def dequantised(values: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.rand(values.shape, generator=generator, dtype=torch.float64)
        return ((values + noise - mean) / std).float()

    noise = torch.Generator().manual_seed(seed + 1000)
    return DataSet(
        name="digits",
        description=f"load_digits flattened: {len(train)} training and {len(test)} test images "
        f"(split seed {seed}), 64 features, 17 levels, uniform dequantisation",
        features=64,
        train_size=len(train),
        training_batch=lambda indices, generator: dequantised(train[indices], generator),
        training_reference=torch.cat([dequantised(train, noise) for _ in range(8)]),
        test_draws=[dequantised(test, noise) for _ in range(test_draws)],
        log_std_sum=float(std.log().sum()),
    )


# Models -------------------------------------------------------------------------------------


@dataclass
class Architecture:
    """The budget every flow shares: its size and its element transform."""

    features: int
    transforms: int
    hidden: int
    bins: int


@dataclass
class Candidate:
    """One trained model: a row of the table."""

    key: str
    label: str
    library: str
    module: nn.Module
    log_prob: LogProb
    optimizer: torch.optim.Optimizer | None = None
    schedule: torch.optim.lr_scheduler.LambdaLR | None = None
    step_cpu_seconds: list[float] = field(default_factory=list)
    step_wall_seconds: list[float] = field(default_factory=list)
    training_losses: list[float] = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


def mlp(in_features: int, out_features: int, hidden: int) -> nn.Sequential:
    """in -> hidden -> hidden -> out with ReLU; last layer zero, so a coupling starts as the
    identity."""
    last = nn.Linear(hidden, out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), last)


def gaussian_log_prob(reference: Tensor) -> LogProb:
    """Log-density of the full-covariance Gaussian fitted to ``reference`` (maximum
    likelihood)."""
    data = reference.double()
    mean = data.mean(0)
    centred = data - mean
    covariance = centred.T @ centred / len(data)
    gaussian = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
    return lambda x: gaussian.log_prob(x.double()).float()


def _permute_kind(features: int) -> str:
    return "reverse" if features == 2 else "random"


def autoflow_coupling(spline: bool) -> Callable[[Architecture], tuple[nn.Module, LogProb]]:
    def build(arch: Architecture) -> tuple[nn.Module, LogProb]:
        import autoflow
        from autoflow.spline import spline_params

        d, kept = arch.features, arch.features // 2
        modules: list[nn.Module] = []
        for index in range(arch.transforms):
            if index:
                modules.append(autoflow.Permute(d, kind=_permute_kind(d)))
            if spline:
                per_element = spline_params(arch.bins)
                modules.append(autoflow.SplineCoupling(
                    d, bins=arch.bins, bound=SPLINE_BOUND,
                    conditioner=mlp(kept, per_element * (d - kept), arch.hidden)))
            else:
                modules.append(autoflow.AffineCoupling(
                    d, conditioner=mlp(kept, 2 * (d - kept), arch.hidden)))
        flow = autoflow.Flow(autoflow.Sequential(*modules), (d,))
        return flow, flow.log_prob

    return build


def zuko_flow(kind: str) -> Callable[[Architecture], tuple[nn.Module, LogProb]]:
    def build(arch: Architecture) -> tuple[nn.Module, LogProb]:
        import zuko

        shared = {"transforms": arch.transforms, "hidden_features": (arch.hidden,) * 2}
        if kind == "maf":
            flow = zuko.flows.MAF(arch.features, **shared)
        elif kind == "nsf":
            flow = zuko.flows.NSF(arch.features, bins=arch.bins, **shared)
        else:  # coupling: two passes; random orders give random halves (alternating in 2-D)
            flow = zuko.flows.NSF(arch.features, bins=arch.bins, passes=2,
                                  randperm=arch.features > 2, **shared)
        return flow, lambda x: flow().log_prob(x)

    return build


def normflows_flow(spline: bool) -> Callable[[Architecture], tuple[nn.Module, LogProb]]:
    def build(arch: Architecture) -> tuple[nn.Module, LogProb]:
        import normflows as nf

        d, kept = arch.features, arch.features // 2
        layers: list[nn.Module] = []
        for index in range(arch.transforms):
            if index:
                layers.append(nf.flows.Permute(d, mode="swap" if d == 2 else "shuffle"))
            if spline:
                layers.append(nf.flows.CoupledRationalQuadraticSpline(
                    d, num_blocks=1, num_hidden_channels=arch.hidden, num_bins=arch.bins,
                    tail_bound=SPLINE_BOUND))
            else:
                layers.append(nf.flows.AffineCouplingBlock(
                    nf.nets.MLP([kept, arch.hidden, arch.hidden, 2 * (d - kept)],
                                init_zeros=True)))
        base = nf.distributions.DiagGaussian(d, trainable=False)
        flow = nf.NormalizingFlow(base, layers)
        return flow, flow.log_prob

    return build


def _freia_permutation_seed(features: int, seed: int) -> int:
    """A seed for FrEIA's ``PermuteRandom``; in 2-D the first one that swaps the features."""
    while features == 2 and np.random.RandomState(seed).permutation(2)[0] == 0:
        seed += 1
    return seed


def freia_affine(arch: Architecture) -> tuple[nn.Module, LogProb]:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(arch.features)
    for index in range(arch.transforms):
        if index:
            inn.append(Fm.PermuteRandom,
                       seed=_freia_permutation_seed(arch.features, 1000 * index))
        inn.append(Fm.AffineCouplingOneSided,
                   subnet_constructor=lambda n_in, n_out: mlp(n_in, n_out, arch.hidden))
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def log_prob(x: Tensor) -> Tensor:
        z, log_jacobian = inn(x)
        return -(0.5 * z.square() + half_log_2pi).sum(1) + log_jacobian

    return inn, log_prob


@dataclass
class ModelSpec:
    key: str
    label: str
    library: str
    build: Callable[[Architecture], tuple[nn.Module, LogProb]]


MODELS = [
    ModelSpec("autoflow-affine", "autoflow AffineCoupling", "autoflow",
              autoflow_coupling(spline=False)),
    ModelSpec(TARGET_ROW, "autoflow SplineCoupling", "autoflow", autoflow_coupling(spline=True)),
    ModelSpec("zuko-maf", "zuko MAF (autoregressive affine)", "zuko", zuko_flow("maf")),
    ModelSpec("zuko-nsf", "zuko NSF (autoregressive spline)", "zuko", zuko_flow("nsf")),
    ModelSpec("zuko-nsf-coupling", "zuko NSF, passes=2 (coupling spline)", "zuko",
              zuko_flow("coupling")),
    ModelSpec("normflows-realnvp", "normflows RealNVP (AffineCouplingBlock)", "normflows",
              normflows_flow(spline=False)),
    ModelSpec("normflows-nsf", "normflows NSF (CoupledRationalQuadraticSpline)", "normflows",
              normflows_flow(spline=True)),
    ModelSpec("freia-affine", "FrEIA AffineCouplingOneSided", "FrEIA", freia_affine),
]
SPLINE_PEERS = ("zuko-nsf", "zuko-nsf-coupling", "normflows-nsf")
PIP_NAMES = {"zuko": "zuko", "normflows": "normflows", "FrEIA": "FrEIA"}


def build_candidates(arch: Architecture, seed: int, keys: list[str],
                     notes: list[str]) -> list[Candidate]:
    """The selected models, each initialised from the same seed; a model whose library cannot
    be imported is left out and named in ``notes``."""
    candidates = []
    for spec in MODELS:
        if spec.key not in keys:
            continue
        torch.manual_seed(seed)
        try:
            module, log_prob = spec.build(arch)
        except ImportError as error:
            note = (f"{spec.label}: skipped, {spec.library} cannot be imported ({error}); "
                    f"install it with `pip install \"torch==2.13.0\" {PIP_NAMES[spec.library]}`")
            if note not in notes:
                notes.append(note)
            print(note, file=sys.stderr)
            continue
        candidates.append(Candidate(spec.key, spec.label, spec.library, module, log_prob))
    return candidates


# Training, side by side ------------------------------------------------------------------


@dataclass
class Budget:
    """What every model on one data set gets."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    log_every: int


def train_side_by_side(candidates: list[Candidate], data: DataSet, budget: Budget) -> None:
    """Train every candidate on the same batches, one step each in rotating order."""
    for c in candidates:
        c.module.train()
        c.optimizer = torch.optim.Adam(c.module.parameters(), lr=budget.lr)
        c.schedule = torch.optim.lr_scheduler.LambdaLR(
            c.optimizer, lambda step: lr_factor(step, budget.steps))
    batches = torch.Generator().manual_seed(budget.seed + 1)
    for step in range(budget.steps):
        indices = torch.randint(data.train_size, (budget.batch_size,), generator=batches)
        x = data.training_batch(indices, batches)
        shift = step % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            if c.diverged_at is None:
                _timed_step(c, x, step)
        if (step + 1) % budget.log_every == 0:
            losses = ", ".join(f"{c.key} {c.training_losses[-1]:.3f}" for c in candidates
                               if c.diverged_at is None)
            print(f"  [{data.name}] step {step + 1}: {losses}", file=sys.stderr, flush=True)


def _timed_step(c: Candidate, x: Tensor, step: int) -> None:
    """One optimiser step of ``c``, timed twice: CPU time of this thread and wall time."""
    cpu_start, wall_start = time.thread_time(), time.perf_counter()
    loss = -c.log_prob(x).mean()
    c.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(c.module.parameters(), GRADIENT_CLIP)
    c.optimizer.step()
    c.schedule.step()
    value = loss.item()
    c.step_cpu_seconds.append(time.thread_time() - cpu_start)
    c.step_wall_seconds.append(time.perf_counter() - wall_start)
    c.training_losses.append(value)
    if not math.isfinite(value):
        c.diverged_at = step


@torch.no_grad()
def test_nll(log_prob: LogProb, data: DataSet, module: nn.Module | None = None) -> float:
    """Mean test NLL in nats per raw dimension, over the test noise draws."""
    if module is not None:
        module.eval()
    per_sample = torch.stack([-log_prob(x).double() for x in data.test_draws]).mean(0)
    return float((per_sample.mean() + data.log_std_sum) / data.features)


@dataclass
class Row:
    """One line of a results table (JSON-serialisable, so a worker can send it)."""

    key: str
    label: str
    library: str
    parameters: int
    test_nll: float
    train_nll: float
    step_cpu_ms: float = math.nan
    step_wall_ms: float = math.nan
    diverged: bool = False


def _median_ms(seconds: list[float]) -> float:
    return 1000 * float(np.median(seconds)) if seconds else math.nan


def run_data_set(data: DataSet, arch: Architecture, budget: Budget, keys: list[str],
                 notes: list[str]) -> list[Row]:
    """Train every selected model on one data set; the rows, the Gaussian floor first."""
    candidates = build_candidates(arch, budget.seed, keys, notes)
    print(f"{data.name}: " + ", ".join(f"{c.key} {c.parameters:,}" for c in candidates),
          file=sys.stderr, flush=True)
    train_side_by_side(candidates, data, budget)
    gaussian = gaussian_log_prob(data.training_reference)
    training_split = DataSet(data.name, data.description, data.features, data.train_size,
                             data.training_batch, data.training_reference,
                             [data.training_reference], data.log_std_sum)
    rows = [Row("gaussian", "Gaussian fitted to the training split (floor)", "torch",
                arch.features + arch.features * (arch.features + 1) // 2,
                test_nll(gaussian, data), test_nll(gaussian, training_split))]
    tail = max(1, budget.steps // 10)
    for c in candidates:
        row = Row(c.key, c.label, c.library, c.parameters, math.nan, math.nan,
                  _median_ms(c.step_cpu_seconds), _median_ms(c.step_wall_seconds))
        if c.diverged_at is not None:
            row.diverged = True
            notes.append(f"{data.name}: {c.label} diverged (non-finite loss) at step "
                         f"{c.diverged_at}.")
        else:
            row.test_nll = test_nll(c.log_prob, data, c.module)
            losses = np.asarray(c.training_losses[-tail:])
            row.train_nll = float((losses.mean() + data.log_std_sum) / data.features)
        rows.append(row)
    return rows


def load_data_set(name: str, args: argparse.Namespace) -> DataSet:
    if name == "moons":
        return two_moons(args.moons_train, args.moons_test, seed=args.seed)
    return flat_digits(seed=args.seed, test_draws=args.test_draws)


def worker(name: str, args: argparse.Namespace) -> dict:
    """Run one data set in this process; returns its rows, notes and wall time."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_data_set(name, args)
    settings = vars(args)
    arch = Architecture(data.features, args.transforms, settings[f"{name}_hidden"], args.bins)
    budget = Budget(settings[f"{name}_steps"], settings[f"{name}_batch_size"], args.lr,
                    args.seed, args.log_every)
    notes: list[str] = []
    keys = list(args.models)
    if data.features == 2 and "zuko-nsf-coupling" in keys:
        keys.remove("zuko-nsf-coupling")
        notes.append(f"{data.name}: no zuko NSF passes=2 row; in 2-D a coupling is the "
                     "autoregressive transform, so it would repeat the zuko NSF row.")
    rows = run_data_set(data, arch, budget, keys, notes)
    return {"name": name, "description": data.description, "hidden": arch.hidden,
            "steps": budget.steps, "batch_size": budget.batch_size,
            "rows": [asdict(r) for r in rows], "notes": notes,
            "wall_s": time.perf_counter() - start}


# Report ----------------------------------------------------------------------------------


def best_peer(rows: list[Row]) -> Row | None:
    peers = [r for r in rows if r.library not in ("autoflow", "torch") and not r.diverged]
    return min(peers, key=lambda r: r.test_nll) if peers else None


def _ratio(value: float, reference: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value / reference:.{digits}f}"


def _number(value: float, digits: int) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def data_set_section(result: dict) -> list[str]:
    rows = [Row(**r) for r in result["rows"]]
    best = best_peer(rows)
    lines = [
        f"## {result['name']}", "",
        f"{result['description']}. {result['steps']} steps at batch {result['batch_size']}, "
        f"conditioners 2 x {result['hidden']} hidden units. Wall time {result['wall_s']:.0f} s.",
        "",
        "| model | parameters | test NLL (nats/dim) | ÷ best peer | train NLL, last 10% "
        "| step CPU time (ms) | ÷ best peer | step wall time (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        label = f"**{r.label}**" if r is best else r.label
        if r.diverged:
            label += " (diverged)"
        nll_ratio = _ratio(r.test_nll, best.test_nll, 3) if best else "—"
        time_ratio = _ratio(r.step_cpu_ms, best.step_cpu_ms, 2) if best else "—"
        lines.append(
            f"| {label} | {r.parameters:,} | {_number(r.test_nll, 4)} | {nll_ratio} "
            f"| {_number(r.train_nll, 4)} | {_number(r.step_cpu_ms, 1)} | {time_ratio} "
            f"| {_number(r.step_wall_ms, 1)} |")
    return lines


def target_lines(results: list[dict]) -> list[str]:
    lines = ["## Target", "",
             f"autoflow's spline flow within {100 * (NLL_TARGET - 1):.0f}% of the best peer's "
             f"test NLL at <= {TIME_TARGET}x its step time (CPU time):", ""]
    for result in results:
        rows = [Row(**r) for r in result["rows"]]
        best = best_peer(rows)
        ours = next((r for r in rows if r.key == TARGET_ROW), None)
        if best is None or ours is None or ours.diverged:
            lines.append(f"* {result['name']}: not measured (no peer or no autoflow spline "
                         "row).")
            continue
        nll_ratio = ours.test_nll / best.test_nll
        time_ratio = ours.step_cpu_ms / best.step_cpu_ms
        lines.append(
            f"* {result['name']}: best peer {best.label}. Test NLL {ours.test_nll:.4f} vs "
            f"{best.test_nll:.4f} nats/dim, ratio {nll_ratio:.3f} (gap "
            f"{ours.test_nll - best.test_nll:+.4f} nats/dim) — "
            f"{_verdict(nll_ratio <= NLL_TARGET)}; step {ours.step_cpu_ms:.1f} vs "
            f"{best.step_cpu_ms:.1f} ms, ratio {time_ratio:.2f} — "
            f"{_verdict(time_ratio <= TIME_TARGET)}.")
        splines = [r for r in rows if r.key in SPLINE_PEERS and not r.diverged]
        if splines:
            spline = min(splines, key=lambda r: r.test_nll)
            lines.append(
                f"  Against the best spline peer, {spline.label}: test NLL ratio "
                f"{ours.test_nll / spline.test_nll:.3f}, step time ratio "
                f"{ours.step_cpu_ms / spline.step_cpu_ms:.2f}.")
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _commit() -> str:
    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", str(Path(__file__).resolve()))
    return head + (" (with uncommitted changes to this script)" if dirty else "")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = [f"torch {torch.__version__}"]
    for name in ("zuko", "normflows", "FrEIA"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found) + f", Python {platform.python_version()}"


def report(results: list[dict], pending: list[str], args: argparse.Namespace, command: str,
           wall: float, loads: list[float]) -> str:
    lines = [
        "# autoflow vs zuko, normflows and FrEIA: two moons and 8x8 digits, one budget",
        "",
        "Command (from the repository root; peers from "
        "`pip install \"torch==2.13.0\" -e \".[example,peers]\"`):",
        "",
        "```",
        command,
        "```",
        "",
        f"Commit {_commit()}. Machine: {platform.machine()}, {os.cpu_count()} cores shared with "
        f"other jobs (1-minute load average {min(loads):.1f}–{max(loads):.1f} during the run), "
        f"one process per data set, 1 torch thread each, nice 19; {_versions()}. Total wall "
        f"time {wall:.0f} s.",
        "",
        f"Budget for every model of a data set: the same batches, Adam at peak lr {args.lr} "
        f"(50 warm-up steps, cosine decay to a tenth), gradient norm clipped to "
        f"{GRADIENT_CLIP:g}, {args.transforms} transforms, conditioners with two hidden "
        f"layers, splines with {args.bins} bins on [-{SPLINE_BOUND:g}, {SPLINE_BOUND:g}], seed "
        f"{args.seed}. Test NLL: nats per dimension of the raw data (the standardisation's "
        "log-det added back; for the digits a bound on the integer images' NLL). Step times "
        "are medians over the budget: CPU time of the training thread (what the step costs, "
        "unaffected by the time the process waits for a core) and wall time (which on this "
        "loaded machine is mostly waiting). The best peer (bold) is the peer row with the "
        "lowest test NLL; the ratios divide by its values.",
        "",
    ]
    for result in results:
        lines += data_set_section(result) + [""]
    for name in pending:
        lines += [f"## {name}", "", "Not finished when this file was written.", ""]
    lines += target_lines(results)
    notes = [note for result in results for note in result["notes"]]
    if notes:
        lines += ["", "## Notes", ""] + [f"* {note}" for note in dict.fromkeys(notes)]
    return "\n".join(lines) + "\n"


def kept_reading(path: Path) -> str:
    """The hand-written ``## Reading`` section of an existing results file, if any."""
    if not path.exists():
        return ""
    text = path.read_text()
    index = text.find("\n" + READING_HEADING)
    return text[index:] if index >= 0 else ""


# Driver ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="moons,digits",
                        help="comma-separated subset of moons, digits")
    parser.add_argument("--models", default=",".join(spec.key for spec in MODELS),
                        help="comma-separated subset of " + ", ".join(s.key for s in MODELS))
    parser.add_argument("--moons-steps", type=int, default=500)
    parser.add_argument("--moons-batch-size", type=int, default=256)
    parser.add_argument("--moons-hidden", type=int, default=64)
    parser.add_argument("--digits-steps", type=int, default=300)
    parser.add_argument("--digits-batch-size", type=int, default=64)
    parser.add_argument("--digits-hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--transforms", type=int, default=6)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moons-train", type=int, default=4000)
    parser.add_argument("--moons-test", type=int, default=2000)
    parser.add_argument("--test-draws", type=int, default=4,
                        help="dequantisation noise draws of the digits test set")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["moons", "digits"], help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    unknown = set(args.models) - {spec.key for spec in MODELS}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    command = "OMP_NUM_THREADS=1 nice -n 19 python benchmarks/flows_vs_peers.py" + "".join(
        f" {a}" for a in argv)
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    order = args.data.split(",")
    running = {
        name: subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv,
                                f"--worker={name}"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, text=True)
        for name in order
    }
    reading = kept_reading(args.out)
    results: list[dict] = []
    loads = [os.getloadavg()[0]]
    while running:
        time.sleep(5)
        loads.append(os.getloadavg()[0])
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            output = process.stdout.read() if process.stdout else ""
            del running[name]
            if process.returncode != 0:
                raise RuntimeError(f"the {name} worker failed (exit {process.returncode})")
            results.append(json.loads(output.strip().splitlines()[-1]))
            results.sort(key=lambda result: order.index(result["name"]))
            text = report(results, list(running), args, command, time.perf_counter() - start,
                          loads)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + reading)
            print(text, flush=True)


if __name__ == "__main__":
    main()
