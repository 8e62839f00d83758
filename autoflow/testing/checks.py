"""Reusable assertions that check an invertible module against its contract."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..base import (
    InvertibleModule,
    State,
    call_with_context,
    flatten_state,
    pack_like,
    state_shape,
)
from ..errors import AutoflowError

__all__ = [
    "assert_engine_gradients_match",
    "assert_invertible",
    "assert_logdet_matches_jacobian",
    "assert_per_sample",
    "default_rtol",
    "relative_error",
]


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of the kit for ``dtype``: 1e-10 in float64, 1e-4 otherwise."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def relative_error(actual: State, expected: State, *, floor: float = 0.0) -> float:
    """Largest absolute difference over all tensors, relative to the largest expected value.

    Relative to the whole state rather than elementwise, so entries near zero do not turn
    rounding noise into a large relative error; ``floor`` is the smallest scale used, for
    tensors that are zero in exact arithmetic. A NaN or infinity in either state gives
    ``inf``: a check must never pass on a non-finite value.

    Example:
        >>> import torch
        >>> from autoflow.testing import relative_error
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
        >>> relative_error(torch.tensor([float("nan")]), torch.tensor([1.0]))
        inf
    """
    actual_list, expected_list = flatten_state(actual), flatten_state(expected)
    if len(actual_list) != len(expected_list):
        raise AssertionError(
            f"states differ in structure: {len(actual_list)} tensors vs {len(expected_list)}"
        )
    worst, scale = 0.0, 0.0
    for a, e in zip(actual_list, expected_list):
        if a.shape != e.shape:
            raise AssertionError(f"shape {tuple(a.shape)} differs from expected {tuple(e.shape)}")
        if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
            return math.inf
        worst = max(worst, (a.double() - e.double()).abs().max().item() if a.numel() else 0.0)
        scale = max(scale, e.double().abs().max().item() if e.numel() else 0.0)
    return worst / max(scale, floor, torch.finfo(torch.float64).tiny)


def _check_finite(inputs: State) -> None:
    for i, t in enumerate(flatten_state(inputs)):
        if not torch.isfinite(t).all():
            raise AutoflowError(
                f"check inputs must be finite, but tensor {i} (shape {tuple(t.shape)}) contains "
                "NaN or inf"
            )


def _require_finite(check: str, module: nn.Module, what: str, state: State | None) -> None:
    # Comparisons with NaN are False, so a NaN output could otherwise pass a tolerance test.
    if state is None:
        return
    for i, t in enumerate(flatten_state(state)):
        if not torch.isfinite(t).all():
            which = "" if isinstance(state, Tensor) else f" (tensor {i})"
            raise AssertionError(
                f"{check}: {type(module).__name__}'s {what}{which} contains NaN or inf"
            )


def _require_logdet_shape(check: str, module: nn.Module, what: str, logdet: object,
                          batch: int) -> None:
    if logdet is None:
        return
    got = tuple(logdet.shape) if isinstance(logdet, Tensor) else type(logdet).__name__
    if not isinstance(logdet, Tensor) or logdet.shape != (batch,):
        raise AssertionError(
            f"{check}: {type(module).__name__}'s {what} must have shape ({batch},), one value "
            f"per sample, got {got}"
        )


def assert_invertible(
    module: InvertibleModule, inputs: State, *, context: Tensor | None = None,
    rtol: float | None = None
) -> None:
    """Assert that ``module.inverse(module(x))`` recovers ``x`` and that the log-dets agree.

    Checks, in order: the output shape matches ``module.output_shape``; ``inverse`` restores the
    input within ``rtol`` (relative to the largest input value); the log-det has shape ``(B,)``;
    for a module with a log-det, ``logdet_inv == -logdet``; ``module.input_shape`` maps the output
    shape back. Outputs and log-dets of both directions must be finite.

    Args:
        module: The module under test, in the mode (train/eval) to be checked.
        inputs: A finite state (tensor or tuple of tensors) with a batch dimension.
        context: For a conditional module, the context passed to ``forward`` and
            ``inverse`` (``module(x, context=context)``).
        rtol: Relative tolerance; by default :func:`default_rtol` of the input dtype.

    Raises:
        AssertionError: Describing the first violated property.
        AutoflowError: If ``inputs`` contain NaN or inf.

    Example:
        >>> import torch, autoflow
        >>> from autoflow.testing import assert_invertible
        >>> assert_invertible(autoflow.InvConv1x1(4), torch.randn(2, 4, 3, 3))
    """
    _check_finite(inputs)
    first = flatten_state(inputs)[0]
    tol = default_rtol(first.dtype) if rtol is None else rtol
    batch = first.shape[0]
    with torch.no_grad():
        outputs, logdet = call_with_context(module, inputs, context)
        check = "assert_invertible"
        _require_finite(check, module, "forward output", outputs)
        _require_logdet_shape(check, module, "logdet", logdet, batch)
        _require_finite(check, module, "logdet", logdet)
        expected_shape = module.output_shape(state_shape(inputs))
        if state_shape(outputs) != expected_shape:
            raise AssertionError(
                f"{type(module).__name__}.output_shape predicted {expected_shape}, "
                f"forward produced {state_shape(outputs)}"
            )
        if module.input_shape(expected_shape) != state_shape(inputs):
            raise AssertionError(
                f"{type(module).__name__}.input_shape maps {expected_shape} to "
                f"{module.input_shape(expected_shape)}, expected {state_shape(inputs)}"
            )
        restored, logdet_inv = call_with_context(module.inverse, outputs, context)
        _require_finite(check, module, "inverse output", restored)
        _require_logdet_shape(check, module, "logdet_inv", logdet_inv, batch)
        _require_finite(check, module, "logdet_inv", logdet_inv)
    error = relative_error(restored, inputs)
    if not error <= tol:
        raise AssertionError(
            f"{type(module).__name__}: inverse(forward(x)) differs from x by {error:.3e} "
            f"(relative), tolerance {tol:.1e}"
        )
    if (logdet is None) != (logdet_inv is None):
        raise AssertionError(
            f"{type(module).__name__}: forward and inverse disagree on having a log-det"
        )
    if logdet is None:
        if module.bijective:
            raise AssertionError(f"{type(module).__name__} is bijective but returned no log-det")
        return
    scale = max(logdet.abs().max().item(), 1.0)
    gap = (logdet + logdet_inv).abs().max().item() / scale
    if not gap <= tol:
        raise AssertionError(
            f"{type(module).__name__}: logdet_inv != -logdet (relative gap {gap:.3e}, "
            f"tolerance {tol:.1e})"
        )
    if module.volume_preserving and logdet.abs().max().item() > tol * scale:
        raise AssertionError(
            f"{type(module).__name__} claims volume_preserving but its logdet is "
            f"{logdet.abs().max().item():.3e}"
        )


def assert_per_sample(
    module: InvertibleModule, inputs: State, *, context: Tensor | None = None,
    rtol: float | None = None
) -> None:
    """Assert that ``module`` maps every sample of a batch on its own, both ways.

    What :func:`~autoflow.base.per_sample` declares, and what the memory-saving engine's
    ``backward_chunk`` relies on: for every sample ``i``, ``module(x[i:i+1])`` equals row ``i``
    of ``module(x)`` (outputs and log-det), and likewise for ``inverse``. Batch statistics
    (batch or volume normalisation in training mode) break it. Run it in each mode the module
    will be trained in; a module with data-dependent initialisation (ActNorm) must be
    initialised first, as its first batch sets its parameters.

    Args:
        module: The module under test, in the mode (train/eval) to be checked.
        inputs: A finite state with a batch dimension of at least 2.
        context: For a conditional module, a context with one row per sample.
        rtol: Relative tolerance; by default :func:`default_rtol` of the input dtype.

    Raises:
        AssertionError: Naming the direction, the sample and the difference.
        AutoflowError: If ``inputs`` contain NaN or inf, or hold fewer than 2 samples.

    Example:
        >>> import torch, autoflow
        >>> from autoflow.testing import assert_per_sample
        >>> assert_per_sample(autoflow.InvConv1x1(4), torch.randn(3, 4, 2, 2))
    """
    _check_finite(inputs)
    first = flatten_state(inputs)[0]
    batch = first.shape[0]
    if batch < 2:
        raise AutoflowError(
            f"assert_per_sample needs a batch of at least 2 samples, received {batch}"
        )
    tol = default_rtol(first.dtype) if rtol is None else rtol
    name = type(module).__name__
    with torch.no_grad():
        outputs, _ = call_with_context(module, inputs, context)
        for direction, function, given in (("forward", module, inputs),
                                           ("inverse", module.inverse, outputs)):
            whole, whole_logdet = call_with_context(function, given, context)
            for i in range(batch):
                row = pack_like([t[i:i + 1] for t in flatten_state(given)], given)
                alone, alone_logdet = call_with_context(
                    function, row, None if context is None else context[i:i + 1])
                parts = [(alone, pack_like([t[i:i + 1] for t in flatten_state(whole)], whole),
                          "output")]
                if whole_logdet is not None:
                    parts.append((alone_logdet, whole_logdet[i:i + 1], "log-det"))
                for found, expected, what in parts:
                    error = relative_error(found, expected)
                    if not error <= tol:
                        raise AssertionError(
                            f"{name} is not per-sample: its {direction} {what} of sample {i} "
                            f"alone differs from row {i} of the batch's by {error:.3e} "
                            f"(relative), tolerance {tol:.1e}; does it use batch statistics?"
                        )


def assert_logdet_matches_jacobian(
    module: InvertibleModule, inputs: State, *, context: Tensor | None = None,
    rtol: float = 1e-8
) -> None:
    """Assert that the reported log-det equals a brute-force one from the autograd Jacobian.

    The module and inputs are copied to float64. For every sample ``b`` the Jacobian ``J`` of
    the flattened output of sample ``b`` with respect to its flattened input is built with
    autograd (other samples held fixed); the expected log-det is ``log|det J|`` when ``J`` is
    square and ``1/2 log det(J^T J)`` (the volume factor of an injective map) when it is tall.
    Use small shapes: the cost grows with the cube of the per-sample size.

    A module whose output for one sample depends on other samples (batch statistics in
    training mode) has no per-sample Jacobian; check it in eval mode or with batch size 1.

    Args:
        module: The module under test; it is deep-copied, the original is not modified.
        inputs: A finite state with a batch dimension.
        context: For a conditional module, its context (copied to float64 too); the
            Jacobian is taken with respect to the state only, the context held fixed.
        rtol: Tolerance on ``|reported - expected| / max(1, |expected|)``.

    Raises:
        AssertionError: If the log-dets differ, or the module returns no log-det.
        AutoflowError: If ``inputs`` contain NaN or inf.

    Example:
        >>> import torch, autoflow
        >>> from autoflow.testing import assert_logdet_matches_jacobian
        >>> assert_logdet_matches_jacobian(autoflow.InvConv1x1(3), torch.randn(2, 3, 2, 2))
    """
    _check_finite(inputs)
    module64 = copy.deepcopy(module).double()
    x = [t.detach().double() for t in flatten_state(inputs)]
    if isinstance(context, Tensor) and context.is_floating_point():
        context = context.detach().double()

    def run(state: State) -> tuple[State, Tensor | None]:
        return call_with_context(module64, state, context)

    with torch.no_grad():
        _, logdet = run(pack_like(x, inputs))
    if logdet is None:
        raise AssertionError(f"{type(module).__name__} returned no log-det to check")
    check = "assert_logdet_matches_jacobian"
    _require_logdet_shape(check, module, "logdet", logdet, x[0].shape[0])
    _require_finite(check, module, "logdet", logdet)
    for b in range(x[0].shape[0]):
        jacobian = _sample_jacobian(run, x, inputs, b)
        _require_finite(check, module, f"Jacobian for sample {b}", jacobian)
        if jacobian.shape[0] == jacobian.shape[1]:
            expected = torch.linalg.slogdet(jacobian).logabsdet
        else:
            expected = 0.5 * torch.linalg.slogdet(jacobian.T @ jacobian).logabsdet
        reported = logdet[b].item()
        if not abs(reported - expected.item()) <= rtol * max(1.0, abs(expected.item())):
            raise AssertionError(
                f"{type(module).__name__}: sample {b} reports logdet {reported:.12g}, the "
                f"Jacobian gives {expected.item():.12g}"
            )


def _sample_jacobian(module: Callable[[State], tuple[State, Tensor | None]], x: list[Tensor],
                     like: State, b: int) -> Tensor:
    sizes = [t[b].numel() for t in x]

    def sample_output(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        tensors = [
            torch.cat([t[:b], p.reshape(t[b:b + 1].shape), t[b + 1:]]) for t, p in zip(x, parts)
        ]
        y, _ = module(pack_like(tensors, like))
        return torch.cat([t[b].reshape(-1) for t in flatten_state(y)])

    flat = torch.cat([t[b].reshape(-1) for t in x])
    return torch.autograd.functional.jacobian(sample_output, flat)


def assert_engine_gradients_match(
    module: InvertibleModule,
    inputs: State,
    *,
    context: Tensor | None = None,
    inverse: bool = False,
    rtol: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Assert that the memory-saving engine reproduces plain autograd for ``module``.

    Two deep copies of ``module`` are run on the same inputs with the same random-number
    state: one with plain autograd, one inside ``Sequential(..., memory_saving=True)`` (a
    :class:`~autoflow.Sequential` is switched over itself). The loss is a fixed random linear
    function of the outputs plus a weighted sum of the log-det, so every path gets a gradient.
    Compared: outputs, log-dets, gradients of the inputs, of the context and of every
    parameter, and every buffer afterwards (state must be updated exactly once). A gradient
    that one run gives and the other does not (``None``) is a failure, not a zero; so is a
    NaN anywhere.

    Both runs execute the module's own code, so a bug shared by both (a detached conditioner,
    say) is not caught here: check the module itself against finite differences
    (``torch.autograd.gradcheck`` in float64) for that.

    Args:
        module: The module under test (left untouched).
        inputs: A finite state; gradients are taken with respect to its floating tensors.
        context: For a conditional module, its context; a floating context gets a gradient
            in both runs (the engine must give it the one autograd gives).
        inverse: Check the inverse direction (``module.inverse``) instead.
        rtol: Relative tolerance per tensor; 1e-8 in float64 and 1e-4 otherwise by default.
        seed: Seed of the random loss weights and of the random-number state of both runs.

    Returns:
        The relative difference of every compared tensor, by what it is (``"output"``,
        ``"log-det"``, ``"gradient of input 0"``, ``"gradient of the context"``,
        ``"gradient of <parameter name>"``, ``"buffer <name> after the step"``): how far
        inside the tolerance the engine stayed, for reports across many flows.

    Raises:
        AssertionError: Naming the first tensor that differs and by how much.

    Example:
        >>> import torch, autoflow
        >>> from autoflow.testing import assert_engine_gradients_match
        >>> flow = autoflow.Sequential(autoflow.AffineCoupling(4), autoflow.InvConv1x1(4))
        >>> errors = assert_engine_gradients_match(flow, torch.randn(2, 4, 4, 4))
        >>> list(errors)[:3]
        ['output', 'log-det', 'gradient of input 0']
        >>> max(errors.values()) <= 1e-4
        True
    """
    from ..sequential import Sequential  # the kit sits above the containers

    _check_finite(inputs)
    first = flatten_state(inputs)[0]
    tol = (1e-8 if first.dtype == torch.float64 else 1e-4) if rtol is None else rtol
    plain = copy.deepcopy(module)
    if isinstance(module, Sequential):
        saving = copy.deepcopy(module)
        saving.memory_saving = True
    else:
        saving = Sequential(copy.deepcopy(module), memory_saving=True)
    check = "assert_engine_gradients_match"
    batch = first.shape[0]
    runs = []
    # Plain autograd first: a broken module is reported by this check, not by the engine.
    for run, model in (("plain autograd", plain), ("the engine", saving)):
        out, ld, grads = _gradients(model, inputs, context, inverse, seed)
        _require_finite(check, module, f"output under {run}", out)
        _require_logdet_shape(check, module, f"log-det under {run}", ld, batch)
        _require_finite(check, module, f"log-det under {run}", ld)
        for i, g in enumerate(grads):
            _require_finite(check, module, f"gradient {i} under {run}", g)
        runs.append((out, ld, grads))
    (out_a, ld_a, grads_a), (out_b, ld_b, grads_b) = runs
    errors: dict[str, float] = {}

    def compare(what: str, actual: State, expected: State, floor: float = 0.0) -> None:
        errors[what] = _compare(what, actual, expected, tol, floor)

    compare("output", out_b, out_a)
    if (ld_a is None) != (ld_b is None):
        raise AssertionError("the engine and autograd disagree on having a log-det")
    if ld_a is not None:
        compare("log-det", ld_b, ld_a)
    # The wrapped copy lists parameters and buffers in the same order as the original.
    names = [f"input {i}" for i, t in enumerate(flatten_state(inputs)) if t.is_floating_point()]
    if isinstance(context, Tensor) and context.is_floating_point():
        names.append("the context")
    names += [n for n, p in plain.named_parameters() if p.requires_grad]
    # A gradient that is zero in exact arithmetic (a bias before batch norm) is compared on
    # the scale of the largest gradient, a million times larger than rounding noise.
    floor = 1e-6 * max((g.abs().max().item() for g in grads_a if g is not None and g.numel()),
                       default=0.0)
    for name, a, b in zip(names, grads_a, grads_b):
        if (a is None) != (b is None):
            given, missing = ("plain autograd", "the engine") if b is None else (
                "the engine", "plain autograd")
            raise AssertionError(
                f"memory-saving engine: {given} gives a gradient for {name} and {missing} "
                "gives none"
            )
        if a is not None:
            compare(f"gradient of {name}", b, a, floor)
    for (name, a), b in zip(plain.named_buffers(), saving.buffers()):
        compare(f"buffer {name} after the step", b, a)
    return errors


def _gradients(module: nn.Module, inputs: State, context: Tensor | None, inverse: bool,
               seed: int):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point())
              for t in flatten_state(inputs)]
    if isinstance(context, Tensor):
        context = context.detach().clone().requires_grad_(context.is_floating_point())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out, logdet = call_with_context(module.inverse if inverse else module,
                                        pack_like(leaves, inputs), context)
    generator = torch.Generator().manual_seed(seed)
    loss = sum(
        (t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)).sum()
        for t in flatten_state(out)
    )
    if logdet is not None:
        weights = torch.rand(logdet.shape, generator=generator, dtype=torch.float64)
        loss = loss + (logdet * weights.to(logdet)).sum()
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    if isinstance(context, Tensor) and context.requires_grad:
        wanted.append(context)
    wanted += [p for p in module.parameters() if p.requires_grad]
    grads = list(torch.autograd.grad(loss, wanted, allow_unused=True))
    detached = pack_like([t.detach() for t in flatten_state(out)], out)
    return detached, (None if logdet is None else logdet.detach()), grads


def _compare(what: str, actual: State, expected: State, tol: float,
             floor: float = 0.0) -> float:
    error = relative_error(actual, expected, floor=floor)
    if not error <= tol:
        raise AssertionError(
            f"memory-saving engine: {what} differs from plain autograd by {error:.3e} "
            f"(relative), tolerance {tol:.1e}"
        )
    return error
