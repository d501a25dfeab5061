"""Blobs on synthetic masks: percentile threshold, morphology, connected components, boxes."""

from __future__ import annotations

import numpy as np
import pytest

from neuroloc.blobs import MORPHOLOGY_PRESETS, clean_masks, largest_components, mask_box, parse_morphology, peak_pixel, scale_box, scale_point, threshold_maps


def _block(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# --- threshold_maps -------------------------------------------------------------------------------


def test_threshold_all_keeps_the_top_20_percent():
    # values 1..100: the 80th percentile (linear interpolation) is 80.2, so 81..100 are kept
    ramp = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    kept = threshold_maps(ramp[None], 80.0, "all")[0]
    assert kept.sum() == 20
    assert set(ramp[kept].tolist()) == set(range(81, 101))


def test_threshold_all_never_keeps_non_positive_pixels():
    # -50..49: the 80th percentile is 29.2 -> 30..49 (20 pixels)
    signed = np.arange(-50, 50, dtype=np.float32).reshape(10, 10)
    # 90 pixels at -1 and 1..10: the 80th percentile is -1, yet only the 10 positive pixels are kept
    mostly_negative = np.full(100, -1.0, dtype=np.float32)
    mostly_negative[:10] = np.arange(1, 11)
    negative = -np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    kept = threshold_maps(np.stack([signed, mostly_negative.reshape(10, 10), negative]), 80.0, "all")
    assert kept.shape == (3, 10, 10) and kept.dtype == bool
    assert set(signed[kept[0]].tolist()) == set(range(30, 50))
    assert kept[1].sum() == 10 and (mostly_negative.reshape(10, 10)[kept[1]] > 0).all()
    assert not kept[2].any()


def test_threshold_positive_uses_the_percentile_of_positive_values():
    # positives of -50..49 are 1..49; their 80th percentile is 39.4 -> 40..49 (10 pixels)
    signed = np.arange(-50, 50, dtype=np.float32).reshape(10, 10)
    negative = -np.ones((10, 10), dtype=np.float32)
    negative[:5] = 0.0  # zeros are not positive either
    kept = threshold_maps(np.stack([signed, negative]), 80.0, "positive")
    assert set(signed[kept[0]].tolist()) == set(range(40, 50))
    assert not kept[1].any()  # no positive value: an empty mask, no NaN
    tied = np.zeros((1, 4, 4), dtype=np.float32)
    tied[0, :2] = 1.0  # every positive value ties with their percentile: strictly above it, as the authors kept
    assert not threshold_maps(tied, 80.0, "positive").any()
    # with 'all' the same map keeps twice as many pixels
    assert threshold_maps(signed[None], 80.0, "all")[0].sum() == 20


def test_threshold_rejects_bad_arguments():
    maps = np.ones((1, 4, 4))
    with pytest.raises(ValueError):
        threshold_maps(maps, 100.0)
    with pytest.raises(ValueError):
        threshold_maps(maps, -1.0)
    with pytest.raises(ValueError, match="percentile_of"):
        threshold_maps(maps, 80.0, "negative")  # type: ignore[arg-type]


# --- parse_morphology -----------------------------------------------------------------------------


def test_parse_morphology_good_specs_and_presets():
    assert parse_morphology("e1,d1") == [("e", 1), ("d", 1)]
    assert parse_morphology(" e2 , c3,fill, largest,s4,o1 ") == [
        ("e", 2), ("c", 3), ("fill", 0), ("largest", 0), ("s", 4), ("o", 1)
    ]
    assert parse_morphology("") == []
    assert parse_morphology("none") == []
    assert parse_morphology("paper") == [("e", 1), ("d", 1)]
    authors = parse_morphology("authors")
    assert authors[:8] == [("e+", 1), ("d+", 1)] * 4 and authors[8:] == [("b", 4), ("d+", 20), ("e+", 15)]
    assert parse_morphology("b3,e+2") == [("b", 3), ("e+", 2)]
    for name in MORPHOLOGY_PRESETS:
        parse_morphology(name)


@pytest.mark.parametrize("spec", ["x1", "e0", "e", "d-1", "e1;d1", "erode", "e1,,q2", "paper,e1", "b0", "o+1", "s+2", "e++1"])
def test_parse_morphology_bad_specs(spec):
    with pytest.raises(ValueError, match="bad morphology step"):
        parse_morphology(spec)


# --- clean_masks ----------------------------------------------------------------------------------


def _authors_process_blob(mask: np.ndarray) -> np.ndarray:
    """The authors' blob clean-up as their code's calls state it (scipy's default cross, the mask convolved with a
    4x4 box and read as "not zero"), written out step by step for one 2-D mask."""
    from scipy import ndimage

    for _ in range(4):
        mask = ndimage.binary_dilation(ndimage.binary_erosion(mask > 0) > 0)
    mask = ndimage.convolve(mask, np.ones((4, 4)), mode="constant", cval=0.0)  # a bool array stays bool
    for _ in range(20):
        mask = ndimage.binary_dilation(mask > 0)
    for _ in range(15):
        mask = ndimage.binary_erosion(mask > 0)
    return mask


def test_the_authors_preset_cleans_blobs_as_their_code_does():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 60, 50)) > np.array([0.6, 0.8, 0.95, 0.99])[:, None, None]
    masks[3] = False
    masks[3, 30, 20] = masks[3, 0, 0] = True  # lone pixels: erased by the first erosion
    cleaned = clean_masks(masks, "authors")
    for mask, mine in zip(masks, cleaned):
        np.testing.assert_array_equal(mine, _authors_process_blob(mask))
    block = _block(60, 50, 20, 30, 15, 25)
    grown = clean_masks(block[None], "authors")[0]
    assert block.sum() == 100 and grown.sum() > 200 and not (block & ~grown).any()  # 20 dilations outgrow 15 erosions


def test_erosion_then_dilation_removes_a_one_pixel_island():
    block = _block(20, 20, 3, 9, 4, 10)  # 6x6 square survives an opening unchanged
    noisy = block.copy()
    noisy[15, 15] = True  # isolated pixel
    cleaned = clean_masks(noisy[None], "paper")[0]
    assert np.array_equal(cleaned, block)
    assert np.array_equal(clean_masks(noisy[None], "none")[0], noisy)


def test_closing_fills_a_small_hole_also_at_the_border():
    inner = _block(20, 20, 5, 13, 5, 13)
    corner = _block(20, 20, 0, 8, 0, 8)  # touches the image border
    holed = np.stack([inner, corner])
    holed[0, 9, 9] = False
    holed[1, 1, 1] = False
    closed = clean_masks(holed, "c1")
    assert np.array_equal(closed[0], inner)
    assert np.array_equal(closed[1], corner)  # no erosion from outside the image


def test_fill_holes_and_largest():
    ring = _block(12, 12, 2, 9, 2, 9) & ~_block(12, 12, 4, 7, 4, 7)
    assert np.array_equal(clean_masks(ring[None], "fill")[0], _block(12, 12, 2, 9, 2, 9))
    two = _block(12, 12, 0, 2, 0, 2) | _block(12, 12, 6, 9, 6, 9)
    assert np.array_equal(clean_masks(two[None], "largest")[0], _block(12, 12, 6, 9, 6, 9))


def test_stack_is_processed_independently():
    island = _block(16, 16, 2, 8, 2, 8)
    island[13, 13] = True
    holed = _block(16, 16, 4, 12, 4, 12)
    holed[8, 8] = False
    empty = np.zeros((16, 16), dtype=bool)
    stack = np.stack([island, empty, holed])
    for spec in ("paper", "c1", "d2", "authors"):
        together = clean_masks(stack, spec)
        alone = np.stack([clean_masks(m[None], spec)[0] for m in stack])
        assert np.array_equal(together, alone), spec
        assert not together[1].any(), f"{spec}: a neighbouring mask leaked into an empty one"


def test_smoothing_is_a_majority_vote():
    # 3x3 vote on a 6x6 block: a corner sees 4/9 -> dropped, an edge pixel 6/9 -> kept, outside <= 3/9
    block = _block(12, 12, 3, 9, 3, 9)
    lone = np.zeros((12, 12), dtype=bool)
    lone[6, 6] = True
    smoothed = clean_masks(np.stack([block, lone]), "s3")
    expected = block.copy()
    expected[[3, 3, 8, 8], [3, 8, 3, 8]] = False
    assert np.array_equal(smoothed[0], expected)
    assert not smoothed[1].any()


# --- largest_components, mask_box, scale_box ------------------------------------------------------


def test_largest_components_per_mask_eight_connected():
    a = np.zeros((10, 10), dtype=bool)
    a[0:2, 0:2] = True  # 4 pixels
    for i in range(5):
        a[4 + i, 4 + i] = True  # 5 pixels touching only diagonally: one 8-connected component
    b = np.zeros((10, 10), dtype=bool)
    b[0:3, 0:3] = True  # 9 pixels, larger than anything in a
    b[7, 7] = True
    c = np.zeros((10, 10), dtype=bool)
    kept = largest_components(np.stack([a, b, c]))
    expected_a = np.zeros_like(a)
    for i in range(5):
        expected_a[4 + i, 4 + i] = True
    assert np.array_equal(kept[0], expected_a)
    assert np.array_equal(kept[1], _block(10, 10, 0, 3, 0, 3))
    assert not kept[2].any()
    assert not largest_components(np.zeros((2, 5, 5), dtype=bool)).any()


def test_mask_box():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:8] = True
    mask[6, 1] = True
    assert mask_box(mask) == (1, 2, 7, 6)
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None


def test_scale_box():
    full = np.ones((224, 224), dtype=bool)
    assert scale_box(mask_box(full), (224, 224), (500, 375)) == (0.0, 0.0, 500.0, 375.0)
    # pixel indices 10..29 x 20..39 on 100x100 cover [10, 30) x [20, 40) -> x2 in x, /2 in y
    assert scale_box((10, 20, 29, 39), (100, 100), (200, 50)) == (20.0, 10.0, 60.0, 20.0)


def test_peak_pixel_looks_inside_the_region_unless_it_is_empty():
    votes = np.zeros((6, 8))
    votes[1, 6] = 5.0  # the strongest vote, outside the region
    votes[4, 2] = 3.0
    region = _block(6, 8, 3, 6, 0, 4)
    assert peak_pixel(votes) == (6, 1)
    assert peak_pixel(votes, region) == (2, 4)
    assert peak_pixel(votes, np.zeros_like(region)) == (6, 1)
    assert peak_pixel(np.ones((3, 3))) == (0, 0)  # ties: the first in row order


def test_scale_point_maps_pixel_centres():
    assert scale_point((0, 0), (224, 224), (448, 112)) == (1.0, 0.25)
    assert scale_point((223, 111), (224, 112), (224, 112)) == (223.5, 111.5)
