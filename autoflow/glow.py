"""A multi-scale Glow architecture (Kingma & Dhariwal, 2018) assembled from autoflow primitives.

For ``levels = L`` and ``depth_per_level = K``, level ``l`` applies::

    downsample                 (B, C, H, W) -> (B, 4C, H/2, W/2)   Squeeze or HaarDownsample
    K x [ActNorm, InvConv1x1 (or Permute), coupling]               shape unchanged
    Split                      keeps 2C channels, factors out 2C   (all levels but the last)

so a ``(B, C, H, W)`` input ends as the latent state ``(h_L, z_1, ..., z_{L-1})`` with
``h_L: (B, 2^(2L-1) C, H/2^L, W/2^L)`` and ``z_l: (B, 2^(2l-1) C, H/2^l, W/2^l)`` (for even
channel counts); the coupling is an :class:`~autoflow.AffineCoupling` (Glow), an
:class:`~autoflow.AdditiveCoupling` or a :class:`~autoflow.SplineCoupling`. After the first
split every module is wrapped in :class:`~autoflow.OnFirst` so it acts on ``h`` and carries
the latents (see :mod:`autoflow.split`); the chain stays one flat
:class:`~autoflow.Sequential`, so the memory-saving engine covers all of it.
"""

from __future__ import annotations

from .actnorm import ActNorm
from .base import InvertibleModule, check_bool, check_int
from .conv1x1 import InvConv1x1
from .coupling import AdditiveCoupling, AffineCoupling, SplineCoupling
from .errors import AutoflowError
from .on_first import OnFirst
from .permute import Permute
from .reshape import HaarDownsample, Squeeze
from .sequential import Sequential
from .split import Split

__all__ = ["glow"]

_DOWNSAMPLE = {"squeeze": Squeeze, "haar": HaarDownsample, None: None}
_MIXING = ("conv1x1", "permute")
_COUPLINGS = ("affine", "additive", "spline")


def glow(
    in_channels: int,
    *,
    levels: int = 3,
    depth_per_level: int = 8,
    hidden_channels: int = 64,
    downsample: str | None = "squeeze",
    mixing: str = "conv1x1",
    coupling: str = "affine",
    learned_prior: bool = True,
    kernel_size: int = 3,
    clamp: float = 2.0,
    memory_saving: bool = False,
    anchor_every: int | None = None,
    context_channels: int = 0,
    backward_chunk: int | None = None,
) -> Sequential:
    """Build a multi-scale Glow flow as one flat :class:`~autoflow.Sequential`.

    Args:
        in_channels: Channels ``C`` of the input images.
        levels: Number of scales ``L``; a :class:`~autoflow.split.Split` follows every level
            but the last. The input's ``H`` and ``W`` must be divisible by ``2^L`` when
            downsampling.
        depth_per_level: Flow steps ``K`` per level.
        hidden_channels: Hidden width of every coupling conditioner (and split prior).
        downsample: ``"squeeze"`` (space-to-depth), ``"haar"`` (orthonormal Haar) or ``None``
            (no downsampling: a single-scale stack when ``levels=1``, e.g. for vector data
            ``(B, D)``, with ``kernel_size=1`` so the conditioners are MLPs).
        mixing: ``"conv1x1"`` (learned PLU 1x1 convolution, Glow) or ``"permute"`` (fixed random
            channel permutation, RealNVP-style).
        coupling: ``"affine"`` (:class:`~autoflow.AffineCoupling`, Glow), ``"additive"``
            (:class:`~autoflow.AdditiveCoupling`, NICE; volume preserving) or ``"spline"``
            (:class:`~autoflow.SplineCoupling` with its default 8 bins and tail bound 3).
        learned_prior: Give each split Glow's learned prior (as a whitening bijection).
        kernel_size: Odd kernel size of the conditioners.
        clamp: Soft-clamp bound of the coupling log-scales (and of the split priors');
            only the affine couplings and the priors have one.
        memory_saving: Train through the memory-saving engine.
        anchor_every: Engine option, see :class:`~autoflow.Sequential`.
        context_channels: Channels ``K`` of a context to condition on (``0``: none): every
            coupling, and every split's learned prior, gets it concatenated to its
            conditioner's input (a ``(B, K)`` vector broadcast over space, or a
            ``(B, K, h, w)`` image resized to each level); call ``flow(x, context=c)``.
        backward_chunk: Engine option, see :class:`~autoflow.Sequential`.

    Returns:
        The flow; check it with ``flow.check((C, H, W))``.

    Raises:
        AutoflowError: If a count or option is invalid, or some level would have fewer than 2
            channels to couple.

    Example:
        >>> import torch, autoflow
        >>> flow = autoflow.glow(1, levels=2, depth_per_level=2, hidden_channels=8)
        >>> flow.check((1, 8, 8))
        ((8, 2, 2), (2, 4, 4))
        >>> (h, z), logdet = flow(torch.randn(3, 1, 8, 8))
        >>> tuple(logdet.shape)
        (3,)
    """
    channels = check_int(in_channels, "in_channels", "glow")
    check_int(levels, "levels", "glow")
    check_int(depth_per_level, "depth_per_level", "glow")
    check_int(hidden_channels, "hidden_channels", "glow")
    check_bool(learned_prior, "learned_prior", "glow")
    check_bool(memory_saving, "memory_saving", "glow")
    check_int(context_channels, "context_channels", "glow", minimum=0)
    if downsample not in _DOWNSAMPLE:
        raise AutoflowError(
            f"glow expected downsample to be 'squeeze', 'haar' or None, received {downsample!r}"
        )
    if mixing not in _MIXING:
        raise AutoflowError(f"glow expected mixing in {_MIXING}, received {mixing!r}")
    if not isinstance(coupling, str) or coupling not in _COUPLINGS:
        raise AutoflowError(f"glow expected coupling in {_COUPLINGS}, received {coupling!r}")
    make_downsample = _DOWNSAMPLE[downsample]
    modules: list[InvertibleModule] = []
    split_seen = False

    def add(module: InvertibleModule) -> None:
        modules.append(OnFirst(module) if split_seen else module)

    for level in range(levels):
        if make_downsample is not None:
            add(make_downsample(channels))
            channels *= 4
        if channels < 2:
            raise AutoflowError(
                f"glow level {level} would couple {channels} channel(s); a coupling needs at "
                "least 2 (use downsampling or more input channels)"
            )
        for _ in range(depth_per_level):
            add(ActNorm(channels))
            add(InvConv1x1(channels) if mixing == "conv1x1" else Permute(channels))
            add(_coupling(coupling, channels, hidden_channels=hidden_channels,
                          kernel_size=kernel_size, clamp=clamp,
                          context_channels=context_channels))
        if level < levels - 1:
            # The split itself takes the tuple state directly: it appends its latent.
            modules.append(Split(channels, learned_prior=learned_prior,
                                 hidden_channels=hidden_channels if learned_prior else None,
                                 kernel_size=kernel_size, clamp=clamp,
                                 context_channels=context_channels if learned_prior else 0))
            split_seen = True
            channels -= channels // 2
    return Sequential(*modules, memory_saving=memory_saving, anchor_every=anchor_every,
                      backward_chunk=backward_chunk)



def _coupling(kind: str, channels: int, *, hidden_channels: int, kernel_size: int,
              clamp: float, context_channels: int) -> InvertibleModule:
    options = {"hidden_channels": hidden_channels, "kernel_size": kernel_size,
               "context_channels": context_channels}
    if kind == "affine":
        return AffineCoupling(channels, clamp=clamp, **options)
    return (AdditiveCoupling if kind == "additive" else SplineCoupling)(channels, **options)
