"""Bad inputs to the library's primitives fail at once, as an AutoflowError naming the fault.

Each case here was once a silent wrong result or a confusing error; the test keeps it handled.
The convention under test: a state is a floating-point tensor; a switch is a bool (a string
such as ``"none"`` is refused, not read as True); a choice among modes is a mode string, with
None for "off".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import autoflow
from autoflow import AutoflowError, ShapeError
from autoflow.coupling import make_conditioner

__all__: list[str] = []

CHANNELS = 4


PRIMITIVES: dict[str, Callable[[], autoflow.InvertibleModule]] = {
    "ActNorm": lambda: autoflow.ActNorm(CHANNELS),
    "InvConv1x1": lambda: autoflow.InvConv1x1(CHANNELS),
    "InvConv1x1(volume_norm)": lambda: autoflow.InvConv1x1(CHANNELS, volume_norm=True),
    "LiftingConv1x1": lambda: autoflow.LiftingConv1x1(CHANNELS),
    "AffineCoupling": lambda: autoflow.AffineCoupling(CHANNELS, hidden_channels=4),
    "AdditiveCoupling": lambda: autoflow.AdditiveCoupling(CHANNELS, hidden_channels=4),
    "SplineCoupling": lambda: autoflow.SplineCoupling(CHANNELS, hidden_channels=4),
    "MaskedCoupling": lambda: autoflow.MaskedCoupling(
        CHANNELS, autoflow.checkerboard_mask((CHANNELS, 8, 8)), hidden_channels=4),
    "InvConv1x1(lu=False)": lambda: autoflow.InvConv1x1(CHANNELS, lu=False),
    "Permute": lambda: autoflow.Permute(CHANNELS),
    "Squeeze": lambda: autoflow.Squeeze(CHANNELS),
    "HaarDownsample": lambda: autoflow.HaarDownsample(CHANNELS),
    "LaplacianPyramid": lambda: autoflow.LaplacianPyramid(2),
    "Sequential": lambda: autoflow.Sequential(autoflow.ActNorm(CHANNELS),
                                              autoflow.InvConv1x1(CHANNELS)),
}
"""One small instance of every primitive that takes a ``(B, C, H, W)`` state, by name."""


def input_for(name: str, dtype: torch.dtype) -> torch.Tensor:
    channels = 3 if name == "LiftingConv1x1" else CHANNELS
    return torch.ones(2, channels, 8, 8).to(dtype)


@pytest.mark.parametrize("name", list(PRIMITIVES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_non_float_input_is_refused_naming_the_dtype(name, dtype):
    module = PRIMITIVES[name]()
    with pytest.raises(AutoflowError, match=f"expected a floating-point input, received {dtype}"):
        module(input_for(name, dtype))


def test_non_float_advice_is_possible():
    # It used to advise "convert the module with .to(torch.int64)", which cannot be done.
    with pytest.raises(AutoflowError) as error:
        autoflow.ActNorm(CHANNELS)(torch.ones(1, CHANNELS, 2, 2, dtype=torch.int64))
    assert ".to(torch.int64)" not in str(error.value) and ".float()" in str(error.value)


def test_float_input_of_another_dtype_names_both_dtypes():
    with pytest.raises(AutoflowError, match=r"expected a torch.float32 input.*received "
                                            r"torch.float64.*\.to\(torch.float32\)"):
        autoflow.InvConv1x1(CHANNELS)(torch.ones(1, CHANNELS, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("value", ["none", "channel", 1, 0, None])
def test_inv_conv_volume_norm_is_a_bool_switch(value):
    # "none" is truthy: taken as a switch it would turn volume normalisation on.
    with pytest.raises(AutoflowError, match="InvConv1x1 volume_norm must be a bool"):
        autoflow.InvConv1x1(CHANNELS, volume_norm=value)


@pytest.mark.parametrize("value", [True, False, 1, "none"])
def test_coupling_volume_norm_is_a_mode_or_none(value):
    with pytest.raises(AutoflowError, match="volume_norm|VolumeNorm mode must be one of"):
        autoflow.AffineCoupling(CHANNELS, hidden_channels=4, volume_norm=value)


def test_conditioner_bias_is_a_bool_switch():
    with pytest.raises(AutoflowError, match="bias must be a bool"):
        make_conditioner(2, 4, 8, bias="false")


@pytest.mark.parametrize("channels", [0, -1, 2.0, True, "4"])
def test_channel_counts_are_positive_ints(channels):
    with pytest.raises(AutoflowError, match="channels"):
        autoflow.ActNorm(channels)


@pytest.mark.parametrize("clamp", [0, -1.0, math.inf, math.nan, True])
def test_coupling_clamp_is_positive_and_finite(clamp):
    with pytest.raises(AutoflowError, match="clamp must be a positive finite number"):
        autoflow.AffineCoupling(CHANNELS, hidden_channels=4, clamp=clamp)


@pytest.mark.parametrize(("state", "message"), [
    ([1, 2, 3], "expected a tensor input"),
    (torch.ones(CHANNELS, 8, 8), "expected a 4-D input"),
    (torch.ones(2, CHANNELS + 1, 8, 8), f"expected {CHANNELS} channels"),
])
def test_wrong_state_is_a_shape_error(state, message):
    with pytest.raises(ShapeError, match=message):
        autoflow.ActNorm(CHANNELS)(state)


def test_odd_size_into_a_downsampling_is_refused():
    with pytest.raises(AutoflowError):
        autoflow.Squeeze(CHANNELS)(torch.ones(1, CHANNELS, 7, 8))


def test_errors_are_value_errors_for_callers_that_catch_those():
    assert issubclass(AutoflowError, ValueError) and issubclass(ShapeError, AutoflowError)


SWITCHES: dict[str, Callable[[object], object]] = {
    "Sequential memory_saving": lambda v: autoflow.Sequential(autoflow.ActNorm(2),
                                                              memory_saving=v),
    "Sequential debug": lambda v: autoflow.Sequential(autoflow.ActNorm(2), debug=v),
    "Sequential preserve_rng_state": lambda v: autoflow.Sequential(
        autoflow.ActNorm(2), preserve_rng_state=v),
    "glow learned_prior": lambda v: autoflow.glow(1, levels=2, depth_per_level=1,
                                                  hidden_channels=4, learned_prior=v),
    "glow memory_saving": lambda v: autoflow.glow(1, levels=2, depth_per_level=1,
                                                  hidden_channels=4, memory_saving=v),
    "Split learned_prior": lambda v: autoflow.Split(4, learned_prior=v),
    "Coupling additive": lambda v: autoflow.Coupling(make_conditioner(2, 2, 4), additive=v),
    "InvConv1x1 volume_norm": lambda v: autoflow.InvConv1x1(CHANNELS, volume_norm=v),
    "InvConv1x1 lu": lambda v: autoflow.InvConv1x1(CHANNELS, lu=v),
    "checkerboard_mask invert": lambda v: autoflow.checkerboard_mask((2,), invert=v),
    "make_conditioner bias": lambda v: make_conditioner(2, 4, 8, bias=v),
    "Flow.sample return_log_prob": lambda v: autoflow.Flow(
        autoflow.ActNorm(2), (2, 1, 1)).sample(2, return_log_prob=v),
}
"""Every on/off option of the library, as a call taking the option's value."""


@pytest.mark.parametrize("name", list(SWITCHES))
@pytest.mark.parametrize("value", ["no", "False", 1, 0, None, torch.tensor(True)])
def test_switches_are_strict_bools(name, value):
    # "no" is truthy: read as a switch it would turn memory saving (or a prior) on.
    owner, option = name.split(" ")
    with pytest.raises(autoflow.SwitchError,
                       match=rf"{owner} {option} must be a bool, received"):
        SWITCHES[name](value)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switches_take_true_and_false(name):
    for value in (True, False):
        SWITCHES[name](value)


def test_switch_error_is_a_type_error_and_an_autoflow_error():
    assert issubclass(autoflow.SwitchError, TypeError)
    assert issubclass(autoflow.SwitchError, AutoflowError)
