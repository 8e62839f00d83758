"""A public property-based test kit: check your own invertible modules like autoflow does."""

from . import strategies
from .checks import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
    assert_per_sample,
    default_rtol,
    relative_error,
)

__all__ = [
    "assert_engine_gradients_match",
    "assert_invertible",
    "assert_logdet_matches_jacobian",
    "assert_per_sample",
    "default_rtol",
    "relative_error",
    "strategies",
]
