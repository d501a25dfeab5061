"""Steps 4 and 6 of Algorithm 1: a blob per neuron map, and the box around the union of blobs.

All functions work on a stack of maps (K, H, W) at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

PercentileOf = Literal["all", "positive"]

# 3x3 square in the image plane, nothing across the stack axis.
_SQUARE = np.zeros((3, 3, 3), dtype=bool)
_SQUARE[1] = True
# The 4-neighbour cross in the image plane: scipy.ndimage's default structure, which the authors' code used.
_CROSS = np.zeros((3, 3, 3), dtype=bool)
_CROSS[1] = ndimage.generate_binary_structure(2, 1)

MORPHOLOGY_PRESETS = {
    "none": "",
    # Paper, section 3.4: erosion removes small islands, then dilation closes small holes.
    "paper": "e1,d1",
    # The authors' code (deconv_utils.process_blob): 4 x (erode, dilate) with scipy's default cross, a 4x4 box
    # convolution of the mask read as "any pixel on" (a dilation), 20 dilations then 15 erosions with the cross.
    "authors": "e+1,d+1,e+1,d+1,e+1,d+1,e+1,d+1,b4,d+20,e+15",
}

# Pixels that touch at a corner belong to the same region (scipy.ndimage's connectivity structure).
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def threshold_maps(maps: np.ndarray, percentile: float = 80.0, of: PercentileOf = "all") -> np.ndarray:
    """Keep the pixels of each map above its ``percentile`` (of all values, or of the positive ones).

    Only positive pixels can be kept: a map with no positive value gives an empty mask.
    """
    if not 0.0 <= percentile < 100.0:
        raise ValueError(f"percentile must be in [0, 100), got {percentile}")
    maps = np.asarray(maps, dtype=np.float32)
    if of == "positive":
        positive = np.where(maps > 0, maps, np.nan)
        has_positive = np.asarray(np.isfinite(positive).any(axis=(1, 2)))
        safe = np.where(has_positive[:, None, None], positive, 0.0)
        thresholds = np.asarray(np.nanpercentile(safe, percentile, axis=(1, 2)))
        return (maps > thresholds[:, None, None]) & (maps > 0)
    if of != "all":
        raise ValueError(f"percentile_of must be 'all' or 'positive', got {of!r}")
    thresholds = np.percentile(maps, percentile, axis=(1, 2))
    return (maps > thresholds[:, None, None]) & (maps > 0)


def parse_morphology(spec: str) -> list[tuple[str, int]]:
    """``"e1,d1"`` -> [("e", 1), ("d", 1)]. Preset names are expanded.

    Operations: ``eN`` erode N times, ``dN`` dilate, ``oN`` open, ``cN`` close (all with the 3x3 square; ``e+N``
    and ``d+N`` with the 4-neighbour cross), ``sN`` NxN box smoothing (majority vote), ``bN`` NxN box dilation
    (a pixel is on when any pixel of its box is: the authors' box convolution), ``fill`` fill holes, ``largest``
    keep the largest connected component.
    """
    spec = MORPHOLOGY_PRESETS.get(spec, spec)
    steps: list[tuple[str, int]] = []
    for token in filter(None, (t.strip() for t in spec.split(","))):
        if token in ("fill", "largest"):
            steps.append((token, 0))
            continue
        match = re.fullmatch(r"([ed]\+?|[ocsb])(\d+)", token)
        if not match or int(match.group(2)) < 1:
            raise ValueError(
                f"bad morphology step {token!r}: use eN, dN, e+N, d+N, oN, cN, sN, bN (N >= 1), fill, largest, "
                f"or a preset ({', '.join(MORPHOLOGY_PRESETS)})"
            )
        steps.append((match.group(1), int(match.group(2))))
    return steps


def clean_masks(masks: np.ndarray, morphology: str = "paper") -> np.ndarray:
    """Apply the morphology steps to every mask of the (K, H, W) stack independently."""
    out = np.asarray(masks, dtype=bool)
    for op, n in parse_morphology(morphology):
        if op in ("e", "e+"):
            out = ndimage.binary_erosion(out, _SQUARE if op == "e" else _CROSS, iterations=n)
        elif op in ("d", "d+"):
            out = ndimage.binary_dilation(out, _SQUARE if op == "d" else _CROSS, iterations=n)
        elif op == "o":
            out = ndimage.binary_opening(out, _SQUARE, iterations=n)
        elif op == "c":
            # Pad so that closing near the border does not erode back from outside the image.
            pad = ((0, 0), (n, n), (n, n))
            out = ndimage.binary_closing(np.pad(out, pad), _SQUARE, iterations=n)[:, n:-n, n:-n]
        elif op == "s":
            out = ndimage.uniform_filter(out.astype(np.float32), size=(1, n, n)) > 0.5
        elif op == "b":
            out = ndimage.convolve(out.astype(np.float32), np.ones((1, n, n), np.float32), mode="constant") > 0
        elif op == "fill":
            out = ndimage.binary_fill_holes(out, _SQUARE)
        elif op == "largest":
            out = largest_components(out)
    return out


def largest_components(masks: np.ndarray) -> np.ndarray:
    """Keep only the largest 8-connected component of each mask in the stack."""
    labels, count = ndimage.label(masks, structure=_SQUARE)
    if count == 0:
        return np.zeros_like(masks, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = np.zeros(count + 1, dtype=bool)
    for k in range(masks.shape[0]):
        present = np.unique(labels[k])
        present = present[present > 0]
        if present.size:
            keep[present[np.argmax(sizes[present])]] = True
    return keep[labels]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (xmin, ymin, xmax, ymax) boxes in continuous coordinates."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) pixel indices (inclusive) of the mask's extent, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def scale_box(
    box: tuple[int, int, int, int], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Inclusive pixel indices on a (W, H) grid to continuous [xmin, ymin, xmax, ymax] on another (W, H)."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x0, y0, x1, y1 = box
    return (x0 * sx, y0 * sy, (x1 + 1) * sx, (y1 + 1) * sy)


def peak_pixel(saliency: np.ndarray, within: np.ndarray | None = None) -> tuple[int, int]:
    """(x, y) pixel index of the map's maximum, looked for inside ``within`` when that mask is not empty
    (the first maximum in row order on ties)."""
    values = saliency.astype(np.float64, copy=True)
    if within is not None and within.any():
        values[~within] = -np.inf
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(x), int(y)


def scale_point(pixel: tuple[int, int], from_size: tuple[int, int], to_size: tuple[int, int]) -> tuple[float, float]:
    """A pixel index on a (W, H) grid to the continuous coordinates of its centre on another (W, H)."""
    return ((pixel[0] + 0.5) * to_size[0] / from_size[0], (pixel[1] + 0.5) * to_size[1] / from_size[1])
