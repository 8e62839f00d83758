"""Couplings evaluated in row bands (``Coupling.band_rows``): same maps, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoflow
from autoflow.banded import row_bands
from autoflow.errors import AutoflowError
from autoflow.testing import assert_engine_gradients_match

from toys import randomize_conditioner

# Height 20 in bands of 3: six full bands and a short one; kernel 3 twice reaches 2 rows.
BAND_ROWS = 3


def _pyramid(batch: int = 2, height: int = 20, width: int = 12) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(batch, 3, height >> d, width >> d, generator=generator,
                             dtype=torch.float64) for d in range(3))


def _couplings(volume_norm: str | None) -> list[autoflow.Coupling]:
    made = [
        autoflow.PyramidCoupling(3, target=0, source=1, kernel_size=3, hidden_channels=5,
                                 condition_at="target", volume_norm=volume_norm),
        autoflow.DualPyramidCoupling(3, target=1, kernel_size=3, hidden_channels=5,
                                     volume_norm=volume_norm),
    ]
    return [randomize_conditioner(block.double(), seed=k) for k, block in enumerate(made)]


def _banded(block: autoflow.Coupling) -> autoflow.Coupling:
    copied = copy.deepcopy(block)
    copied.band_rows = BAND_ROWS
    return copied


def _linear_loss(outputs, logdet, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in outputs]
    return sum((w * t).sum() for w, t in zip(weights, outputs)) + (
        torch.arange(1.0, 1.0 + logdet.numel(), dtype=logdet.dtype) * logdet).sum()


@pytest.mark.parametrize("volume_norm", [None, "channel"])
@pytest.mark.parametrize("which", [0, 1], ids=["finest-at-target", "dual"])
def test_bands_give_the_whole_maps_gradients_and_statistics(volume_norm, which):
    whole = _couplings(volume_norm)[which]
    banded = _banded(whole)
    inputs = [t.requires_grad_() for t in _pyramid()]
    y_whole, logdet_whole = whole(tuple(inputs))
    y_banded, logdet_banded = banded(tuple(inputs))
    for a, b in zip(y_whole, y_banded):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_banded, logdet_whole, rtol=1e-12, atol=1e-10)
    assert banded.state_dict().keys() == whole.state_dict().keys()
    for key, value in whole.state_dict().items():  # the running mean, updated once
        torch.testing.assert_close(banded.state_dict()[key], value, rtol=1e-12, atol=1e-14)

    wanted_whole = [*inputs, *whole.parameters()]
    wanted_banded = [*inputs, *banded.parameters()]
    grads_whole = torch.autograd.grad(_linear_loss(y_whole, logdet_whole), wanted_whole)
    grads_banded = torch.autograd.grad(_linear_loss(y_banded, logdet_banded), wanted_banded)
    for a, b in zip(grads_whole, grads_banded):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)

    back, _ = banded.inverse(tuple(t.detach() for t in y_whole))
    for a, b in zip(inputs, back):
        torch.testing.assert_close(b, a.detach(), rtol=1e-10, atol=1e-10)
    rebuilt = banded.reconstruct(tuple(t.detach() for t in y_whole))  # the engine's hook
    for a, b in zip(inputs, rebuilt.input_from_leaves(rebuilt.leaves)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-10, atol=1e-10)
    for a, b in zip(y_whole, rebuilt.output):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rebuilt.logdet.detach(), logdet_whole.detach(), rtol=1e-12,
                               atol=1e-10)
    # Running statistics are not updated again by backward's rebuild of the bands.
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(banded.state_dict()[key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("which", [0, 1], ids=["finest-at-target", "dual"])
def test_bands_in_eval_mode_use_the_running_mean_rows(which):
    whole = _couplings("channel")[which]
    whole(_pyramid())  # a running mean that is not zero
    whole.eval()
    banded = _banded(whole)
    for a, b in zip(whole(_pyramid(batch=1))[0], banded(_pyramid(batch=1))[0]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", [0, 1], ids=["finest-at-target", "dual"])
def test_engine_gradients_match_with_bands(which):
    assert_engine_gradients_match(_banded(_couplings("channel")[which]), _pyramid())
    assert_engine_gradients_match(_banded(_couplings(None)[which]), _pyramid(), inverse=True)


def test_the_conditioner_sees_bands_not_the_whole_level():
    block = _banded(_couplings("channel")[0])
    heights = []
    block.conditioner.register_forward_hook(lambda m, args, out: heights.append(out.shape[2]))
    block(_pyramid())
    radius = block.conditioner.receptive_radius
    assert radius == 2
    assert len(heights) == len(row_bands(20, BAND_ROWS)) == 7
    assert max(heights) == BAND_ROWS + 2 * radius


def test_a_conditioner_at_the_source_resolution_runs_whole():
    block = autoflow.PyramidCoupling(3, target=0, source=1, kernel_size=3,
                                     hidden_channels=5).double()
    block.band_rows = BAND_ROWS
    heights = []
    block.conditioner.register_forward_hook(lambda m, args, out: heights.append(out.shape[2]))
    block(_pyramid())
    assert heights == [10]


def test_band_rows_rejects_what_cannot_be_banded():
    block = autoflow.PyramidCoupling(3, target=0, source=1, condition_at="target")
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(AutoflowError, match="band_rows"):
            block.band_rows = bad
    spatial = autoflow.PyramidCoupling(3, target=0, source=1, volume_norm="spatial")
    with pytest.raises(AutoflowError, match="'spatial', whose mean spans all rows"):
        spatial.band_rows = 8
    custom = autoflow.AffineCoupling(4, conditioner=nn.Conv2d(2, 4, 3, padding=1))
    with pytest.raises(AutoflowError, match="receptive_radius=None"):
        custom.band_rows = 8
    for norm in (nn.BatchNorm2d(6), nn.InstanceNorm2d(6), nn.GroupNorm(2, 6)):
        normed = autoflow.AffineCoupling(4, conditioner=_DropoutConditioner(
            nn.Conv2d(2, 6, 3, padding=1), norm, nn.Conv2d(6, 4, 3, padding=1)))
        with pytest.raises(AutoflowError, match=f"holding {type(norm).__name__}, whose"):
            normed.band_rows = 8
    for spectral in (nn.utils.parametrizations.spectral_norm, nn.utils.spectral_norm):
        normed = autoflow.AffineCoupling(4, conditioner=_DropoutConditioner(
            spectral(nn.Conv2d(2, 6, 3, padding=1)), nn.Conv2d(6, 4, 3, padding=1)))
        with pytest.raises(AutoflowError, match="spectral norm, whose power iteration"):
            normed.band_rows = 8
    masked = autoflow.MaskedCoupling(3, autoflow.checkerboard_mask((3, 4, 4)),
                                     transform=autoflow.SplineTransform())
    with pytest.raises(AutoflowError, match="cannot be evaluated in bands"):
        masked.band_rows = 8
    block.band_rows = None
    assert block.band_rows is None


def test_spatial_volume_norm_refuses_a_band():
    norm = autoflow.VolumeNorm("spatial")
    with pytest.raises(AutoflowError, match="cannot centre a band of rows"):
        norm(torch.randn(1, 2, 3, 4), rows=(0, 3, 8))


def test_volume_norm_checks_the_band_it_is_given():
    norm = autoflow.VolumeNorm("channel")
    band = torch.randn(1, 2, 3, 4)
    for bad in ((0, 4, 8), (6, 9, 8), (-1, 2, 8), (3, 3, 8), (0, 3), (0.0, 3, 8), [0, 3, 8]):
        with pytest.raises(ValueError, match=r"0 <= start < stop <= height and stop - start"):
            norm(band, rows=bad)
    assert norm(band, rows=(5, 8, 8)).shape == band.shape
    assert norm.running_mean.shape == (1, 1, 8, 4)


def test_the_engine_skips_frozen_first_modules_when_the_input_needs_no_gradient():
    torch.manual_seed(0)
    frozen = autoflow.ActNorm(4)
    frozen.requires_grad_(False)
    trained = randomize_conditioner(autoflow.AffineCoupling(4))
    flow = autoflow.Sequential(frozen, trained, memory_saving=True)
    calls = []
    original = frozen.reconstruct
    frozen.reconstruct = lambda y, **kw: calls.append(1) or original(y, **kw)
    x = torch.randn(3, 4, 5, 5)
    flow(x)[0].square().sum().backward()
    assert calls == []  # nothing before the coupling wants a gradient
    assert all(p.grad is not None for p in trained.parameters())
    flow(x.requires_grad_())[0].square().sum().backward()
    assert calls == [1] and x.grad is not None  # now the input wants one


def test_a_conditional_channel_coupling_in_bands_matches_and_trains_its_context():
    torch.manual_seed(3)
    whole = randomize_conditioner(autoflow.AffineCoupling(4, context_channels=2,
                                                          volume_norm="channel").double())
    banded = _banded(whole)
    heights = []
    banded.conditioner.register_forward_hook(lambda m, args, out: heights.append(out.shape[2]))
    x = torch.randn(2, 4, 11, 6, dtype=torch.float64)
    context = torch.randn(2, 2, 11, 6, dtype=torch.float64, requires_grad=True)
    (y_whole, logdet_whole), (y_banded, logdet_banded) = (
        whole(x, context=context), banded(x, context=context))
    torch.testing.assert_close(y_banded, y_whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_banded, logdet_whole, rtol=1e-12, atol=1e-10)
    grad_whole, = torch.autograd.grad(_linear_loss([y_whole], logdet_whole), context)
    grad_banded, = torch.autograd.grad(_linear_loss([y_banded], logdet_banded), context)
    torch.testing.assert_close(grad_banded, grad_whole, rtol=1e-10, atol=1e-10)
    assert max(heights) == BAND_ROWS + 2 * 2  # it did run in bands
    assert_engine_gradients_match(banded, x, context=context.detach())


class _DropoutConditioner(nn.Sequential):
    receptive_radius = 2  # two 3×3 convolutions


def _dropout_coupling(band_rows: int | None) -> autoflow.AffineCoupling:
    torch.manual_seed(3)
    conditioner = _DropoutConditioner(nn.Conv2d(2, 8, 3, padding=1), nn.Dropout(0.3),
                                      nn.Conv2d(8, 4, 3, padding=1))
    block = autoflow.AffineCoupling(4, conditioner=conditioner, volume_norm="channel").double()
    block.band_rows = band_rows
    return block


def test_bands_rebuilt_in_backward_see_the_dropout_masks_of_their_forward_pass():
    # Each call reseeds, so the map is deterministic and finite differences apply; the
    # backward pass rebuilds every band and must draw the forward pass's masks again.
    block = _dropout_coupling(band_rows=2)
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64, requires_grad=True)

    def seeded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        return block(x)

    assert torch.autograd.gradcheck(seeded, (x,))


def test_the_engine_replays_dropout_in_bands():
    flow = autoflow.Sequential(autoflow.ActNorm(4), _dropout_coupling(band_rows=2),
                               autoflow.InvConv1x1(4)).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    assert_engine_gradients_match(flow, x)


def test_bands_rebuilt_in_backward_run_in_the_forward_pass_autocast():
    # Backward runs outside the autocast block; the bands it rebuilds must still be computed
    # in bfloat16, as in the forward pass (in float32 the gradients were 8% off).
    whole = randomize_conditioner(autoflow.AffineCoupling(8, kernel_size=3,
                                                          volume_norm="channel"), seed=1)
    x = torch.randn(2, 8, 16, 12, generator=torch.Generator().manual_seed(0))

    def gradients(block: autoflow.Coupling, memory_saving: bool) -> list[torch.Tensor]:
        block = copy.deepcopy(block)
        flow = autoflow.Sequential(block, memory_saving=memory_saving)
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, logdet = flow(leaf)
        (y.float().square().sum() + logdet.float().sum()).backward()
        return [leaf.grad, *(p.grad for p in block.parameters())]

    expected = gradients(whole, memory_saving=False)
    banded = copy.deepcopy(whole)
    banded.band_rows = 4
    for memory_saving in (False, True):
        for got, want in zip(gradients(banded, memory_saving), expected):
            # bfloat16 rounding of the conditioner's weight gradients, summed band by band.
            assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_bands_rebuilt_in_backward_see_every_submodule_in_its_forward_mode():
    # Dropout switched off inside a training coupling; all of it switched to training before
    # backward. The rebuilt bands must still run without dropout.
    def gradients(switch_before_backward: bool) -> list[torch.Tensor]:
        block = _dropout_coupling(band_rows=2).train()
        block.conditioner[1].eval()
        x = torch.randn(2, 4, 7, 5, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0)).requires_grad_()
        y, logdet = block(x)
        if switch_before_backward:
            block.train()
        (y.square().sum() + logdet.sum()).backward()
        return [x.grad, *(p.grad for p in block.parameters())]

    for got, want in zip(gradients(True), gradients(False)):
        torch.testing.assert_close(got, want)


def test_a_parameter_changed_in_place_before_backward_is_refused():
    block = _dropout_coupling(band_rows=2).eval()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64).requires_grad_()
    y, logdet = block(x)
    with torch.no_grad():
        block.conditioner[0].weight.mul_(2)  # an optimiser step before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + logdet.sum()).backward()


def test_bands_rebuilt_in_backward_use_the_parameters_of_a_functional_call():
    from torch.func import functional_call

    block = randomize_conditioner(autoflow.AffineCoupling(4, kernel_size=3), seed=1).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    grads = []
    for band_rows in (None, 2):
        block.band_rows = band_rows
        params = {name: p.detach().mul(1.1).requires_grad_()
                  for name, p in block.named_parameters()}
        y, logdet = functional_call(block, params, (x,))
        (y.sum() + logdet.sum()).backward()
        grads.append([params[name].grad for name in params])
    for banded, whole in zip(*reversed(grads)):
        assert banded is not None  # the functional parameters, not the module's own
        torch.testing.assert_close(banded, whole)


def test_tensor_hooks_on_a_banded_couplings_parameters_act_once():
    # The bands' backward differentiates its rebuilt bands with autograd.grad, band by band,
    # and hands the sum to the outer pass: a hook must act once on the sum, not on each band
    # and again outside.
    block = randomize_conditioner(autoflow.AffineCoupling(4, kernel_size=3), seed=1).double()
    for p in block.parameters():
        p.register_hook(lambda g: 3 * g)
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    grads = []
    for band_rows in (None, 2):
        block.band_rows = band_rows
        block.zero_grad(set_to_none=True)
        y, logdet = block(x)
        (y.square().sum() + logdet.sum()).backward()
        grads.append([p.grad for p in block.parameters()])
    for banded, whole in zip(*reversed(grads)):
        torch.testing.assert_close(banded, whole)
