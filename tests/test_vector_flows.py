"""Vector flows: ``(B, D)`` states through the same couplings and mixing layers as images.

``AffineCoupling(2)`` applied to a ``(B, 2)`` tensor works as it is (the default conditioner
runs as an MLP), and so do ActNorm, the LU linear layer (InvConv1x1) and Permute, so a
two-moons flow needs no reshaping to ``(B, D, 1, 1)``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autoflow
from autoflow import Flow, ShapeError
from autoflow.testing import (
    assert_engine_gradients_match,
    assert_invertible,
    assert_logdet_matches_jacobian,
)
from autoflow.testing import strategies as afs

from toys import perturb

F64 = torch.float64

VECTOR_MODULES = {
    "ActNorm": lambda d: autoflow.ActNorm(d),
    "InvConv1x1": lambda d: autoflow.InvConv1x1(d),
    "InvConv1x1(volume_norm)": lambda d: autoflow.InvConv1x1(d, volume_norm=True),
    "InvConv1x1(lu=False)": lambda d: autoflow.InvConv1x1(d, lu=False),
    "Permute": lambda d: autoflow.Permute(d),
    "AffineCoupling": lambda d: autoflow.AffineCoupling(d, kernel_size=1),
    "AffineCoupling(k=3)": lambda d: autoflow.AffineCoupling(d, hidden_channels=5),
    "AdditiveCoupling": lambda d: autoflow.AdditiveCoupling(d, kernel_size=1),
    "SplineCoupling": lambda d: autoflow.SplineCoupling(d, kernel_size=1, bins=4),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=8, deadline=None)
@given(x=afs.vector_states(st.integers(2, 6), dtype=st.just(F64)),
       name=st.sampled_from(sorted(VECTOR_MODULES)))
def test_vector_modules_pass_the_kit(x, name):
    torch.manual_seed(0)
    module = perturb(VECTOR_MODULES[name](x.shape[1]), 0.3).double()
    module(x)  # ActNorm initialises from the first batch
    module.eval()
    assert_invertible(module, x)
    assert_logdet_matches_jacobian(module, x)
    assert_engine_gradients_match(module, x)
    assert module.output_shape((x.shape[1],)) == (x.shape[1],)


def test_a_vector_is_the_one_pixel_image():
    # Same parameters, same map: (B, D) and (B, D, 1, 1) give the same outputs and log-dets.
    x = torch.randn(4, 3, dtype=F64)
    for name, make in VECTOR_MODULES.items():
        torch.manual_seed(0)
        module = perturb(make(3), 0.3).double().eval()
        y, logdet = module(x)
        y_image, logdet_image = module(x[:, :, None, None])
        assert torch.allclose(y, y_image.flatten(1)), name
        assert torch.allclose(logdet, logdet_image), name


def test_actnorm_initialises_per_feature_on_vectors():
    norm = autoflow.ActNorm(3).double()
    x = torch.tensor([1.0, -2.0, 10.0], dtype=F64) + torch.randn(256, 3, dtype=F64)
    y, _ = norm(x)
    assert y.mean(0).abs().max() < 1e-9 and (y.std(0, correction=0) - 1).abs().max() < 1e-5


def test_conditional_vector_coupling():
    torch.manual_seed(0)
    layer = perturb(autoflow.AffineCoupling(4, kernel_size=1, context_channels=2), 0.3).double()
    x, c = torch.randn(3, 4, dtype=F64), torch.randn(3, 2, dtype=F64)
    assert_invertible(layer, x, context=c)
    assert_logdet_matches_jacobian(layer, x, context=c)
    assert_engine_gradients_match(layer, x, context=c)
    with pytest.raises(ShapeError, match=r"expected a context of shape \(B, 2\) with B = 3"):
        layer(x, context=torch.randn(3, 2, 4, 4, dtype=F64))


def test_two_moons_flow_without_reshaping_is_the_one_pixel_image_flow():
    # The (B, 2, 1, 1) flow's density integrates to one (test_flow.py); the vector flow with
    # the same parameters has the same density and samples.
    torch.manual_seed(0)
    transform = autoflow.glow(2, levels=1, depth_per_level=4, hidden_channels=16,
                              downsample=None, kernel_size=1)
    transform = perturb(transform, 0.2).double().eval()
    vector, image = Flow(transform, (2,)), Flow(transform, (2, 1, 1))
    x = 2 * torch.randn(64, 2, dtype=F64)
    with torch.no_grad():
        assert torch.allclose(vector.log_prob(x), image.log_prob(x[:, :, None, None]))
        samples, log_p = vector.sample(5, return_log_prob=True,
                                       generator=torch.Generator().manual_seed(0))
        same = image.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 2) and torch.allclose(samples, same.flatten(1))
    assert torch.allclose(vector.log_prob(samples), log_p)


def test_vector_glow_under_the_memory_saving_engine_matches_autograd():
    torch.manual_seed(0)
    transform = autoflow.glow(3, levels=1, depth_per_level=3, hidden_channels=8,
                              downsample=None, kernel_size=1, mixing="permute")
    transform = perturb(transform, 0.2).double()
    assert_engine_gradients_match(transform, torch.randn(16, 3, dtype=F64))


@pytest.mark.parametrize("learned_prior", [True, False])
def test_split_factors_out_half_of_a_vector(learned_prior):
    x = torch.randn(6, 5, dtype=F64)
    torch.manual_seed(0)
    split = autoflow.Split(5, learned_prior=learned_prior,
                           **({"kernel_size": 1} if learned_prior else {}))
    split = perturb(split, 0.3).double()
    (h, z), logdet = split(x)
    assert (h.shape, z.shape, logdet.shape) == ((6, 3), (6, 2), (6,))
    assert torch.equal(h, x[:, :3])
    assert split.output_shape((5,)) == ((3,), (2,)) and split.input_shape(((3,), (2,))) == (5,)
    assert_invertible(split, x)
    assert_logdet_matches_jacobian(split, x)
    assert_engine_gradients_match(split, x)


def test_multiscale_vector_glow_under_the_memory_saving_engine_matches_autograd():
    torch.manual_seed(0)
    transform = autoflow.glow(4, levels=2, depth_per_level=2, hidden_channels=8,
                              downsample=None, kernel_size=1, mixing="permute")
    transform = perturb(transform, 0.2).double()
    x = torch.randn(16, 4, dtype=F64)
    assert transform.output_shape((4,)) == ((2,), (2,))
    assert_engine_gradients_match(transform, x)
    assert Flow(transform, (4,)).log_prob(x).shape == (16,)


def test_vector_mistakes_are_refused_clearly():
    with pytest.raises(ShapeError, match=r"ActNorm expected a 4-D input \(B, C, H, W\) or a "
                                         r"2-D input \(B, C\) of vectors, received shape \(5,\)"):
        autoflow.ActNorm(2)(torch.randn(5))
    with pytest.raises(ShapeError, match="expected 2 channels in its input, received 3"):
        autoflow.InvConv1x1(2)(torch.randn(5, 3))
    with pytest.raises(ShapeError, match="volume_norm normalises .* build it with "
                                         "volume_norm=None for vector data"):
        autoflow.AffineCoupling(4, volume_norm="channel")(torch.randn(3, 4))
    with pytest.raises(ShapeError, match=r"expected a \(C,\) or \(C, H, W\) shape"):
        autoflow.Permute(2).output_shape((2, 3))
    with pytest.raises(ShapeError, match=r"Split.inverse expected the kept part and the latent to "
                                         r"share batch and spatial size"):
        autoflow.Split(4).inverse((torch.randn(3, 2), torch.randn(3, 2, 1, 1)))
