"""The PyramidFlow network (Sec. 3.3, Fig. 3e), assembled from autoflow's public primitives.

``images (B, 3, H, W) -> features (B, C, H, W) -> pyramid (x_0, ..., x_{L-1}) -> latents``:
a lifting 1×1 convolution (or a frozen ResNet-18 stem), a Laplacian pyramid and ``D`` stacks of
cross-scale couplings. Each stack transforms the even levels given their neighbours, then the
odd levels given theirs: an end level uses the scale-wise coupling (Fig. 3c), a middle level the
dual coupling (Fig. 3d); every coupling ends with a PLU 1×1 convolution.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import autoflow

from .config import PyramidFlowConfig
from .resnet_stem import ResNet18Stem

__all__ = ["BANK_SIZE", "LatentStatistics", "PyramidFlow", "gaussian_blur",
           "pyramid_couplings"]

_IMAGE_STATISTICS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


BANK_SIZE = 8192
"""Training latent vectors kept per level for ``score="nearest"``."""


class LatentStatistics(NamedTuple):
    """Per-level sums of training latents and of their squares, over ``count`` images.

    The levels are those of :meth:`PyramidFlow.scored_states`: the latents, then the input
    pyramid's levels when ``config.input_weight > 0``.

    Attributes:
        sums: Level ``d``: ``(C, H_d, W_d)`` sum of the latents (float64).
        square_sums: Level ``d``: ``(C, H_d, W_d)`` sum of the squared latents (float64).
        count: Number of images summed.
        bank: Training latents kept for a nearest-neighbour score, or None. Level ``d``:
            ``(K_d, C)`` vectors from random positions of the training images for
            ``score="nearest"``; ``(N, C, H_d, W_d)`` latents of ``N`` whole training images
            for ``score="local_nearest"``.
    """

    sums: tuple[Tensor, ...]
    square_sums: tuple[Tensor, ...]
    count: int
    bank: tuple[Tensor, ...] | None = None


def pyramid_couplings(
    channels: int, levels: int, depth: int, *, kernel_size: int = 7,
    volume_norm: str | None = "channel", order: str = "even_first",
    finest_condition_at: str = "source", **options: Any,
) -> list[autoflow.InvertibleModule]:
    """The coupling blocks of PyramidFlow in the order of Fig. 3(e).

    Args:
        channels: Channels of every level.
        levels: Pyramid levels ``L >= 2``.
        depth: Number of stacks ``D``.
        kernel_size: Conditioner kernel size.
        volume_norm: ``"channel"``, ``"spatial"`` or ``None``.
        order: ``"even_first"`` (per stack, levels ``0, 2, 4, ...`` then ``1, 3, 5, ...``) or
            ``"odd_first"`` (``1, 3, ...`` then ``0, 2, ...``, the public code's order).
        finest_condition_at: ``condition_at`` of the level-0 coupling (see
            :class:`autoflow.PyramidCoupling`); the coarsest level's coupling always runs its
            conditioner at its source's (finer) size.
        options: Further coupling arguments (``hidden_channels``, ``resize``, ``bias``,
            ``clamp_kind``).

    Returns:
        ``D * L`` couplings, one per level and stack.

    Example:
        >>> blocks = pyramid_couplings(2, 4, 1, kernel_size=3, order="odd_first")
        >>> [block.target for block in blocks]
        [1, 3, 0, 2]
    """
    if order not in ("even_first", "odd_first"):
        raise ValueError(f"order must be 'even_first' or 'odd_first', received {order!r}")
    parities = (0, 1) if order == "even_first" else (1, 0)
    blocks: list[autoflow.InvertibleModule] = []
    options |= {"kernel_size": kernel_size, "volume_norm": volume_norm}
    for _ in range(depth):
        for first in parities:
            for level in range(first, levels, 2):
                if 0 < level < levels - 1:
                    blocks.append(autoflow.DualPyramidCoupling(channels, target=level, **options))
                elif level == 0:
                    blocks.append(autoflow.PyramidCoupling(
                        channels, target=0, source=1, condition_at=finest_condition_at,
                        **options))
                else:
                    blocks.append(autoflow.PyramidCoupling(
                        channels, target=level, source=levels - 2, **options))
    return blocks


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Blur ``(B, 1, H, W)`` maps with a Gaussian of ``sigma`` pixels (reflect padding).

    The kernel spans ``±3 sigma`` (clipped to the map size) and is applied as two 1-D passes.

    Example:
        >>> gaussian_blur(torch.ones(1, 1, 8, 8), 2.0).allclose(torch.ones(1, 1, 8, 8))
        True
    """
    radius = min(math.ceil(3 * sigma), maps.shape[-2] - 1, maps.shape[-1] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    padded = nn.functional.pad(maps, (radius, radius, radius, radius), mode="reflect")
    rows = nn.functional.conv2d(padded, taps.view(1, 1, -1, 1))
    return nn.functional.conv2d(rows, taps.view(1, 1, 1, -1))


def _nearest_distance(z: Tensor, bank: Tensor, spread: Tensor, chunk: int = 8192) -> Tensor:
    """``(B, 1, H, W)``: distance of every latent vector of ``z`` to its nearest bank vector.

    Channels are divided by ``spread`` ``(1, C, 1, 1)`` first; distances are Euclidean over
    ``sqrt(C)``, the scale of a per-channel difference like eq. 10's.
    """
    b, c, h, w = z.shape
    scale = spread.view(1, c)
    queries = (z.permute(0, 2, 3, 1).reshape(-1, c)) / scale
    keys = bank / scale
    found = torch.cat([torch.cdist(part, keys).min(dim=1).values
                       for part in queries.split(chunk)])
    return (found / math.sqrt(c)).view(b, h, w)[:, None]


def _local_nearest_distance(z: Tensor, gallery: Tensor, spread: Tensor, radius: int,
                            tile_bytes: int = 2**22) -> Tensor:
    """``(B, 1, H, W)``: distance of every latent vector to the closest one nearby in training.

    ``d(p) = min_{n, |δ|_∞ <= r} ‖(z(p) - g_n(p + δ)) / σ‖ / sqrt(C)`` over the ``N`` gallery
    latents ``g_n`` ``(N, C, H, W)`` and the shifts ``δ`` within ``radius`` positions (the
    gallery's border is repeated beyond the edge); ``σ`` is ``spread`` ``(1, C, 1, 1)``.
    Registered objects vary a little in position between images, so each position is
    compared with its neighbourhood in every training image rather than with one mean.
    The search runs over bands of rows whose ``(B, N, rows, W)`` working array takes about
    ``tile_bytes``, so that the passes over it stay in the processor's cache (in one band when
    traced or compiled for export).
    """
    b, c, h, w = z.shape
    queries = z / spread
    keys = nn.functional.pad(gallery / spread, (radius,) * 4, mode="replicate")
    key_norms = keys.square().sum(1)  # (N, H + 2r, W + 2r)
    best = torch.full((b, h, w), math.inf, dtype=z.dtype, device=z.device)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        # One band in an exported graph: it would hold every band's operations, and the band
        # height would depend on the batch size, which an export keeps symbolic.
        rows = h
    else:
        rows = max(1, tile_bytes // (b * gallery.shape[0] * w * z.element_size()))
    work = z.new_empty((b, gallery.shape[0], min(rows, h), w))
    for top in range(0, h, rows):
        bottom = min(top + rows, h)
        partial, near = work[:, :, :bottom - top], best[:, top:bottom]  # views, written
        for dy in range(2 * radius + 1):
            for dx in range(2 * radius + 1):
                shifted = keys[..., top + dy:bottom + dy, dx:dx + w]  # (N, C, rows, W)
                # ‖q - k‖² = ‖q‖² + (‖k‖² - 2 q·k): the bracket, whose minimum over the bank
                # is the nearest key's, accumulated one channel at a time in place: no
                # (B, N, C, H, W) intermediate, 10× faster than an einsum (H·W tiny matrix
                # products), and no pass over the working array the search can do without.
                partial.copy_(key_norms[None, :, top + dy:bottom + dy, dx:dx + w]
                              .expand_as(partial))
                for channel in range(c):
                    partial.addcmul_(queries[:, channel, None, top:bottom],
                                     shifted[None, :, channel], value=-2.0)
                near.copy_(torch.minimum(near, partial.amin(1)))
    squared = best + queries.square().sum(1)
    return (squared.clamp_min(0) / c).sqrt()[:, None]


class PyramidFlow(nn.Module):
    """The PyramidFlow model: images to latent pyramids, anomaly maps and image templates.

    Args:
        config: The run's settings (channels, levels, depth, kernel, volume norm, front...).

    Example:
        >>> model = PyramidFlow(PyramidFlowConfig(channels=4, levels=2, depth=1,
        ...                                       kernel_size=3, image_size=8))
        >>> latents = model(torch.rand(2, 3, 8, 8))
        >>> [tuple(z.shape) for z in latents]
        [(2, 4, 8, 8), (2, 4, 4, 4)]
    """

    def __init__(self, config: PyramidFlowConfig) -> None:
        super().__init__()
        self.config = config
        if config.front == "lifting":
            front: nn.Module = autoflow.LiftingConv1x1(config.channels, in_channels=3)
        else:
            if config.resnet_weights is None:
                raise ValueError("front='resnet18' needs config.resnet_weights, a local file "
                                 "with torchvision ResNet-18 weights")
            front = ResNet18Stem(config.resnet_weights)
        if not config.train_lifting:
            front.requires_grad_(False)
        volume_norm = None if config.volume_norm == "none" else config.volume_norm
        self.pyramid = autoflow.LaplacianPyramid(config.levels, kind=config.pyramid)
        self.flow = autoflow.Sequential(
            front,
            self.pyramid,
            *pyramid_couplings(
                config.channels, config.levels, config.depth, kernel_size=config.kernel_size,
                volume_norm=volume_norm, order=config.order,
                finest_condition_at=config.finest_condition_at,
                hidden_channels=config.hidden_factor * config.channels,
                resize=config.resize, bias=config.conditioner_bias,
                clamp_kind=config.clamp_kind),
            memory_saving=config.memory_saving,
        )
        for block in self.flow:
            if isinstance(block, autoflow.Coupling):
                block.band_rows = config.band_rows
        # The ResNet-18 stem standardises its input itself.
        mean, std = _IMAGE_STATISTICS["none" if config.front == "resnet18" else config.normalize]
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # The latent template (mean training latent per level) and the per-level, per-channel
        # spread of the training latents around it; set by set_template.
        self.template: tuple[Tensor, ...] | None = None
        self.spread: tuple[Tensor, ...] | None = None
        self.bank: tuple[Tensor, ...] | None = None

    def _normalized(self, images: Tensor) -> Tensor:
        # On the CPU the images enter channels-last: the convolutions then run faster and
        # their backward needs less scratch memory (benchmarks/results/pyramidflow_speed.md).
        if images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        return (images - self.image_mean) / self.image_std

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Latent pyramid ``(z_0, ..., z_{L-1})`` of ``(B, 3, H, W)`` images in ``[0, 1]``.

        On the CPU the latents come out channels-last.
        """
        latents, _ = self.flow(self._normalized(images))
        return latents

    def input_pyramid(self, images: Tensor) -> tuple[Tensor, ...]:
        """The pyramid ``(x_0, ..., x_{L-1})`` the couplings start from (features, eq. 1)."""
        levels, _ = self.flow[:2](self._normalized(images))  # the front, then the pyramid
        return levels

    def scored_states(self, images: Tensor) -> tuple[Tensor, ...]:
        """What :meth:`anomaly_map` scores: the latents, followed by the input pyramid when
        ``config.input_weight > 0`` (``L`` or ``2L`` tensors).

        Both come from one run: the couplings continue from the input pyramid.
        """
        if self.config.input_weight == 0:
            return self(images)
        levels = self.input_pyramid(images)
        latents, _ = self.flow[2:](levels)
        return latents + levels

    def compose(self, levels: tuple[Tensor, ...]) -> Tensor:
        """Pyramid composition (eq. 2) of per-level maps with any channel count."""
        composed, _ = self.pyramid.inverse(levels)
        return composed

    def loss(self, latents: tuple[Tensor, ...]) -> Tensor:
        """Eq. 9 over all pairs ``i < j``: ``mean |FFT2(L_com({(z_d(i) - z_d(j))^2}))|``.

        With ``config.loss == "spatial"`` the composed differences are averaged directly.
        """
        batch = latents[0].shape[0]
        first, second = torch.triu_indices(batch, batch, offset=1, device=latents[0].device)
        differences = tuple((z[first] - z[second]).square() for z in latents)
        composed = self.compose(differences)
        if self.config.loss == "spatial":
            return composed.mean()
        if self.config.loss == "fourier":
            composed = composed.mean(1)
        return torch.fft.fft2(composed).abs().mean()

    @torch.no_grad()
    def set_template(self, stats: LatentStatistics) -> None:
        """Store the latent template and spread from statistics of the training latents."""
        mean = tuple(s / stats.count for s in stats.sums)
        variance = tuple((q / stats.count - m.square()).mean(dim=(1, 2), keepdim=True)
                         for q, m in zip(stats.square_sums, mean))
        if self.config.template == "zero":
            mean = tuple(torch.zeros_like(m) for m in mean)
        dtype = self.image_mean.dtype
        self.template = tuple(m[None].to(dtype) for m in mean)
        # A floor keeps a channel that never varied in training from dividing by zero.
        self.spread = tuple(v.clamp_min(1e-12).sqrt()[None].to(dtype) for v in variance)
        self.bank = None if stats.bank is None else tuple(b.to(dtype) for b in stats.bank)

    def anomaly_map(self, states: tuple[Tensor, ...], size: tuple[int, int]) -> Tensor:
        """Eq. 10: ``L_com({|z_d - z̄_d|})`` averaged over channels, at ``size``; ``(B, H, W)``.

        ``states`` is what :meth:`scored_states` returns. With ``config.input_weight = w > 0``
        it also holds the input pyramid, scored in the same way against its own template, and
        each level's map is ``(1 - w) · map(z_d) + w · map(x_d)``: the flow's latents and the
        plain multi-scale features it started from, which a trained flow can lose
        (``docs/reproducing.rst``).

        With ``config.score == "standardized"`` each difference is divided by its level's and
        channel's spread first; with ``"nearest"`` a level's score is the distance of each
        latent vector to the nearest vector of the training bank (both divided by the spread,
        Euclidean distance over ``sqrt(C)``), whatever position it came from; with
        ``"local_nearest"`` the same distance to the nearest latent vector of the banked
        training images within ``config.search_radius`` positions of the same place. With
        ``config.smoothing > 0`` the map is blurred with a Gaussian of that many pixels at the
        end. With ``config.localization == "compose"``
        the latents and the template are composed first and differenced after (ablation III).
        """
        if self.template is None or self.spread is None:
            raise RuntimeError("the model has no latent template yet: fit it first")
        levels, weight = self.config.levels, self.config.input_weight
        expected = levels if weight == 0 else 2 * levels
        if len(states) != expected or len(self.template) != expected:
            raise RuntimeError(
                f"config.input_weight={weight} scores {expected} tensors (the latents"
                f"{'' if weight == 0 else ' and the input pyramid'}), received {len(states)} "
                f"states and a template of {len(self.template)}: take the states from "
                "scored_states and refit the template after changing input_weight")
        template = tuple(t.to(z) for t, z in zip(self.template, states))
        if self.config.localization == "compose":
            score = (self.compose(states) - self.compose(template)).abs().mean(1, keepdim=True)
        else:
            if self.config.score in ("nearest", "local_nearest"):
                maps = self._nearest_scores(states)
            else:
                differences = [(z - t).abs() for z, t in zip(states, template)]
                if self.config.score == "standardized":
                    differences = [d / s.to(d) for d, s in zip(differences, self.spread)]
                maps = [d.mean(1, keepdim=True) for d in differences]
            if weight > 0:
                maps = [(1 - weight) * z + weight * x for z, x in zip(maps[:levels], maps[levels:])]
            score = self.compose(tuple(maps))
        if tuple(score.shape[-2:]) != tuple(size):  # the ResNet front works at 1/4 resolution
            score = nn.functional.interpolate(score, size=size, mode="bilinear",
                                              align_corners=False)
        if self.config.smoothing > 0:
            score = gaussian_blur(score, self.config.smoothing)
        return score[:, 0]

    def localize(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        """Pixel maps and image scores from anomaly maps ``(B, H, W)`` of :meth:`anomaly_map`.

        The image score is each map's maximum. With ``config.map_normalization ==
        "image_mean"`` the pixel map is then divided by its own mean, ``a / mean(a)``: how
        far a pixel stands out of its image rather than of the training images, which puts
        images that differ from the training set as a whole (another lighting, a denser
        patch of texture) on one scale for one threshold. The image score stays the raw
        maximum, which such a difference is evidence for.

        Returns:
            ``(maps (B, H, W), scores (B,))``.
        """
        scores = maps.amax(dim=(-2, -1))
        if self.config.map_normalization == "image_mean":
            mean = maps.mean(dim=(-2, -1), keepdim=True)
            maps = maps / mean.clamp_min(torch.finfo(maps.dtype).tiny)
        return maps, scores

    def _nearest_scores(self, states: tuple[Tensor, ...]) -> list[Tensor]:
        """Per-level ``(B, 1, H_d, W_d)`` maps of the ``nearest`` or ``local_nearest`` score."""
        local = self.config.score == "local_nearest"
        if self.bank is None or self.spread is None or any(
                (b.dim() == 4) != local for b in self.bank):
            raise RuntimeError(f"score={self.config.score!r} needs a bank of training latents "
                               f"of its kind: set the template with config.score="
                               f"{self.config.score!r} (refit the model)")
        if local:
            return [_local_nearest_distance(z, b.to(z), s.to(z), self.config.search_radius)
                    for z, b, s in zip(states, self.bank, self.spread)]
        return [_nearest_distance(z, b.to(z), s.to(z))
                for z, b, s in zip(states, self.bank, self.spread)]

    @torch.no_grad()
    def image_template(self) -> Tensor:
        """Fig. 7: invert the latent template to features, then least squares for the image.

        Returns:
            A ``(3, H, W)`` image (values may leave ``[0, 1]`` slightly; clip to display).
        """
        if self.template is None:
            raise RuntimeError("the model has no latent template yet: fit it first")
        if self.config.front != "lifting":
            raise ValueError("an image template needs the invertible lifting front; the "
                             "ResNet-18 stem has no inverse")
        features, _ = self.flow.inverse(self.template[:self.config.levels])
        return (features * self.image_std + self.image_mean)[0]
