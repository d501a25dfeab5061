"""Large images with small objects: localize tile by tile, then join the tiles' regions.

A whole image is squashed to the network's input (224 pixels for the default model), so an object of 50
pixels in a 4,000-pixel slide or sky survey becomes a few pixels, which no layer resolves. With a
:class:`TileRule` the image is cut into overlapping square tiles of ``size`` pixels; each tile goes
through the classifier on its own (at the network's input size) and is localized for its top-1 class. A
tile counts only when that class is one of the classes asked for, so background tiles, which the
classifier calls something else, add nothing. The kept tiles' regions are laid into one mask per class at
the image's resolution; regions that overlap across tile borders join, and each connected part is one
object with its own box.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from neuroloc.blobs import EIGHT_NEIGHBOURS
from neuroloc.result import Localization

if TYPE_CHECKING:
    from neuroloc.config import LocalizeConfig
    from neuroloc.directions import FeatureDirections
    from neuroloc.models import LoadedModel

MIN_TILE = 32
MAX_OVERLAP = 0.75
TileBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class TileRule:
    """Square tiles of ``size`` pixels (of the original image), neighbours sharing ``overlap`` of a side; a
    tile counts when its top-1 class is one asked for, with a probability of at least ``min_score`` (and
    at least 0.5 for a single-logit model, whose one output is always its top-1)."""

    size: int
    overlap: float = 0.25
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if self.size < MIN_TILE:
            raise ValueError(f"tile size must be at least {MIN_TILE} pixels, got {self.size}")
        if not 0 <= self.overlap <= MAX_OVERLAP:
            raise ValueError(f"tile overlap must be between 0 and {MAX_OVERLAP}, got {self.overlap}")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"tile min_score must be between 0 and 1, got {self.min_score}")


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Where tiles of ``size`` start along a side of ``length``: every ``size x (1 - overlap)`` pixels, the
    last one moved back to end at the edge (one tile, at 0, when the side is no longer than a tile)."""
    if length <= size:
        return [0]
    stride = max(1, round(size * (1 - overlap)))
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def tile_boxes(width: int, height: int, rule: TileRule) -> list[TileBox]:
    """The tiles covering a (width, height) image as (x0, y0, x1, y1) pixel boxes, row by row."""
    xs, ys = tile_starts(width, rule.size, rule.overlap), tile_starts(height, rule.size, rule.overlap)
    return [(x, y, min(x + rule.size, width), min(y + rule.size, height)) for y in ys for x in xs]


def fit_tile_directions(
    model: LoadedModel, layers: Sequence[str], paths: Sequence[Path], rule: TileRule, intensity: str = "range",
    limit: int | None = None, done: Callable[[int], object] | None = None,
) -> FeatureDirections | None:
    """``--directions auto`` for a tiled run (and ``calibrate --tile``): the objectness map's feature directions
    fitted over tiles of the images (a tile is a zoomed-in view, whose features a fit over whole images does
    not describe), about ``limit`` of them (default :data:`~neuroloc.options.MAX_FIT_IMAGES`) spread evenly
    over at most that many images; None when fewer than :data:`~neuroloc.options.MIN_FIT_IMAGES` tiles can be
    read. ``done(1)`` after each image."""
    from neuroloc.directions import DirectionsError, fit_directions, fit_sample, readable_images
    from neuroloc.options import MAX_FIT_IMAGES

    limit = limit or MAX_FIT_IMAGES
    chosen = fit_sample(list(paths), limit)
    if not chosen:
        return None
    per_image = math.ceil(limit / len(chosen))

    def crops() -> Iterator[Image.Image]:
        for image in readable_images(chosen, done, intensity):
            for box in fit_sample(tile_boxes(image.width, image.height, rule), per_image):
                yield image.crop(box)

    try:
        return fit_directions(model, crops(), layers)
    except DirectionsError:  # fewer than MIN_FIT_IMAGES tiles
        return None


# Tiles' regions are joined where they touch; the paper's neurons mode gives a region of scattered blob dots,
# which would come out as hundreds of dot-sized objects.
TILES_NEED_DENSITY = "tiles join the regions of the DAM vote map: they need mode density (not a neurons-mode preset: paper, authors, fast)"


def localize_tiled(
    model: LoadedModel,
    image: Image.Image,
    config: LocalizeConfig,
    classes: Sequence[int],
    rule: TileRule,
    batch_size: int = 8,
) -> list[Localization]:
    """The objects of ``classes`` in ``image``, found tile by tile (module docstring).

    Returns one result per object, class by class in the order of ``classes``, within a class the most
    probable first; an empty list when no tile's top-1 class is among ``classes``. ``config`` must be in
    ``density`` mode (a ValueError otherwise). Each result's box,
    mask and point are in the image's pixels; its probability and confidence are those of the most
    probable tile that found it. Neurons are left out: they belong to single tiles.
    """
    from neuroloc.pipeline import localize_batch

    wanted = list(dict.fromkeys(int(c) for c in classes))
    if not wanted:
        raise ValueError("name at least one class to look for in the tiles")
    if config.mode != "density":
        raise ValueError(TILES_NEED_DENSITY)
    found: dict[int, list[tuple[TileBox, Localization]]] = {label: [] for label in wanted}
    # A single-logit model's top-1 is its one output whatever the tile shows: the class is there at p >= 0.5.
    min_score = max(rule.min_score, 0.5) if len(model.classes) == 1 else rule.min_score
    boxes = tile_boxes(image.width, image.height, rule)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        for box, result in zip(chunk, localize_batch(model, [image.crop(b) for b in chunk], config)):
            if result.label in found and not result.empty and result.probability >= min_score:
                # the map (S x S floats) is dropped: thousands of tiles would hold gigabytes of it
                found[result.label].append((box, replace(result, density=None, maps=None, blobs=None)))
    objects: list[Localization] = []
    for label in wanted:
        objects.extend(sorted(_join(found[label], image.size), key=lambda r: -r.probability))
    return objects


def _join(tiles: list[tuple[TileBox, Localization]], size: tuple[int, int]) -> list[Localization]:
    """One result per connected part of the union of the tiles' regions."""
    if not tiles:
        return []
    union = np.zeros((size[1], size[0]), dtype=bool)
    for (x0, y0, x1, y1), result in tiles:
        union[y0:y1, x0:x1] |= result.mask
    parts, _ = ndimage.label(union, structure=EIGHT_NEIGHBOURS)
    best_tile: dict[int, tuple[TileBox, Localization]] = {}  # part -> the most probable tile inside it
    for box, result in tiles:
        for index in np.unique(parts[box[1] : box[3], box[0] : box[2]][result.mask]).tolist():
            if index not in best_tile or result.probability > best_tile[index][1].probability:
                best_tile[index] = (box, result)
    results = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(parts), start=1):
        window = parts[rows, cols] == index  # the object's box only: full-size masks of many objects fill memory
        (x0, y0, _, _), best = best_tile[index]
        point = None if best.point is None else (best.point[0] + x0, best.point[1] + y0)
        results.append(Localization(
            box=(float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)),
            label=best.label, synset=best.synset, name=best.name, probability=best.probability,
            neurons=(), mask=window, mask_origin=(cols.start, rows.start), image_size=size, layer=best.layer,
            top1=best.label, confidence=best.confidence, point=point,
        ))
    return results
