"""Gradients against finite differences, independent of the code under test.

``assert_engine_gradients_match`` compares the engine with autograd running the same module
code, so a bug in that code (a detached conditioner output, a detached pyramid composition) is
invisible to it. Here ``torch.autograd.gradcheck`` compares autograd's gradients with central
finite differences in float64, for every primitive in both directions and for memory-saving
chains, with respect to the input, every parameter and the log-det. A second test checks that
every parameter of every built-in module gets a non-zero gradient from a generic loss.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import autoflow
from autoflow import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    DualPyramidCoupling,
    HaarDownsample,
    InvConv1x1,
    LaplacianPyramid,
    LiftingConv1x1,
    MaskedCoupling,
    OnFirst,
    Permute,
    PyramidCoupling,
    Sequential,
    SplineCoupling,
    SplineTransform,
    Split,
    Squeeze,
    VolumeNorm,
    checkerboard_mask,
)
from autoflow.base import flatten_state, pack_like

from toys import perturb, randomize_conditioner

torch.set_default_dtype(torch.float32)


def image(channels: int = 4, size: int = 4, batch: int = 2, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator, dtype=torch.float64)


def levels(channels: int = 2, count: int = 3, size: int = 8, seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, channels, size >> d, size >> d, generator=generator,
                             dtype=torch.float64) for d in range(count))


def initialised_actnorm(channels: int) -> ActNorm:
    norm = ActNorm(channels).double()
    with torch.no_grad():
        norm(image(channels, seed=5) * 3 + 1)  # data-dependent initialisation, done once
    return norm


def eval_spatial_coupling() -> AffineCoupling:
    layer = randomize_conditioner(AffineCoupling(4, volume_norm="spatial")).double()
    with torch.no_grad():
        layer(image(seed=6))  # a non-zero running mean, used in eval mode
    return layer.eval()


def pyramid_flow_chain(memory_saving: bool) -> Sequential:
    """A small PyramidFlow: lift, decompose, cross-scale couplings (the library's own parts)."""
    torch.manual_seed(0)
    chain = Sequential(
        LiftingConv1x1(2, in_channels=1),
        LaplacianPyramid(3),
        PyramidCoupling(2, target=0, source=1, volume_norm="channel"),
        DualPyramidCoupling(2, target=1),
        PyramidCoupling(2, target=2, source=1, resize="nearest", clamp_kind="atan"),
        PyramidCoupling(2, target=1, source=2, condition_at="target"),
        memory_saving=memory_saving,
    )
    return randomize_conditioner(chain, scale=0.3).double()


# (id, module factory, input factory). Conditioners get random last layers: the default
# zero-initialised one would make every gradient upstream of it exactly zero.
CASES = [
    ("actnorm", lambda: initialised_actnorm(3), lambda: image(3)),
    ("invconv", lambda: InvConv1x1(3).double(), lambda: image(3)),
    ("invconv-volume-norm", lambda: InvConv1x1(4, volume_norm=True).double(), image),
    ("lifting", lambda: LiftingConv1x1(5, in_channels=3).double(), lambda: image(3)),
    ("affine", lambda: randomize_conditioner(AffineCoupling(4)).double(), image),
    ("affine-odd", lambda: randomize_conditioner(AffineCoupling(5, clamp=1.5)).double(),
     lambda: image(5, size=3)),
    ("affine-cvn-train", lambda: randomize_conditioner(
        AffineCoupling(4, volume_norm="channel")).double(), image),
    ("affine-svn-eval", eval_spatial_coupling, image),
    ("additive", lambda: randomize_conditioner(AdditiveCoupling(4)).double(), image),
    # bound 1: some elements in the identity tails, most inside the spline.
    ("spline", lambda: randomize_conditioner(SplineCoupling(
        4, bins=3, bound=1.0, hidden_channels=2, kernel_size=1)).double(),
     lambda: image(4, size=3, batch=1)),
    ("masked-spline", lambda: randomize_conditioner(MaskedCoupling(
        2, checkerboard_mask((2, 3, 3)), transform=SplineTransform(2, bound=1.0),
        hidden_channels=1)).double(), lambda: image(2, size=3, batch=1)),
    ("invconv-plain", lambda: InvConv1x1(3, lu=False).double(), lambda: image(3)),
    ("pyramid-coupling", lambda: randomize_conditioner(
        PyramidCoupling(2, target=0, source=1)).double(), levels),
    ("pyramid-coupling-up-cvn", lambda: randomize_conditioner(
        PyramidCoupling(2, target=1, source=0, volume_norm="channel")).double(), levels),
    ("pyramid-coupling-variants", lambda: randomize_conditioner(
        PyramidCoupling(2, target=0, source=2, resize="nearest", condition_at="target",
                        bias=False, clamp_kind="atan", volume_norm="spatial")).double(),
     levels),
    ("dual-pyramid-coupling", lambda: randomize_conditioner(
        DualPyramidCoupling(2, target=1, volume_norm="spatial")).double(), levels),
    ("laplacian-gaussian", lambda: LaplacianPyramid(3), lambda: image(2, size=8)),
    ("laplacian-maxpool", lambda: LaplacianPyramid(3, kind="maxpool"),
     lambda: image(2, size=8)),
    ("laplacian-blur-maxpool", lambda: LaplacianPyramid(2, kind="blur_maxpool"),
     lambda: image(2, size=8)),
    ("haar", lambda: HaarDownsample(2), lambda: image(2)),
    ("squeeze", lambda: Squeeze(2), lambda: image(2)),
    ("permute", lambda: Permute(4), image),
    ("split-prior", lambda: randomize_conditioner(Split(4)).double(), image),
    ("on-first", lambda: OnFirst(initialised_actnorm(2)), lambda: (image(2), image(2, seed=1))),
    ("engine-chain", lambda: perturb(Sequential(
        initialised_actnorm(4), InvConv1x1(4), AffineCoupling(4, volume_norm="channel"),
        Permute(4), AdditiveCoupling(4), memory_saving=True), scale=0.2).double(), image),
    ("engine-anchored", lambda: perturb(Sequential(
        InvConv1x1(4), AffineCoupling(4), InvConv1x1(4), AffineCoupling(4),
        memory_saving=True, anchor_every=2), scale=0.2).double(), image),
    ("engine-pyramidflow", lambda: pyramid_flow_chain(True), lambda: image(1, size=8)),
]


class _Inverse(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, y):
        return self.module.inverse(y)


def check_with_finite_differences(module: nn.Module, x, *, inverse: bool,
                                  fast: bool = False) -> None:
    runner = _Inverse(module) if inverse else module
    if inverse:
        with torch.no_grad():
            x, _ = module(x)
    inputs = [t.detach().clone().requires_grad_() for t in flatten_state(x)]
    names = [n for n, p in runner.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_() for n, p in runner.named_parameters()
              if p.requires_grad]
    n = len(inputs)

    def function(*tensors):
        out, logdet = functional_call(runner, dict(zip(names, tensors[n:])),
                                      (pack_like(list(tensors[:n]), x),))
        return (*flatten_state(out), *(() if logdet is None else (logdet,)))

    # fast_mode compares random projections of the Jacobians (one backward pass instead of one
    # per output element): what keeps the memory-saving chains, slow to run backward, cheap.
    assert torch.autograd.gradcheck(function, (*inputs, *params), eps=1e-6, atol=1e-6,
                                    rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize(("make_module", "make_input"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_gradients_match_finite_differences(make_module, make_input, direction):
    torch.manual_seed(0)
    module = make_module()
    check_with_finite_differences(module, make_input(), inverse=direction == "inverse",
                                  fast=isinstance(module, Sequential))


def test_volume_norm_gradients_match_finite_differences():
    for mode in ("channel", "spatial"):
        norm = VolumeNorm(mode).double()
        s = image(3).requires_grad_()
        assert torch.autograd.gradcheck(norm, (s,), eps=1e-6, atol=1e-6)
        with torch.no_grad():
            norm(image(3, seed=2))
        assert torch.autograd.gradcheck(norm.eval(), (s,), eps=1e-6, atol=1e-6)


def generic_loss(out, logdet) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
               for t in flatten_state(out))
    return loss if logdet is None else loss + (logdet * torch.rand(
        logdet.shape, generator=generator, dtype=logdet.dtype)).sum()


PARAMETRISED = [c for c in CASES if c[0] not in (
    "laplacian-gaussian", "laplacian-maxpool", "laplacian-blur-maxpool", "haar", "squeeze",
    "permute")]


@pytest.mark.parametrize("saving", [False, True])
@pytest.mark.parametrize(("make_module", "make_input"), [c[1:] for c in PARAMETRISED],
                         ids=[c[0] for c in PARAMETRISED])
def test_every_parameter_gets_a_non_zero_gradient(make_module, make_input, saving):
    torch.manual_seed(0)
    module = make_module()
    if saving and not isinstance(module, Sequential):
        module = Sequential(module)
    if isinstance(module, Sequential):
        module.memory_saving = saving
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert named
    out, logdet = module(make_input())
    grads = torch.autograd.grad(generic_loss(out, logdet), [p for _, p in named],
                                allow_unused=True)
    for (name, _), g in zip(named, grads):
        assert g is not None, f"{name} gets no gradient"
        assert g.abs().max() > 0, f"{name} gets an all-zero gradient"


def test_every_built_in_module_class_is_covered():
    covered = {type(m) for _, make, _ in CASES for m in make().modules()}
    built_in = {getattr(autoflow, name) for name in autoflow.__all__}
    invertible = {c for c in built_in if isinstance(c, type)
                  and issubclass(c, autoflow.InvertibleModule)}
    missing = invertible - covered - {autoflow.InvertibleModule, autoflow.Coupling,
                                      autoflow.Flow}
    assert not missing, f"no finite-difference check for {sorted(c.__name__ for c in missing)}"
