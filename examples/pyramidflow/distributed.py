"""Multi-process training of PyramidFlow under ``torchrun``, on PyTorch's own distributed stack.

``torchrun --nproc-per-node N -m examples.pyramidflow train ...`` starts ``N`` processes; each
finds its place in the environment variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), joins the process group (gloo for the CPU,
nccl for CUDA devices: process ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``) and trains one
:class:`~torch.nn.parallel.DistributedDataParallel` replica. A run of ``N`` processes computes
what a single process computes with the same ``config.batch_size``, up to floating-point
rounding:

* ``config.batch_size`` is the *global* batch; each process gets ``batch_size / N`` images of
  it. :class:`GlobalBatchSampler` draws the global batches exactly as the single-process
  loader does (seeded by ``(seed, epoch)``) and gives process ``r`` the ``r``-th contiguous
  piece of each, so the pieces put together in rank order are the single-process batch.
* The loss (eq. 9) compares *all pairs* of a batch, across processes too:
  :func:`gather_batch` puts every process's latents together into the global batch before
  the loss. Each process keeps the graph of its own latents only (the others' enter as
  constants), so its gradient is the global loss's gradient through its own images; DDP
  averages over processes, so each process scales its loss by ``N`` before backward, and
  the all-reduced gradient is the gradient of the global batch's loss. (The other pairing,
  a loss over the pairs within each process, would drop the cross-process pairs and make
  the result depend on ``N``.) The loss itself, over all pairs, is computed on every process,
  so its cost does not shrink with ``N``; the flow's forward and backward passes are split.
* Volume normalisation centres log-scales with a *batch* mean, like batch normalisation:
  :class:`SyncVolumeNorm` takes that mean over the global batch (an all-reduce whose
  backward is an all-reduce, like :class:`~torch.nn.SyncBatchNorm`), so the running means
  and the gradients are those of the global batch too. It works inside the memory-saving
  engine, whose backward pass recomputes each coupling (the recomputation all-reduces again,
  in the same order on every process).
* Augmentation draws the choices of the whole global batch on every process and applies its
  own piece.

Only process 0 writes files; the template, spread, bank and thresholds are computed by every
process over the full training and held-out sets, so every process ends with the same
fitted model. Checks that can fail before training (:func:`together`) end every process
with one message, printed by process 0.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import autoflow

__all__ = [
    "ENVIRONMENT",
    "Distributed",
    "GlobalBatchSampler",
    "PeerError",
    "SyncVolumeNorm",
    "check_batch_size",
    "current",
    "epoch_seed",
    "from_environment",
    "gather_batch",
    "initialized",
    "setup",
    "stopped_every_process",
    "sync_volume_norms",
    "together",
    "unsync_volume_norms",
]

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""The variables ``torchrun`` sets for each process, read by :func:`from_environment`."""

_BACKENDS = ("gloo", "nccl")


class PeerError(RuntimeError):
    """Another process stopped: raised on the processes that did not fail themselves.

    ``quiet`` is True on every process but 0, which reports the failure for all of them.
    """

    def __init__(self, message: str, *, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class Distributed:
    """This process's place in a multi-process run.

    Attributes:
        rank: Global index of the process, ``0 .. world_size - 1``; process 0 writes files.
        world_size: Number of processes (at least 2).
        local_rank: Index of the process on its machine (its CUDA device).
    """

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and reports."""
        return self.rank == 0


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shuffling (and, plus one, of its augmentation)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def from_environment() -> Distributed | None:
    """This process's place from ``torchrun``'s variables, or None for a single process.

    No ``WORLD_SIZE`` (a plain ``python`` run) or ``WORLD_SIZE=1`` means a single process.

    Raises:
        ValueError: If the variables are incomplete or inconsistent, naming them.
    """
    if os.environ.get("WORLD_SIZE") is None:
        return None
    values = {}
    for name in ENVIRONMENT:
        text = os.environ.get(name)
        if text is None:
            raise ValueError(f"WORLD_SIZE is set but {name} is not: start the processes with "
                             "torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK")
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"{name} must be an integer, received {text!r}") from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, received {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, {world - 1}] for WORLD_SIZE={world}, "
                         f"received {rank}")
    if not 0 <= local <= rank:
        raise ValueError(f"LOCAL_RANK must be in [0, RANK={rank}], received {local}")
    return None if world == 1 else Distributed(rank, world, local)


def initialized() -> bool:
    """Whether this process belongs to an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def current() -> Distributed | None:
    """The running process group's view of this process, or None without one (or of size 1).

    ``LOCAL_RANK`` comes from the environment when set, else the rank.
    """
    if not initialized() or dist.get_world_size() < 2:
        return None
    rank = dist.get_rank()
    return Distributed(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def _device_for(where: Distributed, device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(
            f"--device {device} under torchrun would put every process on the same GPU: pass "
            "--device cuda, and process LOCAL_RANK uses cuda:LOCAL_RANK"
        )
    count = torch.cuda.device_count()
    if where.local_rank >= count:
        raise ValueError(
            f"process LOCAL_RANK={where.local_rank} needs cuda:{where.local_rank}, but this "
            f"machine has {count} CUDA device(s): start at most {count} processes per machine "
            f"(--nproc-per-node {count})"
        )
    return torch.device("cuda", where.local_rank)


def setup(device: str | torch.device = "cpu", backend: str | None = None
          ) -> tuple[Distributed | None, torch.device]:
    """Join the process group ``torchrun`` describes, if any; returns it and this process's device.

    Args:
        device: The device asked for: ``"cpu"``, or ``"cuda"`` (process ``LOCAL_RANK`` then
            uses ``cuda:LOCAL_RANK``).
        backend: ``"gloo"`` or ``"nccl"``; by default nccl for CUDA and gloo otherwise.

    Returns:
        ``(where, device)``: ``where`` is None for a single process, whose device is returned
        as given. A process group that is already initialised is used as it is.

    Raises:
        ValueError: On incomplete torchrun variables, an unknown backend, nccl without CUDA
            devices, or fewer GPUs than processes on this machine.
    """
    where = current() if initialized() else from_environment()
    if where is None:
        return None, torch.device(device)
    device = _device_for(where, device)
    chosen = backend or ("nccl" if device.type == "cuda" else "gloo")
    if chosen not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, received {chosen!r}")
    if chosen == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl backend needs CUDA devices: pass --device cuda (received "
                         f"--device {device}), or use --backend gloo")
    if not initialized():
        if chosen == "nccl" and not dist.is_nccl_available():
            raise ValueError("this build of torch has no nccl backend; use --backend gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=chosen)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"cannot join the process group (backend {chosen}, "
                             f"MASTER_ADDR={os.environ.get('MASTER_ADDR')!r}, MASTER_PORT="
                             f"{os.environ.get('MASTER_PORT')!r}): {error}") from error
    return where, device


def check_batch_size(batch_size: int, where: Distributed | None) -> int:
    """This process's share of the global ``batch_size``.

    Raises:
        ValueError: If the processes cannot share the batch evenly.
    """
    if where is None:
        return batch_size
    if batch_size % where.world_size:
        lower = batch_size - batch_size % where.world_size
        higher = lower + where.world_size
        suggestion = f"{lower} or {higher}" if lower >= 2 else f"{higher}"
        raise ValueError(
            f"config.batch_size={batch_size} is the global batch, split evenly over the "
            f"{where.world_size} processes (WORLD_SIZE={where.world_size}): it must be "
            f"divisible by {where.world_size}, e.g. --batch-size {suggestion}"
        )
    return batch_size // where.world_size


@contextlib.contextmanager
def together(where: Distributed | None) -> Iterator[None]:
    """Run a block on every process; if it fails on any, it fails on all.

    Every process enters the block; at its end the processes compare notes (one
    ``all_gather_object``). Process 0 raises its own error, or a :class:`PeerError` naming the
    first process that failed; every other process raises a quiet :class:`PeerError`. Only
    for blocks that every process reaches (checks, file writes), never around training steps,
    where a failed process leaves the others waiting in a collective.
    """
    if where is None:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 - shared with the other processes, then raised
        error = caught
    notes: list[str | None] = [None] * where.world_size
    dist.all_gather_object(notes, None if error is None else str(error))
    failed = [rank for rank, note in enumerate(notes) if note is not None]
    if not failed:
        return
    if where.is_main and error is not None:
        error.stopped_every_process = True  # type: ignore[attr-defined]
        raise error
    message = f"process {failed[0]} of {where.world_size} stopped: {notes[failed[0]]}"
    raise PeerError(message, quiet=not where.is_main) from error


def stopped_every_process(error: BaseException) -> bool:
    """Whether ``error`` came out of :func:`together`, so that every process stopped with it.

    After such an error the process group can be left in order
    (:func:`~torch.distributed.destroy_process_group`); after any other, other processes may
    be waiting in a collective, and leaving it could wait for them forever (nccl): exit
    instead, and ``torchrun`` stops the others.
    """
    return isinstance(error, PeerError) or getattr(error, "stopped_every_process", False)


class GlobalBatchSampler(DistributedSampler):
    """This process's piece of each global batch, the batches drawn as a single process does.

    Per epoch (:meth:`set_epoch`), the global batches are those of
    ``DataLoader(dataset, batch_size, shuffle=True, drop_last=True, generator=g)`` with ``g``
    seeded by :func:`epoch_seed` ``(seed, epoch)``: the single-process training loader. Process
    ``r`` gets the ``r``-th of ``world_size`` contiguous pieces of each, so the pieces in rank
    order are the single-process batch. (The stock :class:`DistributedSampler` shuffles with
    ``seed + epoch`` and deals indices out in turn, which gives other batches.)

    Use it with ``DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler)``.

    Args:
        dataset: The training images.
        batch_size: The global batch, divisible by ``world_size``.
        seed: The run's seed.
        num_replicas, rank: As for :class:`DistributedSampler` (default: the process group's).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, *,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        if batch_size % self.num_replicas:
            raise ValueError(f"batch_size={batch_size} is not divisible by the "
                             f"{self.num_replicas} processes")
        self.batch_size = batch_size
        self.local_batch = batch_size // self.num_replicas
        self.num_samples = len(dataset) // batch_size * self.local_batch  # type: ignore[arg-type]
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = DataLoader(range(len(self.dataset)), batch_size=self.batch_size,  # type: ignore[arg-type]
                           shuffle=True, drop_last=True, generator=generator)
        start = self.rank * self.local_batch
        for batch in order:
            yield from batch[start:start + self.local_batch].tolist()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every input is the sum of the outputs' gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


_MEAN_DIMS = {"channel": (0, 1), "spatial": (0, 2, 3)}


class SyncVolumeNorm(autoflow.VolumeNorm):
    """:class:`autoflow.VolumeNorm` whose training-mode batch mean spans every process.

    The mean over the global batch is the all-reduced sum of the processes' sums over the
    all-reduced count, and its gradient reaches every process's log-scales, as in
    :class:`~torch.nn.SyncBatchNorm`. Without a process group (or of size 1), and in eval
    mode, it is :class:`autoflow.VolumeNorm`. Every process must run it the same number of
    times in the same order (they all run the same model on equal pieces of a batch).
    """

    def forward(self, log_scale: Tensor, update: bool = True,
                rows: tuple[int, int, int] | None = None) -> Tensor:
        if not self.training or current() is None or log_scale.dim() != 4:
            return super().forward(log_scale, update, rows)  # or its error, by name
        _, c, _, w = log_scale.shape
        band, h = self.band_of(log_scale, rows)  # a band of rows: a coupling in bands
        shape = (1, 1, h, w) if self.mode == "channel" else (1, c, 1, 1)
        if self.running_mean.numel() == 0:
            self.running_mean = self.running_mean.new_zeros(shape)
        if tuple(self.running_mean.shape) != shape:
            return super().forward(log_scale, update, rows)  # its shape error, by name
        local = log_scale.sum(dim=_MEAN_DIMS[self.mode], keepdim=True)
        count = log_scale.numel() // local.numel()
        packed = torch.cat([local.flatten(), local.new_tensor([count])])
        total = _AllReduceSum.apply(packed)
        mean = (total[:-1] / total[-1]).view(local.shape)
        if update:
            with torch.no_grad():
                self.running_mean[:, :, band].mul_(1.0 - self.momentum).add_(
                    mean.detach().to(self.running_mean.dtype), alpha=self.momentum)
        return log_scale - mean


def _replace_norms(model: nn.Module, sync: bool) -> int:
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if sync and type(child) is autoflow.VolumeNorm:
                new: autoflow.VolumeNorm = SyncVolumeNorm(child.mode, momentum=child.momentum)
            elif not sync and isinstance(child, SyncVolumeNorm):
                new = autoflow.VolumeNorm(child.mode, momentum=child.momentum)
            else:
                continue
            new.running_mean = child.running_mean
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    return replaced


def sync_volume_norms(model: nn.Module) -> int:
    """Replace every :class:`autoflow.VolumeNorm` in ``model`` by a :class:`SyncVolumeNorm`.

    Returns:
        How many were replaced. The state dict is unchanged (same names, same tensors).
    """
    return _replace_norms(model, sync=True)


def unsync_volume_norms(model: nn.Module) -> int:
    """Undo :func:`sync_volume_norms`: plain :class:`autoflow.VolumeNorm` modules again."""
    return _replace_norms(model, sync=False)


def gather_batch(latent: Tensor, where: Distributed) -> Tensor:
    """The global batch of ``latent``: every process's piece, in rank order.

    This process's piece keeps its graph; the others are constants here (their processes
    differentiate them). Every process must pass a piece of the same shape.
    """
    pieces = [torch.empty_like(latent) for _ in range(where.world_size)]
    dist.all_gather(pieces, latent.detach().contiguous())
    pieces[where.rank] = latent
    return torch.cat(pieces)
