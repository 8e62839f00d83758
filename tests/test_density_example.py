"""Smoke test of ``python -m examples.density``: both commands run end to end on tiny budgets."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from examples.density.__main__ import main  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    # The command sets torch's thread count for the whole process.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_digits_command_writes_samples_and_reports_bits_per_dim(tmp_path, capsys):
    main(["digits", "--steps", "3", "--levels", "2", "--depth", "1", "--hidden", "8",
          "--eval-draws", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "test bits/dim:" in out and "wall time" in out
    bpd = float(out.split("test bits/dim:")[1].split()[0])
    assert math.isfinite(bpd) and 0 < bpd < 10
    with Image.open(tmp_path / "digits_samples.png") as image:
        assert image.mode == "RGB" and image.size[0] > 8 * 8


def test_moons_command_writes_density_and_reports_nll(tmp_path, capsys):
    main(["moons", "--steps", "3", "--depth", "2", "--hidden", "8", "--train-size", "256",
          "--test-size", "128", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    nll = float(out.split("test NLL:")[1].split()[0])
    assert math.isfinite(nll)
    with Image.open(tmp_path / "moons_density.png") as image:
        assert image.size == (512, 512)
