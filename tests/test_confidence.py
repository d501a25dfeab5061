"""The localization confidence: each part on hand-made maps, and its place in results and metrics."""

from __future__ import annotations

import numpy as np
import pytest

from neuroloc.confidence import Confidence, component_over, concentration, cut_stability, pixel_box_iou, reference_agreement, region_confidence
from neuroloc.evaluation.metrics import ImageScore, confidence_summary, coverage_accuracy, roc_auc
from neuroloc.evidence import region_at


def _square_map(size: int = 40, top: int = 10, side: int = 12, value: float = 1.0) -> np.ndarray:
    density = np.zeros((size, size), dtype=np.float32)
    density[top : top + side, top : top + side] = value
    return density


def test_pixel_box_iou_counts_inclusive_pixels():
    assert pixel_box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert pixel_box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert pixel_box_iou((0, 0, 1, 0), (1, 0, 2, 0)) == pytest.approx(1 / 3)
    assert pixel_box_iou(None, (0, 0, 1, 1)) == 0.0


def test_a_sharp_plateau_is_stable_and_a_ramp_is_not():
    plateau = _square_map()
    region = region_at(plateau, 0.3)
    assert cut_stability(plateau, region, 0.3) == 1.0
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (40, 1))  # the cut decides the extent
    assert cut_stability(ramp, region_at(ramp, 0.3), 0.3) < 0.8


def test_stability_follows_the_region_not_the_largest_object():
    density = _square_map(side=14)
    density[30:36, 30:36] = 0.8  # a second, smaller object
    small = component_over(density, 0.3, np.pad(np.ones((6, 6), bool), ((30, 4), (30, 4))))
    assert small[32, 32] and not small[15, 15]
    assert cut_stability(density, small, 0.3) == 1.0


def test_component_over_is_empty_when_nothing_overlaps():
    density = _square_map()
    region = np.zeros_like(density, dtype=bool)
    region[0, 0] = True
    assert not component_over(density, 0.5, region).any()


def test_concentration_is_one_for_all_evidence_in_a_small_region_and_zero_for_a_flat_map():
    density = _square_map()
    assert concentration(density, density > 0) == 1.0
    flat = np.ones((20, 20), dtype=np.float32)
    half = np.zeros((20, 20), dtype=bool)
    half[:10] = True
    assert concentration(flat, half) == pytest.approx(0.0)
    assert concentration(flat, np.ones((20, 20), dtype=bool)) == 0.0
    assert concentration(np.zeros((5, 5)), half[:5, :5]) == 0.0


def test_reference_agreement_is_the_box_iou_with_the_reference_region():
    density = _square_map()
    region = density > 0
    assert reference_agreement(region, density) == 1.0
    shifted = np.roll(density, 6, axis=1)
    assert reference_agreement(region, shifted) == pytest.approx(6 * 12 / (18 * 12))
    assert reference_agreement(region, np.zeros_like(density)) == 0.0


def test_confidence_value_is_the_mean_of_its_parts():
    assert Confidence(0.2, 0.4, 0.9).value == pytest.approx(0.5)
    assert Confidence(0.2, 0.4, None).value == pytest.approx(0.3)
    assert Confidence(0.2, 0.4, None).to_dict()["agreement"] is None


def test_confidences_rank_a_clear_map_above_a_confused_one():
    clear = _square_map()
    confused = np.random.default_rng(0).random((40, 40)).astype(np.float32) * 0.6 + clear * 0.4
    clear_conf = region_confidence(clear, region_at(clear, 0.3), 0.3, clear)
    confused_conf = region_confidence(confused, region_at(confused, 0.3), 0.3, clear)
    assert 0 <= confused_conf.value < clear_conf.value <= 1
    part = np.zeros_like(clear, dtype=bool)  # a union of blobs stuck on one corner of the voted object
    part[10:14, 10:14] = True
    assert region_confidence(clear, part, 0.3, None).value < region_confidence(clear, clear > 0, 0.3, None).value


def test_roc_auc_and_coverage_by_hand():
    positive = np.array([True, True, False, False])
    assert roc_auc(positive, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert roc_auc(positive, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert roc_auc(positive, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(roc_auc(np.array([True, True]), np.array([0.1, 0.2])))
    assert coverage_accuracy(positive, np.array([0.9, 0.1, 0.8, 0.2]), 0.5) == 50.0
    assert coverage_accuracy(positive, np.array([0.9, 0.8, 0.1, 0.2]), 0.5) == 100.0
    assert coverage_accuracy(positive, np.array([0.9, 0.8, 0.1, 0.2]), 1.0) == 50.0


def test_confidence_summary_needs_every_image_to_have_one():
    good = ImageScore(0.8, True, (True,), "large", confidence=0.9, probability=0.2)
    bad = ImageScore(0.1, True, (False,), "large", confidence=0.1, probability=0.9)
    row = confidence_summary([good, bad])
    assert row["confidence_auc"] == 1.0 and row["probability_auc"] == 0.0
    assert row["confidence_gt_known@0.5"] == 100.0 and row["probability_gt_known@0.5"] == 0.0
    assert confidence_summary([good, ImageScore(0.1, True, (False,), "large")]) == {}
