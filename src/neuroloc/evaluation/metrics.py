"""Localization metrics of the field: IoU, GT-known / top-1 localization, centre correctness, MaxBoxAccV2.

Boxes are (xmin, ymin, xmax, ymax) in continuous pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage, stats

from neuroloc.blobs import EIGHT_NEIGHBOURS, box_iou

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
CENTRE_MARGINS = tuple(round(m, 2) for m in np.arange(0.0, 0.51, 0.05))
SIZE_BINS = (("small", 0.0, 0.1), ("medium", 0.1, 0.5), ("large", 0.5, 1.01))
# Images with several true boxes (instances of the class) are where one box is hardest to place: a box
# around the group fails IoU 0.5 with each member and centres between them.
BOX_COUNT_GROUPS = ("one_box", "several_boxes")
BOX_COUNT_METRICS = ("gt_known", "centre@0.2")  # per size: every metric of PAIRED_METRICS


def best_iou(box: Sequence[float], truths: Sequence[Sequence[float]]) -> float:
    """IoU with the best-matching ground-truth box of the image."""
    return max(box_iou(box, t) for t in truths)


def centre_correct(box: Sequence[float], truths: Sequence[Sequence[float]], margin: float) -> bool:
    """The paper's centre correctness: the box centre lies in some truth box shrunk by ``margin`` per side."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for x0, y0, x1, y1 in truths:
        w, h = x1 - x0, y1 - y0
        if x0 + margin * w <= cx <= x1 - margin * w and y0 + margin * h <= cy <= y1 - margin * h:
            return True
    return False


# The pointing game (Zhang et al. 2016; TorchRay's benchmark): a method's single most salient point is a
# hit when it falls on a true box or within this many pixels of one (pixels of the image file).
POINTING_TOLERANCE = 15.0


def point_hit(point: Sequence[float], truths: Sequence[Sequence[float]], tolerance: float = POINTING_TOLERANCE) -> bool:
    """Whether ``point`` (x, y) lies within ``tolerance`` pixels of some truth box (inside it counts as 0)."""
    x, y = point
    for x0, y0, x1, y1 in truths:
        dx, dy = max(x0 - x, 0.0, x - x1), max(y0 - y, 0.0, y - y1)
        if dx * dx + dy * dy <= tolerance * tolerance:
            return True
    return False


def size_bin(truths: Sequence[Sequence[float]], image_size: tuple[int, int]) -> str:
    """small (< 10 %) / medium / large (> 50 %) by the largest truth box's share of the image area (of its part
    inside the image: boxes drawn past the edge are common)."""
    width, height = image_size
    area = max(max(0.0, min(t[2], width) - max(t[0], 0.0)) * max(0.0, min(t[3], height) - max(t[1], 0.0))
               for t in truths) / (width * height)
    return "small" if area < SIZE_BINS[0][2] else "large" if area > SIZE_BINS[2][1] else "medium"


@dataclass(frozen=True)
class ImageScore:
    """Per-image outcome of one method."""

    iou: float
    correct_class: bool
    centre: tuple[bool, ...]  # one per CENTRE_MARGINS
    size: str
    confidence: float | None = None  # the method's localization confidence, when it gives one
    probability: float | None = None  # the class probability
    boxes: int = 1  # how many true boxes the image has
    label: int | None = None  # the image's true class
    pointed: bool | None = None  # pointing game hit, for methods that give a point


def box_count_group(boxes: int) -> str:
    """``one_box`` or ``several_boxes`` (:data:`BOX_COUNT_GROUPS`)."""
    return BOX_COUNT_GROUPS[0] if boxes == 1 else BOX_COUNT_GROUPS[1]


def score_image(
    box: Sequence[float],
    truths: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    correct_class: bool,
    label: int | None = None,
    point: Sequence[float] | None = None,
) -> ImageScore:
    return ImageScore(
        pointed=None if point is None else point_hit(point, truths),
        iou=best_iou(box, truths),
        correct_class=correct_class,
        centre=tuple(centre_correct(box, truths, m) for m in CENTRE_MARGINS),
        size=size_bin(truths, image_size),
        boxes=len(truths),
        label=label,
    )


def summarize(scores: Sequence[ImageScore]) -> dict[str, float]:
    """The table row of one method: percentages except mean IoU."""
    if not scores:
        return {}
    iou = np.array([s.iou for s in scores])
    cls = np.array([s.correct_class for s in scores])
    centre = np.array([s.centre for s in scores])
    row = {
        "images": float(len(scores)),
        "top1_cls": 100 * cls.mean(),
        "gt_known": 100 * (iou >= 0.5).mean(),
        "top1_loc": 100 * ((iou >= 0.5) & cls).mean(),
        "mean_iou": float(iou.mean()),
    }
    for t in IOU_THRESHOLDS:
        row[f"acc@{t}"] = 100 * (iou >= t).mean()
    for j, m in enumerate(CENTRE_MARGINS):
        row[f"centre@{m}"] = 100 * centre[:, j].mean()
    if all(s.pointed is not None for s in scores):  # predictions written before points were recorded have none
        row["pointing"] = pointing_accuracy(scores)
        for name, _, _ in SIZE_BINS:
            sized = [s for s in scores if s.size == name]
            row[f"pointing_{name}"] = pointing_accuracy(sized) if sized else float("nan")
    values = {key: per_image_values(scores, key) for key in PAIRED_METRICS}
    parts: list[tuple[str, list[bool], tuple[str, ...]]] = [
        (name, [s.size == name for s in scores], PAIRED_METRICS) for name, _, _ in SIZE_BINS]
    parts += [(g, [box_count_group(s.boxes) == g for s in scores], BOX_COUNT_METRICS) for g in BOX_COUNT_GROUPS]
    for part, members, keys in parts:
        chosen = np.array(members, dtype=bool)
        for key in keys:
            row[f"{key}_{part}"] = float(values[key][chosen].mean()) if chosen.any() else float("nan")
        row[f"n_{part}"] = float(chosen.sum())
    return row


def pointing_accuracy(scores: Sequence[ImageScore]) -> float:
    """The pointing game's figure (Zhang et al. 2016): the mean over classes of each class's share of hits, so a
    class with many images counts as much as one with few (scores without a label form one class)."""
    by_class: dict[int | None, list[bool]] = {}
    for score in scores:
        by_class.setdefault(score.label, []).append(bool(score.pointed))
    return 100 * float(np.mean([np.mean(hits) for hits in by_class.values()]))


CLASS_METRICS = ("gt_known", "mean_iou", "acc@0.7", "top1_cls")


def per_class_summary(scores: Sequence[ImageScore]) -> dict[int, dict[str, float]]:
    """True class -> its images and :data:`CLASS_METRICS` (percentages except mean IoU), in class order.
    Scores without a label are left out."""
    grouped: dict[int, list[ImageScore]] = {}
    for score in scores:
        if score.label is not None:
            grouped.setdefault(score.label, []).append(score)
    rows = {}
    for label in sorted(grouped):
        row = summarize(grouped[label])
        rows[label] = {"images": row["images"], **{key: row[key] for key in CLASS_METRICS}}
    return rows


COVERAGES = (0.25, 0.5, 0.75, 1.0)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` from the rest (ties count half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def coverage_accuracy(correct: np.ndarray, confidence: np.ndarray, coverage: float) -> float:
    """Percentage of ``correct`` among the ``coverage`` share of images with the highest ``confidence``."""
    keep = max(1, round(coverage * len(correct)))
    order = np.argsort(-np.asarray(confidence), kind="stable")[:keep]
    return 100 * float(np.asarray(correct)[order].mean())


def confidence_summary(scores: Sequence[ImageScore]) -> dict[str, float]:
    """How well the confidence (and, for comparison, the class probability) ranks correct boxes (IoU >= 0.5).

    Empty unless every image has both.
    """
    if not scores or any(s.confidence is None or s.probability is None for s in scores):
        return {}
    correct = np.array([s.iou >= 0.5 for s in scores])
    row = {}
    for name in ("confidence", "probability"):
        values = np.array([getattr(s, name) for s in scores], dtype=float)
        row[f"{name}_auc"] = roc_auc(correct, values)
        for coverage in COVERAGES:
            row[f"{name}_gt_known@{coverage}"] = coverage_accuracy(correct, values, coverage)
    return row


def boxes_from_map(saliency: np.ndarray, threshold: float, largest_only: bool = True) -> list[tuple[int, int, int, int]]:
    """Boxes (inclusive pixel indices) around the connected components of ``saliency >= threshold * max``.

    With ``largest_only`` only the largest component's box is returned (the Grad-CAM / CAM protocol).
    """
    peak = float(saliency.max())
    if peak <= 0:
        return []
    return component_boxes(saliency >= threshold * peak, largest_only)


def component_boxes(mask: np.ndarray, largest_only: bool = False) -> list[tuple[int, int, int, int]]:
    """Boxes (inclusive pixel indices) around the connected components of a boolean mask."""
    # pixels touching at a corner are one component, as for the contours (cv2.findContours) CAM's authors and
    # wsolevaluation box
    labels, count = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
    if count == 0:
        return []
    slices = ndimage.find_objects(labels)
    if largest_only:
        sizes = np.bincount(labels.ravel())[1:]
        slices = [slices[int(np.argmax(sizes))]]
    return [(s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1) for s in slices]


# wsolevaluation's (Choe et al. 2020) map thresholds, 0.00 to 0.99, and its cut: the normalised map is
# quantised to 8 bits and a pixel is kept when its level is above int(threshold * 255). Unlike its code, the
# boxes are continuous coordinates (it counts x + w as a pixel inside, a box one pixel larger) around outer
# components only (its RETR_TREE also boxes holes): within about a point of it (docs/results.md)
MAP_THRESHOLDS = np.arange(100) / 100


def threshold_ious(saliency: np.ndarray, truths: Sequence[Sequence[float]], thresholds: np.ndarray = MAP_THRESHOLDS) -> np.ndarray:
    """For each map threshold, the best IoU of any connected-component box with any truth box (T,).

    The map is min-max normalised (a flat map has no box); ``truths`` are in the map's pixel coordinates.
    """
    lo, hi = float(saliency.min()), float(saliency.max())
    levels = np.floor(255 * (saliency - lo) / (hi - lo)) if hi > lo else np.zeros(saliency.shape)
    best = np.zeros(len(thresholds))
    for ti, t in enumerate(thresholds):
        boxes = component_boxes(levels > int(t * 255))
        if boxes:
            best[ti] = max(best_iou((b[0], b[1], b[2] + 1, b[3] + 1), truths) for b in boxes)
    return best


def max_box_acc_v2_from_ious(per_image: ArrayLike) -> dict[str, float]:
    """MaxBoxAccV2 from the (images, thresholds) matrix of :func:`threshold_ious`."""
    matrix = np.asarray(per_image)
    accuracy = [100 * float((matrix >= u).mean(axis=0).max()) for u in IOU_THRESHOLDS]
    result = {f"maxboxacc@{u}": a for u, a in zip(IOU_THRESHOLDS, accuracy)}
    result["maxboxaccv2"] = float(np.mean(accuracy))
    return result


def max_box_acc_v2(
    maps: Sequence[np.ndarray],
    truths: Sequence[Sequence[Sequence[float]]],
    thresholds: np.ndarray = MAP_THRESHOLDS,
) -> dict[str, float]:
    """MaxBoxAccV2 (Choe et al. 2020): per IoU threshold, the best box accuracy over map thresholds,
    where each image counts its best box over all connected components; the mean over 0.3/0.5/0.7.
    """
    return max_box_acc_v2_from_ious(np.stack([threshold_ious(m, t, thresholds) for m, t in zip(maps, truths)]))


PAIRED_METRICS = ("gt_known", "acc@0.7", "mean_iou", "centre@0.2")


def per_image_values(scores: Sequence[ImageScore], metric: str) -> np.ndarray:
    """Each image's share of a ``summarize`` figure in ``PAIRED_METRICS`` (0 or 100, or the IoU), so
    that their mean is the figure."""
    iou = np.array([s.iou for s in scores], dtype=float)
    if metric == "mean_iou":
        return iou
    if metric == "gt_known":
        return 100.0 * (iou >= 0.5)
    if metric == "acc@0.7":
        return 100.0 * (iou >= 0.7)
    if metric == "centre@0.2":
        j = CENTRE_MARGINS.index(0.2)
        return 100.0 * np.array([s.centre[j] for s in scores], dtype=float)
    raise ValueError(f"no per-image values for {metric!r}; choose from {', '.join(PAIRED_METRICS)}")


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (method A - method B) over the same images, with a bootstrap confidence interval."""

    difference: float
    low: float
    high: float
    images: int


def paired_difference(
    a: np.ndarray, b: np.ndarray, confidence_level: float = 0.95, resamples: int = 9999, seed: int = 0
) -> PairedDifference:
    """``mean(a - b)`` for per-image values of two methods on the same images, with a percentile
    bootstrap interval over images (resampling images keeps each image's pair together). The seed is
    fixed so that a report is reproducible; the interval is NaN below 2 images."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    differences = a - b
    mean = float(differences.mean()) if differences.size else float("nan")
    if differences.size < 2:
        return PairedDifference(mean, float("nan"), float("nan"), int(differences.size))
    if np.all(differences == differences[0]):  # no spread: every resample gives the same mean
        return PairedDifference(mean, mean, mean, int(differences.size))
    result = stats.bootstrap(
        (differences,), np.mean, n_resamples=resamples, confidence_level=confidence_level,
        method="percentile", rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return PairedDifference(mean, float(interval.low), float(interval.high), int(differences.size))
