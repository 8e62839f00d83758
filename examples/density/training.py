"""The training loop both examples share: Adam on the mean NLL, warm-up, clipping, timing."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from autoflow.flow import Flow

__all__ = ["fit", "lr_factor"]


def lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to 0.1.

    Flows are touchy while ActNorm and the couplings leave the identity: without warm-up a
    first Adam step at full rate can throw the NLL up by hundreds of nats.

    Example:
        >>> [round(lr_factor(s, 100, warmup=10), 2) for s in (0, 9, 10, 100)]
        [0.1, 1.0, 1.0, 0.1]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def fit(
    flow: Flow,
    next_batch: Callable[[], Tensor],
    *,
    steps: int,
    lr: float,
    warmup: int = 50,
    clip: float = 50.0,
    log_every: int = 100,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Minimise the mean negative log-likelihood of ``next_batch()`` for ``steps`` steps.

    The learning rate follows :func:`lr_factor`; gradients are clipped to norm ``clip``.

    Args:
        flow: The flow to train (put in training mode here).
        next_batch: Returns the next training batch, already dequantised.
        steps: Number of optimiser steps.
        lr: Peak learning rate.
        warmup: Warm-up steps.
        clip: Gradient-norm clip.
        log_every: Print the running NLL every this many steps.
        log: Where progress lines go.

    Returns:
        The wall time of every step in seconds.
    """
    flow.train()
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup)
    )
    times, running = [], None
    for step in range(steps):
        start = time.perf_counter()
        loss = flow.nll(next_batch()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), clip)
        optimizer.step()
        schedule.step()
        times.append(time.perf_counter() - start)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"  step {step + 1:5d}/{steps}  nll {running:9.4f} nats  "
                f"{1000 * sorted(times)[len(times) // 2]:.1f} ms/step (median), "
                f"{sum(times):.1f} s so far")
    flow.eval()
    return times
