"""Tests of the PyramidFlow example's AUROC and AUPRO against slow reference definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from examples.pyramidflow.metrics import aupro, image_auroc, pixel_auroc

__all__: list[str] = []

PROPERTY = settings(max_examples=30, deadline=None)


def reference_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Pairwise Mann-Whitney count over every (positive, negative) pair."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """AUPRO straight from the definition: one full evaluation per distinct threshold."""
    regions = []
    for image, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(image, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & normal).sum() / normal.sum()
        pro = np.mean([predicted[image][region].mean() for image, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@st.composite
def maps_and_masks(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Small random test sets with both classes; quantised maps give many ties."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    masks = rng.random((n, h, w)) < draw(st.floats(0.05, 0.6))
    maps = rng.normal(size=(n, h, w)) + draw(st.floats(0.0, 2.0)) * masks
    levels = draw(st.sampled_from([None, 2, 3, 6]))
    if levels is not None:
        maps = np.round(maps * levels / 4) / levels
    assume(masks.any() and not masks.all())
    return maps, masks


@PROPERTY
@given(data=maps_and_masks(), fpr_limit=st.sampled_from([0.3, 1.0, 0.05, 0.5, 0.77]))
def test_aupro_matches_reference_definition(data, fpr_limit):
    maps, masks = data
    result = aupro(maps, masks, fpr_limit=fpr_limit)
    assert result == pytest.approx(reference_aupro(maps, masks, fpr_limit), abs=1e-9)
    assert 0.0 <= result <= 1.0


@PROPERTY
@given(data=maps_and_masks())
def test_full_range_aupro_is_never_below_standard(data):
    maps, masks = data
    assert aupro(maps, masks, fpr_limit=1.0) >= aupro(maps, masks, fpr_limit=0.3) - 1e-12


@PROPERTY
@given(data=maps_and_masks())
def test_pixel_auroc_matches_pairwise_count(data):
    maps, masks = data
    expected = reference_auroc(maps.ravel(), masks.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


@PROPERTY
@given(
    scores=st.lists(st.integers(0, 4), min_size=2, max_size=40),
    labels=st.lists(st.booleans(), min_size=2, max_size=40),
)
def test_image_auroc_matches_pairwise_count(scores, labels):
    size = min(len(scores), len(labels))
    scores, labels = np.array(scores[:size], dtype=float), np.array(labels[:size])
    assume(labels.any() and not labels.all())
    assert image_auroc(scores, labels) == pytest.approx(reference_auroc(scores, labels), abs=1e-12)


def test_regions_are_eight_connected():
    # Two diagonal neighbours form one region, so detecting only one of them
    # gives PRO 1/4 (4-connectivity would give 1/3).
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.full((1, 4, 4), 2.0)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3] = 3.0, 1.0, 1.0
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.25)


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 2:5, 3:9] = masks[1, 10:12, 10:11] = masks[2, 7, 7] = True
    maps = rng.random(masks.shape) + 2.0 * masks
    assert pixel_auroc(maps, masks) == 1.0
    assert aupro(maps, masks) == 1.0
    assert aupro(maps, masks, fpr_limit=1.0) == 1.0
    assert pixel_auroc(-maps, masks) == 0.0
    assert aupro(-maps, masks) == 0.0
    assert aupro(-maps, masks, fpr_limit=1.0) == 0.0


def test_constant_map_scores_half_auroc():
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 1, 1] = True
    assert pixel_auroc(np.zeros((2, 3, 3)), masks) == 0.5
    assert image_auroc([1.0, 1.0, 1.0], [0, 1, 1]) == 0.5


def test_accepts_integer_masks_and_tensors():
    torch = pytest.importorskip("torch")
    masks = torch.zeros(1, 4, 4, dtype=torch.int64)
    masks[0, 0, :2] = 1
    maps = masks.float() + 0.1 * torch.arange(16.0).reshape(1, 4, 4)
    assert pixel_auroc(maps, masks) == pytest.approx(
        reference_auroc(maps.numpy().ravel(), masks.numpy().ravel().astype(bool))
    )


def test_large_input_is_fast():
    # A few MVTec categories' worth of pixels must not need per-threshold loops.
    rng = np.random.default_rng(1)
    masks = np.zeros((40, 256, 256), dtype=bool)
    masks[::2, 100:140, 60:90] = True
    maps = rng.random(masks.shape, dtype=np.float32) + masks
    assert 0.9 < aupro(maps, masks) <= 1.0
    assert 0.9 < pixel_auroc(maps, masks) <= 1.0


MASKS = np.zeros((1, 2, 2), dtype=bool)
MASKS[0, 0, 0] = True


@pytest.mark.parametrize(
    ("maps", "masks", "match"),
    [
        (np.zeros((1, 2, 3)), MASKS, r"same shape, got \(1, 2, 3\) and \(1, 2, 2\)"),
        (np.zeros((2, 2)), MASKS[0], r"shape \(N, H, W\), got \(2, 2\)"),
        (np.array([[[0.0, np.nan], [0.0, 0.0]]]), MASKS, r"NaN.*1 NaN.*\(0, 0, 1\)"),
        (np.zeros((1, 2, 2)), MASKS * 255, r"binary \(bool or 0/1\).*255"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), "4 normal and 0 defective pixels"),
        (np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool), "0 normal and 4 defective pixels"),
    ],
)
def test_pixel_auroc_rejects_bad_input(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        pixel_auroc(maps, masks)


def test_maps_must_be_real_numbers():
    with pytest.raises(TypeError, match="real numeric array, got dtype <U1"):
        pixel_auroc(np.full((1, 2, 2), "a"), MASKS)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [0, 1, 1], r"same shape, got \(2,\) and \(3,\)"),
        ([[0.1, 0.2]], [[0, 1]], r"shape \(N,\), got \(1, 2\)"),
        ([0.1, 0.2], [1, 1], "0 normal and 2 defective images"),
        ([0.1, 0.2], [0, 2], r"binary .*: 2"),
        ([float("nan"), 0.2], [0, 1], "NaN"),
    ],
)
def test_image_auroc_rejects_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(scores, labels)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, float("nan")])
def test_aupro_rejects_bad_fpr_limit(fpr_limit):
    with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\], got"):
        aupro(np.zeros((1, 2, 2)), MASKS, fpr_limit=fpr_limit)


def test_aupro_needs_regions_and_normal_pixels():
    with pytest.raises(ValueError, match="at least one defect region"):
        aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool))
    with pytest.raises(ValueError, match="needs normal pixels"):
        aupro(np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool))
