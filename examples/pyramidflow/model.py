"""The PyramidFlow network (Sec. 3.3, Fig. 3e), assembled from autoflow's public primitives.

``images (B, 3, H, W) -> features (B, C, H, W) -> pyramid (x_0, ..., x_{L-1}) -> latents``:
a lifting 1×1 convolution (or a frozen ResNet-18 stem), a Laplacian pyramid and ``D`` stacks of
cross-scale couplings. Each stack transforms the even levels given their neighbours, then the
odd levels given theirs: an end level uses the scale-wise coupling (Fig. 3c), a middle level the
dual coupling (Fig. 3d); every coupling ends with a PLU 1×1 convolution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import autoflow

from .config import PyramidFlowConfig
from .resnet_stem import ResNet18Stem

__all__ = ["PyramidFlow", "pyramid_couplings"]


def pyramid_couplings(
    channels: int, levels: int, depth: int, *, kernel_size: int = 7,
    volume_norm: str | None = "channel",
) -> list[autoflow.InvertibleModule]:
    """The coupling blocks of PyramidFlow in the order of Fig. 3(e).

    Args:
        channels: Channels of every level.
        levels: Pyramid levels ``L >= 2``.
        depth: Number of stacks ``D``.
        kernel_size: Conditioner kernel size.
        volume_norm: ``"channel"``, ``"spatial"`` or ``None``.

    Returns:
        ``D * L`` couplings: per stack, levels ``0, 2, 4, ...`` then ``1, 3, 5, ...``.
    """
    blocks: list[autoflow.InvertibleModule] = []
    options = {"kernel_size": kernel_size, "volume_norm": volume_norm}
    for _ in range(depth):
        for first in (0, 1):
            for level in range(first, levels, 2):
                if 0 < level < levels - 1:
                    blocks.append(autoflow.DualPyramidCoupling(channels, target=level, **options))
                else:
                    source = 1 if level == 0 else levels - 2
                    blocks.append(autoflow.PyramidCoupling(
                        channels, target=level, source=source, **options))
    return blocks


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
        volume_norm = None if config.volume_norm == "none" else config.volume_norm
        self.pyramid = autoflow.LaplacianPyramid(config.levels, kind=config.pyramid)
        self.flow = autoflow.Sequential(
            front,
            self.pyramid,
            *pyramid_couplings(config.channels, config.levels, config.depth,
                               kernel_size=config.kernel_size, volume_norm=volume_norm),
            memory_saving=config.memory_saving,
        )
        # The latent template (mean training latent per level); set by set_template.
        self.template: tuple[Tensor, ...] | None = None

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Latent pyramid ``(z_0, ..., z_{L-1})`` of ``(B, 3, H, W)`` images in ``[0, 1]``."""
        latents, _ = self.flow(images)
        return latents

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
        return torch.fft.fft2(composed).abs().mean()

    @torch.no_grad()
    def set_template(self, latent_sums: tuple[Tensor, ...], count: int) -> None:
        """Store the latent template from per-level sums over ``count`` training images."""
        if self.config.template == "zero":
            self.template = tuple(torch.zeros_like(s[:1]) for s in latent_sums)
        else:
            self.template = tuple((s / count)[None] if s.dim() == 3 else s / count
                                  for s in latent_sums)

    def anomaly_map(self, latents: tuple[Tensor, ...], size: tuple[int, int]) -> Tensor:
        """Eq. 10: ``L_com({|z_d - z̄_d|})`` averaged over channels, at ``size``; ``(B, H, W)``.

        With ``config.localization == "compose"`` the latents and the template are composed
        first and differenced after (ablation III).
        """
        if self.template is None:
            raise RuntimeError("the model has no latent template yet: fit it first")
        template = tuple(t.to(z) for t, z in zip(self.template, latents))
        if self.config.localization == "compose":
            score = (self.compose(latents) - self.compose(template)).abs().mean(1, keepdim=True)
        else:
            score = self.compose(tuple((z - t).abs().mean(1, keepdim=True)
                                       for z, t in zip(latents, template)))
        if tuple(score.shape[-2:]) != tuple(size):  # the ResNet front works at 1/4 resolution
            score = nn.functional.interpolate(score, size=size, mode="bilinear",
                                              align_corners=False)
        return score[:, 0]

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
        image, _ = self.flow.inverse(self.template)
        return image[0]
