"""Tests of the PyramidFlow example's datasets on tiny fixture trees and the synthetic set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from examples.pyramidflow.datasets import (
    BTAD,
    ImageFolder,
    ImageReadError,
    MaskMatchError,
    MVTecAD,
)
from examples.pyramidflow.metrics import pixel_auroc
from examples.pyramidflow.synthetic import (
    DEFECT_CYCLE,
    DEFECT_KINDS,
    MIN_VISIBLE_CHANGE,
    SyntheticDefects,
)

__all__: list[str] = []

WIDTH, HEIGHT = 12, 10


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    """A small random image in ``mode``; the content depends only on the file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(path.name.encode()))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(2) if channels == 1 else pixels, mode).save(path)
    return path


def write_mask(
    path: Path, top: int = 2, left: int = 3, size: tuple[int, int] = (WIDTH, HEIGHT)
) -> np.ndarray:
    """A 0/255 mask with a 4x5 defect rectangle; returns the rectangle as bool."""
    path.parent.mkdir(parents=True, exist_ok=True)
    defect = np.zeros((size[1], size[0]), dtype=bool)
    defect[top : top + 4, left : left + 5] = True
    Image.fromarray(defect.astype(np.uint8) * 255).save(path)
    return defect


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    bottle = tmp_path / "bottle"
    write_image(bottle / "train/good/001.png")
    write_image(bottle / "train/good/000.png", "L")
    write_image(bottle / "train/good/002.png", "RGBA")
    (bottle / "train/good/notes.txt").write_text("not an image")
    write_image(bottle / "test/good/000.png")
    for stem in ("001", "000"):
        write_image(bottle / f"test/broken/{stem}.png")
        write_mask(bottle / f"ground_truth/broken/{stem}_mask.png", top=int(stem) * 4)
    write_image(bottle / "test/crack/000.png")
    write_mask(bottle / "ground_truth/crack/000_mask.png")
    (tmp_path / "cable").mkdir()
    return tmp_path


@pytest.fixture
def btad(tmp_path: Path) -> Path:
    product = tmp_path / "01"
    write_image(product / "train/ok/b.png")
    write_image(product / "train/ok/a.bmp")
    write_image(product / "test/ok/c.bmp")
    write_image(product / "test/ko/e.jpg")
    write_image(product / "test/ko/d.bmp")
    write_mask(product / "ground_truth/ko/d.png")
    write_mask(product / "ground_truth/ko/e.bmp", top=5)
    return tmp_path


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    write_image(tmp_path / "ok/p2.png")
    write_image(tmp_path / "ok/p1.png")
    write_image(tmp_path / "ng/x.png")
    write_image(tmp_path / "ng/y.png")
    write_mask(tmp_path / "masks/x.png")
    write_mask(tmp_path / "masks/y_mask.png", top=6)
    return tmp_path


def names(dataset) -> list[str]:
    return ["/".join(Path(record.image).parts[-2:]) for record in dataset.records]


def test_mvtec_train_split_is_sorted_rgb_and_normal(mvtec):
    dataset = MVTecAD(mvtec, "bottle", "train", image_size=8)
    assert names(dataset) == ["good/000.png", "good/001.png", "good/002.png"]
    for sample in dataset:
        assert sample["image"].shape == (3, 8, 8) and sample["image"].dtype == torch.float32
        assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
        assert sample["mask"].shape == (1, 8, 8) and not sample["mask"].any()
        assert sample["label"] == 0
    gray = dataset[0]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_images_resize_bilinear_and_drop_alpha(mvtec):
    path = mvtec / "bottle/train/good/002.png"
    sample = MVTecAD(mvtec, "bottle", "train", image_size=(5, 7))[2]
    expected = Image.open(path).convert("RGB").resize((7, 5), Image.Resampling.BILINEAR)
    assert sample["path"] == str(path)
    np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy() * 255, expected)


def test_mvtec_test_split_labels_and_masks_by_stem(mvtec):
    dataset = MVTecAD(mvtec, "bottle", "test", image_size=(HEIGHT, WIDTH))
    assert names(dataset) == ["broken/000.png", "broken/001.png", "crack/000.png", "good/000.png"]
    assert dataset.labels == [1, 1, 1, 0]
    assert [sample["label"] for sample in dataset] == [1, 1, 1, 0]
    for top, index in ((0, 0), (4, 1)):
        expected = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
        expected[top : top + 4, 3:8] = 1.0
        np.testing.assert_array_equal(dataset[index]["mask"][0].numpy(), expected)
    assert not dataset[3]["mask"].any()


def test_masks_resize_nearest_and_stay_binary(mvtec):
    mask_path = mvtec / "bottle/ground_truth/crack/000_mask.png"
    grey_edge = np.asarray(Image.open(mask_path)).copy()
    grey_edge[2:6, 2] = 100  # anti-aliased edge below half range: normal
    grey_edge[2:6, 8] = 200  # above half range: defect
    Image.fromarray(grey_edge).save(mask_path)
    mask = MVTecAD(mvtec, "bottle", "test", image_size=(7, 5))[2]["mask"]
    binary = Image.fromarray((grey_edge > 127).astype(np.uint8))
    expected = np.asarray(binary.resize((5, 7), Image.Resampling.NEAREST), dtype=np.float32)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(mask[0].numpy(), expected)


@pytest.mark.parametrize("mode", ["01", "palette"])
def test_label_image_masks(mvtec, mode):
    mask_path = mvtec / "bottle/ground_truth/crack/000_mask.png"
    defect = np.asarray(Image.open(mask_path)) > 0
    mask = Image.fromarray(defect.astype(np.uint8))
    if mode == "palette":
        mask = mask.convert("P")
    mask.save(mask_path)
    loaded = MVTecAD(mvtec, "bottle", "test", image_size=(HEIGHT, WIDTH))[2]["mask"]
    np.testing.assert_array_equal(loaded[0].numpy(), defect)


def test_batches_collate_to_the_same_keys(mvtec):
    batch = next(iter(DataLoader(MVTecAD(mvtec, "bottle", "test", 8), batch_size=4)))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["mask"].shape == (4, 1, 8, 8)
    assert batch["label"].tolist() == [1, 1, 1, 0] and len(batch["path"]) == 4


def test_missing_paths_are_named(mvtec):
    with pytest.raises(FileNotFoundError, match=r"MVTec AD root .*nowhere does not exist"):
        MVTecAD(mvtec / "nowhere", "bottle")
    with pytest.raises(FileNotFoundError, match=r"category .*bottel does not exist.*bottle, cable"):
        MVTecAD(mvtec, "bottel")
    with pytest.raises(FileNotFoundError, match=r"training folder .*cable.train.good"):
        MVTecAD(mvtec, "cable")


def test_empty_split_names_folder_and_extensions(mvtec):
    for image in (mvtec / "bottle/test/good").iterdir():
        image.unlink()
    with pytest.raises(FileNotFoundError, match=r"no images with extensions .*'\.png'.* in .*good"):
        MVTecAD(mvtec, "bottle", "test")


def test_defective_image_without_mask(mvtec):
    (mvtec / "bottle/ground_truth/broken/001_mask.png").unlink()
    with pytest.raises(
        MaskMatchError, match=r"image .*001\.png has no mask: looked for '001_mask' .* in .*broken"
    ):
        MVTecAD(mvtec, "bottle", "test")


def test_mask_without_image(mvtec):
    write_mask(mvtec / "bottle/ground_truth/broken/007_mask.png")
    with pytest.raises(MaskMatchError, match=r"mask .*007_mask\.png has no image: .* '007'"):
        MVTecAD(mvtec, "bottle", "test")


def test_ground_truth_folder_without_images(mvtec):
    write_mask(mvtec / "bottle/ground_truth/scratch/000_mask.png")
    with pytest.raises(MaskMatchError, match=r"ground-truth folder .*scratch has no images"):
        MVTecAD(mvtec, "bottle", "test")


def test_defect_folder_without_ground_truth(mvtec):
    write_image(mvtec / "bottle/test/scratch/000.png")
    with pytest.raises(FileNotFoundError, match=r"ground-truth folder for .*scratch"):
        MVTecAD(mvtec, "bottle", "test")


def test_corrupt_image_is_named_when_read(mvtec):
    corrupt = mvtec / "bottle/train/good/001.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    dataset = MVTecAD(mvtec, "bottle", "train")
    dataset[0]
    with pytest.raises(ImageReadError, match=r"cannot decode image file .*001\.png"):
        dataset[1]


def test_mask_size_must_match_image_size(mvtec):
    write_mask(mvtec / "bottle/ground_truth/crack/000_mask.png", size=(WIDTH + 2, HEIGHT))
    dataset = MVTecAD(mvtec, "bottle", "test")
    with pytest.raises(
        MaskMatchError, match=r"mask .*000_mask\.png is 14x10 .* image .*crack.000\.png is 12x10"
    ):
        dataset[2]


@pytest.mark.parametrize("image_size", [0, -3, (8,), (8, 0), "256", True, (8.0, 8)])
def test_bad_image_size(mvtec, image_size):
    with pytest.raises(ValueError, match=r"image_size must be .*, got"):
        MVTecAD(mvtec, "bottle", image_size=image_size)


def test_bad_split(mvtec):
    with pytest.raises(ValueError, match=r"split must be 'train' or 'test', got 'val'"):
        MVTecAD(mvtec, "bottle", "val")


def test_btad_layout(btad):
    train = BTAD(btad, "01", "train", image_size=8)
    assert names(train) == ["ok/a.bmp", "ok/b.png"] and train.labels == [0, 0]
    test = BTAD(btad, 1, "test", image_size=(HEIGHT, WIDTH))
    assert names(test) == ["ko/d.bmp", "ko/e.jpg", "ok/c.bmp"] and test.labels == [1, 1, 0]
    assert [Path(r.mask).name for r in test.records[:2]] == ["d.png", "e.bmp"]
    assert test[1]["mask"][0, 5:9, 3:8].all() and test[1]["mask"].sum() == 20
    assert not test[2]["mask"].any()


def test_btad_rejects_unknown_product(btad):
    with pytest.raises(ValueError, match=r"product must be one of \('01', '02', '03'\), got '04'"):
        BTAD(btad, "04")
    with pytest.raises(FileNotFoundError, match=r"BTAD product .*02 does not exist.*contains: 01"):
        BTAD(btad, "02")


def test_image_folder_matches_both_mask_names(folders):
    dataset = ImageFolder(folders / "ok", folders / "ng", folders / "masks", image_size=8)
    assert names(dataset) == ["ok/p1.png", "ok/p2.png", "ng/x.png", "ng/y.png"]
    assert dataset.labels == [0, 0, 1, 1] and dataset.has_masks
    assert [Path(r.mask).name for r in dataset.records[2:]] == ["x.png", "y_mask.png"]
    assert all(dataset[i]["mask"].any() for i in (2, 3))


def test_image_folder_without_masks(folders):
    train = ImageFolder(folders / "ok")
    assert train.labels == [0, 0] and train.has_masks
    test = ImageFolder(folders / "ok", folders / "ng")
    assert test.labels == [0, 0, 1, 1] and not test.has_masks
    assert not test[2]["mask"].any()


def test_image_folder_ambiguous_masks(folders):
    write_mask(folders / "masks/x_mask.png")
    with pytest.raises(
        MaskMatchError, match=r"image .*x\.png matches 2 masks, expected one: .*x\.png and .*x_mask"
    ):
        ImageFolder(folders / "ok", folders / "ng", folders / "masks")


def test_image_folder_masks_sharing_a_stem(folders):
    write_mask(folders / "masks/x.bmp")
    with pytest.raises(MaskMatchError, match=r"masks .*x\.bmp and .*x\.png share a stem"):
        ImageFolder(folders / "ok", folders / "ng", folders / "masks")


def test_image_folder_argument_errors(folders):
    with pytest.raises(ValueError, match=r"mask_dir .*masks was given without defective_dir"):
        ImageFolder(folders / "ok", mask_dir=folders / "masks")
    with pytest.raises(FileNotFoundError, match=r"defective_dir .*nope does not exist"):
        ImageFolder(folders / "ok", folders / "nope")
    with pytest.raises(FileNotFoundError, match=r"good_dir .*p1\.png is not a folder"):
        ImageFolder(folders / "ok/p1.png")


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_synthetic_is_deterministic(kind):
    first = SyntheticDefects(kind, "test", num_images=6, seed=3)
    second = SyntheticDefects(kind, "test", num_images=6, seed=3)
    for index in (5, 0, 3):
        a, b = first[index], second[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["image"], first[index]["image"]) and a["path"] == b["path"]
    other_seed = SyntheticDefects(kind, "test", num_images=6, seed=4)[0]["image"]
    train = SyntheticDefects(kind, "train", num_images=6, seed=3)[0]["image"]
    assert not torch.equal(other_seed, first[0]["image"])
    assert not torch.equal(train, first[0]["image"])


@pytest.mark.parametrize("kind", ["texture", "object"])
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_masks_are_exact(kind, seed):
    dataset = SyntheticDefects(kind, "test", num_images=20, image_size=(48, 64), seed=seed)
    for index in range(len(dataset)):
        rendering, sample = dataset.render(index), dataset[index]
        change = np.abs(rendering.image - rendering.normal).max(axis=0)
        np.testing.assert_array_equal(change > 0, rendering.mask)
        assert rendering.mask.sum() == 0 or change[rendering.mask].min() >= MIN_VISIBLE_CHANGE
        assert np.array_equal(sample["image"].numpy(), rendering.image)
        assert np.array_equal(sample["mask"][0].numpy(), rendering.mask)
        assert sample["label"] == int(rendering.mask.any()) == int(rendering.defect is not None)
        assert sample["image"].shape == (3, 48, 64) and sample["image"].dtype == torch.float32
        assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_synthetic_splits_and_defect_kinds(kind):
    test = SyntheticDefects(kind, "test", num_images=20)
    assert test.labels == [index % 2 for index in range(20)]
    assert [sample["label"] for sample in test] == test.labels
    renderings = [test.render(index) for index in range(1, 20, 2)]
    assert {r.defect for r in renderings} == set(DEFECT_KINDS)
    # Every other defect is a misprint, the kind that shows whether training worked.
    assert [r.defect for r in renderings] == [DEFECT_CYCLE[i % 8] for i in range(10)]
    assert DEFECT_CYCLE[1::2] == ("misprint",) * 4
    for rendering in renderings:
        # Visible, sizeable, and not one flat colour a model could key on.
        assert rendering.mask.sum() >= 4
        assert rendering.image[:, rendering.mask].std(axis=1).max() > 0.005
    train = SyntheticDefects(kind, "train", num_images=10)
    assert train.labels == [0] * 10 and not any(sample["mask"].any() for sample in train)
    assert test[5]["path"] == f"synthetic/{kind}/seed0/test/stain/0005"


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_synthetic_misprint_puts_the_right_colours_in_the_wrong_place(kind):
    test = SyntheticDefects(kind, "test", num_images=20, seed=1)
    for index in (3, 19):
        rendering = test.render(index)
        assert rendering.defect == "misprint" and rendering.mask.sum() >= 4
        # The misprinted pixels take colours that the normal image has elsewhere.
        low = rendering.normal.min(axis=(1, 2)) - 0.1
        high = rendering.normal.max(axis=(1, 2)) + 0.1
        inside = rendering.image[:, rendering.mask]
        assert ((inside >= low[:, None]) & (inside <= high[:, None])).all()


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_synthetic_normals_vary_in_pose_and_light(kind):
    train = SyntheticDefects(kind, "train", num_images=16)
    images = np.stack([train.render(i).image for i in range(16)])
    # Every shot is lit differently: the overall brightness varies by several percent.
    assert images.mean(axis=(1, 2, 3)).std() > 0.02
    # Light falls off across each image (about 10% on average from one side to the other).
    halves = images[..., :32].mean(axis=(1, 2, 3)) - images[..., 32:].mean(axis=(1, 2, 3))
    assert np.abs(halves).mean() > 0.005
    if kind == "object":
        # The part moves: its brightness-weighted centre wanders by a pixel or more.
        weights = images.mean(axis=1)
        columns = (weights * np.arange(64)).sum(axis=(1, 2)) / weights.sum(axis=(1, 2))
        assert columns.std() > 0.3


@pytest.mark.parametrize(("kind", "limit"), [("texture", 0.8), ("object", 0.85)])
def test_synthetic_defects_are_not_found_by_the_mean_image(kind, limit):
    # The demo must show that training matters, so comparing an image with the mean normal
    # image must not localise the defects already. Pixel AUROC of |image - mean|: 0.97 and
    # 0.97 on the old data, 0.87 and 0.89 with its stark defects on the new variation,
    # 0.66 and 0.80 with every defect kind equally often, 0.65 and 0.82 now (half misprints).
    train = SyntheticDefects(kind, "train", num_images=32)
    test = SyntheticDefects(kind, "test", num_images=40)
    mean = np.stack([train.render(i).image for i in range(32)]).mean(axis=0)
    renderings = [test.render(i) for i in range(40)]
    maps = np.stack([np.abs(r.image - mean).mean(axis=0) for r in renderings])
    assert pixel_auroc(maps, np.stack([r.mask for r in renderings])) < limit


@pytest.mark.parametrize("kind", ["texture", "object"])
def test_synthetic_normals_share_one_appearance(kind):
    def mean_colour(split: str) -> np.ndarray:
        dataset = SyntheticDefects(kind, split, num_images=16)
        return np.mean([dataset.render(i).normal.mean(axis=(1, 2)) for i in range(16)], axis=0)

    np.testing.assert_allclose(mean_colour("train"), mean_colour("test"), atol=0.03)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"kind must be one of \('texture', 'object'\), got 'x'"):
        SyntheticDefects("x")
    with pytest.raises(ValueError, match=r"split must be one of .*, got 'val'"):
        SyntheticDefects(split="val")
    with pytest.raises(ValueError, match=r"num_images must be a positive int, got 0"):
        SyntheticDefects(num_images=0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative int, got -1"):
        SyntheticDefects(seed=-1)
    with pytest.raises(ValueError, match=r"at least 16 pixels per side, got \(8, 64\)"):
        SyntheticDefects(image_size=(8, 64))
    with pytest.raises(IndexError, match=r"index must be in \[0, 3\), got 3"):
        SyntheticDefects(num_images=3)[3]
    assert len(list(SyntheticDefects(num_images=3))) == 3
