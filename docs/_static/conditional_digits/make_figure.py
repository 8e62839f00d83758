"""The numbers and the figure of docs/tutorials/conditional_digits.rst.

Trains the tutorial's class-conditional Glow on scikit-learn's 8x8 digits, longer and wider
than the executed tutorial does, then reports, on the 300 held-out test digits:

* test bits/dim of the 17-level images given the true label and given each wrong label;
* the accuracy of the flow as a classifier by Bayes' rule with a uniform prior,
  ``argmax_y log p(x | y)``, before and after training;
* how many samples drawn for digit ``d`` a separate classifier (logistic regression fitted on
  the real training digits) reads as ``d``;

and writes ``samples.png`` (one row per digit 0..9) and ``results.md`` beside this file.

Run from the repository root (under two minutes of CPU time, one thread)::

    OMP_NUM_THREADS=1 python docs/_static/conditional_digits/make_figure.py
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

import autoflow

HERE = Path(__file__).resolve().parent
LEVELS = 17  # grey levels of the digits, 0..16
CLASSES = 10


def load(seed: int, test_size: int = 300) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train images, train labels, test images, test labels)``; images are integer levels."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = order[:test_size], order[test_size:]
    return images[train], labels[train], images[test], labels[test]


def dequantise(levels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """17 grey levels to ``[-1/2, 1/2)``: uniform noise inside each level, then scaled."""
    return (levels + torch.rand(levels.shape, generator=generator)) / LEVELS - 0.5


def conditional_digits(*, levels: int, depth: int, hidden: int, embedding: int
                       ) -> autoflow.Flow:
    """A Glow conditioned on a learned embedding of the label (as on the page)."""
    embed = nn.Embedding(CLASSES, embedding)
    transform = autoflow.glow(1, levels=levels, depth_per_level=depth, hidden_channels=hidden,
                              context_channels=embedding, memory_saving=True)
    return autoflow.Flow(transform, (1, 8, 8), context_encoder=embed)


@torch.no_grad()
def log_p_every_label(model: autoflow.Flow, x: Tensor) -> Tensor:
    """``log p(x | y)`` for every image and every label, shape ``(B, 10)``."""
    return torch.stack([model.log_prob(x, context=torch.full((len(x),), y))
                        for y in range(CLASSES)], 1)


def evaluate(model: autoflow.Flow, images: Tensor, labels: Tensor, *, draws: int,
             seed: int) -> dict[str, float]:
    """Bits/dim given the true and the wrong labels, and the Bayes-rule accuracy."""
    generator = torch.Generator().manual_seed(seed)
    log_p = sum(log_p_every_label(model, dequantise(images, generator))
                for _ in range(draws)) / draws
    bits = (-log_p / 64 + math.log(LEVELS)) / math.log(2)        # (B, 10) bits/dim
    true = torch.zeros_like(bits, dtype=torch.bool)
    true[torch.arange(len(labels)), labels] = True
    return {
        "accuracy": (log_p.argmax(1) == labels).float().mean().item(),
        "true_bits": bits[true].mean().item(),
        "wrong_bits": bits[~true].mean().item(),
    }


def lr_factor(step: int, steps: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(model: autoflow.Flow, images: Tensor, labels: Tensor, args: argparse.Namespace
          ) -> float:
    """Adam on the mean NLL of fresh dequantised batches; returns the CPU time in seconds."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda step: lr_factor(step, args.steps))
    start, cpu, running = time.perf_counter(), time.process_time(), None
    model.train()
    for step in range(args.steps):
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        loss = model.nll(dequantise(images[index], generator), context=labels[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 250 == 0:
            print(f"  step {step + 1:5d}/{args.steps}  nll {running:8.2f} nats/image  "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    model.eval()
    return time.process_time() - cpu


def save_rows(images: np.ndarray, path: Path, zoom: int = 4, pad: int = 1) -> None:
    """Grey images ``(rows, columns, 8, 8)`` in ``[0, 1]`` as one PNG grid, white between them."""
    rows, columns, h, w = images.shape
    canvas = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad))
    for r in range(rows):
        for c in range(columns):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            canvas[top:top + h, left:left + w] = np.clip(images[r, c], 0.0, 1.0)
    canvas = np.kron(canvas, np.ones((zoom, zoom)))
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--embedding", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--per-digit", type=int, default=12, help="samples per digit (row)")
    parser.add_argument("--draws", type=int, default=4,
                        help="dequantisation draws averaged in the evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = load(args.seed)
    model = conditional_digits(levels=args.levels, depth=args.depth, hidden=args.hidden,
                              embedding=args.embedding)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{len(train_x)} train / {len(test_x)} test digits; Glow {args.levels} levels x "
          f"{args.depth} steps, hidden {args.hidden}, embedding {args.embedding}: "
          f"{parameters:,} parameters")
    with torch.no_grad():  # ActNorm's data-dependent initialisation, on a large batch
        model.train()
        model.log_prob(dequantise(train_x[:512]), context=train_y[:512])
    model.eval()
    before = evaluate(model, test_x, test_y, draws=1, seed=args.seed + 2)
    print("untrained:", before)
    cpu = train(model, train_x, train_y, args)
    after = evaluate(model, test_x, test_y, draws=args.draws, seed=args.seed + 2)
    print("trained:", after)

    # One row per digit, drawn on request: a batch of one context shared by the row.
    generator = torch.Generator().manual_seed(args.seed + 3)
    with torch.no_grad():
        rows = [model.sample(args.per_digit, context=torch.tensor([d]),
                             temperature=args.temperature, generator=generator)
                for d in range(CLASSES)]
    samples = torch.stack(rows)[:, :, 0] + 0.5                    # (10, per_digit, 8, 8)
    args.out.mkdir(parents=True, exist_ok=True)
    save_rows(samples.numpy(), args.out / "samples.png")

    # A judge that never saw the flow: logistic regression on the real training digits.
    judge = LogisticRegression(max_iter=5000).fit(train_x.flatten(1).numpy(), train_y.numpy())
    judge_test = judge.score(test_x.flatten(1).numpy(), test_y.numpy())
    levels = (samples.clamp(0, 1) * LEVELS - 0.5).flatten(2).numpy()   # back to 0..16
    read = judge.predict(levels.reshape(-1, 64)).reshape(CLASSES, args.per_digit)
    per_digit = (read == np.arange(CLASSES)[:, None]).mean(1)

    lines = [
        f"`python docs/_static/conditional_digits/make_figure.py` (seed {args.seed}, "
        f"{args.steps} steps, batch {args.batch_size}, lr {args.lr}; Glow {args.levels} levels "
        f"x {args.depth} steps, hidden {args.hidden}, embedding {args.embedding}, "
        f"{parameters:,} parameters; training took {cpu:.0f} s of CPU time)",
        "",
        "| | untrained | trained |",
        "|---|---|---|",
        f"| test bits/dim, true label | {before['true_bits']:.3f} | {after['true_bits']:.3f} |",
        f"| test bits/dim, wrong labels (mean) | {before['wrong_bits']:.3f} "
        f"| {after['wrong_bits']:.3f} |",
        f"| Bayes-rule accuracy | {before['accuracy']:.3f} | {after['accuracy']:.3f} |",
        "",
        f"Samples at temperature {args.temperature}, {args.per_digit} per digit, read by a "
        f"logistic regression fitted on the real training digits (test accuracy "
        f"{judge_test:.3f}) as the digit asked for: {per_digit.mean():.3f} overall; per digit "
        + ", ".join(f"{d}: {p:.2f}" for d, p in enumerate(per_digit)) + ".",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
