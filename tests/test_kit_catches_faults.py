"""The test kit fails on the faults it exists to catch, each named in its message.

Every other test file uses ``assert_invertible`` and ``assert_logdet_matches_jacobian`` on
modules that are right; these tests feed them modules that are subtly wrong (a log-det off by
a little for one sample, an inverse that does not quite undo, a false ``volume_preserving``
flag, shapes predicted wrongly) and check that each one is caught, so that a kit that passes
everything cannot go unnoticed.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from autoflow import InvertibleModule, Permute
from autoflow.base import Shape
from autoflow.testing import assert_invertible, assert_logdet_matches_jacobian

F64 = torch.float64


class ChannelScale(InvertibleModule):
    """``y = x * exp(s_c)`` per channel: ``log|det J| = H W sum_c s_c``; faults switched on."""

    def __init__(self, fault: str = "", sign: float = 1.0, error: float = 1e-6) -> None:
        super().__init__()
        self.error = error
        self.log_scale = nn.Parameter(sign * torch.tensor([0.3, -0.2, 0.5], dtype=F64))
        self.fault = fault
        self.volume_preserving = fault == "false volume_preserving"

    def _logdet(self, x: Tensor) -> Tensor:
        logdet = self.log_scale.sum() * x[0, 0].numel() * x.new_ones(x.shape[0])
        if self.fault == "logdet off for the last sample":
            logdet = logdet + (torch.arange(x.shape[0]) == x.shape[0] - 1) * 1e-6
        if self.fault == "logdet sign":
            logdet = -logdet
        return logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp()[:, None, None], self._logdet(x)

    def inverse(self, y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x = y * (-self.log_scale).exp()[:, None, None]
        if self.fault == "inverse off":
            x = x + self.error * x.abs().max()
        logdet_inv = -self._logdet(x)
        faults = {
            "inverse logdet sign": (x, -logdet_inv),
            "inverse logdet off": (x, logdet_inv + self.error),
            "inverse output NaN": (x * torch.nan, logdet_inv),
            "inverse logdet NaN": (x, logdet_inv * torch.nan),
            "inverse logdet (B, 1)": (x, logdet_inv[:, None]),
            "inverse logdet missing": (x, None),
        }
        return faults.get(self.fault, (x, logdet_inv))

    def output_shape(self, input_shape: Shape) -> Shape:
        if self.fault == "output_shape wrong":
            return (input_shape[0], input_shape[2], input_shape[1])
        return input_shape

    def input_shape(self, output_shape: Shape) -> Shape:
        if self.fault == "input_shape wrong":
            return (output_shape[0] + 1, *output_shape[1:])
        return output_shape


def x64() -> Tensor:
    return torch.randn(3, 3, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sign", [1.0, -1.0])  # a volume-growing and a shrinking map
def test_the_right_module_passes_both_checks(sign):
    assert_invertible(ChannelScale(sign=sign), x64())
    assert_logdet_matches_jacobian(ChannelScale(sign=sign), x64())


@pytest.mark.parametrize(("fault", "message"), [
    ("logdet off for the last sample", r"ChannelScale: sample 2 reports logdet .*, the "
                                       r"Jacobian gives"),
    ("logdet sign", r"ChannelScale: sample 0 reports logdet -4\.8, the Jacobian gives 4\.8"),
])
def test_logdet_faults_are_caught_against_the_jacobian(fault, message):
    with pytest.raises(AssertionError, match=message):
        assert_logdet_matches_jacobian(ChannelScale(fault), x64())


@pytest.mark.parametrize(("fault", "message"), [
    ("inverse off", r"ChannelScale: inverse\(forward\(x\)\) differs from x by .* \(relative\), "
                    r"tolerance 1\.0e-10"),
    ("inverse logdet sign", r"ChannelScale: logdet_inv != -logdet \(relative gap 2\.000e\+00"),
    ("false volume_preserving", r"ChannelScale claims volume_preserving but its logdet is "
                                r"4\.800e\+00"),
    ("output_shape wrong", r"ChannelScale.output_shape predicted \(3, 4, 2\), forward produced "
                           r"\(3, 2, 4\)"),
    ("input_shape wrong", r"ChannelScale.input_shape maps \(3, 2, 4\) to \(4, 2, 4\), "
                          r"expected \(3, 2, 4\)"),
])
def test_inverse_and_shape_faults_are_caught(fault, message):
    with pytest.raises(AssertionError, match=message):
        assert_invertible(ChannelScale(fault), x64())


@pytest.mark.parametrize(("fault", "message"), [
    ("inverse output NaN", "assert_invertible: ChannelScale's inverse output contains NaN or "
                           "inf"),
    ("inverse logdet NaN", "assert_invertible: ChannelScale's logdet_inv contains NaN or inf"),
    ("inverse logdet (B, 1)", r"assert_invertible: ChannelScale's logdet_inv must have shape "
                              r"\(3,\), one value per sample, got \(3, 1\)"),
    ("inverse logdet missing", "ChannelScale: forward and inverse disagree on having a "
                               "log-det"),
])
def test_faults_of_the_inverse_alone_are_caught_and_named(fault, message):
    with pytest.raises(AssertionError, match=message):
        assert_invertible(ChannelScale(fault), x64())


class NoLogdet(ChannelScale):
    """Bijective, but returns no log-det in either direction."""

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return super().forward(x)[0], None

    def inverse(self, y: Tensor) -> tuple[Tensor, None]:
        return super().inverse(y)[0], None


def test_a_bijective_module_without_a_logdet_is_caught():
    with pytest.raises(AssertionError, match="NoLogdet is bijective but returned no log-det"):
        assert_invertible(NoLogdet(), x64())
    with pytest.raises(AssertionError, match="NoLogdet returned no log-det to check"):
        assert_logdet_matches_jacobian(NoLogdet(), x64())


def test_the_jacobian_check_leaves_the_module_as_it_was():
    # It works on a float64 copy: the caller's float32 module keeps its dtype and values.
    module = ChannelScale().float()
    before = module.log_scale.detach().clone()
    assert_logdet_matches_jacobian(module, x64().float(), rtol=1e-5)
    assert module.log_scale.dtype == torch.float32 and torch.equal(module.log_scale, before)


def test_small_logdets_are_compared_absolutely():
    # |logdet| <= 1 is compared on an absolute scale of 1: a gap of 1.5e-10 in logdet_inv is
    # outside the float64 tolerance of 1e-10 (a floor of 2 would let it pass).
    with pytest.raises(AssertionError, match=r"logdet_inv != -logdet \(relative gap 1\.5"):
        assert_invertible(ChannelScale("inverse logdet off", sign=0.05, error=1.5e-10), x64())


def test_an_exact_bijection_passes_with_zero_tolerance():
    # The comparisons are "within", not "strictly below": a permutation restores its input
    # exactly and its log-dets are exactly 0.
    assert_invertible(Permute(3, kind="reverse"), x64(), rtol=0.0)


def test_a_looser_tolerance_is_honoured_and_a_tighter_one_is_not_met():
    # 1e-6 relative error in the inverse: within rtol=1e-5, outside the float64 default.
    assert_invertible(ChannelScale("inverse off"), x64(), rtol=1e-5)
    with pytest.raises(AssertionError, match="tolerance 1.0e-07"):
        assert_invertible(ChannelScale("inverse off"), x64(), rtol=1e-7)
    assert_logdet_matches_jacobian(ChannelScale("logdet off for the last sample"), x64(),
                                   rtol=1e-5)


def test_the_float32_default_tolerance_is_1e_4():
    x = x64().float()
    assert_invertible(ChannelScale("inverse off", error=1e-5).float(), x)
    with pytest.raises(AssertionError, match="tolerance 1.0e-04"):
        assert_invertible(ChannelScale("inverse off", error=1e-3).float(), x)
