"""Training as several processes: a real 2-process gloo run matches one process.

The processes are started with ``torch.multiprocessing`` and given the environment variables
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
each runs the command line as a ``torchrun`` worker does. The 2-process run (2 images per
process) trains one epoch, then resumes to two; a single process trains two epochs with the
same global batch of 4. Both use the memory-saving engine, volume normalisation (a batch
statistic) and augmentation.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from examples.pyramidflow import cli
from examples.pyramidflow.distributed import (
    ENVIRONMENT,
    Distributed,
    GlobalBatchSampler,
    check_batch_size,
    epoch_seed,
    from_environment,
    setup,
)
from examples.pyramidflow.train import load_checkpoint

__all__: list[str] = []

FLAGS = ["--dataset", "synthetic", "--kind", "texture", "--train-images", "12",
         "--test-images", "4", "--channels", "4", "--levels", "2", "--depth", "1",
         "--kernel-size", "3", "--image-size", "16", "--batch-size", "4", "--holdout", "0.25",
         "--augment", "--memory-saving", "--grad-clip", "1000", "--panels", "1",
         "--no-progress", "-q", "--threads", "1"]
"""A tiny run: 9 training images (2 global batches of 4 per epoch), 3 held out. The gradient
is not clipped (a clipped gradient would hide a gradient of the wrong scale)."""

# Audit events of everything that changes the file system (os.replace raises "os.rename").
_WRITING_EVENTS = ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate",
                   "shutil.rmtree", "shutil.move", "os.symlink", "os.link")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, ports: tuple[int, int], run: str, report: str) -> None:
    """One torchrun-like process: train 1 epoch, then resume to 2; note every write under run."""
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                       else bool(flags & _WRITE_FLAGS))
            paths = [path] if writing else []
        elif event in _WRITING_EVENTS:
            paths = list(args[:2])
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(run):
                writes.append(f"{event} {os.fsdecode(path)}")

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    sys.addaudithook(audit)
    codes = [cli.main(["train", *FLAGS, "--out", run, "--epochs", "1"])]
    os.environ["MASTER_PORT"] = str(ports[1])
    codes.append(cli.main(["train", *FLAGS, "--out", run, "--epochs", "2", "--resume"]))
    Path(report, f"rank{rank}.json").write_text(json.dumps({"codes": codes, "writes": writes}))


def _banded_worker(rank: int, port: int, run: str) -> None:
    """One process of a 1-epoch run whose couplings are evaluated in row bands."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cli.main(["train", *FLAGS, "--out", run, "--epochs", "1", "--band-rows", "5"]) != 0:
        raise RuntimeError(f"rank {rank}: the banded run failed")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _assert_close(first: dict, second: dict, what: str) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], rtol=1e-5, atol=1e-6), f"{what} {key}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """``(two_process_run, single_process_run, per-process reports)``."""
    saved = {name: os.environ.pop(name) for name in ENVIRONMENT if name in os.environ}
    root = tmp_path_factory.mktemp("distributed")
    try:
        two, one = root / "two", root / "one"
        mp.start_processes(_worker, args=((_free_port(), _free_port()), str(two), str(root)),
                           nprocs=2, start_method="spawn")
        assert cli.main(["train", *FLAGS, "--out", str(one), "--epochs", "2"]) == 0
    finally:
        os.environ.update(saved)
    reports = [json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return two, one, reports


def test_two_processes_train_what_one_process_trains(runs):
    two, one, reports = runs
    assert [report["codes"] for report in reports] == [[0, 0], [0, 0]]
    assert _files(two) == _files(one)
    # After one epoch (the first 2-process run's last checkpoint): weights and Adam's state.
    ours, theirs = (load_checkpoint(run / "checkpoints/epoch-001.pt") for run in (two, one))
    _assert_close(ours["model"], theirs["model"], "epoch 1: weight")
    for key, state in theirs["optimizer"]["state"].items():
        _assert_close(ours["optimizer"]["state"][key], state, f"epoch 1: Adam state {key}:")
    # After resuming to two epochs: everything, template and thresholds included.
    for name in ("checkpoints/epoch-002.pt", "model.pt"):
        ours, theirs = load_checkpoint(two / name), load_checkpoint(one / name)
        assert ours["epoch"] == theirs["epoch"] == 2 and ours["config"] == theirs["config"]
        assert ours["holdout"] == theirs["holdout"]
        _assert_close(ours["model"], theirs["model"], f"{name}: weight")
        for key in ("template", "spread", "bank"):
            _assert_close(dict(enumerate(ours[key])), dict(enumerate(theirs[key])),
                          f"{name}: {key}")
        assert ours["thresholds"].image == pytest.approx(theirs["thresholds"].image, rel=1e-5)
        assert ours["thresholds"].pixel == pytest.approx(theirs["thresholds"].pixel, rel=1e-5)


def test_only_process_zero_writes(runs):
    two, _, reports = runs
    assert reports[1]["writes"] == []
    written = " ".join(reports[0]["writes"])
    assert "epoch-001.pt" in written and "model.pt" in written and "results.json" in written


def test_the_sampler_gives_each_process_its_piece_of_the_single_process_batches():
    data = list(range(11))
    for world in (2, 4):
        samplers = [GlobalBatchSampler(data, 4, seed=3, num_replicas=world, rank=rank)
                    for rank in range(world)]
        for epoch in (0, 1, 5):
            generator = torch.Generator().manual_seed(epoch_seed(3, epoch))
            single = [b.tolist() for b in DataLoader(data, batch_size=4, shuffle=True,
                                                     drop_last=True, generator=generator)]
            for sampler in samplers:
                sampler.set_epoch(epoch)
            pieces = [list(sampler) for sampler in samplers]
            assert all(len(piece) == len(sampler) for piece, sampler in zip(pieces, samplers))
            share = 4 // world
            rebuilt = [[i for piece in pieces for i in piece[k * share:(k + 1) * share]]
                       for k in range(len(single))]
            assert rebuilt == single


def test_the_environment_is_read_and_checked(monkeypatch):
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == Distributed(rank=1, world_size=2, local_rank=1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, 1\] for WORLD_SIZE=2, "
                                         r"received 2"):
        from_environment()
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="WORLD_SIZE is set but RANK is not"):
        from_environment()


def test_clear_errors_before_any_process_group(monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"config.batch_size=5 is the global batch, split "
                                         r"evenly over the 2 processes .* divisible by 2, "
                                         r"e.g. --batch-size 4 or 6"):
        check_batch_size(5, Distributed(0, 2, 0))
    assert check_batch_size(6, Distributed(1, 2, 1)) == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"the nccl backend needs CUDA devices: pass --device "
                                         r"cuda \(received --device cpu\)"):
        setup("cpu", "nccl")
    if torch.cuda.device_count() < 2:
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(ValueError, match=r"LOCAL_RANK=1 needs cuda:1, but this machine has "
                                             r"\d CUDA device"):
            setup("cuda")
    with pytest.raises(ValueError, match=r"--device cuda:0 under torchrun would put every "
                                         r"process on the same GPU"):
        setup("cuda:0")
    assert cli.main(["predict", "run", "images"]) == 1
    assert "only the train command runs as several processes" in capsys.readouterr().err


def test_two_processes_in_row_bands_train_what_one_process_trains(runs, tmp_path):
    """Bands of 5 rows of 16: the couplings' volume norms exchange their means per band."""
    _, one, _ = runs
    saved = {name: os.environ.pop(name) for name in ENVIRONMENT if name in os.environ}
    try:
        mp.start_processes(_banded_worker, args=(_free_port(), str(tmp_path / "banded")),
                           nprocs=2, start_method="spawn")
    finally:
        os.environ.update(saved)
    ours = load_checkpoint(tmp_path / "banded/checkpoints/epoch-001.pt")
    theirs = load_checkpoint(one / "checkpoints/epoch-001.pt")
    assert ours["config"].band_rows == 5
    _assert_close(ours["model"], theirs["model"], "epoch 1, in bands: weight")
