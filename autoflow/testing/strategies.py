"""Hypothesis strategies for the shapes, dtypes and states that invertible modules take.

Example:
    >>> from hypothesis import given, settings
    >>> from autoflow.testing import strategies as afs
    >>> @settings(max_examples=5)
    ... @given(afs.states(channels=4))
    ... def test_shape(x):
    ...     assert x.shape[1] == 4
    >>> test_shape()

Importing this module registers torch's global random-number generator with Hypothesis (see
:data:`TORCH_RANDOM`): every example then starts from the same torch random state, so a module
built inside a test (whose initial weights torch draws) is built again identically when
Hypothesis replays or shrinks a failing example, instead of turning the failure into a
``Flaky`` report. Draw ``hypothesis.strategies.random_module()`` in a test to vary that state
reproducibly from example to example.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import register_random
from hypothesis import strategies as st
from torch import Tensor

__all__ = [
    "TORCH_RANDOM",
    "batch_sizes",
    "conditional_states",
    "contexts",
    "dtypes",
    "image_shapes",
    "pyramid_states",
    "states",
    "tensor_of",
    "vector_states",
]


class _TorchGlobalRandom:
    """torch's global generator seen through the ``random.Random`` methods Hypothesis manages."""

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def getstate(self) -> Any:
        return torch.random.get_rng_state()

    def setstate(self, state: Any) -> None:
        torch.random.set_rng_state(state)


TORCH_RANDOM = _TorchGlobalRandom()
"""torch's global random-number generator as Hypothesis manages it: seeded at the start of
every example and restored after the test (``hypothesis.register_random`` keeps only a weak
reference, so this module holds the object)."""
register_random(TORCH_RANDOM)


def batch_sizes(min_size: int = 1, max_size: int = 3) -> st.SearchStrategy[int]:
    """Batch sizes between ``min_size`` and ``max_size``."""
    return st.integers(min_size, max_size)


def dtypes(*choices: torch.dtype) -> st.SearchStrategy[torch.dtype]:
    """Floating dtypes; float32 and float64 unless ``choices`` are given."""
    return st.sampled_from(choices or (torch.float32, torch.float64))


def _ints(value: int | st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def image_shapes(
    channels: int | st.SearchStrategy[int] = st.integers(1, 4),
    *,
    min_size: int = 1,
    max_size: int = 6,
    multiple_of: int = 1,
) -> st.SearchStrategy[tuple[int, int, int]]:
    """``(C, H, W)`` shapes with ``H`` and ``W`` multiples of ``multiple_of`` in the size range."""
    lo = max(1, -(-min_size // multiple_of))
    hi = max(lo, max_size // multiple_of)
    side = st.integers(lo, hi).map(lambda k: k * multiple_of)
    return st.tuples(_ints(channels), side, side)


def tensor_of(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 1.0) -> Tensor:
    """A reproducible standard-normal tensor of ``shape`` scaled by ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


@st.composite
def states(
    draw: st.DrawFn,
    channels: int | st.SearchStrategy[int] = st.integers(1, 4),
    *,
    min_size: int = 1,
    max_size: int = 6,
    multiple_of: int = 1,
    batch: st.SearchStrategy[int] | None = None,
    dtype: st.SearchStrategy[torch.dtype] | None = None,
) -> Tensor:
    """Random ``(B, C, H, W)`` tensors with drawn shape, batch size and dtype."""
    shape = draw(image_shapes(channels, min_size=min_size, max_size=max_size,
                              multiple_of=multiple_of))
    b = draw(batch if batch is not None else batch_sizes())
    kind = draw(dtype if dtype is not None else dtypes())
    return tensor_of((b, *shape), kind, draw(st.integers(0, 2**31 - 1)))


@st.composite
def pyramid_states(
    draw: st.DrawFn,
    channels: int | st.SearchStrategy[int] = st.integers(1, 3),
    *,
    levels: int | st.SearchStrategy[int] = st.integers(2, 3),
    max_top_size: int = 2,
    batch: st.SearchStrategy[int] | None = None,
    dtype: st.SearchStrategy[torch.dtype] | None = None,
) -> tuple[Tensor, ...]:
    """Tuples of pyramid levels: level ``d`` has shape ``(B, C, h * 2^(L-1-d), w * 2^(L-1-d))``.

    The coarsest level has side lengths between 1 and ``max_top_size``.
    """
    n_levels = draw(_ints(levels))
    c = draw(_ints(channels))
    h, w = draw(st.integers(1, max_top_size)), draw(st.integers(1, max_top_size))
    b = draw(batch if batch is not None else batch_sizes())
    kind = draw(dtype if dtype is not None else dtypes())
    seed = draw(st.integers(0, 2**31 - 1))
    return tuple(
        tensor_of((b, c, h * 2 ** (n_levels - 1 - d), w * 2 ** (n_levels - 1 - d)), kind, seed + d)
        for d in range(n_levels)
    )


@st.composite
def contexts(
    draw: st.DrawFn,
    batch: int,
    channels: int | st.SearchStrategy[int],
    *,
    dtype: torch.dtype = torch.float64,
    spatial: bool | None = None,
    max_size: int = 6,
) -> Tensor:
    """Contexts for a batch of ``batch`` states: ``(B, K)`` vectors or ``(B, K, h, w)`` images.

    Args:
        batch: The batch size ``B`` of the states they go with.
        channels: ``K``, or a strategy for it.
        dtype: The dtype of the states they go with.
        spatial: ``False`` for vectors only, ``True`` for images only (of any size up to
            ``max_size``, so a coupling must resize them), ``None`` for either.
        max_size: Largest side of an image context.
    """
    k = draw(_ints(channels))
    image = draw(st.booleans()) if spatial is None else spatial
    shape: tuple[int, ...] = (batch, k)
    if image:
        side = st.integers(1, max_size)
        shape = (batch, k, draw(side), draw(side))
    return tensor_of(shape, dtype, draw(st.integers(0, 2**31 - 1)))


@st.composite
def conditional_states(
    draw: st.DrawFn,
    channels: int | st.SearchStrategy[int] = st.integers(2, 4),
    context_channels: int | st.SearchStrategy[int] = st.integers(1, 3),
    *,
    min_size: int = 1,
    max_size: int = 6,
    multiple_of: int = 1,
    spatial: bool | None = None,
    batch: st.SearchStrategy[int] | None = None,
    dtype: st.SearchStrategy[torch.dtype] | None = None,
) -> tuple[Tensor, Tensor]:
    """Pairs ``(x, context)``: a state as :func:`states` draws it and a matching context.

    The context has the state's batch size and dtype (see :func:`contexts`).

    Example:
        >>> from hypothesis import given, settings
        >>> from autoflow.testing import strategies as afs
        >>> @settings(max_examples=5)
        ... @given(afs.conditional_states(channels=4, context_channels=2))
        ... def test_pair(pair):
        ...     x, c = pair
        ...     assert c.shape[:2] == (x.shape[0], 2) and c.dtype == x.dtype
        >>> test_pair()
    """
    x = draw(states(channels, min_size=min_size, max_size=max_size, multiple_of=multiple_of,
                    batch=batch, dtype=dtype))
    c = draw(contexts(x.shape[0], context_channels, dtype=x.dtype, spatial=spatial,
                      max_size=max_size))
    return x, c


@st.composite
def vector_states(
    draw: st.DrawFn,
    features: int | st.SearchStrategy[int] = st.integers(1, 6),
    *,
    batch: st.SearchStrategy[int] | None = None,
    dtype: st.SearchStrategy[torch.dtype] | None = None,
) -> Tensor:
    """Random ``(B, D)`` vector batches (tabular data) with drawn ``D``, batch size and dtype."""
    d = draw(_ints(features))
    b = draw(batch if batch is not None else batch_sizes())
    kind = draw(dtype if dtype is not None else dtypes())
    return tensor_of((b, d), kind, draw(st.integers(0, 2**31 - 1)))
