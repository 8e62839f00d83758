"""Hostile inputs to the PyramidFlow example: files, flags, run folders and diverging training.

Each case was once a silent wrong result, a lost or mixed run, or an unreadable error; these
tests keep it handled. Everything runs at 16 × 16 pixels with 4 channels and one or two epochs.
"""

from __future__ import annotations

import itertools
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.pyramidflow import PyramidFlow, train
from examples.pyramidflow.cli import main
from examples.pyramidflow.datasets import (
    EmptyMaskError,
    ImageFolder,
    ImageReadError,
    MaskMatchError,
)
from examples.pyramidflow.detector import Detector
from examples.pyramidflow.train import load_checkpoint, save_checkpoint

__all__: list[str] = []

SIZE = 16
TINY_FLAGS = ["--channels", "4", "--levels", "2", "--depth", "1", "--kernel-size", "3",
              "--image-size", str(SIZE), "--no-progress", "--quiet"]


def synthetic_run(out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "synthetic", "--kind", "texture", "--train-images", "6",
            "--out", str(out), "--no-evaluate", *TINY_FLAGS, *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_error(capsys, status: int) -> str:
    assert status == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    return error


def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit grayscale (H, W) or RGB (H, W, 3) PNG, written by hand: Pillow writes no 16-bit
    colour PNG."""
    height, width = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def rgb(seed: int, width: int = SIZE, height: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def defect_mask(value: int = 255, width: int = SIZE, height: int = SIZE) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[4:9, 3:7] = value
    return mask


def folder_dataset(root: Path, masks: dict[str, np.ndarray] | None = None) -> dict[str, Path]:
    """good/ (6 normal), test_good/ (1), defective/ and masks/ (one pair per entry of masks)."""
    dirs = {name: root / name for name in ("good", "test_good", "defective", "masks")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rgb(i)).save(dirs["good"] / f"{i}.png")
    Image.fromarray(rgb(10)).save(dirs["test_good"] / "n.png")
    for stem, mask in (masks if masks is not None else {"d": defect_mask()}).items():
        Image.fromarray(rgb(20)).save(dirs["defective"] / f"{stem}.png")
        Image.fromarray(mask).save(dirs["masks"] / f"{stem}.png")
    return dirs


def folder_flags(dirs: dict[str, Path]) -> list[str]:
    return ["--dataset", "folder", "--good", str(dirs["good"]), "--test-good",
            str(dirs["test_good"]), "--defective", str(dirs["defective"]), "--masks",
            str(dirs["masks"])]


# --- images as viewers show them ------------------------------------------------------------


def test_16_bit_grayscale_is_scaled_by_65535_not_clipped_to_white(tmp_path):
    values = np.linspace(20000, 39987, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    write_png16(tmp_path / "a.png", values)
    image = ImageFolder(tmp_path, image_size=SIZE)[0]["image"]
    expected = torch.from_numpy(values / 65535.0).float()
    for channel in image:
        torch.testing.assert_close(channel, expected, atol=1e-6, rtol=0)


def test_16_bit_colour_loads_at_8_bit_precision(tmp_path):
    values = np.stack([np.full((SIZE, SIZE), v, np.uint16) for v in (30000, 65535, 0)], 2)
    write_png16(tmp_path / "a.png", values)
    image = ImageFolder(tmp_path, image_size=SIZE)[0]["image"]
    assert np.allclose(image[:, 0, 0].numpy(), [30000 / 65535, 1.0, 0.0], atol=1 / 255)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "1"])
def test_grayscale_palette_rgba_and_bilevel_images_load_as_rgb(tmp_path, mode):
    source = Image.fromarray(rgb(3)).convert(mode)
    source.save(tmp_path / "a.png")
    image = ImageFolder(tmp_path, image_size=SIZE)[0]["image"]
    expected = np.asarray(source.convert("RGB"), dtype=np.float32) / 255  # alpha dropped
    assert image.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_exif_orientation_is_applied_to_images_and_masks_match_the_upright_image(tmp_path):
    stored = rgb(5, width=SIZE, height=SIZE // 2)  # stored 16 wide, 8 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    for folder in ("good", "bad"):
        (tmp_path / folder).mkdir()
        Image.fromarray(stored).save(tmp_path / folder / "a.png", exif=exif)
    (tmp_path / "masks").mkdir()
    upright_mask = defect_mask(width=SIZE // 2, height=SIZE)  # drawn on the displayed image
    Image.fromarray(upright_mask).save(tmp_path / "masks" / "a.png")
    dataset = ImageFolder(tmp_path / "good", tmp_path / "bad", tmp_path / "masks",
                          image_size=(SIZE, SIZE // 2))
    dataset.validate()
    sample = dataset[1]
    upright = np.rot90(stored, k=-1)  # clockwise
    np.testing.assert_allclose(sample["image"].permute(1, 2, 0).numpy(), upright / 255,
                               atol=1e-6)
    assert np.array_equal(sample["mask"][0].numpy(), upright_mask > 0)


# --- masks: every non-zero pixel is a defect ------------------------------------------------


@pytest.mark.parametrize("mask", [
    defect_mask(255), defect_mask(100), defect_mask(1),
    np.where(defect_mask() > 0, np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 110 + 10, 0)
    .astype(np.uint8),  # a soft map, 10 to 119
], ids=["0-255", "0-100", "0-1", "soft"])
def test_any_non_zero_mask_pixel_is_a_defect(tmp_path, mask):
    dirs = folder_dataset(tmp_path, {"d": mask})
    dataset = ImageFolder(dirs["test_good"], dirs["defective"], dirs["masks"], SIZE)
    assert np.array_equal(dataset[1]["mask"][0].numpy(), mask > 0)


def test_16_bit_rgba_palette_and_colour_masks(tmp_path):
    expected = defect_mask() > 0
    (tmp_path / "bad").mkdir()
    (tmp_path / "masks").mkdir()
    write_png16(tmp_path / "masks" / "m16.png", defect_mask().astype(np.uint16) * 3)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 0] = defect_mask()
    rgba[..., 3] = 255
    rgba[0, 0] = (200, 0, 0, 0)  # colour without opacity: nothing drawn
    Image.fromarray(rgba, "RGBA").save(tmp_path / "masks" / "rgba.png")
    Image.fromarray(defect_mask(3)).convert("P").save(tmp_path / "masks" / "pal.png")
    colour = np.zeros((SIZE, SIZE, 3), np.uint8)
    colour[..., 2] = defect_mask(40)  # dark blue defects
    Image.fromarray(colour).save(tmp_path / "masks" / "rgb.png")
    for stem in ("m16", "rgba", "pal", "rgb"):
        Image.fromarray(rgb(1)).save(tmp_path / "bad" / f"{stem}.png")
    dataset = ImageFolder(tmp_path / "bad", tmp_path / "bad", tmp_path / "masks", SIZE)
    dataset.records = [r for r in dataset.records if r.label == 1]
    for index in range(4):
        assert np.array_equal(dataset[index]["mask"][0].numpy(), expected), index


def test_a_defective_image_with_an_empty_mask_is_an_error_naming_the_file(tmp_path):
    dirs = folder_dataset(tmp_path, {"d": defect_mask(), "e": defect_mask(0)})
    dataset = ImageFolder(dirs["test_good"], dirs["defective"], dirs["masks"], SIZE)
    with pytest.raises(EmptyMaskError, match=r"mask .*e\.png of defective image .*e\.png"):
        dataset.validate()
    with pytest.raises(EmptyMaskError, match="marks no defect"):
        dataset[2]


def test_mask_size_mismatch_orphans_and_corrupt_masks_are_found_before_any_work(tmp_path):
    dirs = folder_dataset(tmp_path, {"d": defect_mask(width=SIZE + 2)})
    dataset = ImageFolder(dirs["test_good"], dirs["defective"], dirs["masks"], SIZE)
    with pytest.raises(MaskMatchError, match=r"is 18x16 .* is 16x16"):
        dataset.validate()
    (dirs["masks"] / "d.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="d.png"):
        dataset.validate()
    Image.fromarray(defect_mask()).save(dirs["masks"] / "orphan.png")
    with pytest.raises(MaskMatchError, match="orphan.png has no image"):
        ImageFolder(dirs["test_good"], dirs["defective"], dirs["masks"], SIZE)


def test_cli_checks_masks_before_writing_anything(tmp_path, capsys):
    dirs = folder_dataset(tmp_path / "data", {"d": defect_mask(width=SIZE + 2)})
    out = tmp_path / "run"
    error = one_line_error(capsys, main(["train", *folder_flags(dirs), "--out", str(out),
                                         *TINY_FLAGS]))
    assert "is 18x16" in error and not out.exists()


# --- devices and folders --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_missing_gpu_is_one_line_and_writes_nothing(tmp_path, capsys, command):
    out = tmp_path / "run"
    arguments = (synthetic_run(out) if command == "train"
                 else ["demo", "--out", str(out), *TINY_FLAGS])
    # Without CUDA any CUDA device is missing; with it, the 100th one is.
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    error = one_line_error(capsys, main([*arguments, "--device", device]))
    assert f"device '{device}' is not available" in error and not out.exists()


def test_a_malformed_device_is_one_line(tmp_path, capsys):
    error = one_line_error(capsys, main([*synthetic_run(tmp_path / "run"), "--device", "gpu0"]))
    assert "unknown device 'gpu0'" in error


def test_unwritable_checkpoint_folder_is_named_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    error = one_line_error(capsys, main(synthetic_run(out)))
    assert f"cannot write to the folder '{out / 'checkpoints'}'" in error
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_a_read_only_checkpoint_folder_is_named_before_training(tmp_path, capsys,
                                                                monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    write_bytes = Path.write_bytes

    def read_only(self, data):
        # As root, chmod does not stop writes: refuse them in checkpoints/ directly.
        if self.parent.name == "checkpoints":
            raise PermissionError(13, "Permission denied")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    error = one_line_error(capsys, main(synthetic_run(out)))
    assert f"cannot write to the folder '{out / 'checkpoints'}': Permission denied" in error
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints"]


def test_a_failing_checkpoint_write_names_the_file_and_leaves_no_partial(tmp_path, monkeypatch,
                                                                         tiny_config,
                                                                         normal_images):
    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed")

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(OSError, match=r"cannot write checkpoint '.*epoch-001\.pt'"):
        train(tiny_config(epochs=1), normal_images, checkpoint_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_an_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch,
                                                                 tiny_config, normal_images):
    path = tmp_path / "epoch-001.pt"
    result = train(tiny_config(epochs=1), normal_images, checkpoint_dir=tmp_path,
                   progress=False)
    before = path.read_bytes()
    real_save = torch.save

    def interrupted(state, target, *args, **kwargs):
        real_save(state, target)
        Path(target).write_bytes(Path(target).read_bytes()[:100])  # half written, then
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, result.model, epoch=1)
    assert path.read_bytes() == before


# --- run folders never lose or mix runs -----------------------------------------------------


def test_a_run_folder_holding_a_run_is_refused_and_left_untouched(tmp_path, capsys):
    assert main(synthetic_run(tmp_path, "--epochs", "2")) == 0
    before = snapshot(tmp_path)
    error = one_line_error(capsys, main(synthetic_run(tmp_path, "--epochs", "1",
                                                      "--channels", "8")))
    assert "already holds a run" in error and "--overwrite" in error and "--resume" in error
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_the_run_without_stale_checkpoints(tmp_path):
    assert main(synthetic_run(tmp_path, "--epochs", "2")) == 0
    (tmp_path / "notes.txt").write_text("mine")
    assert main(synthetic_run(tmp_path, "--epochs", "1", "--overwrite")) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-001.pt"]
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not a file of the run


def test_a_failing_train_leaves_no_config_in_a_fresh_folder(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, main(synthetic_run(out, "--batch-size", "99")))
    assert not out.exists()


def test_a_failing_train_never_touches_a_good_run(tmp_path, capsys, monkeypatch):
    assert main(synthetic_run(tmp_path, "--epochs", "1")) == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(PyramidFlow, "loss", lambda self, latents: torch.tensor(float("nan")))
    one_line_error(capsys, main(synthetic_run(tmp_path, "--epochs", "2", "--resume")))
    assert snapshot(tmp_path) == before
    assert main(["evaluate", str(tmp_path), "--dataset", "synthetic", "--kind", "texture",
                 "--test-images", "4", "--panels", "0", "--quiet"]
                ) == 0


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    error = one_line_error(capsys, main(synthetic_run(tmp_path, "--resume", "--overwrite")))
    assert "exclude each other" in error


def test_resume_refuses_another_architecture_and_another_runs_checkpoint(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(synthetic_run(first, "--epochs", "1")) == 0
    assert main(synthetic_run(second, "--epochs", "1", "--seed", "1")) == 0
    error = one_line_error(capsys, main(synthetic_run(first, "--epochs", "2", "--resume",
                                                      "--channels", "8")))
    assert "differs in channels: 4 -> 8" in error
    error = one_line_error(capsys, main(synthetic_run(
        second, "--epochs", "2", "--resume", str(first / "checkpoints" / "epoch-001.pt"))))
    assert "would mix two runs" in error


def test_resume_refuses_other_data(tmp_path, capsys):
    assert main(synthetic_run(tmp_path, "--epochs", "1")) == 0
    error = one_line_error(capsys, main([*synthetic_run(tmp_path, "--epochs", "2", "--resume"),
                                         "--data-seed", "3"]))
    assert "on other data (data_seed: 0 -> 3)" in error


def test_resume_takes_the_same_folders_spelled_differently(tmp_path):
    dirs = folder_dataset(tmp_path / "data")
    out = tmp_path / "run"
    flags = ["--out", str(out), "--no-evaluate", *TINY_FLAGS]
    assert main(["train", "--dataset", "folder", "--good", str(dirs["good"]), "--epochs", "1",
                 *flags]) == 0
    assert main(["train", "--dataset", "folder", "--good", f"{dirs['good']}/.", "--epochs",
                 "2", "--resume", *flags]) == 0


# --- checkpoints are never non-finite -------------------------------------------------------


def test_divergence_keeps_the_last_finite_checkpoint_and_resumes_with_a_lower_rate(
        tmp_path, capsys, monkeypatch):
    steps = itertools.count(1)
    step = torch.optim.Adam.step

    def overflowing(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if next(steps) == 3:  # epoch 2, step 1: the loss was finite, the update is not
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", overflowing)
    error = one_line_error(capsys, main(synthetic_run(tmp_path, "--epochs", "3")))
    assert "became non-finite at epoch 2/3, step 1/2" in error
    assert "epoch-001.pt" in error and "--learning-rate" in error
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-001.pt"]
    assert not (tmp_path / "config.json").exists()
    weights = load_checkpoint(tmp_path / "checkpoints" / "epoch-001.pt")["model"]
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    assert main(synthetic_run(tmp_path, "--epochs", "3", "--resume",
                              "--learning-rate", "1e-5")) == 0
    resumed = load_checkpoint(tmp_path / "checkpoints" / "epoch-002.pt")
    assert resumed["optimizer"]["param_groups"][0]["lr"] == 1e-5  # the new rate is used
    assert resumed["config"].learning_rate == 1e-5


def test_a_numerical_failure_names_the_epoch_and_step(tmp_path, monkeypatch, tiny_config,
                                                      normal_images):
    calls = itertools.count(1)
    loss = PyramidFlow.loss

    def failing(self, latents):
        if next(calls) == 3:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return loss(self, latents)

    monkeypatch.setattr(PyramidFlow, "loss", failing)
    with pytest.raises(RuntimeError, match=r"training failed at epoch 2/2, step 1/2: "
                                           r"linalg.svd.*lower config.learning_rate"):
        train(tiny_config(), normal_images, checkpoint_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-001.pt"]


def test_a_nan_loss_names_the_epoch_and_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PyramidFlow, "loss", lambda self, latents: torch.tensor(float("nan")))
    error = one_line_error(capsys, main(synthetic_run(tmp_path / "run", "--epochs", "1")))
    assert "loss is nan at epoch 1/1, step 1/2" in error and "no checkpoint was written" in error
    assert not (tmp_path / "run").exists()


def test_a_non_finite_model_is_never_saved(tmp_path, tiny_config):
    model = PyramidFlow(tiny_config())
    next(model.parameters()).data[0] = float("nan")
    with pytest.raises(FloatingPointError, match="holds NaN or infinite values"):
        save_checkpoint(tmp_path / "broken.pt", model, epoch=1)
    assert not list(tmp_path.iterdir())


# --- checkpoints that disagree with their config --------------------------------------------


def test_weights_that_disagree_with_their_config_name_the_tensor(tmp_path, capsys,
                                                                 tiny_config):
    path = save_checkpoint(tmp_path / "model.pt", PyramidFlow(tiny_config()), epoch=1)
    state = torch.load(path, weights_only=True)
    state["config"] = json.dumps(tiny_config(channels=8).to_dict())
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"does not match its own config: its tensor '.+' "
                                         r"has shape \(.*4.*\), the config's model has"):
        Detector.load(path)
    error = one_line_error(capsys, main(["predict", str(path), str(tmp_path), "--quiet"]))
    assert "does not match its own config" in error


def test_a_foreign_file_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"\x00" * 10)
    error = one_line_error(capsys, main(["predict", str(tmp_path), str(tmp_path), "--quiet"]))
    assert "not a readable PyramidFlow checkpoint" in error


@pytest.mark.parametrize("writer", ["results", "panel", "image"])
def test_an_interrupted_result_write_keeps_the_previous_file(tmp_path, monkeypatch, writer):
    from PIL import Image

    from examples.pyramidflow import write_results
    from examples.pyramidflow.visualize import save_image, save_panel

    image, heat = np.zeros((3, 8, 8)), np.zeros((8, 8))
    write = {
        "results": lambda: write_results({"a": {"pixel_auroc": 0.5}}, tmp_path)[0],
        "panel": lambda: save_panel(tmp_path / "panel.png", image, heat),
        "image": lambda: save_image(tmp_path / "image.png", image),
    }[writer]
    path = write()
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", interrupted)
    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(OSError, match=f"cannot write '{path}'"):
        write()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []
