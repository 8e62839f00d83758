"""Exact-likelihood flows: Split, OnFirst, the Glow builder and Flow's density and sampling."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autoflow
from autoflow.base import state_shape
from autoflow.flow import Flow, StandardNormal
from autoflow.glow import glow
from autoflow.on_first import OnFirst
from autoflow.split import Split
from autoflow.testing import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
)
from autoflow.testing import strategies as afs

from toys import perturb

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_2d_flow(seed: int = 2, scale: float = 0.2) -> Flow:
    """A perturbed (so non-Gaussian) 4-step flow on 2-D points stored as (B, 2, 1, 1)."""
    torch.manual_seed(seed)
    transform = glow(2, levels=1, depth_per_level=4, hidden_channels=16, downsample=None,
                     kernel_size=1)
    perturb(transform, scale, seed=seed)
    return Flow(transform.double().eval(), (2, 1, 1))


def tiny_multiscale(**options) -> autoflow.Sequential:
    torch.manual_seed(0)
    transform = glow(1, levels=2, depth_per_level=2, hidden_channels=8, **options)
    return perturb(transform, 0.1).double()


# Flow: density and sampling ----------------------------------------------------------------


def test_log_prob_of_2d_flow_integrates_to_one():
    flow = tiny_2d_flow()
    with torch.no_grad():
        samples = flow.sample(20000, generator=torch.Generator().manual_seed(0)).flatten(1)
        # The box holds the mass: the samples' range, widened by half of it on each side.
        lo, hi = samples.min(0).values, samples.max(0).values
        lo, hi = lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo)
        n = 500
        gx = torch.linspace(lo[0].item(), hi[0].item(), n, dtype=F64)
        gy = torch.linspace(lo[1].item(), hi[1].item(), n, dtype=F64)
        xx, yy = torch.meshgrid(gx, gy, indexing="ij")
        grid = torch.stack([xx.flatten(), yy.flatten()], 1)[:, :, None, None]
        log_p = flow.log_prob(grid)
    cell = (gx[1] - gx[0]) * (gy[1] - gy[0])
    integral = (log_p.exp().sum() * cell).item()
    assert abs(integral - 1) < 0.02, integral
    # The flow is far from the standard normal it starts from, so the check means something.
    gaussian = StandardNormal().log_prob(grid)
    assert (log_p - gaussian).abs().max().item() > 1.0


@pytest.mark.parametrize("multiscale", [False, True])
def test_samples_log_prob_is_base_density_minus_inverse_logdet(multiscale):
    flow = Flow(tiny_multiscale().eval(), (1, 4, 4)) if multiscale else tiny_2d_flow()
    with torch.no_grad():
        x, reported = flow.sample(7, generator=torch.Generator().manual_seed(1),
                                  return_log_prob=True)
        z = flow.base.sample(flow.latent_shape, 7, dtype=F64,
                             generator=torch.Generator().manual_seed(1))
        x_again, logdet_inv = flow.transform.inverse(z)
        expected = flow.base.log_prob(z) - logdet_inv
        evaluated = flow.log_prob(x)
    assert torch.equal(x, x_again)
    assert torch.equal(reported, expected)
    torch.testing.assert_close(evaluated, expected, rtol=0, atol=1e-10)


def test_nll_and_bits_per_dim_with_dequantisation_bins():
    flow = tiny_2d_flow()
    x = torch.rand(5, 2, 1, 1, dtype=F64)
    nll = flow.nll(x)
    torch.testing.assert_close(nll, -flow(x))
    torch.testing.assert_close(flow.bits_per_dim(x), nll / (2 * math.log(2)))
    torch.testing.assert_close(
        flow.bits_per_dim(x, bins=17), (nll + 2 * math.log(17)) / (2 * math.log(2))
    )


def test_sample_follows_module_dtype_and_temperature():
    flow = tiny_2d_flow()
    with torch.no_grad():
        cold = flow.sample(4, temperature=1e-6)
        mode = flow.transform.inverse(torch.zeros(1, 2, 1, 1, dtype=F64))[0]
    assert cold.dtype == F64 and cold.shape == (4, 2, 1, 1)
    torch.testing.assert_close(cold, mode.expand(4, 2, 1, 1), rtol=0, atol=1e-4)


def test_flow_trains_with_the_memory_saving_engine():
    torch.manual_seed(0)
    transform = glow(1, levels=2, depth_per_level=2, hidden_channels=8, memory_saving=True)
    flow = Flow(transform, (1, 4, 4))
    data = 0.3 * torch.randn(64, 1, 4, 4) + torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = flow.nll(data).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


# The multi-scale flow --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"downsample": "haar", "mixing": "permute", "learned_prior": False}],
    ids=["glow", "haar-permute-plain-split"],
)
def test_multiscale_logdet_matches_brute_force_jacobian(options):
    flow = tiny_multiscale(**options).eval()
    x = torch.randn(2, 1, 4, 4, dtype=F64)
    assert_invertible(flow, x)
    assert_logdet_matches_jacobian(flow, x)


def test_multiscale_engine_gradients_match_autograd():
    flow = tiny_multiscale()  # training mode: ActNorm initialises from the batch, once
    assert_engine_gradients_match(flow, torch.randn(3, 1, 4, 4, dtype=F64))


def test_glow_structure_and_shapes():
    flow = glow(1, levels=3, depth_per_level=2, hidden_channels=8, memory_saving=True)
    assert flow.memory_saving
    assert flow.check((1, 8, 8)) == ((16, 1, 1), (2, 4, 4), (4, 2, 2))
    assert sum(isinstance(m, Split) for m in flow) == 2
    # Everything after the first split is wrapped so it acts on the kept part only.
    first_split = next(i for i, m in enumerate(flow) if isinstance(m, Split))
    assert all(isinstance(m, (OnFirst, Split)) for m in list(flow)[first_split:])
    assert Flow(flow, (1, 8, 8)).latent_shape == ((16, 1, 1), (2, 4, 4), (4, 2, 2))


# Split and OnFirst ------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(
    x=afs.states(channels=st.integers(2, 5), max_size=4, dtype=st.just(F64)),
    learned_prior=st.booleans(),
    with_latents=st.booleans(),
)
def test_split_is_invertible_and_engine_exact(x, learned_prior, with_latents):
    split = perturb(Split(x.shape[1], learned_prior=learned_prior, hidden_channels=4)
                    if learned_prior else Split(x.shape[1], learned_prior=False)).double()
    state = (x, torch.randn(x.shape[0], 3, 2, 2, dtype=F64)) if with_latents else x
    assert_invertible(split, state)
    assert_engine_gradients_match(split, state)
    assert split.input_shape(split.output_shape(state_shape(state))) == state_shape(state)


def test_split_logdet_is_the_whitening_logdet():
    split = perturb(Split(4)).double()
    assert_logdet_matches_jacobian(split, torch.randn(2, 4, 2, 2, dtype=F64))
    plain = Split(4, learned_prior=False)
    (h, z), logdet = plain(torch.arange(16.0).view(1, 4, 2, 2))
    assert plain.volume_preserving and logdet.tolist() == [0.0]
    assert h.flatten().tolist() == list(range(8)) and z.flatten().tolist() == list(range(8, 16))


def test_split_prior_reconstruction_runs_its_conditioner_once():
    split = perturb(Split(4)).double()
    calls = []
    split.prior.conditioner.register_forward_hook(lambda *args: calls.append(1))
    y, _ = split(torch.randn(2, 4, 3, 3, dtype=F64))
    calls.clear()
    rec = split.reconstruct(y)
    assert len(calls) == 1
    x = rec.input_from_leaves(rec.leaves)
    torch.testing.assert_close(split.inverse(y)[0], x)


def test_on_first_wraps_a_coupling_with_engine_exact_gradients():
    step = OnFirst(perturb(autoflow.AffineCoupling(4)).double())
    state = (torch.randn(2, 4, 3, 3, dtype=F64), torch.randn(2, 1, 5, 5, dtype=F64))
    assert_invertible(step, state)
    assert_engine_gradients_match(step, state)
    assert_engine_gradients_match(step, state, inverse=True)
    assert step.bijective and not step.volume_preserving
    assert OnFirst(autoflow.Permute(3)).volume_preserving


# Refusals and bad inputs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "transform",
    [
        autoflow.Sequential(autoflow.LaplacianPyramid(levels=2)),
        autoflow.Sequential(autoflow.LiftingConv1x1(4, in_channels=1), autoflow.ActNorm(4)),
    ],
    ids=["laplacian-pyramid", "lifting-conv"],
)
def test_flow_refuses_non_bijective_chains(transform):
    with pytest.raises(autoflow.NotBijectiveError, match="a log-likelihood needs a bijection"):
        Flow(transform, (1, 4, 4))


def test_flow_bad_inputs():
    transform = glow(2, levels=1, depth_per_level=1, hidden_channels=4, downsample=None)
    with pytest.raises(autoflow.AutoflowError, match="expected an InvertibleModule"):
        Flow(torch.nn.Identity(), (2, 1, 1))
    with pytest.raises(autoflow.AutoflowError, match="tuple of positive ints"):
        Flow(transform, [2, 1, 1])
    with pytest.raises(autoflow.ShapeError, match="expected 2 channels"):
        Flow(transform, (3, 1, 1))
    with pytest.raises(autoflow.AutoflowError, match="without log_prob and sample"):
        Flow(transform, (2, 1, 1), base=torch.nn.Identity())
    flow = Flow(transform, (2, 1, 1))
    with pytest.raises(autoflow.ShapeError, match=r"shape \(B, 2, 1, 1\), received \(4, 2\)"):
        flow.log_prob(torch.randn(4, 2))
    with pytest.raises(autoflow.AutoflowError, match="bins >= 1"):
        flow.bits_per_dim(torch.randn(1, 2, 1, 1), bins=0)
    with pytest.raises(autoflow.AutoflowError,
                       match=r"n must be an int >= 1 \(or a tuple of them.*received 0"):
        flow.sample(0)
    with pytest.raises(autoflow.AutoflowError, match="positive temperature"):
        flow.sample(2, temperature=0.0)


def test_split_and_on_first_bad_inputs():
    with pytest.raises(autoflow.AutoflowError, match="channels must be an int >= 2.*received 1"):
        Split(1)
    with pytest.raises(autoflow.AutoflowError, match="channels must be an int >= 2.*received True"):
        Split(True)
    with pytest.raises(autoflow.AutoflowError, match="hidden_channels without learned_prior"):
        Split(4, learned_prior=False, hidden_channels=8)
    split = Split(4)
    with pytest.raises(autoflow.ShapeError, match="expected 4 channels.*received 3"):
        split(torch.randn(1, 3, 2, 2))
    with pytest.raises(autoflow.ShapeError, match="received a 1-tuple"):
        split((torch.randn(1, 4, 2, 2),))
    with pytest.raises(autoflow.ShapeError, match="tuple .* received Tensor"):
        split.inverse(torch.randn(1, 4, 2, 2))
    with pytest.raises(autoflow.ShapeError, match="share batch and spatial size"):
        split.inverse((torch.randn(1, 2, 2, 2), torch.randn(1, 2, 4, 4)))
    with pytest.raises(autoflow.ShapeError, match="expected 4 channels"):
        split.output_shape((3, 2, 2))
    with pytest.raises(autoflow.AutoflowError, match="expected an InvertibleModule.*Conv2d"):
        OnFirst(torch.nn.Conv2d(2, 2, 1))
    with pytest.raises(autoflow.ShapeError, match=r"tuple state \(h, z_1, ..., z_k\), received "
                                                   "Tensor"):
        OnFirst(autoflow.ActNorm(2))(torch.randn(1, 2, 2, 2))
    with pytest.raises(autoflow.ShapeError, match="to map a tensor to a tensor"):
        OnFirst(Split(2))((torch.randn(1, 2, 2, 2),))


def test_glow_bad_inputs():
    with pytest.raises(autoflow.AutoflowError, match="levels must be an int >= 1, received 0"):
        glow(1, levels=0)
    with pytest.raises(autoflow.AutoflowError, match="downsample .* received 'pool'"):
        glow(1, downsample="pool")
    with pytest.raises(autoflow.AutoflowError, match="mixing .* received 'shuffle'"):
        glow(1, mixing="shuffle")
    with pytest.raises(autoflow.AutoflowError, match="level 0 would couple 1 channel"):
        glow(1, levels=1, downsample=None)
    with pytest.raises(autoflow.ShapeError, match="even height and width"):
        glow(1, levels=3, depth_per_level=1, hidden_channels=4).check((1, 4, 4))
