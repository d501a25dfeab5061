"""Result objects returned by the localizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # only a type here; importing it would pull in PyTorch for `neuroloc --help`
    from neuroloc.confidence import Confidence

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Neuron:
    """One neuron DAM chose: its position in the layer, its scores, and whether its blob is in the union.

    Attributes:
        channel, y, x: position in the layer's (C, H, W) output.
        dam_score: activation x d(class score)/d(activation).
        region_score: class score of the blob region after re-scoring (None when re-scoring is off).
        blob_fraction: share of the input covered by its blob (0 in ``density`` mode, which makes no blobs).
        kept: ``neurons`` mode: whether its blob is part of the union that gives the box; ``density`` mode:
            whether its position lies inside the region.
    """

    channel: int
    y: int
    x: int
    dam_score: float
    region_score: float | None
    blob_fraction: float
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "y": self.y,
            "x": self.x,
            "dam_score": self.dam_score,
            "region_score": self.region_score,
            "blob_fraction": round(self.blob_fraction, 5),
            "kept": self.kept,
        }


@dataclass(frozen=True, eq=False)  # arrays: == would be ambiguous; compared and hashed by identity
class Localization:
    """Where the classifier sees one class in one image.

    Attributes:
        box: (xmin, ymin, xmax, ymax) in pixels of the original image (continuous coordinates: a box
            covering the whole image is (0, 0, width, height)).
        label: the model's class index (ImageNet-1k's for ImageNet classifiers); synset: its WordNet id
            (None for a model's own classes); name: its name.
        probability: the class's probability for the whole image (softmax; sigmoid for a single-logit model).
        confidence: how far to trust the box, in [0, 1], from the method's own evidence (see
            :mod:`neuroloc.confidence`); separate from ``probability``.
        top1: the classifier's top-1 class for the image (equal to ``label`` unless a class was given).
        neurons: the kmax neurons DAM chose, in DAM order.
        mask: union of the kept blobs, bool (height, width) at the original resolution; for objects found tile
            by tile, only the box's window of it, placed at ``mask_origin`` (a large image can hold hundreds of
            them). :meth:`full_mask` gives the whole image's array in every case. The arrays of a
            Localization are read-only; copy one to edit it.
        mask_origin: (x, y) of ``mask``'s top-left pixel in the image when it holds a window; None otherwise.
        image_size: (width, height) of the original image.
        layer: the layer whose neurons were used.
        empty: True when no blob survived; the box is then the whole image.
        maps / blobs: per-neuron guided-backprop maps and blobs (kmax, S, S) at input size, when asked for.
        density: in ``density`` mode, the map (S, S) at input size the region is cut from: the fused DAM votes
            plus the similarity and objectness maps as the configuration weighs them.
        point: (x, y) in pixels of the original image where the class's DAM votes peak inside the region
            (anywhere when the region is empty): one point on the object, for the pointing game or as a
            click prompt for a segmenter.
    """

    box: Box
    label: int
    synset: str | None
    name: str
    probability: float
    neurons: tuple[Neuron, ...]
    mask: np.ndarray = field(repr=False)
    image_size: tuple[int, int]
    layer: str
    empty: bool = False
    maps: np.ndarray | None = field(default=None, repr=False)
    blobs: np.ndarray | None = field(default=None, repr=False)
    density: np.ndarray | None = field(default=None, repr=False)
    top1: int | None = None
    confidence: Confidence | None = None
    point: tuple[float, float] | None = None
    mask_origin: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Frozen all the way down: a caller editing ``mask`` in place would silently change what
        # ``full_mask`` and every later export read. Copy (``loc.mask.copy()``) to edit.
        for array in (self.mask, self.maps, self.blobs, self.density):
            if array is not None:
                array.setflags(write=False)

    def full_mask(self) -> np.ndarray:
        """The region as bool (height, width) over the whole image: ``mask`` itself, or its window laid in place."""
        if self.mask_origin is None:
            return self.mask
        full = np.zeros((self.image_size[1], self.image_size[0]), dtype=bool)
        x, y = self.mask_origin
        height, width = self.mask.shape
        full[y : y + height, x : x + width] = self.mask
        full.setflags(write=False)
        return full

    @property
    def kept_neurons(self) -> tuple[Neuron, ...]:
        return tuple(n for n in self.neurons if n.kept)

    def prediction_dict(self, with_neurons: bool = True) -> dict[str, Any]:
        """The JSON Lines form of this prediction."""
        out: dict[str, Any] = {
            "label": self.label,
            "synset": self.synset,
            "name": self.name,
            "score": round(self.probability, 6),
            "confidence": None if self.confidence is None else round(self.confidence.value, 4),
            "box": [round(v, 2) for v in self.box],
            "point": None if self.point is None else [round(v, 2) for v in self.point],
            "layer": self.layer,
            "empty": self.empty,
            "confidence_parts": None if self.confidence is None else self.confidence.to_dict(),
        }
        if with_neurons:
            out["neurons"] = [n.to_dict() for n in self.neurons]
        return out
