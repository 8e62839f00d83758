"""Configuration of a PyramidFlow run: model, loss, localisation and training settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRESETS", "PyramidFlowConfig", "MVTEC_TEXTURES", "mvtec_defaults"]

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")

_CHOICES = {
    "volume_norm": ("channel", "spatial", "none"),
    "front": ("lifting", "resnet18"),
    "normalize": ("imagenet", "none"),
    "pyramid": ("gaussian", "maxpool", "blur_maxpool"),
    "resize": ("bilinear", "nearest"),
    "finest_condition_at": ("source", "target"),
    "clamp_kind": ("tanh", "atan"),
    "order": ("even_first", "odd_first"),
    "loss": ("fourier", "fourier_channels", "spatial"),
    "template": ("mean", "zero"),
    "score": ("difference", "standardized", "nearest", "local_nearest"),
    "localization": ("difference", "compose"),
    "map_normalization": ("none", "image_mean"),
}

PRESETS: dict[str, dict[str, Any]] = {
    # The architecture and recipe of the paper's public code (gasharper/PyramidFlow), point by
    # point; see docs/reproducing.rst for where each differs from this project's defaults.
    "paper-code": {
        "normalize": "imagenet",
        "train_lifting": False,
        "pyramid": "blur_maxpool",
        "resize": "nearest",
        "finest_condition_at": "target",
        "hidden_factor": 2,
        "conditioner_bias": False,
        "clamp_kind": "atan",
        "order": "odd_first",
        "loss": "fourier",
        "score": "difference",
        "input_weight": 0.0,
        "smoothing": 0.0,
        "test_time_flips": False,
        "map_normalization": "none",
    },
}
"""Named sets of settings, applied by :meth:`PyramidFlowConfig.from_preset`."""


@dataclass
class PyramidFlowConfig:
    """Every setting of a run; the defaults follow the paper and its public training recipe.

    Attributes:
        channels: Feature channels ``C`` after the lifting convolution (64 with ``resnet18``).
        levels: Pyramid levels ``L``.
        depth: Stacks ``D`` of pyramid couplings (Fig. 3e).
        kernel_size: Kernel of the conditioner convolutions.
        volume_norm: ``"channel"`` (CVN), ``"spatial"`` (SVN) or ``"none"``.
        front: ``"lifting"`` (the fully normalizing flow: a 3 -> C lifting 1×1 convolution) or
            ``"resnet18"`` (a frozen ResNet-18 stem at 1/4 resolution, 64 channels).
        resnet_weights: Local file with torchvision-format ResNet-18 weights (``resnet18`` only).
        normalize: ``"imagenet"`` standardises images with the ImageNet channel mean and std
            before the front (the public code), ``"none"`` feeds ``[0, 1]`` values.
        train_lifting: Train the lifting convolution; the public code keeps its orthogonal
            initialisation fixed (the loss has no log-det term, so a trained W can shrink).
        pyramid: Down/up operators of the Laplacian pyramid: ``"gaussian"``, ``"maxpool"`` or
            ``"blur_maxpool"`` (the public code's blur-then-max-pool and nearest-then-blur).
        resize: Interpolation between pyramid levels in the couplings, ``"bilinear"`` or
            ``"nearest"``.
        finest_condition_at: Where the coupling of level 0 (conditioned on level 1) runs its
            conditioner: ``"source"`` (at level 1's size, resizing s and t) or ``"target"``
            (resize level 1 up first and run it at level 0's size, as the public code does).
        hidden_factor: Conditioner width as a multiple of ``channels`` (the public code: 2).
        conditioner_bias: Give the conditioner convolutions a bias (the public code: no).
        clamp_kind: Soft clamp of the log-scale: ``"tanh"`` or ``"atan"`` (the public code).
        order: Couplings within a stack: ``"even_first"`` (levels 0, 2, ..., then 1, 3, ...)
            or ``"odd_first"`` (1, 3, ..., then 0, 2, ...; the public code).
        image_size: Images are resized to ``image_size × image_size``; must be divisible by
            ``2^(levels - 1)`` (times 4 with ``resnet18``).
        loss: ``"fourier"`` (eq. 9 as the public code computes it: mean ``|FFT2|`` of the
            channel mean of the composed squared differences), ``"fourier_channels"`` (mean
            ``|FFT2|`` of every channel) or ``"spatial"`` (their plain mean; ablation IV).
        template: ``"mean"`` (mean training latent) or ``"zero"`` (ablation II).
        score: ``"difference"`` (eq. 10, ``|z - z̄|``) or ``"standardized"``
            (``|z - z̄| / σ``, σ the per-level, per-channel standard deviation of the training
            latents, so every channel and level speaks in units of its normal spread) or
            ``"nearest"`` (the standardised distance to the nearest of 8192 training latent
            vectors per level, from any position: several templates instead of their mean) or
            ``"local_nearest"`` (the standardised distance to the nearest latent vector of
            the ``bank_images`` banked training images within ``search_radius`` positions of
            the same place: suits registered objects, whose parts move a little between
            images).
        search_radius: Positions searched around each place, per level, for
            ``score="local_nearest"``.
        bank_images: Training images, evenly spaced through the training set, whose whole
            scored states the ``local_nearest`` score keeps and searches (all of them when the
            set is smaller). Memory and scoring time grow in proportion (about 11 MiB per
            image at 256² with ``input_weight > 0``); 128 against 32 was chosen on two data
            seeds of the real photographs (``benchmarks/results/bank_size_seed*.md``):
            objects +.09 and +.05 AUPRO, textures +.003 and −.027.
        input_weight: Weight ``w`` in ``[0, 1]`` of the input pyramid's score in the anomaly
            map: each level's map is ``(1 - w)`` times the latents' score plus ``w`` times the
            same score of the pyramid the couplings start from, fitted the same way (0: the
            latents alone, as in the paper; 0.5 was chosen on the selection photographs,
            ``benchmarks/results/input_weight_selection.md``).
        localization: ``"difference"`` (eq. 10: per-level differences, then composition) or
            ``"compose"`` (compose first, then difference; ablation III).
        smoothing: Standard deviation in pixels of a Gaussian blur of the anomaly map (0: none,
            as in the public code).
        test_time_flips: Average the anomaly maps of the 8 flips and 90° rotations of each
            image (meant for textures, whose appearance has no orientation).
        map_normalization: ``"image_mean"`` divides each image's anomaly map by its own mean,
            so a pixel scores how far it stands out of its image, and one threshold serves
            images that differ as a whole (lighting, density of a texture); ``"none"`` keeps
            eq. 10's values (the public code). Image scores are the maximum of the map before
            it (:meth:`~examples.pyramidflow.PyramidFlow.localize`). Chosen on the
            selection photographs (``benchmarks/results/real_defects_seed0.md``).
        memory_saving: Train with the memory-saving engine.
        band_rows: Evaluate every coupling whose conditioner runs at its target's resolution
            in bands of at most this many rows (:attr:`autoflow.Coupling.band_rows`): the same
            results up to float rounding, without holding a whole level's conditioner
            activations, for one more evaluation of those conditioners in backward. For large
            images (1024² in 2 GB: ``benchmarks/results/pyramidflow_speed.md``); needs
            ``volume_norm`` ``"channel"`` or ``"none"``. ``None``: whole levels at once.
        epochs: Training epochs (fixed: no model selection on test data). 0 trains nothing
            and gives the untrained baseline: the template and thresholds of the initial
            model.
        batch_size: Images per step; the loss uses all pairs within a batch (at least 2).
        learning_rate, betas, eps, weight_decay: Adam settings.
        grad_clip: Gradient-norm clip.
        augment: Random flips and 90° rotations (texture categories only).
        holdout: Fraction of the normal training images held out to set decision thresholds.
        image_quantile: Quantile of held-out image scores used as the image threshold.
        pixel_quantile: Quantile of held-out pixel scores used as the pixel threshold.
        seed: Seed of every random choice of the run.
    """

    channels: int = 16
    levels: int = 4
    depth: int = 4
    kernel_size: int = 7
    volume_norm: str = "channel"
    front: str = "lifting"
    resnet_weights: str | None = None
    normalize: str = "imagenet"
    train_lifting: bool = False
    pyramid: str = "blur_maxpool"
    resize: str = "nearest"
    finest_condition_at: str = "target"
    hidden_factor: int = 2
    conditioner_bias: bool = False
    clamp_kind: str = "atan"
    order: str = "odd_first"
    image_size: int = 256
    loss: str = "fourier"
    template: str = "mean"
    score: str = "local_nearest"
    localization: str = "difference"
    search_radius: int = 1
    bank_images: int = 128
    input_weight: float = 0.5
    smoothing: float = 0.0
    test_time_flips: bool = False
    map_normalization: str = "image_mean"
    memory_saving: bool = True
    band_rows: int | None = None
    epochs: int = 15
    batch_size: int = 2
    learning_rate: float = 2e-4
    betas: tuple[float, float] = field(default=(0.5, 0.9))
    eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    augment: bool = False
    holdout: float = 0.1
    image_quantile: float = 0.99
    pixel_quantile: float = 0.999
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"config.{name} must be one of {allowed}, received {value!r}")
        for name in ("train_lifting", "conditioner_bias", "memory_saving", "augment",
                     "test_time_flips"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be a bool, received "
                                 f"{getattr(self, name)!r}")
        for name in ("channels", "levels", "depth", "kernel_size", "image_size", "epochs",
                     "batch_size", "hidden_factor", "search_radius", "bank_images"):
            value = getattr(self, name)
            least = 0 if name in ("epochs", "search_radius") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"config.{name} must be an int of at least {least}, "
                                 f"received {value!r}")
        if self.band_rows is not None:
            if (isinstance(self.band_rows, bool) or not isinstance(self.band_rows, int)
                    or self.band_rows < 1):
                raise ValueError(f"config.band_rows must be None or an int of at least 1, "
                                 f"received {self.band_rows!r}")
            if self.volume_norm == "spatial":
                raise ValueError("config.band_rows needs volume_norm 'channel' or 'none': the "
                                 "spatial mode averages over all rows, received 'spatial'")
        if self.levels < 2:
            raise ValueError(f"config.levels must be at least 2 for pyramid couplings, "
                             f"received {self.levels}")
        if self.batch_size < 2:
            raise ValueError("config.batch_size must be at least 2 (the loss compares pairs), "
                             f"received {self.batch_size}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"config.kernel_size must be odd, received {self.kernel_size}")
        divisor = 2 ** (self.levels - 1) * (4 if self.front == "resnet18" else 1)
        if self.image_size % divisor:
            raise ValueError(
                f"config.image_size must be divisible by {divisor} for {self.levels} levels "
                f"with the {self.front} front, received {self.image_size}"
            )
        if self.front == "resnet18":
            self.channels = 64
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"config.holdout must be in [0, 1), received {self.holdout}")
        self.betas = tuple(self.betas)  # JSON round trips give lists
        self._check_training()

    def _check_training(self) -> None:
        """Reject optimiser, threshold and seed settings that would fail or mislead mid-run."""

        def require(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"config.{name} must be {expected}, received "
                                 f"{getattr(self, name)!r}")

        def number(value: Any) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value))

        require(number(self.learning_rate) and self.learning_rate > 0, "learning_rate",
                "a positive number")
        require(len(self.betas) == 2 and all(number(b) and 0 <= b < 1 for b in self.betas),
                "betas", "two numbers in [0, 1)")
        require(number(self.eps) and self.eps > 0, "eps", "a positive number")
        require(number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                "a number of at least 0")
        require(number(self.grad_clip) and self.grad_clip > 0, "grad_clip",
                "a positive number")
        require(number(self.smoothing) and self.smoothing >= 0, "smoothing",
                "a number of at least 0")
        require(number(self.input_weight) and 0 <= self.input_weight <= 1, "input_weight",
                "a number in [0, 1]")
        if self.input_weight > 0 and self.localization == "compose":
            raise ValueError("config.input_weight must be 0 with localization='compose' (it "
                             f"mixes per-level maps), received {self.input_weight}")
        for name in ("image_quantile", "pixel_quantile"):
            value = getattr(self, name)
            require(number(value) and 0 <= value <= 1, name, "a quantile in [0, 1]")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool)
                and self.seed >= 0, "seed", "a non-negative int")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-compatible values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PyramidFlowConfig:
        """A config from a named preset (:data:`PRESETS`), with further settings on top.

        Example:
            >>> config = PyramidFlowConfig.from_preset("paper-code", epochs=10)
            >>> config.pyramid, config.train_lifting, config.epochs
            ('blur_maxpool', False, 10)
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets are {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name] | overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PyramidFlowConfig:
        """Build a config from :meth:`to_dict` output, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def mvtec_defaults(category: str) -> dict[str, Any]:
    """Per-category MVTec AD settings: the paper's public recipe and this project's texture score.

    From the public recipe: SVN for carpet, grid, bottle and transistor, CVN otherwise; 8
    levels for metal_nut, carpet and transistor, 2 for screw, 4 otherwise; augmentation for
    texture categories only. From this project's measurements: textures search no
    neighbouring positions (``search_radius=0``) with the default ``local_nearest`` score,
    since a texture is not registered and what lies one position away in a training image is
    no better a match than what lies at the same place (see ``docs/reproducing.rst``).

    Example:
        >>> mvtec_defaults("carpet")
        {'volume_norm': 'spatial', 'levels': 8, 'augment': True, 'search_radius': 0}
        >>> mvtec_defaults("bottle")
        {'volume_norm': 'spatial', 'levels': 4, 'augment': False}
    """
    texture = category in MVTEC_TEXTURES
    return {
        "volume_norm": "spatial" if category in ("carpet", "grid", "bottle", "transistor")
        else "channel",
        "levels": 8 if category in ("metal_nut", "carpet", "transistor")
        else 2 if category == "screw" else 4,
        "augment": texture,
    } | ({"search_radius": 0} if texture else {})
