"""Tests of the real-photograph defect dataset (:mod:`examples.pyramidflow.photos`)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader

from examples.pyramidflow import photos
from examples.pyramidflow.photos import (
    MIN_VISIBLE_CHANGE,
    PHOTO_CATEGORIES,
    PHOTO_DEFECT_KINDS,
    PHOTO_OBJECTS,
    PHOTO_TEXTURES,
    PhotoDefects,
)

__all__: list[str] = []

SIZE = 64
"""Small enough to keep the file fast, large enough for every defect kind to show."""


@pytest.fixture(scope="module")
def renderings() -> dict[str, list]:
    """Two test images of each defect kind (and as many normal ones) for every class."""
    return {
        category: [
            PhotoDefects(category, "test", 4 * len(PHOTO_DEFECT_KINDS), SIZE).render(i)
            for i in range(4 * len(PHOTO_DEFECT_KINDS))
        ]
        for category in PHOTO_CATEGORIES
    }


def test_classes():
    assert set(PHOTO_TEXTURES) | set(PHOTO_OBJECTS) == set(PHOTO_CATEGORIES)
    assert len(PHOTO_CATEGORIES) == 6


@pytest.mark.parametrize("category", PHOTO_CATEGORIES)
def test_samples_have_the_dataset_contract(category):
    dataset = PhotoDefects(category, "test", num_images=4, image_size=SIZE, seed=2)
    for index, sample in enumerate(dataset):
        image, mask = sample["image"], sample["mask"]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert mask.shape == (1, SIZE, SIZE) and mask.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.01
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert sample["label"] == index % 2 == int(mask.any())
        folder = sample["path"].split("/")[-2]
        assert sample["path"].startswith(f"photos/{category}/seed2/test/")
        assert folder == ("good" if index % 2 == 0 else dataset.render(index).defect)
    assert dataset.labels == [0, 1, 0, 1] and dataset.has_masks
    train = PhotoDefects(category, "train", num_images=3, image_size=SIZE)
    assert train.labels == [0, 0, 0] and not any(s["mask"].any() for s in train)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["label"].tolist() == [0, 1, 0, 1]


def test_defaults():
    train, test = PhotoDefects("ihc", "train"), PhotoDefects("ihc", "test")
    assert len(train) == len(test) == 48 and train.image_size == 128
    assert test[1]["image"].shape == (3, 128, 128) and sum(test.labels) == 24


def test_every_defect_kind_appears(renderings):
    for category, rendered in renderings.items():
        kinds = [r.defect for r in rendered]
        assert kinds[::2] == [None] * len(kinds[::2])
        # Each kind is painted as drawn in most images; a fallback spot is rare.
        kinds_count = len(PHOTO_DEFECT_KINDS)
        expected = [PHOTO_DEFECT_KINDS[i % kinds_count] for i in range(len(kinds[1::2]))]
        agree = sum(a == b for a, b in zip(kinds[1::2], expected, strict=True))
        assert agree >= len(expected) - 2, (category, kinds[1::2])
    drawn = {r.defect for rendered in renderings.values() for r in rendered}
    assert drawn == {None, *PHOTO_DEFECT_KINDS}


def test_masks_are_exact(renderings):
    for category, rendered in renderings.items():
        for index, r in enumerate(rendered):
            assert r.image.dtype == r.normal.dtype == np.float32
            assert r.mask.shape == (SIZE, SIZE) and r.mask.dtype == bool
            # Outside the mask the image is untouched; inside, every pixel visibly changed.
            np.testing.assert_array_equal(r.image[:, ~r.mask], r.normal[:, ~r.mask])
            change = np.abs(r.image - r.normal).max(axis=0)
            assert (change[r.mask] >= MIN_VISIBLE_CHANGE).all(), (category, index)
            assert (r.defect is None) == (not r.mask.any())
            if r.defect is not None:
                assert r.mask.sum() >= 8, (category, index, r.defect)
                assert r.mask.mean() <= 0.15, (category, index, r.defect)


def test_gray_photos_stay_gray(renderings):
    for category in ("moon", "camera"):
        for r in renderings[category]:
            np.testing.assert_array_equal(r.image[0], r.image[2])


@pytest.mark.parametrize("category", ["hubble", "camera"])
def test_rendering_is_deterministic(category):
    first = PhotoDefects(category, "test", num_images=8, image_size=SIZE, seed=3)
    second = PhotoDefects(category, "test", num_images=8, image_size=SIZE, seed=3)
    for index in (7, 0, 3):  # out of order, and again in a fresh dataset
        a, b = first[index], second[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["image"], first[index]["image"]) and a["path"] == b["path"]
    other_seed = PhotoDefects(category, "test", num_images=8, image_size=SIZE, seed=4)
    train = PhotoDefects(category, "train", num_images=8, image_size=SIZE, seed=3)
    assert not torch.equal(other_seed[0]["image"], first[0]["image"])
    assert not torch.equal(train[0]["image"], first[0]["image"])
    # Normal images vary from one to the next: a new crop, shift, or lighting.
    assert not torch.equal(first[0]["image"], first[2]["image"])


@pytest.mark.parametrize("category", PHOTO_TEXTURES)
def test_texture_splits_come_from_disjoint_regions(category):
    boxes = {
        split: [PhotoDefects(category, split, 48, 128).source_box(i) for i in range(48)]
        for split in ("train", "test")
    }
    height, width = photos._photo(photos._SOURCES[category].photo).shape[:2]
    for split, split_boxes in boxes.items():
        for top, left, bottom, right in split_boxes:
            assert 0 <= top < bottom <= height and 0 <= left < right <= width, (split, left)
    train_right = max(box[3] for box in boxes["train"])
    test_left = min(box[1] for box in boxes["test"])
    assert train_right <= test_left, (train_right, test_left)
    assert len(set(boxes["train"])) > 40  # random positions, not one crop


def test_source_box_matches_the_pixels(monkeypatch):
    # Without lighting changes, a moon crop (never turned) is its box of the photo, resized.
    monkeypatch.setattr(photos, "_relight", lambda rng, image, gray: image.astype(np.float32))
    photo = photos._photo("moon")
    for split in ("train", "test"):
        dataset = PhotoDefects("moon", split, num_images=6, image_size=SIZE)
        for index in range(0, 6, 2):
            top, left, bottom, right = dataset.source_box(index)
            crop = Image.fromarray(photo[top:bottom, left:right]).resize((SIZE, SIZE))
            expected = np.asarray(crop, np.float32).transpose(2, 0, 1) / 255
            assert np.abs(dataset.render(index).image - expected).mean() < 0.02, (split, index)


def test_objects_are_registered():
    dataset = PhotoDefects("rocket", "train", num_images=12, image_size=SIZE)
    boxes = np.array([dataset.source_box(i) for i in range(12)])
    photo = photos._photo("rocket")
    # Centred square framing, shifted by a few pixels (3% of the side at most).
    side = boxes[:, 2] - boxes[:, 0]
    assert (np.abs(side - 0.94 * photo.shape[0]) <= 3).all()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    offset = np.abs(centres - np.array(photo.shape[:2]) / 2)
    assert (offset <= 0.035 * photo.shape[0]).all() and offset.max() > 0
    images = np.stack([dataset.render(i).image for i in range(12)])
    assert np.abs(images - images.mean(axis=0)).mean() < 0.1


def test_rendering_is_fast():
    dataset = PhotoDefects("hubble", "test", num_images=12)
    dataset.render(1)  # decodes and scales the photos once
    start = time.perf_counter()
    for index in range(12):
        dataset.render(index)
    assert (time.perf_counter() - start) / 12 < 25e-3


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"category must be one of \('hubble', .*\), got 'wood'"):
        PhotoDefects("wood")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        PhotoDefects("moon", "val")
    with pytest.raises(ValueError, match=r"num_images must be a positive int, got 0"):
        PhotoDefects("moon", num_images=0)
    with pytest.raises(ValueError, match=r"seed must be a non-negative int, got -1"):
        PhotoDefects("moon", seed=-1)
    for size in (16, 1024, 128.0, True, (128, 128)):
        with pytest.raises(ValueError, match=r"image_size must be an int from 32 to 512, got"):
            PhotoDefects("moon", image_size=size)
    with pytest.raises(IndexError, match=r"index must be in \[0, 3\), got 3"):
        PhotoDefects("moon", num_images=3)[3]
    assert len(list(PhotoDefects("moon", num_images=3, image_size=32))) == 3



@pytest.mark.parametrize("category", ["moon", "camera"])
def test_normal_images_are_lit_differently(category):
    dataset = PhotoDefects(category, "train", num_images=12, image_size=SIZE)
    images = np.stack([dataset.render(i).image for i in range(12)])
    # Gain, contrast and gamma change each shot's brightness by a few percent.
    assert 0.015 < images.mean(axis=(1, 2, 3)).std() < 0.1


def test_normal_images_have_sensor_noise():
    dataset = PhotoDefects("moon", "train", num_images=12, image_size=SIZE)
    images = np.stack([dataset.render(i).image for i in range(12)])
    # The moon is smooth at this scale, so neighbouring pixels differ mostly by noise:
    # about 2x more than in the lightly blurred image without it, about 3.7x with it.
    steps = np.abs(np.diff(images, axis=-1)).mean()
    smooth = np.abs(np.diff(ndimage.gaussian_filter(images, (0, 0, 1, 1)), axis=-1)).mean()
    assert steps > 3 * smooth
