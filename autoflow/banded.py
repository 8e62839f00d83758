"""Row bands: a coupling evaluated a few rows at a time, so that no whole-image activation of
its conditioner is ever held.

A coupling ``y = mix(f(x; NN(c)))`` whose conditioner ``NN`` is local (stride-1 convolutions
reaching ``r`` rows up and down, :attr:`receptive_radius`) and whose map ``f`` and mixer act
per position computes output rows ``a:b`` from target rows ``a:b`` and conditioner-input rows
``a - r : b + r`` alone. Volume normalisation over channels (CVN) centres each position on its
own, so nothing else ties rows together, and for bands ``a_0 = 0 < a_1 < ... < a_n = H``:

.. math::

    y_{a:b} = \\operatorname{mix}\\Big(f\\big(x_{a:b};\\,
        \\operatorname{crop}_{a:b} \\operatorname{NN}(c_{a-r:b+r})\\big)\\Big), \\qquad
    \\log|\\det J| = \\sum_{\\text{bands}} \\log|\\det J_{a:b}|,

equal to the whole image's result up to float rounding (the log-det's terms are added in
another order). Memory: the conditioner's activations of one band of ``rows + 2 r`` rows.

For gradients, :class:`_BandedMap` keeps only ``c`` and ``x`` and rebuilds each band with a
graph in backward (gradient checkpointing by bands): one more conditioner evaluation, and the
gradient of ``c`` sums the bands' contributions, which overlap in the ``r`` rows around each
cut. A conditioner that draws random numbers (dropout) draws them again in that rebuild, from
the generator state the bands first started from, so every band sees its forward masks, under
the autocast settings, train/eval modes and parameter tensors of the forward pass.
Shapes: ``c`` is ``(B, C_c, H, W)``, ``x`` and ``y`` are ``(B, C, H, W)``, the log-det
``(B,)``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import (
    RANDOMNESS,
    RngSnapshot,
    TensorSlots,
    autocast_as,
    autocast_state,
    outer_hooks_only,
    plain_autograd_reason,
    put_back,
    replaying_rng,
    rng_snapshot,
    set_modes,
    tensor_slots,
    undo_put_back,
    warn_caller,
)

if TYPE_CHECKING:  # pragma: no cover
    from .coupling import Coupling

__all__ = ["map_in_bands", "row_bands"]


def row_bands(height: int, rows: int) -> list[tuple[int, int]]:
    """Rows ``0:height`` cut into consecutive ``(start, stop)`` bands of at most ``rows`` rows.

    Example:
        >>> from autoflow.banded import row_bands
        >>> row_bands(10, 4)
        [(0, 4), (4, 8), (8, 10)]
    """
    return [(a, min(a + rows, height)) for a in range(0, height, rows)]


def _band(coupling: Coupling, features: Tensor, target: Tensor, start: int, stop: int,
          height: int, halo: slice, *, inverse: bool, update: bool) -> tuple[Tensor, Tensor]:
    """Output rows ``start:stop`` and their log-det; ``features`` holds conditioner-input rows
    ``halo`` (:func:`_halo`) and ``target`` the target's rows ``start:stop``."""
    out = coupling.conditioner(features)[:, :, start - halo.start : stop - halo.start]
    params = coupling._params_from(coupling._fit_to_target(out, target), target,
                                   update=update, rows=(start, stop, height))
    step = coupling._inverse_target if inverse else coupling._forward_target
    return step(target, *params)


def _halo(coupling: Coupling, start: int, stop: int, height: int) -> slice:
    radius = coupling.conditioner.receptive_radius
    return slice(max(start - radius, 0), min(stop + radius, height))


def map_in_bands(coupling: Coupling, features: Tensor, target: Tensor, *, inverse: bool,
                 update: bool, known: tuple[Tensor, Tensor] | None = None,
                 rng: RngSnapshot | None = None) -> tuple[Tensor, Tensor]:
    """The coupling's map (``inverse=False``) or inverse of ``target`` given the conditioner's
    input ``features``, evaluated in bands of ``coupling.band_rows`` rows.

    With gradients enabled and a tensor requiring grad involved, the result carries a graph
    that rebuilds each band in backward (under a ``torch.func`` transform or forward-mode AD,
    with a warning, the bands' own graphs instead). ``known = (out, logdet)``, the result
    already computed without a graph, is returned with that graph instead of being computed
    again (the memory-saving engine's reconstruction has it); ``rng`` is then the generator
    state its bands started from (:func:`~autoflow.base.rng_snapshot`, ``None`` when nothing
    random ran).

    Returns:
        ``(out, logdet)``: ``out`` shaped like ``target``, ``logdet`` of shape ``(B,)``.
    """
    if torch.is_grad_enabled():
        reason = None if known is not None else plain_autograd_reason(lambda: itertools.chain(
            (features, target), coupling.parameters(), coupling.buffers()))
        if reason is not None:
            warn_caller(f"row bands: {reason}, and a backward pass that rebuilds the bands "
                        "cannot serve it; the bands keep their graphs (right derivatives, no "
                        "memory saved)")
            return _map(coupling, features, target, inverse=inverse, update=update)
        parameters = [p for p in coupling.parameters() if p.requires_grad]
        if features.requires_grad or target.requires_grad or parameters:
            if known is None and RANDOMNESS.fork:  # not known to draw nothing
                rng = rng_snapshot(features.device)
            return _BandedMap.apply(coupling, inverse, update, known, rng, features, target,
                                    *parameters)
    if known is not None:
        return known
    with torch.no_grad():
        return _map(coupling, features, target, inverse=inverse, update=update)


def _map(coupling: Coupling, features: Tensor, target: Tensor, *, inverse: bool,
         update: bool) -> tuple[Tensor, Tensor]:
    height = target.shape[2]
    out, logdet = torch.empty_like(target), None
    for start, stop in row_bands(height, coupling.band_rows):
        halo = _halo(coupling, start, stop, height)
        part, part_logdet = _band(coupling, features[:, :, halo], target[:, :, start:stop],
                                  start, stop, height, halo, inverse=inverse, update=update)
        out[:, :, start:stop] = part
        logdet = part_logdet if logdet is None else logdet + part_logdet
    return out, logdet


@contextlib.contextmanager
def _modes_as(module: torch.nn.Module, modes: list[bool]) -> Iterator[None]:
    """Every submodule of ``module`` in the train/eval mode it had in the forward pass
    (``modes``, in ``module.modules()`` order), for a backward run after a mode switch."""
    modules = list(module.modules())
    previous = set_modes(modules, modes)
    try:
        yield
    finally:
        if previous is not None:
            set_modes(modules, previous)


@contextlib.contextmanager
def _tensors_as(slots: TensorSlots) -> Iterator[None]:
    """The parameters and buffers the forward pass used, put back where they were replaced
    since (:func:`~autoflow.base.put_back`), for the backward run."""
    replaced = put_back(slots)
    try:
        yield
    finally:
        undo_put_back(replaced)


class _BandedMap(torch.autograd.Function):
    """:func:`map_in_bands` with a graph: saves ``features`` and ``target`` and rebuilds each
    band in backward; the forward pass's running statistics are not updated again."""

    @staticmethod
    def forward(ctx, coupling: Coupling, inverse: bool, update: bool,  # type: ignore[override]
                known: tuple[Tensor, Tensor] | None, rng: RngSnapshot | None,
                features: Tensor, target: Tensor, *parameters: Tensor
                ) -> tuple[Tensor, Tensor]:
        ctx.coupling, ctx.inverse = coupling, inverse
        ctx.modes = [m.training for m in coupling.modules()]
        ctx.slots = tensor_slots(list(coupling.modules()))
        ctx.rng = rng
        # The bands are rebuilt in backward as they ran here, in autocast's precision too.
        ctx.autocast = autocast_state(features.device.type)
        ctx.parameters = parameters
        # The parameters are saved too, so that autograd refuses a backward pass after they
        # were changed in place (an optimiser step): the bands are rebuilt with them.
        ctx.save_for_backward(features, target, *parameters)
        if known is not None:
            # New tensor objects on the same memory: autograd attaches this function to them.
            return known[0].detach(), known[1].detach()
        return _map(coupling, features, target, inverse=inverse, update=update)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_logdet: Tensor):  # type: ignore[override]
        features, target = ctx.saved_tensors[:2]
        coupling, parameters = ctx.coupling, ctx.parameters
        want_features, want_target = ctx.needs_input_grad[5:7]
        grad_features = torch.zeros_like(features) if want_features else None
        grad_target = torch.empty_like(target) if want_target else None
        grad_parameters: list[Tensor | None] = [None] * len(parameters)
        height = target.shape[2]
        with (torch.enable_grad(), _modes_as(coupling, ctx.modes),
              replaying_rng(ctx.rng), autocast_as(ctx.autocast), _tensors_as(ctx.slots),
              outer_hooks_only(parameters)):
            for start, stop in row_bands(height, coupling.band_rows):
                halo = _halo(coupling, start, stop, height)
                band_features = features[:, :, halo].detach().requires_grad_(want_features)
                band_target = target[:, :, start:stop].detach().requires_grad_(want_target)
                out, logdet = _band(coupling, band_features, band_target, start, stop, height,
                                    halo, inverse=ctx.inverse, update=False)
                outputs = [(out, grad_out[:, :, start:stop]), (logdet, grad_logdet)]
                outputs = [(o, g) for o, g in outputs if o.requires_grad]
                inputs = [t for t, wanted in ((band_features, want_features),
                                              (band_target, want_target)) if wanted]
                found = list(torch.autograd.grad(
                    [o for o, _ in outputs], [*inputs, *parameters],
                    [g for _, g in outputs], allow_unused=True,
                )) if outputs else [None] * (len(inputs) + len(parameters))
                if want_features:
                    g = found.pop(0)
                    if g is not None:
                        grad_features[:, :, halo] += g
                if want_target:
                    g = found.pop(0)
                    grad_target[:, :, start:stop] = 0.0 if g is None else g
                for k, g in enumerate(found):
                    if g is not None:
                        grad_parameters[k] = g if grad_parameters[k] is None else (
                            grad_parameters[k] + g)
        return (None, None, None, None, None, grad_features, grad_target, *grad_parameters)
