"""Exact-likelihood normalizing flows: a bijection plus a base density.

For a bijection ``f`` (any :class:`~autoflow.InvertibleModule` whose every part is bijective)
mapping data ``x`` of shape ``(B, *shape)`` to a latent state ``z = f(x)`` (a tensor or a tuple
of tensors, e.g. the factored-out latents of a multi-scale flow), the change of variables gives

.. math::

    \\log p(x) = \\log p_Z(f(x)) + \\log|\\det \\partial f / \\partial x|,

and sampling draws ``z ~ p_Z`` and returns ``f^{-1}(z)``. The default base ``p_Z`` is the standard
normal over every tensor of the latent state (:class:`StandardNormal`).

Negative log-likelihoods are in nats per sample, ``(B,)``. Bits per dimension divide by
``D ln 2`` with ``D = prod(shape)``; for discrete data dequantised from ``K`` levels into
``[0, 1)`` (``x = (v + u) / K``, ``u ~ U[0, 1)``) pass ``bins=K``: the density of ``x`` is then
``K^D`` times that of the ``[0, K)`` data, so ``D log K`` nats are added and the result is the
usual variational bound on the bits/dim of the discrete data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import (
    InvertibleModule,
    Shape,
    State,
    call_with_context,
    check_bool,
    check_int,
    check_logdet,
    flatten_state,
    require_bijective,
)
from .errors import AutoflowError, NotBijectiveError, ShapeError

__all__ = ["DistributionBase", "Flow", "StandardNormal"]

_LOG_2PI = math.log(2 * math.pi)


def _per_sample_sum(z: State, log_density: Callable[[Tensor], Tensor]) -> Tensor:
    """``(B,)``: an elementwise log-density summed over every non-batch element of ``z``."""
    return sum(log_density(t).reshape(t.shape[0], -1).sum(1) for t in flatten_state(z))


def _draw_state(shape: Shape, draw: Callable[[tuple[int, ...]], Tensor]) -> State:
    """A state of ``shape`` (a shape or a tuple of shapes) with each tensor from ``draw``."""
    if shape and all(isinstance(s, tuple) for s in shape):
        return tuple(draw(s) for s in shape)  # type: ignore[arg-type]
    return draw(shape)  # type: ignore[arg-type]


class StandardNormal(nn.Module):
    """Standard normal density over every tensor of a state: ``log N(z; 0, I)`` per sample.

    A custom base passed to :class:`Flow` needs the same two methods.

    Example:
        >>> import torch, autoflow
        >>> base = autoflow.StandardNormal()
        >>> z = base.sample(((2, 1, 1), (1, 1, 1)), 4)
        >>> [tuple(t.shape) for t in z], tuple(base.log_prob(z).shape)
        ([(4, 2, 1, 1), (4, 1, 1, 1)], (4,))
        >>> round(base.log_prob(torch.zeros(1, 2)).item(), 4)  # -log(2 pi)
        -1.8379
    """

    def log_prob(self, z: State) -> Tensor:
        """The log-density of each sample, summed over all tensors of ``z``; shape ``(B,)``."""
        return _per_sample_sum(z, lambda t: -0.5 * (t.square() + _LOG_2PI))

    def sample(
        self,
        shape: Shape,
        n: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> State:
        """Draw ``n`` states of ``shape`` (a shape or a tuple of shapes, without batch).

        ``temperature`` scales the standard deviation (Glow's reduced-temperature sampling).
        """
        return _draw_state(shape, lambda s: temperature * torch.randn(
            (n, *s), dtype=dtype, device=device, generator=generator))


class DistributionBase(nn.Module):
    """A ``torch.distributions.Distribution`` as the base density of a :class:`Flow`.

    The distribution's ``batch_shape + event_shape`` must be ``()`` (the same density for every
    latent element, e.g. ``Normal(0.0, 1.0)``) or end each latent tensor's shape (e.g.
    ``Normal(torch.zeros(C, H, W), 1.0)`` for ``(C, H, W)`` latents,
    ``Independent(Normal(torch.zeros(D), 1.0), 1)`` for ``(D,)`` latents); the leading latent
    dimensions it does not cover are drawn independently. ``log_prob`` sums the
    distribution's log-density over every non-batch dimension, so it is ``(B,)`` whatever the
    event dimensions are. :class:`Flow` wraps a distribution in this class itself.

    The distribution is not a module: its parameters stay on their device and dtype. Samples
    are moved to the flow's, and latents to the distribution's for ``log_prob``.

    Args:
        distribution: The distribution.
        latent_shape: The flow's latent shape (a shape or a tuple of shapes, without batch).

    Raises:
        ShapeError: If the distribution's shape does not end every latent tensor's shape.

    Example:
        >>> import torch, autoflow
        >>> base = autoflow.DistributionBase(torch.distributions.Normal(0.0, 1.0), (2, 3))
        >>> z = base.sample((2, 3), 4)
        >>> tuple(z.shape), tuple(base.log_prob(z).shape)
        ((4, 2, 3), (4,))
    """

    def __init__(self, distribution: torch.distributions.Distribution, latent_shape: Shape
                 ) -> None:
        super().__init__()
        self.distribution = distribution
        self.covered = tuple(distribution.batch_shape + distribution.event_shape)
        shapes = (list(latent_shape) if latent_shape and isinstance(latent_shape[0], tuple)
                  else [latent_shape])
        k = len(self.covered)
        for s in shapes:
            if k > len(s) or tuple(s[len(s) - k:]) != self.covered:
                raise ShapeError(
                    f"Flow base {type(distribution).__name__} has batch_shape + event_shape "
                    f"{self.covered}, which does not end the latent shape {tuple(s)} (of "
                    f"{latent_shape}); use a distribution of shape () for the same density on "
                    "every latent element, or one whose shape ends every latent tensor's"
                )
        self.device = distribution.sample(()).device

    def extra_repr(self) -> str:
        return repr(self.distribution)

    def log_prob(self, z: State) -> Tensor:
        """The distribution's log-density summed over every non-batch dimension, ``(B,)``."""
        return _per_sample_sum(
            z, lambda t: self.distribution.log_prob(t.to(self.device)).to(t.device))

    def sample(
        self,
        shape: Shape,
        n: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> State:
        """Draw ``n`` states of ``shape``; ``temperature`` must be 1 and ``generator`` None.

        Raises:
            AutoflowError: For another temperature or a generator: a torch distribution
                takes neither (scale or seed it yourself, with ``torch.manual_seed``).
        """
        name = type(self.distribution).__name__
        if temperature != 1.0:
            raise AutoflowError(
                f"Flow base {name} (a torch distribution) has no temperature; received "
                f"temperature={temperature!r}, expected 1.0"
            )
        if generator is not None:
            raise AutoflowError(
                f"Flow base {name} (a torch distribution) cannot draw from a generator; "
                "received one, expected generator=None (seed with torch.manual_seed)"
            )
        k = len(self.covered)

        return _draw_state(shape, lambda s: self.distribution.sample(
            (n, *s[: len(s) - k])).to(dtype=dtype, device=device))


class Flow(nn.Module):
    """A normalizing flow: ``log p(x) = log p_Z(f(x)) + log|det df/dx|``.

    Calling the module returns :meth:`log_prob`, so it can be wrapped in
    ``DistributedDataParallel``.

    Args:
        transform: The bijection ``f`` from data to latents; use
            ``Sequential(..., memory_saving=True)`` to train it with the memory-saving engine.
        shape: The shape of one data sample without the batch dimension, e.g. ``(C, H, W)``.
        base: The latent density: an object with ``log_prob(z) -> (B,)`` and
            ``sample(latent_shape, n, *, dtype, device, temperature, generator)``, or a
            ``torch.distributions.Distribution`` (wrapped in :class:`DistributionBase`);
            a standard normal over all latents by default.
        context_encoder: A network applied to every context before the transform sees it
            (nflows' ``embedding_net``), e.g. ``nn.Embedding(10, K)`` to condition on class
            labels; part of the flow, so its parameters train and save with the transform's.
            ``None`` passes contexts on as they are.

    Raises:
        NotBijectiveError: If ``transform`` or any part of it is not a bijection (e.g. a
            :class:`~autoflow.LaplacianPyramid`): its log-det would not be a change of variables.
        AutoflowError: If ``transform`` is not an :class:`~autoflow.InvertibleModule`, ``shape``
            is not a tuple of positive ints, ``base`` lacks ``log_prob``/``sample``, or
            ``context_encoder`` is not an ``nn.Module``.
        ShapeError: If ``transform`` cannot take inputs of ``shape``, or a distribution
            ``base`` does not fit the latent shape.

    Example:
        >>> import math
        >>> import torch, autoflow
        >>> transform = autoflow.Sequential(autoflow.ActNorm(2), autoflow.AffineCoupling(2))
        >>> flow = autoflow.Flow(transform, (2, 1, 1))
        >>> x = torch.randn(5, 2, 1, 1)
        >>> tuple(flow.log_prob(x).shape), tuple(flow.sample(3).shape)
        ((5,), (3, 2, 1, 1))
        >>> bool(torch.allclose(flow.bits_per_dim(x), flow.nll(x) / (2 * math.log(2))))
        True
    """

    def __init__(self, transform: InvertibleModule, shape: tuple[int, ...], *,
                 base: nn.Module | torch.distributions.Distribution | None = None,
                 context_encoder: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(transform, InvertibleModule):
            raise AutoflowError(
                f"Flow expected an InvertibleModule as transform, received "
                f"{type(transform).__name__}"
            )
        require_bijective(transform, "a log-likelihood")
        if (
            not isinstance(shape, tuple)
            or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise AutoflowError(
                f"Flow expected shape to be a tuple of positive ints (one sample's shape without "
                f"the batch dimension), received {shape!r}"
            )
        self.latent_shape = transform.output_shape(shape)
        if base is None:
            base = StandardNormal()
        elif isinstance(base, torch.distributions.Distribution):
            # Its log_prob is per element (or per event), and its sample takes no latent
            # shape: the adapter sums to (B,) and draws the latent shape.
            base = DistributionBase(base, self.latent_shape)
        missing = [name for name in ("log_prob", "sample")
                   if not callable(getattr(base, name, None))]
        if missing:
            raise AutoflowError(
                f"Flow expected a base with log_prob and sample methods, received "
                f"{type(base).__name__} without {' and '.join(missing)}"
            )
        if context_encoder is not None and not isinstance(context_encoder, nn.Module):
            raise AutoflowError(
                f"Flow expected context_encoder to be an nn.Module (so that its parameters are "
                f"the flow's), received {type(context_encoder).__name__}"
            )
        self.transform = transform
        self.base = base
        self.context_encoder = context_encoder
        self.shape = shape
        self.dims = math.prod(shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, latent_shape={self.latent_shape}"

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.log_prob(x, context=context)

    def _check_context(self, context: object) -> None:
        if context is None:
            return
        if not isinstance(context, Tensor):
            raise AutoflowError(
                f"Flow expected the context to be a tensor (B, ...), received "
                f"{type(context).__name__}"
            )
        if not self.transform.conditional:
            raise AutoflowError(
                f"Flow received a context, but its transform ({type(self.transform).__name__}) "
                "takes none; build it conditional (e.g. glow(..., context_channels=K) or "
                "couplings with context_channels=K)"
            )

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise ShapeError(f"Flow expected a tensor, received {type(x).__name__}")
        if tuple(x.shape[1:]) != self.shape or x.dim() != len(self.shape) + 1:
            raise ShapeError(
                f"Flow expected data of shape (B, {', '.join(map(str, self.shape))}), "
                f"received {tuple(x.shape)}"
            )

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Exact log-density of each sample in nats.

        Args:
            x: Data of shape ``(B, *shape)``.
            context: For a conditional transform, the context of each sample (batch ``B``):
                the result is ``log p(x | context)``.

        Returns:
            ``log p(x)`` of shape ``(B,)``.

        Raises:
            ShapeError: If ``x`` does not have shape ``(B, *shape)``.
        """
        self._check(x)
        self._check_context(context)
        z, logdet = call_with_context(self.transform, x, self._encode(context))
        if logdet is None:  # only a transform that broke its own bijective flag gets here
            raise NotBijectiveError(
                f"{type(self.transform).__name__} reported no log-det; a log-likelihood needs one"
            )
        check_logdet(logdet, x.shape[0], f"Flow transform {type(self.transform).__name__}")
        return self._base_log_prob(z, x.shape[0]) + logdet

    def _base_log_prob(self, z: State, batch: int) -> Tensor:
        log_p = self.base.log_prob(z)
        if not isinstance(log_p, Tensor) or tuple(log_p.shape) != (batch,):
            got = tuple(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
            raise ShapeError(
                f"Flow base {type(self.base).__name__}.log_prob returned {got}; expected one "
                f"log-density per sample, shape ({batch},) (sum over every non-batch dimension)"
            )
        return log_p

    def nll(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Negative log-likelihood of each sample in nats, shape ``(B,)``; ``.mean()`` is a loss."""
        return -self.log_prob(x, context=context)

    def bits_per_dim(self, x: Tensor, context: Tensor | None = None, *,
                     bins: float | None = None) -> Tensor:
        """Negative log-likelihood in bits per dimension, shape ``(B,)``.

        Args:
            x: Data of shape ``(B, *shape)``.
            context: The context of each sample, for a conditional transform.
            bins: For data dequantised from ``bins`` discrete levels into ``[0, 1)`` (or any unit
                interval), add the ``log(bins)`` nats per dimension of that scaling, giving the
                bits/dim of the discrete data (see the module docstring).

        Raises:
            AutoflowError: If ``bins`` is not a number ``>= 1``.
        """
        if bins is not None and (
            isinstance(bins, bool) or not isinstance(bins, (int, float)) or not bins >= 1
        ):
            raise AutoflowError(f"bits_per_dim expected bins >= 1 or None, received {bins!r}")
        nats = self.nll(x, context=context)
        if bins is not None:
            nats = nats + self.dims * math.log(bins)
        return nats / (self.dims * math.log(2))

    def _reference(self) -> tuple[torch.dtype, torch.device]:
        for t in (*self.transform.parameters(), *self.transform.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
        return torch.get_default_dtype(), torch.device("cpu")

    def sample(
        self,
        sample_shape: int | tuple[int, ...],
        *,
        context: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        return_log_prob: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw samples ``x = f^{-1}(z)``, ``z`` from the base.

        Runs with the current grad mode; wrap in ``torch.no_grad()`` when only sampling.

        Args:
            sample_shape: Number of samples ``n``, or a sample shape (a tuple of ints, as in
                ``torch.distributions``): ``(a, b)`` draws ``a * b`` samples shaped
                ``(a, b, *shape)``, ``()`` one sample shaped ``shape``.
            context: For a conditional transform, the context of the ``n`` samples: a batch
                of ``n`` contexts (one per sample, in order), or of 1 (shared by all).
            temperature: Scales the base's standard deviation (``1.0``: the model itself).
            generator: Random generator for the latents.
            return_log_prob: Also return ``log p(x) = log p_Z(z) - log|det df^{-1}/dz|`` under
                the model (not the tempered base), from the same pass.

        Returns:
            Samples of shape ``(*sample_shape, *shape)``, and their log-densities
            ``sample_shape`` if asked.

        Raises:
            AutoflowError: If ``sample_shape`` is not a positive int or a tuple of them,
                ``temperature`` is not positive, or the context's batch is neither 1 nor ``n``.
        """
        batch_shape = self._sample_shape(sample_shape)
        n = math.prod(batch_shape)
        check_bool(return_log_prob, "return_log_prob", "Flow.sample")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0
        ):
            raise AutoflowError(
                f"Flow.sample expected a positive temperature, received {temperature!r}"
            )
        dtype, device = self._reference()
        z = self.base.sample(self.latent_shape, n, dtype=dtype, device=device,
                             temperature=float(temperature), generator=generator)
        x, logdet_inv = call_with_context(self.transform.inverse, z,
                                          self._sample_context(context, n))
        check_logdet(logdet_inv, n, f"Flow transform {type(self.transform).__name__} (inverse)")
        x = x.reshape(*batch_shape, *self.shape)
        if not return_log_prob:
            return x
        return x, (self._base_log_prob(z, n) - logdet_inv).reshape(batch_shape)

    def _encode(self, context: Tensor | None) -> Tensor | None:
        """The context as the transform takes it: through ``context_encoder`` if there is one."""
        if context is None or self.context_encoder is None:
            return context
        return self.context_encoder(context)

    def _sample_context(self, context: Tensor | None, n: int) -> Tensor | None:
        self._check_context(context)
        if context is None:
            return None
        if context.dim() == 0 or context.shape[0] not in (1, n):
            raise AutoflowError(
                f"Flow.sample expected a context with a batch of 1 (shared) or {n} (one per "
                f"sample), received shape {tuple(context.shape)}"
            )
        # Encoded before it is expanded: a shared context goes through the encoder once.
        encoded = self._encode(context)
        return encoded.expand(n, *encoded.shape[1:])

    @staticmethod
    def _sample_shape(sample_shape: object) -> tuple[int, ...]:
        if isinstance(sample_shape, torch.Size):
            sample_shape = tuple(sample_shape)
        if isinstance(sample_shape, tuple):
            for size in sample_shape:
                check_int(size, "sample_shape entry", "Flow.sample",
                          why=f" (in sample_shape {sample_shape!r})")
            return sample_shape
        return (check_int(sample_shape, "n", "Flow.sample",
                          why=" (or a tuple of them, a sample shape)"),)
