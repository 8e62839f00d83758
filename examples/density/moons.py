"""A 2-D normalizing flow on two moons: test NLL in nats and a PNG of the learnt density.

Points ``(x, y)`` from ``sklearn.datasets.make_moons`` (noise 0.05), standardised with the
training mean and standard deviation, go through the flow as ``(B, 2)`` vectors: each flow step
is ActNorm, a learned 2x2 linear map (``InvConv1x1`` on vectors) and an affine coupling whose
conditioner is an MLP. The reported NLL is of
the original (unstandardised) points: the standardisation's log-det is added back.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import autoflow
from autoflow.flow import Flow

from .images import colormap, save_rgb
from .training import fit

__all__ = ["load_moons", "main", "make_flow", "mlp_conditioner"]


def load_moons(n: int, seed: int) -> Tensor:
    """``n`` two-moons points ``(n, 2)`` in float32."""
    from sklearn.datasets import make_moons

    points, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
    return torch.from_numpy(points).float()


def mlp_conditioner(hidden: int) -> nn.Sequential:
    """MLP 1 -> hidden -> hidden -> 2 (s, t), last layer zero (identity start)."""
    last = nn.Linear(hidden, 2)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LeakyReLU(), last)


def make_flow(*, depth: int, hidden: int, memory_saving: bool = True) -> Flow:
    """``depth`` x [ActNorm, InvConv1x1, AffineCoupling] on ``(B, 2)`` points."""
    modules = []
    for _ in range(depth):
        modules += [autoflow.ActNorm(2), autoflow.InvConv1x1(2),
                    autoflow.AffineCoupling(2, conditioner=mlp_conditioner(hidden), clamp=3.0)]
    return Flow(autoflow.Sequential(*modules, memory_saving=memory_saving), (2,))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--depth", type=int, default=8, help="flow steps")
    parser.add_argument("--hidden", type=int, default=64, help="conditioner MLP width")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/density"),
                        help="folder for moons_density.png")
    return parser


@torch.no_grad()
def density_image(flow: Flow, mean: Tensor, std: Tensor, *, size: int = 256,
                  box: tuple[float, float, float, float] = (-1.5, 2.5, -1.0, 1.5)) -> np.ndarray:
    """The model density of the original points on a ``size x size`` grid over ``box``.

    Returns:
        ``(size, size)`` densities, rows from top (large y) to bottom, and their integral over
        the box as a check.
    """
    x0, x1, y0, y1 = box
    xs = torch.linspace(x0, x1, size)
    ys = torch.linspace(y1, y0, size)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    log_p = flow.log_prob((points - mean) / std) - std.log().sum()
    return log_p.exp().view(size, size).numpy()


def main(args: argparse.Namespace) -> dict[str, float]:
    """Train, evaluate, write the density plot; returns the measured numbers."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train = load_moons(args.train_size, args.seed)
    test = load_moons(args.test_size, args.seed + 1000)
    mean, std = train.mean(0), train.std(0)
    to_flow = lambda p: (p - mean) / std  # noqa: E731
    flow = make_flow(depth=args.depth, hidden=args.hidden)
    n_params = sum(p.numel() for p in flow.parameters())
    print(f"moons: {len(train)} train / {len(test)} test points; {args.depth} steps, MLP width "
          f"{args.hidden}, {n_params:,} parameters, memory-saving engine")
    generator = torch.Generator().manual_seed(args.seed + 1)

    def next_batch() -> Tensor:
        return to_flow(train[torch.randint(len(train), (args.batch_size,), generator=generator)])

    times = fit(flow, next_batch, steps=args.steps, lr=args.lr, log_every=500)
    # The standardisation x -> (x - mean) / std has log-det -sum(log std): add it back.
    with torch.no_grad():
        test_nll = (flow.nll(to_flow(test)) + std.log().sum()).mean().item()
    density = density_image(flow, mean, std)
    box_area = 4.0 * 2.5
    mass = float(density.mean() * box_area)
    image = colormap(density / density.max())
    image = np.kron(image, np.ones((2, 2, 1), dtype=np.uint8))
    path = save_rgb(image, args.out / "moons_density.png")
    wall = time.perf_counter() - start
    print(f"test NLL: {test_nll:.4f} nats/point; density mass in the plotted box {mass:.3f}; "
          f"median step {1000 * float(np.median(times)):.1f} ms; density -> {path}; "
          f"wall time {wall:.1f} s")
    return {"test_nll": test_nll, "mass_in_box": mass, "wall_s": wall}
