"""How far to trust a box: a localization confidence in [0, 1] from the method's own evidence.

The class probability says whether the classifier recognises the class, not whether the box is
right (on ILSVRC dev its ROC AUC for "IoU >= 0.5" is barely above chance: docs/confidence.md). The
confidence is the mean of three agreements, each in [0, 1]:

* **stability**: does the box survive a change of the rule that made it? In ``density`` mode the
  smaller IoU of the box with the boxes of the vote map cut at ``level / spread`` and ``level * spread``;
  in ``neurons`` mode the mean IoU of each kept neuron's blob box with the union's box.
* **concentration**: how much more of the evidence lies inside the region than its share of the
  image would give, ``(mass share - area share) / (1 - area share)``, clipped to [0, 1]. A region that
  holds all the evidence in a small area scores 1; one no denser than the rest scores 0.
* **agreement**: IoU of the box with the box Grad-CAM gives from the same forward and backward pass
  (largest component at 15 % of its maximum), a second opinion that costs nothing extra.

No weights were fitted: the rule was chosen on the tuning half of the dev set among a few such
combinations and reported on the other half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from neuroloc.blobs import box_iou, mask_box
from neuroloc.evidence import region_at

GRADCAM_THRESHOLD = 0.15


@dataclass(frozen=True)
class Confidence:
    """The parts of a localization confidence; ``agreement`` is None when no reference map exists."""

    stability: float
    concentration: float
    agreement: float | None

    @property
    def value(self) -> float:
        parts = [self.stability, self.concentration] + ([self.agreement] if self.agreement is not None else [])
        return float(np.mean(parts))

    def to_dict(self) -> dict[str, float | None]:
        return {
            "stability": round(self.stability, 4),
            "concentration": round(self.concentration, 4),
            "agreement": None if self.agreement is None else round(self.agreement, 4),
        }


def pixel_box_iou(a: tuple[int, int, int, int] | None, b: tuple[int, int, int, int] | None) -> float:
    """IoU of two boxes given as inclusive pixel indices (as :func:`neuroloc.blobs.mask_box` makes them)."""
    if a is None or b is None:
        return 0.0
    return box_iou((a[0], a[1], a[2] + 1, a[3] + 1), (b[0], b[1], b[2] + 1, b[3] + 1))


def component_over(evidence: np.ndarray, level: float, region: np.ndarray) -> np.ndarray:
    """The 8-connected component of ``evidence >= level`` that overlaps ``region`` most (empty if none does)."""
    labels, _ = ndimage.label(evidence >= level, structure=np.ones((3, 3), dtype=bool))
    overlap = np.bincount(labels[region], minlength=1)
    overlap[0] = 0
    if overlap.max() == 0:
        return np.zeros_like(region)
    return labels == int(overlap.argmax())


def cut_stability(evidence: np.ndarray, region: np.ndarray, level: float, spread: float = 1.5) -> float:
    """Smaller IoU of the region's box with its boxes when ``evidence`` is cut at ``level / spread`` and ``level * spread``.

    At each other level the component overlapping ``region`` most stands for it, so a second object of
    the same class (multi-object mode) is compared with itself, not with the largest object.
    """
    box = mask_box(region)
    lower = component_over(evidence, level / spread, region)
    higher = component_over(evidence, min(level * spread, 0.999), region)
    return min(pixel_box_iou(box, mask_box(lower)), pixel_box_iou(box, mask_box(higher)))


def blob_stability(blobs: np.ndarray, union: np.ndarray) -> float:
    """Mean IoU of each blob's box (K, H, W) with the union's box: do the chosen neurons point at the same object?"""
    box = mask_box(union)
    ious = [pixel_box_iou(mask_box(blob), box) for blob in blobs if blob.any()]
    return float(np.mean(ious)) if ious else 0.0


def concentration(evidence: np.ndarray, region: np.ndarray) -> float:
    """How much denser the non-negative ``evidence`` is inside ``region`` than its area share predicts, in [0, 1]."""
    total = float(evidence.sum())
    area = float(region.mean())
    if total <= 0 or area >= 1:
        return 0.0
    mass = float(evidence[region].sum()) / total
    return float(np.clip((mass - area) / (1 - area), 0.0, 1.0))


def reference_agreement(region: np.ndarray, reference: np.ndarray, threshold: float = GRADCAM_THRESHOLD) -> float:
    """IoU of the region's box with the box of ``reference`` (largest component at ``threshold`` of its maximum)."""
    peak = float(reference.max())
    if peak <= 0:
        return 0.0
    return pixel_box_iou(mask_box(region), mask_box(region_at(reference / peak, threshold)))


def density_confidence(density: np.ndarray, region: np.ndarray, level: float, reference: np.ndarray | None) -> Confidence:
    """Confidence of a region cut from a vote map (``density`` mode)."""
    agreement = None if reference is None else reference_agreement(region, reference)
    return Confidence(cut_stability(density, region, level), concentration(density, region), agreement)


def blob_confidence(blobs: np.ndarray, kept: np.ndarray, union: np.ndarray, reference: np.ndarray | None) -> Confidence:
    """Confidence of a union of neuron blobs (``neurons`` mode); the evidence is how many blobs cover each pixel."""
    votes = blobs.sum(axis=0, dtype=np.float32)
    agreement = None if reference is None else reference_agreement(union, reference)
    return Confidence(blob_stability(blobs[kept], union), concentration(votes, union), agreement)
