"""Tests of the fixed channel permutation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoflow.errors import AutoflowError, ShapeError
from autoflow.permute import Permute
from autoflow.testing import assert_invertible, assert_logdet_matches_jacobian
from autoflow.testing import strategies as afs

kinds = st.sampled_from(["random", "reverse"])
fast = settings(max_examples=20, deadline=None)


@fast
@given(x=afs.states(channels=st.integers(1, 6), max_size=5), kind=kinds, seed=st.integers(0, 99))
def test_round_trip_and_zero_logdet(x: torch.Tensor, kind: str, seed: int) -> None:
    torch.manual_seed(seed)
    perm = Permute(x.shape[1], kind=kind)
    assert perm.volume_preserving
    assert_invertible(perm, x)
    y, logdet = perm(x)
    assert torch.equal(y, x[:, perm.perm]) and torch.equal(logdet, torch.zeros_like(logdet))
    assert logdet.dtype == x.dtype


@fast
@given(x=afs.states(channels=st.integers(1, 3), max_size=3), kind=kinds,
       _torch_state=st.random_module())
def test_logdet_matches_jacobian(x: torch.Tensor, kind: str, _torch_state) -> None:
    assert_logdet_matches_jacobian(Permute(x.shape[1], kind=kind), x)


@fast
@given(channels=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_random_is_a_repeatable_permutation(channels: int, seed: int) -> None:
    torch.manual_seed(seed)
    a = Permute(channels).perm
    torch.manual_seed(seed)
    b = Permute(channels).perm
    assert torch.equal(a, b)
    assert sorted(a.tolist()) == list(range(channels))


def test_reverse_and_state_dict() -> None:
    assert Permute(4, kind="reverse").perm.tolist() == [3, 2, 1, 0]
    torch.manual_seed(0)
    source = Permute(16)
    target = Permute(16)
    assert not torch.equal(source.perm, target.perm)
    target.load_state_dict(source.state_dict())
    x = torch.randn(1, 16, 1, 1)
    assert torch.equal(target(x)[0], source(x)[0])


@fast
@given(x=afs.states(channels=st.integers(1, 6), max_size=4), seed=st.integers(0, 99),
       as_tensor=st.booleans())
def test_a_given_order_is_the_permutation_applied(x: torch.Tensor, seed: int,
                                                  as_tensor: bool) -> None:
    order = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))
    perm = Permute(x.shape[1], order=order if as_tensor else order.tolist())
    y, _ = perm(x)
    for i, source in enumerate(order.tolist()):
        assert torch.equal(y[:, i], x[:, source])
    assert_invertible(perm, x)
    assert perm.kind == "order" and f"order={order.tolist()}" in repr(perm)
    order[0] = -1  # the module keeps its own copy
    assert perm.perm.min() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": 0}, "channels must be an int >= 1, received 0"),
        ({"channels": 3, "kind": "shuffle"}, r"kind must be one of .*received 'shuffle'"),
        ({"channels": 3, "order": [0, 0, 1]}, r"order must hold each of 0 \.\. 2 once .*"
                                               r"received \[0, 0, 1\]"),
        ({"channels": 3, "order": [1, 0]}, r"order must hold each of 0 \.\. 2 once"),
        ({"channels": 3, "order": [0.0, 2.0, 1.0]}, r"order must hold each of 0 \.\. 2 once"),
        ({"channels": 3, "order": "abc"}, r"order must hold each of 0 \.\. 2 once"),
        ({"channels": 3, "kind": "reverse", "order": [2, 1, 0]},
         "takes a kind or an order, not both"),
    ],
)
def test_rejects_bad_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(AutoflowError, match=match):
        Permute(**kwargs)


def test_rejects_bad_inputs() -> None:
    perm = Permute(3)
    with pytest.raises(ShapeError, match="expected 3 channels.*received 2"):
        perm(torch.randn(1, 2, 2, 2))
    with pytest.raises(ShapeError, match="4-D input"):
        perm.inverse(torch.randn(3, 2, 2))
    with pytest.raises(ShapeError, match="expected 3 channels"):
        perm.input_shape((2, 2, 2))
