"""Randomised stress check: the memory-saving engine against plain autograd on many random flows.

What: builds many small flows at random, runs each with plain autograd (``memory_saving=False``)
and through the memory-saving engine (``memory_saving=True``), and compares outputs, log-dets
and the gradients of the inputs, the context and every parameter. Why: the unit tests pin
chosen configurations; the engine's claim (gradients equal plain autograd's for any chain of
invertible modules, with contexts, dropout replay, folded runs, anchors, tuple states) is
about all of them, and conditioning multiplies the combinations. Three families:

``glow``
    conditional :func:`autoflow.glow` flows: squeeze or Haar downsampling, 1x1 convolution or
    permutation mixing, affine, additive or spline couplings, learned split priors or not,
    1-3 levels (or vector flows ``(B, D)`` with MLP conditioners), a vector ``(B, K)`` or
    spatial ``(B, K, h, w)`` context (of another size than the image, so it is resized),
    train or eval mode, ActNorm initialised on a batch beforehand or not (then a training
    forward initialises it inside the check), forward or inverse direction, engine anchors
    or not. Checked by :func:`autoflow.testing.assert_engine_gradients_match`.
``flow``
    :class:`autoflow.Flow` with a ``context_encoder``: an ``nn.Embedding`` of labels (alone or
    followed by dropout), an MLP with dropout over float contexts, or a small CNN with
    ``Dropout2d`` over context images; the transform is a random conditional Glow or a random
    chain of ``family chain``. Directions: ``log_prob(x, context)`` and
    ``sample(n, context=..., return_log_prob=True)`` with grad enabled (the engine's inverse
    direction; a shared context of batch 1 is expanded to ``n``). Both runs start from the
    same torch seed, so the encoder's and the conditioners' dropout draw the same masks; the
    engine has to replay the conditioners' draws in its backward pass. The kit's checker takes
    an :class:`~autoflow.InvertibleModule`, not a ``Flow`` (whose encoder runs outside the
    chain), so these runs are compared here with the kit's :func:`~autoflow.testing.
    relative_error`, per tensor, on the kit's scale (see ``_compare_flow_runs``). The log-det
    column holds ``log p(x | c)`` as ``Flow`` returns it (log-det plus base density; in the
    sample direction the density of the samples), the outputs column the latents (forward) or
    the samples (inverse); the gradients are those of the data (forward), of a float context
    and of every parameter, the encoder's included.
``chain``
    :class:`autoflow.Sequential` chains of 2-5 couplings (affine with or without volume
    normalisation, additive, spline, masked with a checkerboard and an affine, additive or
    spline transform) whose conditioners are user networks with ``Dropout``/``Dropout2d``
    (and sometimes ``BatchNorm``, whose running statistics must be updated once; without it,
    image couplings are sometimes evaluated in row bands, ``band_rows``), between
    ActNorm, permutations and 1x1 convolutions; image or vector states, no context or a
    vector or spatial one, sometimes a coupling object used twice, anchors every 1-3 modules
    or none, train or eval mode, either direction. Checked by the kit.

Half of the cases of every family set ``backward_chunk`` to 1, 2 or 3 samples, so the engine
rebuilds their runs of per-sample modules in slices of the batch (drawn from a generator of
their own: the rest of each case is the same with or without). A third get module hooks the
same way (``maybe_hooks``): hooks on the chain's members that only look, and hooks on coupling
conditioners that scale their input, output or gradients, which the engine must apply again
when it reruns a conditioner with a graph.

Every coupling conditioner (split priors included) and every ActNorm gets ``0.1 * N(0, 1)``
added to its weights (``--perturbation``), so that zero-initialised conditioners do not make
the couplings, the context or the log-dets trivial; 1x1 convolutions keep their random
orthogonal initialisation. Each case is rebuilt from (family, case index, base seed) alone:
its configuration is drawn from ``random.Random("family:seed:index")`` and torch is seeded
from it before any module is built, so ``--families glow --cases 17 --seed 0`` replays case
17 of the glow family of the default run exactly, whatever ran before it.

The kit's checker raises at the first tensor above its tolerance and otherwise returns the
relative difference of every tensor it compared, buffers after the step included; a failure
is checked again with no tolerance to report all of them.

Tolerance. Everything runs in float64 (every module allows it). A case passes when every
compared tensor's relative difference (largest absolute difference over the largest value of
the plain-autograd tensor; for gradients at least a millionth of the largest gradient, the
kit's rule for gradients that are zero in exact arithmetic) is at most ``--rtol`` = 1e-9.
Outputs and log-dets are computed by the same code in both runs and come out identical; the
gradients differ because the engine rebuilds each input by inverting the modules after it:
rounding (float64's epsilon is 2.2e-16) amplified by the chain's conditioning. In the default
run the median case's largest gradient difference is about 6e-16 and 99% of the cases stay
below 2e-12; spline couplings amplify rounding most (a random spline's inverse divides by
derivatives down to 1e-3; in the worst cases each coupling multiplied the reconstruction
error by 10 to 40), up to a few 1e-10 for six spline couplings in a row. 1e-9 leaves a margin
over that, while a logic error (a detached context, a dropped log-det term, a dropout mask
drawn anew, a gradient overwritten instead of summed, a running statistic updated twice)
gives differences of 1e-3 or more, or a missing gradient. The kit's own float64 default is
1e-8; float32 would need about 1e-4 (the kit's default there), too loose to tell rounding
from a small systematic error in a deep chain, hence float64.

A flow whose reconstruction is ill-conditioned (larger random weights, ``--perturbation
0.3``) exceeds any fixed tolerance without a bug in the engine (see the ``autoflow.engine``
docstring). Every failure is therefore diagnosed (``diagnose``): it is rerun with
``anchor_every=1`` (every module's true input kept, nothing rebuilt by inversion), and once in
the engine's debug mode, whose largest per-module reconstruction error is reported. Drift
passes with anchors and shows rebuilt inputs that are off; an error in the engine's
bookkeeping fails with anchors too, or (an error in folding runs of modules, which anchors
also switch off) passes with them while the gradients differ by more than a thousand times
the reconstruction error.

Run from the repository root, one torch thread (about 2.5 minutes on a shared core)::

    PYTHONPATH=. python benchmarks/engine_stress.py

It prints one line per failing case (with its replay command) and a table, writes
``benchmarks/results/engine_stress.md`` (``--out``), and exits with status 1 if any case
failed. ``--glow``, ``--flow``, ``--chain`` set the number of cases per family; ``--families``
and ``--cases`` select a subset (``--cases 3,17``), ``--verbose`` prints every case.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import autoflow  # noqa: E402
from autoflow import Sequential  # noqa: E402
from autoflow.base import State, call_with_context, flatten_state, pack_like  # noqa: E402
from autoflow.testing import assert_engine_gradients_match, relative_error  # noqa: E402
from autoflow.testing.strategies import tensor_of  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "engine_stress.md"
F64 = torch.float64
FAMILIES = ("glow", "flow", "chain")
DEFAULT_COUNTS = {"glow": 1500, "flow": 1000, "chain": 1500}
CATEGORIES = ("outputs", "log-dets", "grads")
LISTED_FAILURES = 5  # per family, in the results file (all are printed)


@dataclass(frozen=True)
class Settings:
    """What every case is built and judged with: base seed, tolerance, weight perturbation."""

    seed: int = 0
    rtol: float = 1e-9
    perturbation: float = 0.1


# A case: what was built, how to check it -------------------------------------------------------


@dataclass
class Case:
    """One random flow with its inputs; ``check`` raises ``AssertionError`` on a mismatch.

    ``check(seen, rtol)`` appends ``(category, relative difference)`` pairs to ``seen`` for
    every tensor it compares; ``anchored()`` returns the same check with every module's input
    kept; ``rebuild()`` runs the engine once in debug mode and returns its worst
    reconstruction error and where it was.
    """

    family: str
    index: int
    summary: str
    tags: list[str]
    check: Callable[[list, float], None]
    anchored: Callable[[], Callable[[list, float], None]]
    rebuild: Callable[[], tuple[float, str]]


@dataclass
class Outcome:
    case: Case
    worst: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    diagnosis: str = ""


def case_rng(family: str, seed: int, index: int) -> random.Random:
    """The random-number generator that draws a case's configuration (str seeding is stable
    across processes and Python hash seeds)."""
    return random.Random(f"{family}:{seed}:{index}")


def perturb(module: nn.Module, seed: int, scale: float) -> None:
    """Add ``scale * N(0, 1)`` to every coupling conditioner's parameters (split priors
    included) and every ActNorm's, in place.

    Zero-initialised conditioners would make the couplings, the context and the log-dets
    trivial, and an uninitialised ActNorm the identity. 1x1 convolutions keep their random
    orthogonal initialisation (already a non-trivial map): the same absolute noise on the LU
    factors of a 48-channel one makes it badly conditioned, and that is reconstruction
    drift, not what this check is after.
    """
    generator = torch.Generator().manual_seed(seed)
    targets: dict[int, Tensor] = {}
    for m in module.modules():
        chosen = (m.conditioner.parameters() if isinstance(m, autoflow.Coupling)
                  else m.parameters() if isinstance(m, autoflow.ActNorm) else ())
        for p in chosen:
            targets.setdefault(id(p), p)  # a module used twice is perturbed once
    with torch.no_grad():
        for p in targets.values():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def state_of(shape: State, batch: int, seed: int) -> State:
    """A float64 standard-normal state of ``shape`` (a shape or a tuple of shapes)."""
    if shape and isinstance(shape[0], tuple):
        return tuple(tensor_of((batch, *s), F64, seed + i) for i, s in enumerate(shape))
    return tensor_of((batch, *shape), F64, seed)


def with_engine_options(model: Sequential, **options) -> Sequential:
    """A deep copy of ``model`` with engine options changed (e.g. ``anchor_every=1``)."""
    model = copy.deepcopy(model)
    for key, value in options.items():
        setattr(model.engine_options, key, value)
    return model


def maybe_slices(model: Sequential, family: str, seed: int, index: int, tags: list[str]) -> None:
    """Half of the cases rebuild in slices of 1-3 samples (``backward_chunk``), drawn from a
    generator of their own so that the rest of each case is what it was without slices."""
    draw = random.Random(f"slices:{family}:{seed}:{index}")
    if draw.random() < 0.5:
        model.engine_options.backward_chunk = draw.choice([1, 2, 3])
        tags.append(f"slices of {model.engine_options.backward_chunk}")


def maybe_hooks(model: nn.Module, family: str, seed: int, index: int, tags: list[str]) -> None:
    """A third of the cases get module hooks, drawn from a generator of their own (the rest of
    each case is what it was without them); ``tags`` names each kind added.

    * On the chain's members, hooks the engine must let through: a forward hook and a forward
      pre-hook that only look (return ``None``), and a ``with_kwargs`` pre-hook that hands its
      arguments back unchanged. (Hooks that replace a member's input or output are refused by
      the engine, which ``tests/test_engine_hooks.py`` checks.)
    * On coupling conditioners, which the engine runs again with a graph, hooks that change
      the computation and must act alike in both runs: a forward hook scaling the output, a
      pre-hook scaling the input, a full backward hook scaling the input's gradient, and a
      forward hook registering a tensor hook that scales the output's gradient (only where the
      output requires grad, as user code must: the engine's forward pass runs without a graph).

    Module hooks are deep-copied with their module (the kit copies the model), tensor hooks are
    not, hence tensor hooks registered inside a module hook.
    """
    draw = random.Random(f"hooks:{family}:{seed}:{index}")
    if draw.random() >= 1 / 3:
        return
    members = list(model.children()) if isinstance(model, Sequential) else []
    conditioners = [m.conditioner for m in model.modules() if isinstance(m, autoflow.Coupling)]
    added: set[str] = set()

    def look(module: nn.Module, *args: object) -> None:
        assert all(isinstance(a, (tuple, dict, Tensor)) for a in args)

    def unchanged(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    for member in members:
        kind = draw.choice(["look", "look before", "kwargs before", None])
        if kind == "look":
            member.register_forward_hook(look)
        elif kind == "look before":
            member.register_forward_pre_hook(look)
        elif kind == "kwargs before":
            member.register_forward_pre_hook(unchanged, with_kwargs=True)
        if kind is not None:
            added.add("member hook")
    for net in conditioners:
        kind = draw.choice(["scale output", "scale input", "scale input gradient",
                            "scale output gradient", None])
        factor = draw.uniform(0.5, 1.5)
        if kind == "scale output":
            net.register_forward_hook(lambda m, i, out, c=factor: out * c)
        elif kind == "scale input":
            net.register_forward_pre_hook(lambda m, i, c=factor: tuple(t * c for t in i))
        elif kind == "scale input gradient":
            net.register_full_backward_hook(
                lambda m, gi, go, c=factor: tuple(None if g is None else g * c for g in gi))
        elif kind == "scale output gradient":
            def on_output(m: nn.Module, i: tuple, out: Tensor, c: float = factor) -> None:
                if out.requires_grad:
                    out.register_hook(lambda g: g * c)
            net.register_forward_hook(on_output)
        if kind is not None:
            added.add(f"conditioner: {kind}")
    tags += sorted(added)


# The kit's checker and the numbers it returns --------------------------------------------------


def record(seen: list, errors: dict[str, float]) -> None:
    """Append the kit's measured differences to ``seen`` as ``(category, difference)`` pairs."""
    for what, error in errors.items():
        category = ("outputs" if what == "output" else "log-dets" if what == "log-det"
                    else "grads" if what.startswith("gradient") else "buffers")
        seen.append((category, error))
        if what == "gradient of the context":
            seen.append(("context grads", error))


def kit_case(family: str, index: int, summary: str, tags: list[str], model: Sequential,
             inputs: State, context: Tensor | None, inverse: bool, seed: int) -> Case:
    """A case checked by the kit: ``model`` (memory_saving=False) against its engine copy."""

    def make_check(chain: Sequential) -> Callable[[list, float], None]:
        def check(seen: list, rtol: float) -> None:
            record(seen, assert_engine_gradients_match(
                chain, inputs, context=context, inverse=inverse, rtol=rtol, seed=seed))
        return check

    def rebuild() -> tuple[float, str]:
        chain = with_engine_options(model, debug=True)
        chain.memory_saving = True
        leaves = [t.clone().requires_grad_() for t in flatten_state(inputs)]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out, logdet = call_with_context(chain.inverse if inverse else chain,
                                            pack_like(leaves, inputs), context)
        (sum(t.sum() for t in flatten_state(out)) + logdet.sum()).backward()
        return describe_reconstruction(chain)

    return Case(family, index, summary, tags, make_check(model),
                lambda: make_check(with_engine_options(model, anchor_every=1)), rebuild)


def describe_reconstruction(chain: Sequential) -> tuple[float, str]:
    """The largest relative reconstruction error the engine measured in debug mode, where."""
    errors = chain.reconstruction_errors
    if not errors:
        return 0.0, "no reconstruction error measured"
    name = max(errors, key=errors.get)
    module = chain[int(name)]
    kind = type(getattr(module, "module", module)).__name__  # OnFirst(m) named as m
    return errors[name], (f"largest reconstruction error in debug mode {errors[name]:.1e}, "
                          f"module '{name}' ({kind}) of {len(chain)}")


# Random building blocks ------------------------------------------------------------------------


def random_context(rng: random.Random, batch: int, channels: int, *, spatial: bool,
                   seed: int) -> Tensor:
    """A ``(B, K)`` context, or a ``(B, K, h, w)`` one of a random size (resized by the
    couplings)."""
    shape = (batch, channels, rng.randint(1, 6), rng.randint(1, 6)) if spatial else (
        batch, channels)
    return tensor_of(shape, F64, seed)


def random_glow(rng: random.Random, context_channels: int, *, vector: bool
                ) -> tuple[Sequential, tuple[int, ...], list[str]]:
    """A random conditional Glow (float64, parameters perturbed later) and its data shape."""
    depth = rng.randint(1, 3)
    options = dict(
        depth_per_level=depth, hidden_channels=rng.choice([4, 8]),
        mixing=rng.choice(["conv1x1", "permute"]),
        coupling=rng.choice(["affine", "additive", "spline"]),
        learned_prior=rng.random() < 0.5, context_channels=context_channels,
        anchor_every=rng.choice([None, None, 2, 3]),
    )
    if vector:
        levels = rng.randint(1, 2)
        shape: tuple[int, ...] = (rng.randint(2, 4) * levels,)
        options.update(levels=levels, downsample=None, kernel_size=1)
    else:
        levels = rng.randint(1, 3)
        side = 2 ** levels * rng.choice([1, 2])
        shape = (rng.randint(1, 3), side, side)
        options.update(levels=levels, downsample=rng.choice(["squeeze", "haar"]),
                       kernel_size=rng.choice([1, 3]))
    flow = autoflow.glow(shape[0], **options).double()
    tags = [options["coupling"], options["mixing"],
            str(options.get("downsample") or "vector glow"),
            "prior" if options["learned_prior"] else "no prior",
            "anchors" if options["anchor_every"] else "no anchors"]
    text = ", ".join(f"{k}={v}" for k, v in options.items())
    return flow, shape, [f"glow({shape[0]}, {text}) on {shape}", *tags]


def conditioner(rng: random.Random, in_channels: int, out_channels: int, *, vector: bool,
                dropout: float, batch_norm: bool) -> nn.Module:
    """A user conditioner with dropout: conv3x3-LeakyReLU-dropout-conv3x3, or an MLP."""
    hidden = rng.choice([4, 8])
    if vector:
        layers: list[nn.Module] = [nn.Linear(in_channels, hidden), nn.Tanh(),
                                   nn.Dropout(dropout)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        return nn.Sequential(*layers, nn.Linear(hidden, out_channels))
    drop = nn.Dropout2d(dropout) if rng.random() < 0.5 else nn.Dropout(dropout)
    layers = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.LeakyReLU(), drop]
    if batch_norm:
        layers.append(nn.BatchNorm2d(hidden))
        return nn.Sequential(*layers, nn.Conv2d(hidden, out_channels, 3, padding=1))
    return LocalConditioner(*layers, nn.Conv2d(hidden, out_channels, 3, padding=1))


class LocalConditioner(nn.Sequential):
    """Two 3x3 convolutions and no batch statistics: outputs read two rows each way, so a
    coupling with it may be evaluated in row bands (``Coupling.band_rows``)."""

    receptive_radius = 2


def random_coupling(rng: random.Random, shape: tuple[int, ...], context_channels: int
                    ) -> tuple[nn.Module, str]:
    """A coupling over ``shape`` with a dropout conditioner, and its description."""
    channels, vector = shape[0], len(shape) == 1
    kind = rng.choice(["affine", "additive", "spline", "masked"])
    dropout = rng.choice([0.1, 0.3, 0.5])
    batch_norm = rng.random() < 0.25

    def net(in_channels: int, out_channels: int) -> nn.Module:
        return conditioner(rng, in_channels + context_channels, out_channels, vector=vector,
                           dropout=dropout, batch_norm=batch_norm)

    kept, target = channels // 2, channels - channels // 2
    options = {"context_channels": context_channels}
    if kind == "affine":
        volume_norm = None if vector else rng.choice([None, None, "channel", "spatial"])
        layer = autoflow.AffineCoupling(channels, conditioner=net(kept, 2 * target),
                                        volume_norm=volume_norm, **options)
        kind += "" if volume_norm is None else f"(volume_norm={volume_norm})"
    elif kind == "additive":
        layer = autoflow.AdditiveCoupling(channels, conditioner=net(kept, target), **options)
    elif kind == "spline":
        layer = autoflow.SplineCoupling(channels, bins=4, conditioner=net(kept, 11 * target),
                                        **options)
    else:
        transform = rng.choice([autoflow.AffineTransform(), autoflow.AdditiveTransform(),
                                autoflow.SplineTransform(bins=4)])
        mask = autoflow.checkerboard_mask(shape, invert=rng.random() < 0.5)
        layer = autoflow.MaskedCoupling(
            channels, mask, transform=transform,
            conditioner=net(channels, transform.params_per_element * channels), **options)
        kind += f"({type(transform).__name__})"
    extras = f"dropout {dropout}" + (", batch norm" if batch_norm else "")
    banded = (not vector and not isinstance(layer, autoflow.MaskedCoupling) and not batch_norm
              and shape[1] > 1 and "spatial" not in kind and rng.random() < 0.4)
    if banded:  # fewer rows than the image: several bands, halos crossing the cuts
        layer.band_rows = rng.randint(1, shape[1] - 1)
        extras += f", band_rows {layer.band_rows}"
    return layer, f"{kind} [{extras}]"


def random_chain(rng: random.Random, context_channels: int, *, vector: bool
                 ) -> tuple[Sequential, tuple[int, ...], list[str]]:
    """A random chain of dropout-conditioned couplings between cheap modules (float64)."""
    channels = rng.randint(2, 5)
    shape = (channels,) if vector else (channels, rng.randint(2, 5), rng.randint(2, 5))
    modules: list[nn.Module] = []
    names = []
    for _ in range(rng.randint(2, 5)):
        layer, name = random_coupling(rng, shape, context_channels)
        modules.append(layer)
        names.append(name)
        mixing = rng.choice([None, "ActNorm", "Permute", "InvConv1x1"])
        if mixing is not None:
            modules.append(getattr(autoflow, mixing)(channels))
            names.append(mixing)
    shared = rng.random() < 0.2
    if shared:  # the same coupling object twice: its gradient is the sum of both uses
        modules.append(modules[0])
        names.append("module 0 again")
    anchor_every = rng.choice([None, None, 1, 2, 3])
    chain = Sequential(*modules, anchor_every=anchor_every).double()
    kinds = sorted({name.split("(")[0].split(" [")[0] for name in names} - {"module 0 again"})
    kinds += ["batch norm"] if any("batch norm" in name for name in names) else []
    kinds += ["volume norm"] if any("volume_norm" in name for name in names) else []
    kinds += ["row bands"] if any("band_rows" in name for name in names) else []
    tags = ["anchors" if anchor_every else "no anchors", *kinds] + (
        ["shared module"] if shared else [])
    return chain, shape, [f"Sequential({', '.join(names)}; anchor_every={anchor_every}) "
                          f"on {shape}", *tags]


def initialise_actnorm(model: nn.Module, x: State, context: Tensor | None) -> None:
    """ActNorm's data-dependent initialisation: one training forward without grad."""
    training = model.training
    with torch.no_grad():
        model.train()
        model(x) if context is None else model(x, context=context)
    model.train(training)


def set_mode(rng: random.Random, model: nn.Module, x: State, context: Tensor | None,
             tags: list[str]) -> None:
    """Draw ActNorm initialised or not, and train or eval mode; record both in ``tags``.

    The initialising forward also updates running statistics (batch and volume
    normalisation), like a previous training step; it is drawn for chains without ActNorm too.
    """
    actnorm = any(isinstance(m, autoflow.ActNorm) for m in model.modules())
    if rng.random() < 0.5:
        initialise_actnorm(model, x, context)
        tags.append("ActNorm initialised" if actnorm else "no ActNorm, warm-up forward")
    else:
        tags.append("ActNorm not initialised" if actnorm else "no ActNorm, no warm-up")
    training = rng.random() < 0.6
    model.train(training)
    tags.append("train" if training else "eval")


# Family 1: conditional Glows ----------------------------------------------------------------


def glow_case(index: int, settings: Settings) -> Case:
    rng = case_rng("glow", settings.seed, index)
    torch_seed = rng.getrandbits(31)
    torch.manual_seed(torch_seed)
    vector = rng.random() < 0.2
    k = rng.randint(1, 3)
    flow, shape, tags = random_glow(rng, k, vector=vector)
    perturb(flow, torch_seed, settings.perturbation)
    maybe_slices(flow, "glow", settings.seed, index, tags)
    maybe_hooks(flow, "glow", settings.seed, index, tags)
    batch = rng.randint(2, 4)
    spatial = not vector and rng.random() < 0.5
    tags.append("spatial context" if spatial else "vector context")
    init_x = state_of(shape, 4, torch_seed + 1)
    set_mode(rng, flow, init_x, random_context(rng, 4, k, spatial=spatial, seed=torch_seed + 2),
             tags)
    inverse = rng.random() < 0.5
    tags.append("inverse" if inverse else "forward")
    inputs = state_of(flow.check(shape) if inverse else shape, batch, torch_seed + 3)
    context = random_context(rng, batch, k, spatial=spatial, seed=torch_seed + 4)
    summary = (f"{tags[0]}, {'spatial' if spatial else 'vector'} context "
               f"{tuple(context.shape)}, batch {batch}, {', '.join(tags[-3:])}")
    return kit_case("glow", index, summary, tags[1:], flow, inputs, context, inverse,
                    torch_seed)


# Family 3: chains of couplings with dropout conditioners ---------------------------------------


def chain_case(index: int, settings: Settings) -> Case:
    rng = case_rng("chain", settings.seed, index)
    torch_seed = rng.getrandbits(31)
    torch.manual_seed(torch_seed)
    vector = rng.random() < 0.35
    k = rng.choice([0, 1, 2, 3])
    chain, shape, tags = random_chain(rng, k, vector=vector)
    perturb(chain, torch_seed, settings.perturbation)
    maybe_slices(chain, "chain", settings.seed, index, tags)
    maybe_hooks(chain, "chain", settings.seed, index, tags)
    spatial = k > 0 and not vector and rng.random() < 0.5
    tags.append("no context" if k == 0 else "spatial context" if spatial else "vector context")
    batch = rng.randint(2, 4)

    def context_for(n: int, offset: int) -> Tensor | None:
        if k == 0:
            return None
        return random_context(rng, n, k, spatial=spatial, seed=torch_seed + offset)

    set_mode(rng, chain, state_of(shape, 4, torch_seed + 1), context_for(4, 2), tags)
    inverse = rng.random() < 0.5
    tags.append("inverse" if inverse else "forward")
    inputs = state_of(shape, batch, torch_seed + 3)
    context = context_for(batch, 4)
    where = "no" if context is None else str(tuple(context.shape))
    summary = f"{tags[0]}, context {where}, batch {batch}, {', '.join(tags[-3:])}"
    return kit_case("chain", index, summary, tags[1:], chain, inputs, context, inverse,
                    torch_seed)


# Family 2: Flows with context encoders -----------------------------------------------------


def random_encoder(rng: random.Random, channels: int, *, images: bool
                   ) -> tuple[nn.Module, str, Callable[[int, int], Tensor]]:
    """A context encoder giving ``channels`` context channels, and how to draw its inputs."""
    kinds = ["embedding", "embedding+dropout", "mlp+dropout"] + (["cnn+dropout"] if images
                                                                 else [])
    kind = rng.choice(kinds)
    dropout = rng.choice([0.1, 0.3, 0.5])
    hidden = rng.choice([4, 8])
    if kind.startswith("embedding"):
        classes = rng.randint(2, 6)
        layers: list[nn.Module] = [nn.Embedding(classes, channels)]
        if kind.endswith("dropout"):
            layers.append(nn.Dropout(dropout))

        def draw(n: int, seed: int) -> Tensor:
            return torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))

        return nn.Sequential(*layers), f"{kind}({classes} classes)", draw
    features = rng.randint(1, 4)
    if kind == "mlp+dropout":
        encoder = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Dropout(dropout),
                                nn.Linear(hidden, channels))
        shape: tuple[int, ...] = (features,)
    else:
        encoder = nn.Sequential(nn.Conv2d(features, hidden, 3, padding=1), nn.ReLU(),
                                nn.Dropout2d(dropout), nn.Conv2d(hidden, channels, 1))
        shape = (features, rng.randint(1, 6), rng.randint(1, 6))

    def draw_float(n: int, seed: int) -> Tensor:
        return tensor_of((n, *shape), F64, seed)

    return encoder, f"{kind}(p={dropout}) on {shape}", draw_float


@dataclass
class FlowSpec:
    flow: autoflow.Flow
    sample: bool
    data: Tensor | None  # forward: the data x
    context: Tensor  # the encoder's input
    n: int


def flow_pass(flow: autoflow.Flow, spec: FlowSpec, seed: int
              ) -> tuple[list[Tensor], Tensor, list[Tensor | None]]:
    """One training pass: latents (or samples), ``log p``, and the gradients of a fixed random
    loss with respect to the data, a float context and every parameter."""
    x = None if spec.data is None else spec.data.clone().requires_grad_()
    context = spec.context.clone()
    if context.is_floating_point():
        context.requires_grad_()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.sample:
            outputs, log_p = flow.sample(spec.n, context=context, return_log_prob=True,
                                         generator=torch.Generator().manual_seed(seed))
        else:
            seen = []
            hook = flow.transform.register_forward_hook(
                lambda module, args, out: seen.append(out[0]))
            try:
                log_p = flow.log_prob(x, context=context)
            finally:
                hook.remove()
            outputs = seen[0]
    weights = torch.Generator().manual_seed(seed)
    tensors = flatten_state(outputs)
    loss = (log_p * torch.rand(log_p.shape, generator=weights, dtype=F64)).sum() + sum(
        (t * torch.randn(t.shape, generator=weights, dtype=F64)).sum() for t in tensors)
    wanted = ([] if x is None else [x]) + ([context] if context.requires_grad else [])
    wanted += [p for p in flow.parameters() if p.requires_grad]
    grads = list(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [t.detach() for t in tensors], log_p.detach(), grads


def _compare_flow_runs(spec: FlowSpec, seed: int, seen: list, rtol: float) -> None:
    """Plain autograd against the engine for a Flow, per tensor with the kit's
    ``relative_error``; gradients on the kit's scale (at least 1e-6 of the largest one), a
    gradient given by one run only is a failure, buffers must match after the step."""
    runs = {}
    models = {}
    for memory_saving in (False, True):
        flow = copy.deepcopy(spec.flow)
        flow.transform.memory_saving = memory_saving
        runs[memory_saving] = flow_pass(flow, spec, seed)
        models[memory_saving] = flow
    (out_a, logp_a, grads_a), (out_b, logp_b, grads_b) = runs[False], runs[True]
    floor = 1e-6 * max((g.abs().max().item() for g in grads_a if g is not None), default=0.0)
    names = (["data"] if spec.data is not None else []) + (
        ["context"] if spec.context.is_floating_point() else [])
    names += [n for n, p in models[False].named_parameters() if p.requires_grad]
    pairs = [("outputs", "latents" if spec.data is not None else "samples", out_b, out_a, 0.0),
             ("log-dets", "log p", logp_b, logp_a, 0.0)]
    failures = []
    for name, a, b in zip(names, grads_a, grads_b):
        if (a is None) != (b is None):
            given = "plain autograd" if b is None else "the engine"
            failures.append(f"only {given} gives {name} a gradient")
        elif a is not None:
            pairs.append(("grads", f"gradient of {name}", b, a, floor))
    pairs += [("buffers", f"buffer {n}", b, a, 0.0) for (n, a), b in
              zip(models[False].named_buffers(), models[True].buffers())]
    for category, what, actual, expected, scale in pairs:
        error = relative_error(actual, expected, floor=scale)
        seen.append((category, error))
        if what == "gradient of context":
            seen.append(("context grads", error))
        if not error <= rtol:
            failures.append(f"{what} differs by {error:.3e}")
    if failures:
        raise AssertionError(f"memory-saving engine vs plain autograd (tolerance {rtol:.0e}): "
                             + "; ".join(failures[:4]))


def flow_case(index: int, settings: Settings) -> Case:
    rng = case_rng("flow", settings.seed, index)
    torch_seed = rng.getrandbits(31)
    torch.manual_seed(torch_seed)
    k = rng.randint(1, 3)
    vector = rng.random() < 0.3
    if rng.random() < 0.5:
        transform, shape, tags = random_glow(rng, k, vector=vector)
    else:
        transform, shape, tags = random_chain(rng, k, vector=vector)
    encoder, encoder_text, draw = random_encoder(rng, k, images=not vector)
    flow = autoflow.Flow(transform, shape, context_encoder=encoder.double()).double()
    perturb(flow, torch_seed, settings.perturbation)
    maybe_slices(transform, "flow", settings.seed, index, tags)
    maybe_hooks(transform, "flow", settings.seed, index, tags)
    tags.append(encoder_text.split("(")[0])
    set_mode(rng, flow, tensor_of((4, *shape), F64, torch_seed + 1), draw(4, torch_seed + 2),
             tags)
    sample = rng.random() < 0.5
    n = rng.randint(2, 4)
    shared = sample and rng.random() < 0.5
    tags.append(("sample" + (" (shared context)" if shared else "")) if sample else "log_prob")
    data = None if sample else tensor_of((n, *shape), F64, torch_seed + 3)
    spec = FlowSpec(flow, sample, data, draw(1 if shared else n, torch_seed + 4), n)
    summary = (f"Flow({tags[0]}, context_encoder={encoder_text}), n {n}, "
               f"{', '.join(tags[-3:])}")

    def make_check(spec: FlowSpec) -> Callable[[list, float], None]:
        return lambda seen, rtol: _compare_flow_runs(spec, torch_seed, seen, rtol)

    def anchored() -> Callable[[list, float], None]:
        flow = copy.deepcopy(spec.flow)
        flow.transform.engine_options.anchor_every = 1
        return make_check(FlowSpec(flow, spec.sample, spec.data, spec.context, spec.n))

    def rebuild() -> tuple[float, str]:
        flow = copy.deepcopy(spec.flow)
        flow.transform.memory_saving = True
        flow.transform.engine_options.debug = True
        flow_pass(flow, spec, torch_seed)
        return describe_reconstruction(flow.transform)

    return Case("flow", index, summary, tags[1:], make_check(spec), anchored, rebuild)


BUILDERS = {"glow": glow_case, "flow": flow_case, "chain": chain_case}


# Running and reporting ---------------------------------------------------------------------


def run_case(case: Case, rtol: float) -> Outcome:
    """Check ``case``; on a failure, measure every difference and try it with anchors."""
    outcome = Outcome(case)
    seen: list = []
    try:
        case.check(seen, rtol)
    except Exception as error:  # an EngineError or a crash is a failure too
        outcome.failure = f"{type(error).__name__}: {error}".splitlines()[0]
    if not seen and outcome.failure is None:
        raise RuntimeError("the check compared nothing: has autoflow.testing.checks changed?")
    if outcome.failure is not None:
        # The kit stops at the first tensor above the tolerance: run again with none, to
        # report the differences of all of them.
        with contextlib.suppress(Exception):
            case.check(seen, math.inf)
    for category, error in seen:
        outcome.worst[category] = max(outcome.worst.get(category, 0.0), error)
    if outcome.failure is not None:
        outcome.diagnosis = diagnose(case, max(outcome.worst.values(), default=0.0), rtol)
    return outcome


def diagnose(case: Case, difference: float, rtol: float) -> str:
    """Tell reconstruction drift from an engine error, for a case that failed.

    Two facts: whether the case passes with ``anchor_every=1`` (every module's true input
    kept, nothing rebuilt by inversion), and how accurately debug mode finds the inputs
    rebuilt. Failing with anchors is not drift; neither is a difference more than a thousand
    times the largest reconstruction error when that error is small (at most 1e-6: inputs
    rebuilt that well cannot move the gradients that much; anchors also cut the runs of
    folded modules, so an error in folding passes with them and only this shows it). Drift
    seen so far gives differences below the reconstruction error, or garbage everywhere once
    a reconstruction is off by order one.
    """
    try:
        case.anchored()([], rtol)
        anchored = None
    except Exception as error:
        anchored = f"{type(error).__name__}: {error}"
    try:
        error, where = case.rebuild()
    except Exception as failure:
        error, where = math.nan, f"the debug-mode run failed: {type(failure).__name__}: {failure}"
    if anchored is not None:
        verdict = ("fails with anchor_every=1 too (every input kept), so not reconstruction "
                   f"drift: {anchored}")
    elif error <= 1e-6 and difference > 1e3 * error:
        verdict = ("passes with anchor_every=1, but the rebuilt inputs are accurate, so drift "
                   "does not explain the difference: suspect what anchors change besides "
                   "rebuilding (they cut the runs of folded modules) or a reconstruction hook")
    else:
        verdict = ("passes with anchor_every=1 (every input kept, nothing rebuilt by "
                   "inversion) and the rebuilt inputs are off: reconstruction drift in an "
                   "ill-conditioned flow, or a wrong inverse or reconstruction hook")
    return f"{verdict}; {where}".splitlines()[0]


def replay_command(case: Case, settings: Settings) -> str:
    extra = "".join(f" --{name} {getattr(settings, name):g}" for name in ("rtol", "perturbation")
                    if getattr(settings, name) != getattr(Settings(), name))
    return (f"PYTHONPATH=. python benchmarks/engine_stress.py --families {case.family} "
            f"--cases {case.index} --seed {settings.seed}{extra} --verbose")


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "autoflow")
    return commit + (" (autoflow/ modified)" if dirty else "")


def worst_of(results: list[Outcome], category: str) -> float | None:
    """The largest difference of ``category`` over ``results`` (None if none was compared)."""
    return max((o.worst[category] for o in results if category in o.worst), default=None)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def report(outcomes: dict[str, list[Outcome]], times: dict[str, float], settings: Settings,
           command: str, wall: float) -> str:
    lines = [
        "# Memory-saving engine vs plain autograd: randomised stress check",
        "",
        "Command (from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
        f"Measured at commit {git_commit()}; torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, 1 torch "
        f"thread; total wall time {wall:.0f} s. Base seed {settings.seed}; float64; "
        f"conditioner and ActNorm weights perturbed by {settings.perturbation:g} N(0, 1); a "
        f"case passes when every compared tensor differs by at most {settings.rtol:g} "
        "(relative; see the script's docstring for the measure and the reasons for this "
        "tolerance).",
        "",
        "| family | flows | passed | worst rel. diff outputs | log-dets | grads "
        "| wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for family, results in outcomes.items():
        passed = sum(o.failure is None for o in results)
        worst = {c: worst_of(results, c) for c in CATEGORIES}
        lines.append(f"| {family} | {len(results)} | {passed} | {fmt(worst['outputs'])} | "
                     f"{fmt(worst['log-dets'])} | {fmt(worst['grads'])} | "
                     f"{times[family]:.0f} |")
    def per_family(text: Callable[[list[Outcome]], str]) -> str:
        return ", ".join(f"{family} {text(results)}" for family, results in outcomes.items())

    def spread(results: list[Outcome]) -> str:
        values = sorted(o.worst["grads"] for o in results if "grads" in o.worst)
        if not values:
            return "-"
        return (f"{fmt(values[len(values) // 2])} / "
                f"{fmt(values[min(len(values) - 1, int(0.99 * len(values)))])}")

    lines += [
        "", "The outputs, log-det and gradient columns are the largest differences over all "
        "cases of the family, failing ones included; the gradients are those of the inputs, "
        "the context and every parameter (a gradient given by one run only is a failure "
        "without a number). Median / 99th percentile over the cases of a case's largest "
        f"gradient difference: {per_family(spread)}. Largest difference of a context's "
        f"gradient: {per_family(lambda r: fmt(worst_of(r, 'context grads')))}. Buffers "
        "(running statistics, ActNorm's `initialized`), compared after each step: "
        f"{per_family(lambda r: fmt(worst_of(r, 'buffers')))}.", ""]
    failures = {family: [o for o in results if o.failure]
                for family, results in outcomes.items()}
    lines += ["## Failures", ""]
    if not any(failures.values()):
        lines.append("None.")
    for family, failed in failures.items():
        for o in failed[:LISTED_FAILURES]:
            lines += [f"* {family} case {o.case.index}: {o.case.summary}.",
                      f"  {o.failure}", f"  Diagnosis: {o.diagnosis}.",
                      f"  Replay: `{replay_command(o.case, settings)}`"]
        if len(failed) > LISTED_FAILURES:
            drift = sum(o.diagnosis.startswith("passes") for o in failed)
            lines.append(f"* ... and {len(failed) - LISTED_FAILURES} more {family} failures "
                         f"(cases {', '.join(str(o.case.index) for o in failed)}; {drift} of "
                         f"all {len(failed)} pass with anchor_every=1).")
    lines += ["", "## What the cases covered", ""]
    for family, results in outcomes.items():
        counts = Counter(tag for o in results for tag in o.case.tags)
        lines.append(f"* {family}: " + ", ".join(f"{tag} {n}" for tag, n in
                                                 sorted(counts.items())) + ".")
    return "\n".join(lines) + "\n"


def parse_cases(text: str | None) -> list[int] | None:
    return None if text is None else [int(i) for i in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for family in FAMILIES:
        parser.add_argument(f"--{family}", type=int, default=DEFAULT_COUNTS[family],
                            help=f"number of {family} cases (default {DEFAULT_COUNTS[family]})")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every case")
    parser.add_argument("--rtol", type=float, default=Settings.rtol,
                        help="relative tolerance per compared tensor")
    parser.add_argument("--perturbation", type=float, default=Settings.perturbation,
                        help="scale of the noise added to conditioner and ActNorm weights")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="comma-separated subset of " + ", ".join(FAMILIES))
    parser.add_argument("--cases", help="comma-separated case indices to run (for replays)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results file; not written when --cases is given")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(args.seed, args.rtol, args.perturbation)
    arguments = argv if argv is not None else sys.argv[1:]
    command = "PYTHONPATH=. python benchmarks/engine_stress.py" + "".join(
        f" {a}" for a in arguments)
    chosen = parse_cases(args.cases)
    start = time.perf_counter()
    outcomes: dict[str, list[Outcome]] = {}
    times: dict[str, float] = {}
    for family in args.families.split(","):
        began = time.perf_counter()
        results = []
        for index in chosen if chosen is not None else range(getattr(args, family)):
            outcome = run_case(BUILDERS[family](index, settings), settings.rtol)
            results.append(outcome)
            if args.verbose or outcome.failure:
                status = "ok" if outcome.failure is None else "FAILED"
                worst = ", ".join(f"{c} {fmt(outcome.worst.get(c))}" for c in CATEGORIES)
                print(f"{family} {index}: {status} ({worst}) {outcome.case.summary}",
                      flush=True)
                if outcome.failure:
                    print(f"    {outcome.failure}\n    {outcome.diagnosis}\n    replay: "
                          f"{replay_command(outcome.case, settings)}", flush=True)
        outcomes[family] = results
        times[family] = time.perf_counter() - began
    text = report(outcomes, times, settings, command, time.perf_counter() - start)
    if chosen is None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 1 if any(o.failure for results in outcomes.values() for o in results) else 0


if __name__ == "__main__":
    sys.exit(main())
