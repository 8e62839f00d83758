"""The engine's fast paths (issue 14) give plain autograd's results, and are left when unsure.

Two shortcuts make the engine cheap on many small modules: a self-contained module (every
class in its tree declared with ``@self_contained``, no hooks, only plain data in its
attributes) is not run under the operation recorder, its gradient going to its registered
tensors; and a module whose forward pass drew no random numbers gets no random-number replay.
Each test here fails if a shortcut is taken where it must not be, or gives something else than
plain autograd where it is taken.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import autoflow
from autoflow import ActNorm, AffineCoupling, InvertibleModule, Permute, Sequential, engine
from autoflow.base import RANDOMNESS, SELF_CONTAINED, flatten_state
from autoflow.testing import assert_engine_gradients_match, relative_error

from toys import ToyCoupling, perturb


def _gradients(make, x: Tensor, memory_saving: bool) -> list[Tensor | None]:
    """Gradients of a fixed loss w.r.t. ``x``, the chain's parameters and the extra tensors.

    ``make(memory_saving)`` returns ``(chain, extras)``; it is called under the same seed for
    both runs, so the two chains and extras are equal.
    """
    torch.manual_seed(0)
    chain, extras = make(memory_saving)
    x = x.clone().requires_grad_()
    y, logdet = chain(x)
    weights = torch.Generator().manual_seed(1)
    loss = logdet.sum() + sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum()
                              for t in flatten_state(y))
    tensors = [x, *chain.parameters(), *extras]
    return list(torch.autograd.grad(loss, tensors, allow_unused=True))


def _assert_same_gradients(make, x: Tensor) -> None:
    plain, saving = _gradients(make, x, False), _gradients(make, x, True)
    for i, (a, b) in enumerate(zip(plain, saving)):
        assert (a is None) == (b is None), f"tensor {i}: gradient {a is None} vs {b is None}"
        if a is not None:
            assert relative_error(b, a) < 1e-10, f"tensor {i} differs from plain autograd"


def _coupling(channels: int = 4) -> AffineCoupling:
    coupling = AffineCoupling(channels, hidden_channels=6)
    nn.init.normal_(coupling.conditioner[-1].weight, std=0.1)  # not the identity
    return coupling


X = torch.randn(3, 4, 4, 4, dtype=torch.float64)


# Self-contained modules ---------------------------------------------------------------------

def _samples() -> list[nn.Module]:
    """One or more instances of every self-contained autoflow class, in float64."""
    glow = autoflow.glow(1, levels=2, depth_per_level=1, hidden_channels=4)
    plain_glow = autoflow.glow(1, levels=2, depth_per_level=1, hidden_channels=4,
                               mixing="permute", learned_prior=False, downsample="haar")
    return [m.double() for m in (
        glow, plain_glow, AffineCoupling(4, volume_norm="channel"),
        autoflow.AdditiveCoupling(4), autoflow.InvConv1x1(4, lu=False),
    )]


def test_every_self_contained_class_reads_only_its_own_tensors():
    """The operation recorder, run over each sample, finds nothing but registered tensors."""
    covered = set()
    for sample in _samples():
        sample.train()
        for block in sample.children() if isinstance(sample, Sequential) else [sample]:
            covered |= {type(m) for m in block.modules()}
        for p in sample.parameters():
            nn.init.normal_(p, std=0.1)
        x = torch.randn(2, 1 if sample.__class__ is Sequential else 4, 8, 8,
                        dtype=torch.float64)
        own = {id(t) for t in (*sample.parameters(), *sample.buffers())}
        recorder = engine._GradTensorRecorder()
        with torch.no_grad(), recorder:
            y, _ = sample(x)
            sample.inverse(y)
        assert recorder.found, "the sample should use parameters requiring grad"
        # Under no_grad a view of a parameter (a reshape) still says it requires grad.
        outside = [t for t in recorder.found.values()
                   if id(t) not in own and (t._base is None or id(t._base) not in own)]
        assert not outside, [tuple(t.shape) for t in outside]
    ours = {c for c in SELF_CONTAINED if c.__module__.startswith("autoflow")}
    assert ours <= covered, f"not sampled: {sorted(c.__name__ for c in ours - covered)}"


def test_the_benchmark_glow_takes_the_fast_path_everywhere():
    flow = autoflow.glow(1, levels=3, depth_per_level=2, hidden_channels=4, mixing="permute",
                         learned_prior=False)
    for name, block in flow.named_children():
        assert engine._own_grad_tensors(list(block.modules())) is not None, name


class _ScaledCoupling(AffineCoupling):
    """A subclass reading a tensor from outside (a module-level table): not self-contained."""

    def _params_from(self, out, target, *, update, rows=None):
        s, t = super()._params_from(out, target, update=update, rows=rows)
        return s, t * _OUTSIDE["scale"]


_OUTSIDE: dict[str, Tensor] = {}


def test_a_subclass_of_a_self_contained_class_is_watched():
    def make(memory_saving):
        _OUTSIDE["scale"] = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        coupling = _ScaledCoupling(4, hidden_channels=6)
        nn.init.normal_(coupling.conditioner[-1].weight, std=0.1)
        chain = Sequential(ActNorm(4), coupling, memory_saving=memory_saving).double()
        return chain, [_OUTSIDE["scale"]]

    _assert_same_gradients(make, X)


def test_a_hook_on_a_submodule_is_watched():
    def make(memory_saving):
        scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        coupling = _coupling()
        coupling.conditioner[0].register_forward_hook(lambda m, args, out: out * scale)
        return Sequential(coupling, Permute(4), memory_saving=memory_saving).double(), [scale]

    _assert_same_gradients(make, X)


def test_a_global_module_hook_is_watched():
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def hook(module, args, out):
        return out * scale if isinstance(module, nn.Conv2d) else None

    def make(memory_saving):
        return Sequential(_coupling(), memory_saving=memory_saving).double(), [scale]

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        _assert_same_gradients(make, X)
    finally:
        handle.remove()


def test_a_tensor_assigned_over_a_parameter_is_watched():
    """A hypernetwork-style weight: the parameter replaced by a tensor computed outside."""

    def make(memory_saving):
        factor = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        coupling = _coupling().double()
        conv = coupling.conditioner[-1]
        weight = conv.weight.detach()
        del conv.weight
        conv.weight = weight * factor  # a plain attribute now, not a registered tensor
        return Sequential(ActNorm(4), coupling, memory_saving=memory_saving).double(), [factor]

    _assert_same_gradients(make, X)


def test_a_context_requiring_grad_gets_its_gradient_through_the_fast_path():
    def make(memory_saving):
        context = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        coupling = AffineCoupling(4, hidden_channels=6, context_channels=2).double()
        nn.init.normal_(coupling.conditioner[-1].weight, std=0.1)
        chain = Sequential(coupling, memory_saving=memory_saving)
        return _WithContext(chain, context), [context]

    _assert_same_gradients(make, X)


class _WithContext(nn.Module):
    def __init__(self, chain: Sequential, context: Tensor) -> None:
        super().__init__()
        self.chain, self.context = chain, context

    def forward(self, x: Tensor):
        return self.chain(x, context=self.context)


# Random numbers -----------------------------------------------------------------------------

def _mixed_chain() -> Sequential:
    """Modules drawing random numbers (dropout conditioners) between ones that draw none."""
    chain = perturb(Sequential(
        ActNorm(4), ToyCoupling(4, dropout=0.5), Permute(4), _coupling(),
        ToyCoupling(4, dropout=0.3),
    )).double().train()
    # ActNorm initialised first: an uninitialised one would initialise itself inside the
    # inverse direction's reconstruction (its forward pass), which plain inverse never does.
    with torch.no_grad():
        chain(X)
    return chain


@pytest.mark.parametrize("inverse", [False, True])
def test_modules_that_draw_are_replayed_and_the_others_match_plain_autograd(inverse):
    assert_engine_gradients_match(_mixed_chain(), X, inverse=inverse)


def test_only_the_modules_that_drew_random_numbers_are_replayed(monkeypatch):
    chain = _mixed_chain()
    chain.memory_saving = True
    calls = []
    replay = engine.restore_rng
    monkeypatch.setattr(engine, "restore_rng", lambda saved: (calls.append(1),
                                                              replay(saved)))
    y, logdet = chain(X.clone().requires_grad_())
    (y.sum() + logdet.sum()).backward()
    assert len(calls) == 2 + 1  # the two dropout couplings, then the caller's state put back


class _RandomInverse(InvertibleModule):
    """``y = 2x``, whose inverse also draws (and ignores) a random number."""

    def forward(self, x: Tensor):
        return 2 * x, x.new_full((x.shape[0],), x[0].numel() * 0.6931471805599453)

    def inverse(self, y: Tensor):
        torch.rand(1)
        return y / 2, y.new_full((y.shape[0],), -y[0].numel() * 0.6931471805599453)


@pytest.mark.parametrize("chain", [_mixed_chain, lambda: Sequential(_RandomInverse(),
                                                                      ActNorm(4)).double()])
def test_backward_leaves_the_callers_random_state_as_it_found_it(chain):
    chain = chain()
    chain.memory_saving = True
    y, logdet = chain(X.clone().requires_grad_())
    before = torch.get_rng_state()
    (y.sum() + logdet.sum()).backward()
    assert torch.equal(torch.get_rng_state(), before)
    assert RANDOMNESS.fork


class _TwoRandomCouplings(InvertibleModule):
    """Two dropout couplings in one module: the default reconstruct inverts them last to
    first, so the replayed random numbers reach them in the wrong order."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = ToyCoupling(4, dropout=0.5), ToyCoupling(4, dropout=0.5)

    def forward(self, x: Tensor):
        h, a = self.first(x)
        y, b = self.second(h)
        return y, a + b

    def inverse(self, y: Tensor):
        h, b = self.second.inverse(y)
        x, a = self.first.inverse(h)
        return x, a + b


def test_the_engine_refuses_a_rebuild_that_replays_random_numbers_in_another_order():
    chain = Sequential(perturb(_TwoRandomCouplings()), memory_saving=True).double().train()
    y, logdet = chain(X.clone().requires_grad_())
    with pytest.raises(autoflow.EngineError, match="'0' .*drew random numbers.* another order"):
        (y.sum() + logdet.sum()).backward()
    # As members of the chain, each is rebuilt with its own numbers: exact gradients.
    members = Sequential(*perturb(_TwoRandomCouplings()).children()).double().train()
    assert_engine_gradients_match(members, X)


class _FailingReconstruction(ActNorm):
    def reconstruct(self, y, *, context=None):
        assert not RANDOMNESS.fork  # it drew nothing, so the engine switched forks off
        raise RuntimeError("reconstruction failed")


def test_forks_are_switched_back_on_when_a_reconstruction_fails():
    chain = Sequential(_FailingReconstruction(4), memory_saving=True).double()
    y, logdet = chain(X.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="reconstruction failed"):
        (y.sum() + logdet.sum()).backward()
    assert RANDOMNESS.fork


# Runs of cheap modules sharing one local backward ---------------------------------------------

def _glow(**options) -> Sequential:
    """The benchmark's Glow (ActNorm, permutation, coupling; splits) or a variant, float64,
    with every parameter away from its initial value so each gradient path carries weight."""
    torch.manual_seed(0)
    options = {"mixing": "permute", "learned_prior": False, **options}
    flow = autoflow.glow(1, levels=2, depth_per_level=2, hidden_channels=4, **options)
    flow = perturb(flow).double().train()
    with torch.no_grad():
        flow(torch.randn(5, 1, 8, 8, dtype=torch.float64))  # ActNorm initialised
    return flow


def _record_runs(monkeypatch) -> list[list[tuple[int, int]]]:
    seen: list[list[tuple[int, int]]] = []
    runs_of = engine._Plan.runs_of
    monkeypatch.setattr(engine._Plan, "runs_of",
                        lambda plan: seen.append(runs_of(plan)) or seen[-1])
    return seen


def _count_grad_calls(monkeypatch) -> list[int]:
    calls = [0]
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls[0] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


GLOW_X = torch.randn(3, 1, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("options", [{}, {"mixing": "conv1x1", "learned_prior": True},
                                     {"coupling": "additive", "downsample": "haar"}])
def test_a_glow_with_folded_runs_matches_plain_autograd(options):
    """The test that fails if a run computes a wrong gradient: detaching the run's graph from
    the rebuilt module (``output = rec.output`` replaced by detached leaves), dropping the
    folded modules' log-dets or their externals each make it fail."""
    assert_engine_gradients_match(_glow(**options), GLOW_X)


def test_glow_steps_share_one_local_backward(monkeypatch):
    flow = _glow()
    runs, calls = _record_runs(monkeypatch), _count_grad_calls(monkeypatch)
    flow.memory_saving = True
    (h, z), logdet = flow(GLOW_X.clone().requires_grad_())
    (h.sum() + z.sum() + logdet.sum()).backward()
    names = [type(getattr(m, "module", m)).__name__ for m in flow]
    grouped = [[names[i] for i in range(first, last + 1)] for first, last in runs[0]]
    step = ["AffineCoupling", "ActNorm", "Permute"]
    assert grouped == [["Squeeze", "ActNorm", "Permute"], step, ["AffineCoupling"],
                       ["Split", "Squeeze", "ActNorm", "Permute"], step, ["AffineCoupling"]]
    assert calls[0] == len(grouped)


class _ContextShift(InvertibleModule):
    """``y = x + w * mean(context)``: a cheap conditional module (no submodules), folded."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor, *, context: Tensor | None = None):
        return x + self.w * context.mean(1)[:, None, None, None], x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, *, context: Tensor | None = None):
        return y - self.w * context.mean(1)[:, None, None, None], y.new_zeros(y.shape[0])


@pytest.mark.parametrize("inverse", [False, True])
def test_folded_modules_give_context_and_captured_tensors_their_gradients(inverse):
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    outside = ActNorm(4).double()  # its parameter is read by a folded module through a reference

    class _Borrowing(InvertibleModule):
        def forward(self, x):
            return x * scale + outside.bias, x.new_full((x.shape[0],), x[0].numel()) * scale.log()

        def inverse(self, y):
            return (y - outside.bias) / scale, -y.new_full((y.shape[0],), y[0].numel()) * (
                scale.log())

    def make(memory_saving):
        torch.manual_seed(0)
        coupling = AffineCoupling(4, hidden_channels=6, context_channels=2).double()
        nn.init.normal_(coupling.conditioner[-1].weight, std=0.1)
        nn.init.normal_(outside.bias, std=0.3)
        chain = Sequential(coupling, _ContextShift(), _Borrowing(), Permute(4),
                           memory_saving=memory_saving).double()
        return chain, [scale, *outside.parameters()]

    context = torch.randn(3, 2, dtype=torch.float64)
    assert_engine_gradients_match(make(False)[0], X, context=context, inverse=inverse)
    plain = _gradients_with_context(make, X, context, False, inverse)
    saving = _gradients_with_context(make, X, context, True, inverse)
    for a, b in zip(plain, saving):
        assert (a is None) == (b is None)
        if a is not None:
            assert relative_error(b, a) < 1e-10


def _gradients_with_context(make, x, context, memory_saving, inverse):
    chain, extras = make(memory_saving)
    x = x.clone().requires_grad_()
    context = context.clone().requires_grad_()
    y, logdet = (chain.inverse if inverse else chain)(x, context=context)
    loss = logdet.sum() + (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    return torch.autograd.grad(loss, [x, context, *chain.parameters(), *extras],
                               allow_unused=True)


class _RunningShift(InvertibleModule):
    """``y = x + b``, keeping a running mean of its input (a buffer) in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(0.2))
        self.register_buffer("running", torch.zeros(()))

    def forward(self, x: Tensor):
        if self.training:
            self.running.mul_(0.9).add_(0.1 * x.detach().mean())
        return x + self.b, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor):
        return y - self.b, y.new_zeros(y.shape[0])


def test_a_folded_module_updates_its_buffers_once():
    chain = perturb(Sequential(_coupling(), _RunningShift(), Permute(4), _RunningShift()))
    assert_engine_gradients_match(chain.double().train(), X)  # compares buffers afterwards


def test_an_in_place_change_is_named_for_the_folded_module_that_read_it():
    chain = Sequential(_coupling(), ActNorm(4), Permute(4), memory_saving=True).double()
    y, logdet = chain(X.clone().requires_grad_())
    with torch.no_grad():
        chain[1].bias.add_(1.0)
    with pytest.raises(autoflow.EngineError, match="module '1' \\(ActNorm\\).*'bias'"):
        (y.sum() + logdet.sum()).backward()


class _SelfInitialising(_RunningShift):
    def forward(self, x: Tensor):
        with torch.no_grad():
            self.b.fill_(0.3)
        return super().forward(x)


def test_a_folded_module_writing_its_parameters_is_refused():
    chain = Sequential(_coupling(), _SelfInitialising(), memory_saving=True).double()
    y, logdet = chain(X.clone().requires_grad_())
    with pytest.raises(autoflow.EngineError, match="module '1' .*changed its parameters"):
        (y.sum() + logdet.sum()).backward()


def test_runs_are_cut_where_folding_would_change_a_rebuild(monkeypatch):
    """Anchors, modules that drew random numbers, a module met twice, debug mode, no
    random-number replay, and the length cap each start a run."""
    runs = _record_runs(monkeypatch)
    shared = Permute(4)
    chain = perturb(Sequential(
        _coupling(), ActNorm(4), ToyCoupling(4, dropout=0.5), Permute(4), shared, shared,
        *[Permute(4) for _ in range(engine._RUN_LENGTH + 1)],
    )).double().train()

    def run(**options):
        chain.memory_saving = True
        for key, value in options.items():
            setattr(chain.engine_options, key, value)
        y, logdet = chain(X.clone().requires_grad_())
        (y.sum() + logdet.sum()).backward()
        return runs[-1]

    n = len(chain)
    cap = engine._RUN_LENGTH
    # ToyCoupling has a conditioner: it starts a run; it drew random numbers anyway.
    assert run() == [(0, 1), (2, 4), (5, 5 + cap - 1), (5 + cap, n - 1)]
    assert run(anchor_every=3) == [(0, 1), (2, 2), (3, 4), (5, 5), (6, 8), (9, 11),
                                   (12, n - 1)]
    assert run(anchor_every=None, preserve_rng_state=False) == [(i, i) for i in range(n)]
    assert run(preserve_rng_state=True, debug=True) == [(i, i) for i in range(n)]


def test_memory_of_a_backward_step_is_flat_in_the_number_of_cheap_modules(monkeypatch):
    """However long a chain of foldable modules, one local backward covers at most
    ``_RUN_LENGTH`` of them."""
    runs = _record_runs(monkeypatch)
    chain = Sequential(*[ActNorm(4) for _ in range(40)], memory_saving=True).double()
    y, logdet = chain(X.clone().requires_grad_())
    (y.sum() + logdet.sum()).backward()
    assert max(last - first + 1 for first, last in runs[0]) == engine._RUN_LENGTH
