"""How far to trust a box: a localization confidence in [0, 1] from the method's own evidence.

The class probability says whether the classifier recognises the class, not whether the box is
right (on ILSVRC dev its ROC AUC for "IoU >= 0.5" is barely above chance: docs/confidence.md). The
confidence is the mean of three agreements, each in [0, 1]:

* **stability**: does the box survive a change of the rule? The smaller IoU of the box with the
  boxes of the DAM vote map (every positive-DAM neuron voting for its position, as the ``density``
  mode fuses it) cut at ``level / spread`` and ``level * spread``, taking at each cut the component
  that overlaps the region most. In ``neurons`` mode the region is the paper's union of blobs and the
  vote map is computed from the same backward pass, so this also says whether the union agrees with
  the votes of all neurons.
* **concentration**: how much more of the vote mass lies inside the region than its share of the
  image would give, ``(mass share - area share) / (1 - area share)``, clipped to [0, 1]. A region that
  holds all the votes in a small area scores 1; one no denser than the rest scores 0.
* **agreement**: IoU of the box with the box Grad-CAM gives from the same forward and backward pass
  (largest component at 15 % of its maximum), a second opinion that costs nothing extra.

No weights were fitted: the parts and their plain mean were chosen on the tuning half of the dev set
among a few such combinations and reported on the other half (docs/confidence.md). Blob-based parts
for ``neurons`` mode (mean IoU of the kept blobs with the union, blob-vote concentration) were
measured there and ranked worse than chance: agreeing blobs mostly mean a union stuck on one part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from neuroloc.blobs import EIGHT_NEIGHBOURS, box_iou, mask_box
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
    labels, _ = ndimage.label(evidence >= level, structure=EIGHT_NEIGHBOURS)
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


def region_confidence(votes: np.ndarray, region: np.ndarray, level: float, reference: np.ndarray | None) -> Confidence:
    """Confidence of a ``region`` (bool, S x S) given the fused DAM ``votes`` (S x S, maximum 1) and a reference map.

    ``level`` is the fixed reference cut of the vote map that the stability varies around
    (``LocalizeConfig.level``, 0.3), whatever rule made the region: with the default per-image ``mass``
    cut, stability around the image's own cut ranked boxes worse on the tuning half (ROC AUC 0.58 vs 0.61).
    """
    agreement = None if reference is None else reference_agreement(region, reference)
    return Confidence(cut_stability(votes, region, level), concentration(votes, region), agreement)
