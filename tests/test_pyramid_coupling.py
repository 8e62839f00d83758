"""Cross-scale couplings over pyramid levels: maths, engine hooks and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from autoflow.conv1x1 import InvConv1x1
from autoflow.errors import AutoflowError, ShapeError
from autoflow.pyramid_coupling import DualPyramidCoupling, PyramidCoupling
from autoflow.testing import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
)
from autoflow.testing import strategies as afs

from test_coupling import check_reconstruction
from toys import randomize_conditioner

VOLUME_NORMS = [None, "channel", "spatial"]


@st.composite
def coupling_cases(draw, *, small: bool = False, batch=None):
    """A randomised (dual) pyramid coupling and a pyramid state it accepts.

    ``small`` keeps a sample at most 2 * (16 + 4 + 1) = 42 numbers for Jacobian checks.
    """
    # The conditioners' first layers keep torch's random initialisation: vary it per example,
    # reproducibly (the kit's strategies register torch's generator with Hypothesis).
    draw(st.random_module())
    dual = draw(st.booleans())
    levels = draw(afs.pyramid_states(
        st.integers(1, 2) if small else st.integers(1, 3),
        levels=st.just(3) if dual else st.integers(2, 3),
        max_top_size=1 if small else 2,
        batch=batch,
    ))
    channels = levels[0].shape[1]
    options = {
        "volume_norm": draw(st.sampled_from(VOLUME_NORMS)),
        "resize": draw(st.sampled_from(["bilinear", "nearest"])),
        "bias": draw(st.booleans()),
        "clamp_kind": draw(st.sampled_from(["tanh", "atan"])),
    }
    if dual:
        module = DualPyramidCoupling(channels, target=1, **options)
    else:
        target, source = draw(st.permutations(range(len(levels))))[:2]
        module = PyramidCoupling(channels, target=target, source=source, **options,
                                 condition_at=draw(st.sampled_from(["source", "target"])))
    return randomize_conditioner(module).to(levels[0].dtype), levels


@settings(max_examples=25, deadline=None)
@given(case=coupling_cases())
def test_round_trip_and_logdet_sign(case):
    module, levels = case
    assert_invertible(module, levels)  # training: the batch mean is the same both ways
    assert_invertible(module.eval(), levels)


@settings(max_examples=15, deadline=None)
@given(case=coupling_cases(small=True))
def test_logdet_matches_the_jacobian(case):
    module, levels = case
    module(levels)  # a training step gives the volume norm a non-trivial running mean
    # In training mode the volume norm subtracts the batch mean of s, coupling the samples, so
    # the per-sample Jacobian is checked in eval mode (running mean) and, below, with batch 1.
    assert_logdet_matches_jacobian(module.eval(), levels)


@settings(max_examples=10, deadline=None)
@given(case=coupling_cases(small=True, batch=st.just(1)))
def test_logdet_matches_the_jacobian_in_training_with_batch_one(case):
    module, levels = case
    assert_logdet_matches_jacobian(module.train(), levels)


@settings(max_examples=10, deadline=None)
@given(case=coupling_cases(), inverse=st.booleans())
def test_reconstruction_hooks_match_autograd_with_one_conditioner_call(case, inverse):
    module, levels = case
    check_reconstruction(module, levels, inverse=inverse)
    check_reconstruction(module.eval(), levels, inverse=inverse)


@settings(max_examples=10, deadline=None)
@given(case=coupling_cases(), inverse=st.booleans())
def test_memory_saving_engine_matches_autograd(case, inverse):
    module, levels = case
    assert_engine_gradients_match(module, levels, inverse=inverse)


@pytest.mark.parametrize("inverse", [False, True])
def test_reconstruction_does_not_update_the_running_mean(inverse):
    module = randomize_conditioner(PyramidCoupling(2, volume_norm="channel")).double()
    levels = (torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 2, 2).double())
    module(levels)
    before = module.volume_norm.running_mean.clone()
    (module.reconstruct_inverse if inverse else module.reconstruct)(levels)
    module.inverse(levels)
    assert torch.equal(module.volume_norm.running_mean, before)


# The maths -------------------------------------------------------------------------------


def _capture_conditioner_input(module):
    seen = []
    module.conditioner.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    return seen


@pytest.mark.parametrize(("target", "source"), [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)])
def test_pyramid_coupling_applies_affine_then_1x1_on_the_target_only(target, source):
    module = PyramidCoupling(2, target=target, source=source, clamp=1.0)
    module = randomize_conditioner(module).double()
    levels = tuple(torch.randn(2, 2, 2 ** (3 - d), 2 ** (3 - d), dtype=torch.float64)
                   for d in range(3))
    seen = _capture_conditioner_input(module)
    out, logdet = module(levels)
    size = tuple(levels[target].shape[2:])
    # The conditioner sees the source at its own resolution; its output is resized.
    assert torch.equal(seen[0], levels[source])
    params = module.conditioner(levels[source])
    params = F.interpolate(params, size=size, mode="bilinear", align_corners=False)
    s, t = params.chunk(2, dim=1)
    s = torch.tanh(s)
    expected, conv_logdet = module.mixer(torch.exp(s) * levels[target] + t)
    assert torch.allclose(out[target], expected)
    assert all(out[d] is levels[d] for d in range(3) if d != target)
    assert torch.allclose(logdet, s.sum(dim=(1, 2, 3)) + conv_logdet)
    area = size[0] * size[1]
    assert torch.allclose(conv_logdet, area * module.mixer.log_scale.sum().expand(2))


@pytest.mark.parametrize(("target", "source"), [(0, 1), (1, 0), (0, 2)])
def test_public_code_variant_nearest_conditioner_at_target_atan_clamp_no_bias(target, source):
    module = PyramidCoupling(2, target=target, source=source, clamp=2.0, resize="nearest",
                             condition_at="target", bias=False, clamp_kind="atan")
    module = randomize_conditioner(module).double()
    assert all(conv.bias is None for conv in (module.conditioner[0], module.conditioner[-1]))
    levels = tuple(torch.randn(2, 2, 2 ** (3 - d), 2 ** (3 - d), dtype=torch.float64)
                   for d in range(3))
    seen = _capture_conditioner_input(module)
    out, logdet = module(levels)
    size = tuple(levels[target].shape[2:])
    # The source is resized (nearest) to the target's size before the conditioner runs.
    source_at_target = F.interpolate(levels[source], size=size, mode="nearest")
    assert torch.equal(seen[0], source_at_target)
    s, t = module.conditioner(source_at_target).chunk(2, dim=1)
    s = 2.0 * 0.6366197723675814 * torch.atan(s / 2.0)
    expected, conv_logdet = module.mixer(torch.exp(s) * levels[target] + t)
    assert torch.allclose(out[target], expected)
    assert torch.allclose(logdet, s.sum(dim=(1, 2, 3)) + conv_logdet)


def test_nearest_resize_of_the_affine_parameters_at_the_source():
    module = randomize_conditioner(PyramidCoupling(2, target=1, source=0, resize="nearest"))
    levels = (torch.randn(1, 2, 8, 8).double(), torch.randn(1, 2, 4, 4).double())
    module = module.double()
    out, _ = module(levels)
    params = F.interpolate(module.conditioner(levels[0]), size=(4, 4), mode="nearest")
    s, t = params.chunk(2, dim=1)
    expected, _ = module.mixer(torch.exp(torch.tanh(s / 2.0) * 2.0) * levels[1] + t)
    assert torch.allclose(out[1], expected)


def test_dual_coupling_conditions_on_both_resized_neighbours():
    module = randomize_conditioner(DualPyramidCoupling(3, target=2)).double()
    levels = tuple(torch.randn(1, 3, 2 ** (4 - d), 2 ** (4 - d), dtype=torch.float64)
                   for d in range(4))
    seen = _capture_conditioner_input(module)
    out, _ = module(levels)
    size = (4, 4)
    expected = torch.cat([
        F.interpolate(levels[1], size=size, mode="bilinear", align_corners=False),
        F.interpolate(levels[3], size=size, mode="bilinear", align_corners=False),
    ], dim=1)
    assert module.conditioner[0].in_channels == 6
    assert torch.equal(seen[0], expected)
    assert all(out[d] is levels[d] for d in (0, 1, 3)) and not torch.equal(out[2], levels[2])


def test_untrained_coupling_is_just_the_1x1_convolution():
    module = PyramidCoupling(3)
    levels = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    out, logdet = module(levels)
    conv, conv_logdet = module.mixer(levels[0])
    assert torch.equal(out[0], conv) and torch.equal(logdet, conv_logdet)


def test_volume_norm_normalises_the_1x1_convolution_too():
    module = PyramidCoupling(2, volume_norm="spatial")
    assert isinstance(module.mixer, InvConv1x1) and module.mixer.volume_norm
    assert module.volume_norm.mode == "spatial"
    assert not PyramidCoupling(2).mixer.volume_norm


def test_hidden_width_and_kernel_size():
    module = DualPyramidCoupling(2, hidden_channels=7, kernel_size=1)
    assert module.conditioner[0].out_channels == 7 and module.conditioner[0].kernel_size == (1, 1)
    assert module.conditioner[-1].out_channels == 4
    assert PyramidCoupling(5).conditioner[0].out_channels == 5


def test_shape_methods():
    shapes = ((2, 8, 8), (2, 4, 4), (1, 2, 2))
    assert PyramidCoupling(2).output_shape(shapes) == shapes
    assert DualPyramidCoupling(2).input_shape(((2, 8, 8), (2, 4, 4), (2, 2, 2))) is not None
    with pytest.raises(ShapeError, match="needs at least 3 pyramid levels"):
        DualPyramidCoupling(2).output_shape(shapes[:2])
    with pytest.raises(ShapeError, match=r"expected 2 channels, received shape \(1, 2, 2\)"):
        DualPyramidCoupling(2).output_shape(shapes)
    with pytest.raises(ShapeError, match="expected a tuple of level shapes"):
        PyramidCoupling(2).output_shape((2, 8, 8))


# Bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ("tensor", r"expected a tuple of pyramid levels, each \(B, C, H, W\), received Tensor"),
        ("short", r"target level 0 and source levels \[2\] needs at least 3 pyramid levels, "
                  r"received 2"),
        ("channels", r"expected 2 channels in its level 2, received 3"),
        ("batch", r"same batch size in every level, received \[1, 1, 2\]"),
        ("rank", r"4-D level 1 \(B, C, H, W\), received shape \(2, 4, 4\)"),
    ],
)
@pytest.mark.parametrize("method", ["forward", "inverse", "reconstruct", "reconstruct_inverse"])
def test_bad_states_raise_shape_errors(state, match, method):
    good = [torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)]
    bad = {
        "tensor": good[0],
        "short": tuple(good[:2]),
        "channels": (*good[:2], torch.zeros(1, 3, 2, 2)),
        "batch": (*good[:2], torch.zeros(2, 2, 2, 2)),
        "rank": (good[0], torch.zeros(2, 4, 4), good[2]),
    }[state]
    module = PyramidCoupling(2, target=0, source=2)
    call = module if method == "forward" else getattr(module, method)
    with pytest.raises(ShapeError, match=match):
        call(bad)


def test_untouched_levels_may_have_other_channel_counts():
    module = PyramidCoupling(2, target=1, source=2)
    levels = (torch.randn(1, 5, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2))
    out, _ = module(levels)
    assert out[0] is levels[0]


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (PyramidCoupling, {"channels": 0}, "channels must be an int >= 1, received 0"),
        (PyramidCoupling, {"channels": 2, "target": 1, "source": 1},
         "distinct target and source levels, received both = 1"),
        (PyramidCoupling, {"channels": 2, "source": -1},
         "source must be an int >= 0, received -1"),
        (PyramidCoupling, {"channels": 2, "target": 1.0},
         "target must be an int >= 0, received 1.0"),
        (PyramidCoupling, {"channels": 2, "clamp": -1.0}, "clamp must be a positive finite"),
        (PyramidCoupling, {"channels": 2, "kernel_size": 2}, "kernel_size must be odd"),
        (DualPyramidCoupling, {"channels": 2, "target": 0},
         "target must be at least 1 .* received 0"),
        (DualPyramidCoupling, {"channels": 2, "volume_norm": "instance"},
         "mode must be one of"),
        (DualPyramidCoupling, {"channels": 2, "resize": "cubic"},
         r"resize must be one of \('bilinear', 'nearest'\), received 'cubic'"),
        (PyramidCoupling, {"channels": 2, "condition_at": "finer"},
         r"condition_at must be one of \('source', 'target'\), received 'finer'"),
        (PyramidCoupling, {"channels": 2, "clamp_kind": "sigmoid"},
         r"clamp_kind must be one of \('tanh', 'atan'\), received 'sigmoid'"),
        (PyramidCoupling, {"channels": 2, "bias": "no"}, "bias must be a bool, received 'no'"),
    ],
)
def test_constructor_validates(cls, kwargs, match):
    with pytest.raises(AutoflowError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("condition_at", ["source", "target"])
@pytest.mark.parametrize(("target", "source"), [(0, 1), (1, 0), (2, 1)])
def test_non_square_levels(target, source, condition_at):
    # Levels of 6×10, 3×5 and 2×3 (odd sizes round up): resizing between levels must keep
    # height and width apart.
    torch.manual_seed(0)
    levels = tuple(torch.randn(2, 2, h, w, dtype=torch.float64)
                   for h, w in ((6, 10), (3, 5), (2, 3)))
    for module in (PyramidCoupling(2, target=target, source=source,
                                   condition_at=condition_at),
                   DualPyramidCoupling(2, target=1)):
        module = randomize_conditioner(module).double()
        assert_invertible(module, levels)
        assert_engine_gradients_match(module, levels)
        # The conditioner sees its input at the target's size (or the source's own).
        seen = []
        module.conditioner.register_forward_pre_hook(
            lambda _, args, seen=seen: seen.append(tuple(args[0].shape[-2:])))
        module(levels)
        at_source = isinstance(module, PyramidCoupling) and condition_at == "source"
        size = levels[source if at_source else module.target].shape[-2:]
        assert seen == [tuple(size)]
