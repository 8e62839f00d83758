"""Training a PyramidFlow model, then calibrating its template and decision thresholds.

The recipe follows the paper (Sec. 3.3, 4.4) and its public code: Adam, gradient-norm
clipping, a fixed number of epochs (no model selection on test data), the Fourier loss (eq. 9)
over all pairs of a batch of normal images, and random flips and 90° rotations for textures.
After training, in eval mode:

* the latent template is the mean latent of the training images (eq. 10's ``z̄_d``), and the
  spread their per-level, per-channel standard deviation around it;
* a ``config.holdout`` fraction of the normal training images (at least one image), drawn by
  the seed and never trained on, sets the decision thresholds: the image threshold is the
  ``config.image_quantile`` quantile of their image scores (the maximum of each raw anomaly map),
  the pixel threshold the ``config.pixel_quantile`` quantile of all their pixel scores.

Training never writes a non-finite checkpoint: the loss is checked before each optimizer step
and every parameter and buffer after it, and the first NaN or infinity (or a numerical failure
such as an SVD that does not converge) stops training with its epoch and step named. The last
checkpoint written is then the last finite one: resume from it with a lower
``config.learning_rate`` (the optimiser settings may change on resume, the architecture not).

Every random choice follows ``config.seed``: the model's initialisation, the held-out split,
and per epoch the shuffling and the augmentation, each seeded by ``(seed, epoch)``. A run
resumed from an epoch's checkpoint therefore ends with exactly the weights of an uninterrupted
run.

Under ``torchrun`` (a process group of two or more processes is initialised, see
:mod:`.distributed`), :func:`train` trains a DistributedDataParallel replica per process:
``config.batch_size`` is the global batch, shared evenly, and the run computes what one process
computes with that batch (up to rounding); only process 0 writes checkpoints.

A checkpoint is one ``torch.save`` file of plain tensors, numbers, strings, lists and dicts
(loaded with ``weights_only=True``)::

    format      "pyramidflow-checkpoint"       version     2
    config      the config as a JSON string    epoch       epochs completed
    model       the model's state dict         optimizer   Adam's state dict, or None
    template    per-level latent template, or None until training ends
    spread      per-level, per-channel spread of the training latents, or None likewise
    bank        per-level training latents kept for score "nearest" (vectors) or
                "local_nearest" (whole states of config.bank_images images), or None
    thresholds  {"image": float, "pixel": float}, or None
    holdout     indices of the held-out images, or None
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import distributed
from .config import PyramidFlowConfig
from .distributed import Distributed, GlobalBatchSampler, gather_batch, together
from .files import write_atomically
from .inference import (
    ImageSource,
    as_dataset,
    latent_statistics,
    predictions,
    to_image_batch,
)
from .model import PyramidFlow

__all__ = [
    "CHECKPOINT_FORMAT",
    "Thresholds",
    "TrainingResult",
    "RESUMABLE_CHANGES",
    "augment",
    "calibrate",
    "check_device",
    "check_resume",
    "check_writable",
    "latest_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "split_holdout",
    "train",
    "training_split",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pyramidflow-checkpoint"
_CHECKPOINT_VERSION = 2
_CHECKPOINT_KEYS = ("format", "version", "config", "epoch", "model", "optimizer", "template",
                    "spread", "bank", "thresholds", "holdout")
RESUMABLE_CHANGES = ("epochs", "learning_rate", "betas", "eps", "weight_decay", "grad_clip")
"""Config fields that may differ from the checkpoint's when resuming: more epochs continue a
finished run, and the optimiser's settings may change (a lower learning rate after a
divergence). Every other field shapes the model, the data or the loss, and must match."""
_OPTIMIZER_SETTINGS = {"learning_rate": "lr", "betas": "betas", "eps": "eps",
                       "weight_decay": "weight_decay"}


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds calibrated on held-out normal images.

    Attributes:
        image: An image whose score (the maximum of its anomaly map) exceeds this is defective.
        pixel: A pixel whose anomaly score exceeds this is defective.
    """

    image: float
    pixel: float


@dataclass
class TrainingResult:
    """What :func:`train` produces.

    Attributes:
        model: The trained model in eval mode, its latent template set.
        thresholds: Held-out thresholds, or None when ``config.holdout`` is 0.
        train_indices: Dataset indices trained on (and averaged into the template).
        holdout_indices: Dataset indices held out for the thresholds.
        losses: Mean training loss of each epoch run by this call.
        checkpoint: Path of the final checkpoint, when a checkpoint folder was given.
    """

    model: PyramidFlow
    thresholds: Thresholds | None
    train_indices: list[int]
    holdout_indices: list[int]
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None


def split_holdout(num_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(num_images)`` into training and held-out indices, by the seed.

    Args:
        num_images: Number of normal training images.
        fraction: Share held out; any positive fraction holds out at least one image.
        seed: The run's seed.

    Returns:
        ``(train_indices, holdout_indices)``, each sorted.

    Raises:
        ValueError: If nothing would be left to train on.

    Example:
        >>> split_holdout(10, 0.2, seed=0)
        ([0, 2, 3, 4, 5, 6, 7, 8], [1, 9])
    """
    held = 0 if fraction == 0 else max(1, round(fraction * num_images))
    if held >= num_images:
        raise ValueError(f"holding out {held} of {num_images} images leaves none to train on; "
                         "provide more normal images or lower config.holdout")
    order = np.random.default_rng([seed, 1]).permutation(num_images)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def training_split(config: PyramidFlowConfig, num_images: int) -> tuple[list[int], list[int]]:
    """:func:`split_holdout` by the config, checking that a batch of images is left to train.

    Raises:
        ValueError: If the images left after the hold-out are fewer than a batch.
    """
    train_indices, holdout_indices = split_holdout(num_images, config.holdout, config.seed)
    if len(train_indices) < config.batch_size:
        raise ValueError(
            f"{len(train_indices)} training images (after holding out {len(holdout_indices)}) "
            f"are fewer than config.batch_size={config.batch_size}; provide more images"
        )
    return train_indices, holdout_indices


def check_device(device: str | torch.device) -> torch.device:
    """The device, checked to exist here, so a missing GPU fails in one line before any work.

    Raises:
        ValueError: For a malformed device string, or a CUDA or MPS device this machine or
            this build of torch does not have.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {str(device)!r}: {error}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = ("was built without CUDA" if torch.version.cuda is None
                     else "finds no CUDA GPU")
            raise ValueError(f"device {str(device)!r} is not available: this torch "
                             f"({torch.__version__}) {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: there are "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available on this machine; "
                         "use --device cpu")
    return device


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it.

    Returns:
        The folder.

    Raises:
        OSError: Naming the folder, if it cannot be created or written to.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Permission bits alone do not tell (root, ACLs, read-only mounts): try a write.
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to the folder '{folder}': "
                      f"{error.strerror or error}") from error
    return folder


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip horizontally, flip vertically and rotate by 90°, each with probability 0.5.

    Args:
        images: ``(B, C, S, S)`` square images.
        generator: Source of the random choices.

    Returns:
        The augmented images (same shape).
    """
    return _flip_and_rotate(images, torch.rand(len(images), 3, generator=generator) < 0.5)


def _flip_and_rotate(images: Tensor, choices: Tensor) -> Tensor:
    """:func:`augment` with its ``(B, 3)`` boolean choices given."""
    pick = choices.to(images.device)[:, :, None, None, None]
    images = torch.where(pick[:, 0], images.flip(-1), images)
    images = torch.where(pick[:, 1], images.flip(-2), images)
    return torch.where(pick[:, 2], images.rot90(1, (-2, -1)), images)


def train(
    config: PyramidFlowConfig,
    data: ImageSource,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> TrainingResult:
    """Train on normal images, then set the latent template and the held-out thresholds.

    Seeds torch's and NumPy's global generators with ``config.seed`` before building the model.

    Args:
        config: The run's settings.
        data: Normal training images: a dataset of samples, an ``(N, 3, H, W)`` tensor or a
            list of ``(3, H, W)`` tensors, floats in ``[0, 1]`` (resized to
            ``config.image_size`` with bilinear interpolation when their size differs).
        checkpoint_dir: Folder for ``epoch-NNN.pt`` checkpoints (one per epoch; the last one
            also gets the template and thresholds). None writes nothing.
        resume: A checkpoint of an earlier run on the same data and config (``epochs`` may be
            raised) to continue from.
        device: Where to train; under ``torchrun``, ``"cuda"`` means ``cuda:LOCAL_RANK``.
        num_workers: DataLoader worker processes.
        progress: Show tqdm progress bars for epochs and batches (on process 0 only).

    Returns:
        The trained model with its template, thresholds and split; under ``torchrun`` every
        process returns the same (``checkpoint`` names the file process 0 wrote).

    Raises:
        ValueError: On too few images for a batch after the hold-out, an unavailable
            device, a checkpoint to resume from that belongs to another architecture or
            data split (see :data:`RESUMABLE_CHANGES`), or under ``torchrun`` a
            ``config.batch_size`` not divisible by the number of processes.
        OSError: If ``checkpoint_dir`` cannot be written to (checked before the first epoch).
        FloatingPointError: If the loss, a parameter or a buffer becomes NaN or infinite
            (naming the epoch and step; no checkpoint is written from then on).
        RuntimeError: If a step fails numerically (e.g. an SVD that does not converge),
            naming the epoch and step.

    Example:
        >>> config = PyramidFlowConfig(channels=4, levels=2, depth=1, kernel_size=3,
        ...                            image_size=16, epochs=1, holdout=0.25)
        >>> result = train(config, torch.rand(8, 3, 16, 16), progress=False)
        >>> len(result.train_indices), len(result.holdout_indices), result.thresholds is None
        (6, 2, False)
    """
    device = check_device(device)
    where = distributed.current()
    if where is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", where.local_rank)
    local_batch = distributed.check_batch_size(config.batch_size, where)
    dataset = as_dataset(data, config.image_size)
    train_indices, holdout_indices = training_split(config, len(dataset))
    checkpoint = None if resume is None else check_resume(resume, config, holdout_indices)
    writes = where is None or where.is_main
    folder = None
    if checkpoint_dir is not None:
        with together(where):
            folder = check_writable(checkpoint_dir) if writes else Path(checkpoint_dir)
    torch.manual_seed(config.seed)
    # Our own draws use seeded generators; this covers datasets that draw from the global one.
    np.random.seed(config.seed)  # noqa: NPY002
    model = PyramidFlow(config).to(device)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
        betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
    )
    start = 0
    last_checkpoint: Path | None = None
    # Where a diverged run can restart from: the last checkpoint written, or the resumed one.
    finite_checkpoint: Path | None = None
    if checkpoint is not None:
        start = _resume(checkpoint, model, optimizer, config)
        finite_checkpoint = checkpoint["path"]

    train_set = Subset(dataset, train_indices)
    generator = torch.Generator()
    replica: torch.nn.Module = model
    if where is None:
        sampler = None
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                            drop_last=True, num_workers=num_workers, generator=generator)
    else:
        replica = _replicate(model, device)
        sampler = GlobalBatchSampler(train_set, config.batch_size, config.seed,
                                     num_replicas=where.world_size, rank=where.rank)
        loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler,
                            drop_last=True, num_workers=num_workers)
    progress = progress and writes
    losses: list[float] = []
    epochs = tqdm(range(start, config.epochs), desc="epochs", disable=not progress,
                  initial=start, total=config.epochs)
    for epoch in epochs:
        # Seeding by (seed, epoch) makes a resumed run repeat the uninterrupted one exactly.
        if sampler is None:
            generator.manual_seed(_epoch_seed(config.seed, epoch))
        else:
            sampler.set_epoch(epoch)
        augmenter = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch) + 1)
        loss = _train_epoch(model, optimizer, loader, augmenter, config, epoch, progress,
                            finite_checkpoint, replica=replica, where=where)
        losses.append(loss)
        epochs.set_postfix(loss=f"{loss:.4g}")
        logger.info("epoch %d/%d: mean loss %.5g", epoch + 1, config.epochs, loss)
        if folder is not None:
            last_checkpoint = folder / f"epoch-{epoch + 1:03d}.pt"
            with together(where):
                if writes:
                    save_checkpoint(last_checkpoint, model, epoch=epoch + 1,
                                    optimizer=optimizer, holdout=holdout_indices)
            finite_checkpoint = last_checkpoint

    if where is not None:
        distributed.unsync_volume_norms(model)
    # Every process computes the template and thresholds as a single process does, over the
    # full training and held-out sets: all of them end with the same fitted model.
    model.eval()
    model.set_template(latent_statistics(model, train_set, batch_size=config.batch_size,
                                         num_workers=num_workers))
    thresholds = None
    if holdout_indices:
        thresholds = calibrate(model, Subset(dataset, holdout_indices), num_workers=num_workers)
        logger.info("thresholds from %d held-out images: image %.5g, pixel %.5g",
                    len(holdout_indices), thresholds.image, thresholds.pixel)
    else:
        logger.warning("config.holdout is 0: no images held out, so no decision thresholds")
    if folder is not None:
        last_checkpoint = folder / f"epoch-{config.epochs:03d}.pt"
        with together(where):
            if writes:
                save_checkpoint(last_checkpoint, model, epoch=config.epochs,
                                optimizer=optimizer, thresholds=thresholds,
                                holdout=holdout_indices)
    return TrainingResult(model, thresholds, train_indices, holdout_indices, losses,
                          last_checkpoint)


_epoch_seed = distributed.epoch_seed


def _replicate(model: PyramidFlow, device: torch.device) -> torch.nn.Module:
    """The model as a DistributedDataParallel replica, its volume norms synchronised.

    Buffers are not broadcast from process 0 before each forward pass: the only ones that
    change, the volume norms' running means, are updated with the global batch mean on every
    process alike (:class:`~.distributed.SyncVolumeNorm`).
    """
    distributed.sync_volume_norms(model)
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers.
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else "broadcast_buffers")
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
               **{no_sync: False})


def _train_epoch(model: PyramidFlow, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 augmenter: torch.Generator, config: PyramidFlowConfig, epoch: int,
                 progress: bool, finite_checkpoint: Path | None, *,
                 replica: torch.nn.Module | None = None, where: Distributed | None = None,
                 ) -> float:
    """One pass over the training images; returns the mean loss (of the global batches).

    Under ``torchrun``, ``replica`` is the DDP wrapper of ``model`` and each process holds a
    piece of every global batch: the latents of all pieces are gathered into the global batch
    for the pairwise loss (see :mod:`.distributed`).

    Raises:
        FloatingPointError: At the first non-finite loss, parameter or buffer.
        RuntimeError: If a step fails, re-raised naming the epoch and step.
    """
    replica = model if replica is None else replica
    replica.train()
    device = next(model.parameters()).device
    total, steps = 0.0, len(loader)
    batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
    for step, batch in enumerate(batches):
        at = f"epoch {epoch + 1}/{config.epochs}, step {step + 1}/{steps}"
        images = to_image_batch(batch["image"], config.image_size).to(device)
        if config.augment and where is None:
            images = augment(images, augmenter)
        elif config.augment:
            # The choices of the whole global batch, as one process draws them; ours a piece.
            choices = torch.rand(config.batch_size, 3, generator=augmenter) < 0.5
            piece = len(images)
            images = _flip_and_rotate(images, choices[where.rank * piece:][:piece])
        try:
            latents = replica(images)
            if where is not None:
                latents = tuple(gather_batch(z, where) for z in latents)
            loss = model.loss(latents)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss is {loss.item()} at {at}; training stopped. "
                    f"Check the images for NaN, or {_lower_rate(config, finite_checkpoint)}"
                )
            optimizer.zero_grad(set_to_none=True)
            # This process differentiates the global loss through its own piece only; DDP
            # averages the processes' gradients, so N pieces times 1/N needs the factor N.
            (loss if where is None else loss * where.world_size).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
        except torch.linalg.LinAlgError as error:  # diverged weights, e.g. an SVD of NaNs
            raise RuntimeError(f"training failed at {at}: {error}; the weights have "
                               f"probably diverged: {_lower_rate(config, finite_checkpoint)}"
                               ) from error
        except RuntimeError as error:
            raise RuntimeError(f"training failed at {at}: {error}") from error
        # An overflowing update can leave the loss finite and the weights not: a checkpoint
        # of them would fail again when resumed.
        broken = _first_non_finite(model.state_dict())
        if broken is not None:
            raise FloatingPointError(
                f"{broken} became non-finite at {at} (the loss was {loss.item():.4g}); "
                f"training stopped. Check the images, or {_lower_rate(config, finite_checkpoint)}"
            )
        total += loss.item()
        batches.set_postfix(loss=f"{loss.item():.4g}")
    return total / steps


def _lower_rate(config: PyramidFlowConfig, finite_checkpoint: Path | None) -> str:
    """Advice after a divergence: resume from the last (finite) checkpoint with a lower rate."""
    if finite_checkpoint is None:
        return (f"lower config.learning_rate (now {config.learning_rate}) and start again; "
                "no checkpoint was written")
    return (f"lower config.learning_rate (now {config.learning_rate}) and resume from the "
            f"last finite checkpoint '{finite_checkpoint}' (CLI: --resume --learning-rate X)")


def _first_non_finite(tensors: Any, prefix: str = "") -> str | None:
    """Name of the first floating tensor in nested dicts and lists holding NaN or infinity."""
    named = list(_floating_tensors(tensors, prefix))
    # One device sync for all tensors; the per-tensor search runs only after a failure.
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return None
    return next(f"tensor '{name}'" for name, t in named if not bool(torch.isfinite(t).all()))


def _floating_tensors(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _floating_tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _floating_tensors(item, f"{name}.{index}" if name else str(index))
    elif isinstance(value, Tensor) and value.is_floating_point():
        yield name, value.detach()


def calibrate(model: PyramidFlow, holdout: ImageSource, *, num_workers: int = 0) -> Thresholds:
    """Decision thresholds from the anomaly maps of held-out normal images.

    Args:
        model: A trained model with its template.
        holdout: Normal images never trained on.
        num_workers: DataLoader worker processes.

    Returns:
        The ``config.image_quantile`` quantile of the image scores (map maxima) and the
        ``config.pixel_quantile`` quantile of all pixel scores.
    """
    config = model.config
    maps, scores = predictions(model, holdout, batch_size=config.batch_size,
                               num_workers=num_workers)
    maps, image_scores = maps.double().numpy(), scores.double().numpy()
    return Thresholds(image=float(np.quantile(image_scores, config.image_quantile)),
                      pixel=float(np.quantile(maps, config.pixel_quantile)))


def save_checkpoint(
    path: str | os.PathLike[str],
    model: PyramidFlow,
    *,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    thresholds: Thresholds | None = None,
    holdout: list[int] | None = None,
) -> Path:
    """Write a checkpoint (see the module docstring) atomically, creating its folder.

    The file is written aside and renamed over ``path``, so an interrupted save leaves the
    previous file (or none), never a truncated one.

    Returns:
        The checkpoint's path.

    Raises:
        FloatingPointError: If a weight, buffer or latent statistic is NaN or infinite
            (naming it); nothing is written.
        OSError: If the file cannot be written, naming it.
    """
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "epoch": int(epoch),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "template": None if model.template is None
        else [t.detach().cpu() for t in model.template],
        "spread": None if model.spread is None else [t.detach().cpu() for t in model.spread],
        "bank": None if model.bank is None else [t.detach().cpu() for t in model.bank],
        "thresholds": None if thresholds is None
        else {"image": thresholds.image, "pixel": thresholds.pixel},
        "holdout": None if holdout is None else [int(i) for i in holdout],
    }
    broken = _first_non_finite({key: state[key] for key in ("model", "template", "spread",
                                                            "bank")})
    if broken is not None:
        raise FloatingPointError(f"not writing checkpoint '{path}': its {broken} holds NaN or "
                                 "infinite values")
    try:
        write_atomically(path, lambda partial: torch.save(state, partial))
    except OSError as error:
        raise OSError(f"cannot write checkpoint '{path}': {error.__cause__ or error}") from error
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    Returns:
        The checkpoint's dict, with ``config`` parsed into a :class:`PyramidFlowConfig` and
        ``thresholds`` into :class:`Thresholds` (or None).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a PyramidFlow checkpoint of a known version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for foreign or corrupt files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"'{path}' is not a readable PyramidFlow checkpoint: {reason}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' is not a PyramidFlow checkpoint (expected a dict with "
                         f"format={CHECKPOINT_FORMAT!r})")
    if state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"'{path}' has checkpoint version {state.get('version')!r}; this code "
                         f"reads version {_CHECKPOINT_VERSION}")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint '{path}' lacks the entries {missing}")
    state = dict(state)
    values = json.loads(state["config"])
    # Checkpoints written before input_weight existed scored the latents alone.
    values.setdefault("input_weight", 0.0)
    # Those written before bank_images existed banked 32 images.
    values.setdefault("bank_images", 32)
    # And those written before map_normalization existed set thresholds on raw maps.
    values.setdefault("map_normalization", "none")
    state["config"] = PyramidFlowConfig.from_dict(values)
    if state["thresholds"] is not None:
        state["thresholds"] = Thresholds(**state["thresholds"])
    return state


def model_from_checkpoint(checkpoint: dict[str, Any], device: str | torch.device = "cpu", *,
                          source: str | os.PathLike[str] | None = None) -> PyramidFlow:
    """Rebuild the model of a loaded checkpoint, with its weights and template, in eval mode.

    Args:
        checkpoint: A dict of :func:`load_checkpoint`.
        device: Where the model goes.
        source: The checkpoint's path, named in errors.

    Raises:
        ValueError: If the weights do not fit the model of the stored config (naming the first
            tensor that differs).
    """
    model = PyramidFlow(checkpoint["config"])
    load_weights(model, checkpoint["model"], source)
    if checkpoint["template"] is not None:
        model.template = tuple(checkpoint["template"])
        model.spread = tuple(checkpoint["spread"])
        model.bank = None if checkpoint["bank"] is None else tuple(checkpoint["bank"])
    return model.to(device).eval()


def load_weights(model: PyramidFlow, weights: dict[str, Tensor],
                 source: str | os.PathLike[str] | None = None) -> None:
    """``model.load_state_dict(weights)``, failing in one line on the first tensor that differs.

    Raises:
        ValueError: Naming the first missing, unexpected or differently shaped tensor.
    """
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        where = "the checkpoint" if source is None else f"checkpoint '{source}'"
        mismatch = _first_mismatch(model, weights, error)
        raise ValueError(f"{where} does not match its own config: {mismatch} "
                         "(the weights come from a model with other settings, e.g. channels, "
                         "levels or depth)") from error


def _first_mismatch(model: PyramidFlow, weights: dict[str, Tensor], error: Exception) -> str:
    """The first tensor that ``load_state_dict`` refused, in the model's order, in words."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            return f"it lacks the tensor '{name}'"
        # Empty tensors are running statistics sized on load, not a mismatch.
        if tensor.numel() and tuple(weights[name].shape) != tuple(tensor.shape):
            return (f"its tensor '{name}' has shape {tuple(weights[name].shape)}, the config's "
                    f"model has {tuple(tensor.shape)}")
    unexpected = [name for name in weights if name not in expected]
    if unexpected:
        return (f"it has the tensor '{unexpected[0]}' ({len(unexpected)} unexpected in all), "
                "which the config's model lacks")
    return str(error).splitlines()[0]


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """The ``epoch-NNN.pt`` checkpoint with the most epochs in ``folder``.

    Raises:
        FileNotFoundError: If ``folder`` holds no such checkpoint.
    """
    found = sorted(Path(folder).glob("epoch-*.pt"))
    if not found:
        raise FileNotFoundError(f"no epoch-NNN.pt checkpoint in '{folder}' to resume from")
    return found[-1]


def check_resume(path: str | os.PathLike[str], config: PyramidFlowConfig,
                 holdout: list[int]) -> dict[str, Any]:
    """Load a checkpoint to resume from and check that it continues this run.

    Args:
        path: The checkpoint.
        config: The resumed run's config; only :data:`RESUMABLE_CHANGES` may differ from the
            checkpoint's.
        holdout: The resumed run's held-out indices (the same data gives the same ones).

    Returns:
        The loaded checkpoint.

    Raises:
        FileNotFoundError, ValueError: If the checkpoint is missing or unreadable, or belongs
            to another architecture, data split or a finished detector without optimizer state.
    """
    checkpoint = load_checkpoint(path)
    stored, current = checkpoint["config"].to_dict(), config.to_dict()
    changed = sorted(k for k in current
                     if stored[k] != current[k] and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {stored[k]!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"cannot resume from '{path}': its config differs in {details} "
                         f"(only {', '.join(RESUMABLE_CHANGES)} may change)")
    if checkpoint["holdout"] is not None and checkpoint["holdout"] != holdout:
        raise ValueError(f"cannot resume from '{path}': it held out other images "
                         "(a different dataset or size); resume on the same training data")
    if checkpoint["optimizer"] is None:
        raise ValueError(f"cannot resume from '{path}': it has no optimizer state (a saved "
                         "detector, not a training checkpoint)")
    if checkpoint["epoch"] > config.epochs:
        raise ValueError(f"cannot resume from '{path}': it has {checkpoint['epoch']} epochs, "
                         f"more than config.epochs={config.epochs}")
    checkpoint["path"] = Path(path)
    return checkpoint


def _resume(checkpoint: dict[str, Any], model: PyramidFlow, optimizer: torch.optim.Optimizer,
            config: PyramidFlowConfig) -> int:
    """Load a checked checkpoint's weights and optimizer state; returns its epoch."""
    load_weights(model, checkpoint["model"], checkpoint["path"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    # The stored state carries the old run's settings; the resumed run's config wins.
    for group in optimizer.param_groups:
        for field_name, key in _OPTIMIZER_SETTINGS.items():
            value = getattr(config, field_name)
            group[key] = tuple(value) if isinstance(value, list) else value
    logger.info("resuming from '%s' after epoch %d", checkpoint["path"], checkpoint["epoch"])
    return checkpoint["epoch"]
