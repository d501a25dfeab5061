"""Region masks as files: PNG pictures, COCO run-length encoding, and optional GrabCut refinement.

COCO RLE: the mask is read column by column (Fortran order); ``counts`` alternates the lengths of runs
of 0 and 1, starting with 0 (a mask that starts with 1 has a first run of length 0). The compressed
string form, as pycocotools writes it, stores each count (from the third on as the difference to the
count two before) in 5-bit groups, each offset into printable ASCII: ``{"size": [h, w], "counts": "..."}``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neuroloc.blobs import mask_box
from neuroloc.imageio import to_rgb

RLE = dict[str, Any]
REFINE_METHODS = ("none", "grabcut")
# GrabCut runs on a copy whose longer side is at most this (its cost grows with the pixel count).
GRABCUT_MAX_SIDE = 400


def run_lengths(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a 2-D boolean mask (column-major, starting with a run of 0)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def encode_rle(mask: np.ndarray) -> RLE:
    """COCO compressed RLE of a 2-D boolean mask: ``{"size": [height, width], "counts": str}``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    counts = run_lengths(mask)
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative difference ends in a run of -1
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr(c + 48 + (0x20 if more else 0)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def rle_counts(rle: RLE) -> list[int]:
    """The run lengths of a COCO RLE, compressed (str or bytes) or uncompressed (a list of ints)."""
    counts = rle["counts"]
    if isinstance(counts, list):
        return [int(c) for c in counts]
    text = counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
    out: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise ValueError("RLE counts string ends inside a number")
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_problem(rle: Any, height: int, width: int) -> str | None:
    """What keeps ``rle`` from being COCO RLE of a ``height`` x ``width`` mask; None when nothing does.
    Reads the run lengths only (a large mask is not decoded)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return "is not COCO RLE ({\"size\": [height, width], \"counts\": ...})"
    if rle["size"] != [height, width]:
        return f"has the size {rle['size']!r}, not the image's [{height}, {width}]"
    counts_given = rle["counts"]
    integers = isinstance(counts_given, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts_given)
    if not (isinstance(counts_given, str) or integers):
        return "has \"counts\" that are neither a string nor a list of integers"
    try:
        counts = rle_counts(rle)
    except ValueError as exc:
        return f"has unreadable \"counts\" ({exc})"
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        return f"has \"counts\" that do not cover a {height}x{width} mask"
    return None


def decode_rle(rle: RLE) -> np.ndarray:
    """The boolean (height, width) mask of a COCO RLE (compressed or uncompressed)."""
    height, width = (int(v) for v in rle["size"])
    counts = rle_counts(rle)
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(f"RLE counts do not cover a {height}x{width} mask")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


def rle_area(rle: RLE) -> int:
    """Number of mask pixels of a COCO RLE."""
    return int(sum(rle_counts(rle)[1::2]))


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Write a boolean mask as an 8-bit grey PNG (0 outside, 255 inside)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L").save(path)
    return path


def load_mask_png(path: str | Path) -> np.ndarray:
    """A mask PNG written by :func:`save_mask_png` (any non-zero pixel is inside)."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("L")) > 0


class RefinementUnavailable(RuntimeError):
    """The package a mask refinement needs is not installed."""


def refine_mask(image: Image.Image, mask: np.ndarray, method: str = "grabcut", iterations: int = 5) -> np.ndarray:
    """Refine a region mask (bool, at the image's resolution) with the image's colours, inside its box.

    ``grabcut`` (OpenCV, the optional extra ``neuroloc[masks]``) starts GrabCut from the mask's box, as from a
    rectangle drawn around the object: inside it probably foreground, outside surely background, so the
    refined mask stays in the box. The mask's own pixels only place the box: the neurons mode's union of
    blobs is scattered dots of guided-backprop edges, and seeded by them alone GrabCut kept a few percent of
    the box. It runs on a copy at most GRABCUT_MAX_SIDE pixels on its longer side. A mask that is empty,
    whose box is the whole image, or that GrabCut empties is returned unchanged.

    Raises:
        RefinementUnavailable: when OpenCV is not installed.
        ValueError: for an unknown method or a mask of another size.
    """
    if method == "none":
        return mask
    if method != "grabcut":
        raise ValueError(f"unknown mask refinement {method!r}; choose from {', '.join(REFINE_METHODS)}")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask {mask.shape} does not fit the image ({image.height}, {image.width})")
    extent = mask_box(mask)
    if extent is None:
        return mask
    x0, y0, x1, y1 = extent[0], extent[1], extent[2] + 1, extent[3] + 1
    if (x0, y0, x1, y1) == (0, 0, image.width, image.height):
        return mask
    cv2 = require_opencv()
    scale = min(1.0, GRABCUT_MAX_SIDE / max(image.size))
    small_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    picture = np.ascontiguousarray(np.asarray(to_rgb(image).resize(small_size, Image.Resampling.BILINEAR))[:, :, ::-1])
    seeds = np.full((small_size[1], small_size[0]), cv2.GC_BGD, dtype=np.uint8)
    seeds[int(y0 * scale) : max(int(y0 * scale) + 1, math.ceil(y1 * scale)),
          int(x0 * scale) : max(int(x0 * scale) + 1, math.ceil(x1 * scale))] = cv2.GC_PR_FGD
    if (seeds == cv2.GC_PR_FGD).all():  # the box fills the copy: nothing is known to be background
        return mask
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # as in grabcut_region: the same mask whatever ran before in this thread
    cv2.grabCut(picture, seeds, None, background, foreground, iterations, cv2.GC_INIT_WITH_MASK)
    refined = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if not refined.any():
        return mask
    full = np.asarray(Image.fromarray(refined.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)) > 127
    inside = np.zeros_like(full)
    inside[y0:y1, x0:x1] = True
    return full & inside if (full & inside).any() else mask


def grabcut_region(
    picture: np.ndarray, density: np.ndarray, region: np.ndarray, votes: np.ndarray, level: float, iterations: int = 1
) -> np.ndarray:
    """A region cut from an evidence map, redrawn along the image's colour edges with GrabCut (OpenCV).

    The map seeds GrabCut's colour models: the region's core (map values at least halfway from ``level``
    to the maximum) is surely object, the rest of the region probably object, values below half of
    ``level`` surely background, everything else probably background. Of the pixels GrabCut calls object,
    the 8-connected component holding the most ``votes`` is kept, as for the region itself; if GrabCut
    keeps nothing, or nothing is background, the region is returned unchanged.

    Args:
        picture: (S, S, 3) uint8 RGB, the image at the map's size (the model's input).
        density, votes: (S, S) the map the region was cut from, and the class's votes.
        region: (S, S) bool, ``density >= level`` (one component of it).
        level: the cut that gave the region.
        iterations: GrabCut iterations (one was measured as good as five, docs/method.md).

    Raises:
        RefinementUnavailable: when OpenCV is not installed.
        ValueError: when the shapes do not agree.
    """
    from neuroloc.evidence import region_at

    if picture.shape != (*density.shape, 3) or region.shape != density.shape or votes.shape != density.shape:
        raise ValueError(
            f"picture {picture.shape}, map {density.shape}, region {region.shape} and votes {votes.shape} differ"
        )
    cv2 = require_opencv()
    seeds = np.full(density.shape, cv2.GC_PR_BGD, dtype=np.uint8)
    seeds[density < level / 2] = cv2.GC_BGD
    seeds[region] = cv2.GC_PR_FGD
    seeds[region & (density >= (level + density.max()) / 2)] = cv2.GC_FGD
    if not region.any() or not np.isin(seeds, (cv2.GC_BGD, cv2.GC_PR_BGD)).any():
        return region
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's colour models start from k-means with OpenCV's own random generator
    bgr = np.ascontiguousarray(picture[:, :, ::-1])
    cv2.grabCut(bgr, seeds, None, background, foreground, iterations, cv2.GC_INIT_WITH_MASK)
    refined = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if not refined.any():
        return region
    return region_at(refined.astype(np.float32), 0.5, votes)


def require_opencv() -> Any:
    """OpenCV's ``cv2`` module, which GrabCut refinement needs.

    Raises:
        RefinementUnavailable: with what to install, when OpenCV is not installed.
    """
    try:
        import cv2
    except ImportError:
        raise RefinementUnavailable(
            "--refine grabcut needs OpenCV: pip install opencv-python-headless (or pip install 'neuroloc[masks]')"
        ) from None
    return cv2
