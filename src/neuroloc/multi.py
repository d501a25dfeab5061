"""Several classes and several objects in one image (the paper's Algorithm 2, and a split of the vote map).

Classes. :class:`ClassRule` names the classes of an image: either a fixed list (``--classes pig,dog``), or
the classes ranked by the classifier's probability and kept by rank, probability and ratio to the top-1
(``--top``, ``--min-score``, ``--min-ratio``). Each class gets its own DAM evidence: in density mode one
forward pass and one backward pass per class through the kept graph
(:func:`neuroloc.pipeline.gather_class_evidence`, measured faster than a batch of copies of the image,
docs/multi.md); in neurons mode, or when the explain figure needs the neuron maps, the image is run as
copies, one per class, :data:`COPIES_PER_BATCH` at a time.

Objects. With ``objects="multi"`` the vote map of each class is split by :class:`ObjectRule`: seeds cut
from the map above a higher level, kept when their peak and area are large enough, each grown by a
watershed into the region above ``level``; each object gets its own box and mask.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from scipy import ndimage

from neuroloc.blobs import EIGHT_NEIGHBOURS
from neuroloc.device import exact_float32
from neuroloc.masks import REFINE_METHODS, encode_rle, refine_mask
from neuroloc.result import Localization

if TYPE_CHECKING:
    import torch

    from neuroloc.config import LocalizeConfig
    from neuroloc.models import LoadedModel
    from neuroloc.pipeline import Evidence
    from neuroloc.tiles import TileRule

ObjectsMode = Literal["single", "multi"]


@dataclass(frozen=True)
class ClassRule:
    """Which classes of an image to localize.

    With ``classes`` given, exactly those, in that order, whatever their probability. Otherwise the
    classes are ranked by the classifier's probability p, and the class at rank r (0 = top-1) is kept
    when all three hold:

    * r < ``top`` (None: no limit on the rank),
    * p >= ``min_score``, and p > 0 (a class the model masks with a score of -inf is never ranked in),
    * p >= ``min_ratio`` x p(top-1).

    The top-1 class is always kept, so every image gets at least one class. The default rule is the
    top-1 class alone (today's single-class behaviour).
    """

    classes: tuple[int, ...] = ()
    top: int | None = 1
    min_score: float = 0.0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.top is not None and self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")
        object.__setattr__(self, "classes", tuple(dict.fromkeys(int(c) for c in self.classes)))

    def choose(self, probabilities: np.ndarray | torch.Tensor) -> list[int]:
        """The class indices to localize, given the image's class probabilities (1000,)."""
        if self.classes:
            return list(self.classes)
        p = np.asarray(probabilities.detach().cpu() if hasattr(probabilities, "detach") else probabilities, float)
        order = np.argsort(-p, kind="stable")[: self.top]
        best = p[order[0]]
        # a probability of exactly 0 (a class the model masks with -inf) is never among the ranked choices
        kept = [int(c) for c in order if p[c] > 0 and p[c] >= self.min_score and p[c] >= self.min_ratio * best]
        return kept or [int(order[0])]


@dataclass(frozen=True)
class ObjectRule:
    """How the map of one class is split into objects (``objects="multi"``).

    Seeds are the 8-connected components of the map at or above ``split_level`` (a cut above the
    region's ``level``, where touching objects come apart). A seed counts when its highest value is at
    least ``min_peak`` x the map's maximum and its area at least ``min_area`` x the input's area; the
    largest seed always counts, and at most ``max_objects`` do. Each object is the part of the region
    (the map at or above ``level``) that a watershed flooding the map from the seeds gives to its seed.
    One seed gives the single-object region. Objects are ordered by area, largest first.

    The defaults were tuned on half of the dev images, seeds from the class's votes and extents from the
    default preset's whole map (votes, similarity and objectness; docs/multi.md).
    """

    split_level: float = 0.45
    min_peak: float = 0.7
    min_area: float = 0.02
    max_objects: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.split_level < 1:
            raise ValueError(f"split_level must be in (0, 1), got {self.split_level}")
        if not 0 <= self.min_peak <= 1:
            raise ValueError(f"min_peak must be in [0, 1], got {self.min_peak}")
        if not 0 <= self.min_area < 1:
            raise ValueError(f"min_area must be in [0, 1), got {self.min_area}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")


def split_objects(
    density: np.ndarray, level: float, rule: ObjectRule = ObjectRule(), extent: np.ndarray | None = None
) -> list[np.ndarray]:
    """The object masks (bool, like ``density``) that ``rule`` cuts from one class's vote map.

    ``density`` is scaled to a maximum of 1, as :func:`neuroloc.evidence.fuse_densities` makes it; its
    peaks are the seeds. The region shared out among them is ``extent >= level`` (``extent``: another
    map of the same shape and scale, such as the default's whole map; by default ``density`` itself),
    flooded along ``extent``. When one object comes out, it is the single-object region (the largest
    component of ``extent >= level``, or the whole input when nothing reaches ``level``).
    """
    extent = density if extent is None else extent
    seeds, count = ndimage.label(density >= max(level, rule.split_level), structure=EIGHT_NEIGHBOURS)
    if count < 2:
        return _single_region(extent, level)
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(density), seeds, index)
    peaks = ndimage.maximum(density, seeds, index)
    order = np.argsort(-areas, kind="stable")
    peak = float(density.max())
    kept = [order[0]] + [
        j for j in order[1:] if peaks[j] >= rule.min_peak * peak and areas[j] >= rule.min_area * density.size
    ]
    kept = kept[: rule.max_objects]
    if len(kept) == 1:
        return _single_region(extent, level)
    markers = np.zeros(density.shape, dtype=np.int32)
    for number, j in enumerate(kept, start=1):
        markers[seeds == index[j]] = number
    region = extent >= level
    components, _ = ndimage.label(region, structure=EIGHT_NEIGHBOURS)
    seeded = np.isin(components, np.unique(components[(markers > 0) & region]))  # region parts that hold a seed
    # Outside the region the map is a wall, so every seeded part is flooded from inside before any
    # flood crosses the outside.
    height = np.where(region, np.round((1 - np.clip(extent, 0, 1)) * 65534), 65535).astype(np.uint16)
    basins = ndimage.watershed_ift(height, markers, structure=EIGHT_NEIGHBOURS)
    masks = [(basins == number) & seeded for number in range(1, len(kept) + 1)]
    return sorted((m for m in masks if m.any()), key=lambda m: -int(m.sum())) or _single_region(extent, level)


def _single_region(density: np.ndarray, level: float) -> list[np.ndarray]:
    """The single-object region of a vote map, as density mode cuts it."""
    from neuroloc.evidence import region_at

    return [region_at(density, level)]


@dataclass(frozen=True)
class MultiOptions:
    """What to localize in each image beyond one box for one class, and which mask files to write.

    Attributes:
        classes: the class rule; None = the class given to :func:`localize_image`, else the top-1.
        objects: ``single`` (one region per class, as before) or ``multi`` (split by ``object_rule``).
        object_rule: how ``multi`` splits a class's vote map.
        refine: ``none`` or ``grabcut`` (OpenCV): refine each mask with the image's colours, GrabCut started
            from the mask's box (:func:`neuroloc.masks.refine_mask`); the box stays. This is for neurons mode, which has no map to seed from; in density
            mode ``LocalizeConfig.refine`` redraws the region itself, seeded by the map, and the box follows.
        masks_dir: write each prediction's mask as ``<masks_dir>/<name>_<j>.png`` (j: its position in
            the record's "predictions").
        rle: put each mask in its prediction as COCO RLE (``"mask": {"size": [h, w], "counts": ...}``).
        coco: write a COCO detection/segmentation file of the whole run there (implies ``rle``).
        tiles: localize tile by tile (:mod:`neuroloc.tiles`, for small objects in large images); needs the
            classes named (``classes`` with a list, or the ``label`` of :func:`localize_image`).
    """

    classes: ClassRule | None = None
    objects: ObjectsMode = "single"
    object_rule: ObjectRule = field(default_factory=ObjectRule)
    refine: str = "none"
    masks_dir: Path | None = None
    rle: bool = False
    coco: Path | None = None
    tiles: TileRule | None = None

    def __post_init__(self) -> None:
        if self.objects not in ("single", "multi"):
            raise ValueError(f"objects must be single or multi, got {self.objects!r}")
        if self.refine not in REFINE_METHODS:
            raise ValueError(f"refine must be one of {', '.join(REFINE_METHODS)}, got {self.refine!r}")

    @property
    def with_rle(self) -> bool:
        return self.rle or self.coco is not None

    @property
    def several_objects(self) -> bool:
        """Whether a class may get several objects (each prediction then says which, as ``object``)."""
        return self.objects == "multi" or self.tiles is not None


@exact_float32()
def localize_image(
    model: LoadedModel,
    image: Image.Image,
    config: LocalizeConfig,
    options: MultiOptions = MultiOptions(),
    label: int | None = None,
    keep_maps: bool = False,
) -> list[Localization]:
    """Every class and object ``options`` asks for in one image, class by class (in the rule's order),
    and within a class object by object (largest first).

    Args:
        model, config: the classifier and the method's parameters.
        image: the image at its original size.
        options: the class rule, objects mode and mask refinement.
        label: the class to localize when ``options.classes`` is None (None: the top-1 class).
        keep_maps: keep the per-neuron maps for the explain figure.

    Raises:
        ValueError: ``objects="multi"`` in neurons mode (it splits the density-mode vote map); tiles
            without named classes; a class index the model does not have.
        neuroloc.masks.RefinementUnavailable: ``refine="grabcut"`` without OpenCV.
    """
    from neuroloc.hooks import gradients_on

    with gradients_on(model.module):
        return _localize_image(model, image, config, options, label, keep_maps)


# Neurons mode and the explain figure localize each class of an image in a copy of it; --top 50 as one batch
# took 5.4 GB.
COPIES_PER_BATCH = 8


def _localize_image(
    model: LoadedModel, image: Image.Image, config: LocalizeConfig, options: MultiOptions, label: int | None,
    keep_maps: bool,
) -> list[Localization]:
    from neuroloc.pipeline import gather_class_evidence, gather_evidence, image_to_input, localize_batch

    rule = options.classes or ClassRule(classes=() if label is None else (label,))
    if outside := [c for c in rule.classes if not 0 <= int(c) < len(model.classes)]:
        raise ValueError(f"class index {outside[0]} is out of range for {model.name}'s {len(model.classes)} classes")
    if config.mode != "density" and options.objects == "multi":
        raise ValueError("several objects per class need density mode (--mode density)")
    if options.tiles is not None:
        from neuroloc.tiles import localize_tiled

        if not rule.classes:
            raise ValueError("tiles look for named classes: give the class (--class or --classes)")
        results = localize_tiled(model, image, config, rule.classes, options.tiles)
    elif config.mode == "density" and not keep_maps:  # one forward pass, then a backward pass per class
        inputs = image_to_input([image], model)
        results = _density_results(image, gather_class_evidence(model, inputs, rule.choose, config), config, options, model)
    else:  # copies of the image, one per class, a batch at a time: each holds kmax full-size neuron maps
        inputs = image_to_input([image], model)
        results = []
        for chosen in _batches_of_copies(list(rule.classes) or rule.choose(_probabilities(model, inputs))):
            if config.mode != "density":
                results += localize_batch(model, [image] * len(chosen), config, chosen, keep_maps=keep_maps)
            else:  # the explain figure's neuron maps take a guided backward pass per neuron
                evidence = gather_evidence(model, inputs.repeat(len(chosen), 1, 1, 1), chosen, config, neuron_maps=True)
                results += _density_results(image, evidence, config, options, model, keep_maps=True)
    if options.refine != "none":
        results = _refined(image, results, options.refine)
    return results


def _batches_of_copies(labels: Sequence[int]) -> Iterator[list[int]]:
    """``labels`` in batches of at most :data:`COPIES_PER_BATCH`, one copy of the image per label."""
    for start in range(0, len(labels), COPIES_PER_BATCH):
        yield list(labels[start : start + COPIES_PER_BATCH])


def _density_results(
    image: Image.Image, evidence: Evidence, config: LocalizeConfig, options: MultiOptions, model: LoadedModel,
    keep_maps: bool = False,
) -> list[Localization]:
    """The objects of each class in ``evidence``: its density map cut, split into objects when asked."""
    from neuroloc.evidence import density_level, region_at
    from neuroloc.pipeline import refine_region, region_result

    assert evidence.density is not None, "density mode keeps the map it cuts"
    results: list[Localization] = []
    for j, (density, votes) in enumerate(zip(evidence.density, evidence.votes)):
        level = density_level(density, config)
        # The class's own votes seed the objects (look-alike features of other classes are not its
        # objects); the whole map, cut as single mode cuts it, gives their extent.
        regions = split_objects(votes, level, options.object_rule, density) if options.objects == "multi" else []
        if len(regions) < 2:  # one object: the component holding the most of the class's votes
            regions = [region_at(density, level, votes)]
        if config.refine != "none":
            regions = [refine_region(image, r, density, votes, level, model.input_size) for r in regions]
            if len(regions) > 1:  # GrabCut can grow two split objects back into one
                regions = distinct_regions(regions)
        results.extend(region_result(image, region, evidence, j, config, model, keep_maps) for region in regions)
    return results


def distinct_regions(regions: Sequence[np.ndarray], keep: float = 0.5) -> list[np.ndarray]:
    """``regions`` largest first, each without the pixels of the larger ones kept before it; a region left with
    under ``keep`` of its own area repeats an earlier one and is dropped (the largest is always kept)."""
    taken = np.zeros_like(regions[0], dtype=bool)
    distinct: list[np.ndarray] = []
    for region in sorted(regions, key=lambda r: -int(r.sum())):
        rest = region & ~taken
        if not distinct or (rest.any() and rest.sum() >= keep * region.sum()):
            distinct.append(rest if distinct else region)
            taken |= distinct[-1]
    return distinct


def _refined(image: Image.Image, results: list[Localization], method: str) -> list[Localization]:
    """Each result's mask redrawn along the image's colours (:func:`neuroloc.masks.refine_mask`), at full size."""
    return [replace(r, mask=refine_mask(image, r.full_mask(), method), mask_origin=None) for r in results]


def _probabilities(model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    import torch

    from neuroloc.hooks import hooks_turn
    from neuroloc.rescore import class_probabilities

    with torch.no_grad(), hooks_turn(model.module):  # not while another thread's hooks are on a shared model
        return class_probabilities(model.module(inputs))[0]


def object_indices(results: Sequence[Localization]) -> list[int]:
    """Each result's object index within its class: 0 for the first result of a label, then 1, 2, ..."""
    seen: Counter[int] = Counter()
    indices = []
    for result in results:
        indices.append(seen[result.label])
        seen[result.label] += 1
    return indices


def prediction_dicts(
    results: Sequence[Localization], with_neurons: bool = True, options: MultiOptions = MultiOptions()
) -> list[dict[str, Any]]:
    """The "predictions" of one JSON line: each result's dict, with ``object`` (its index within its
    class) in multi-object mode and ``mask`` (COCO RLE at the image's resolution) when asked for."""
    predictions = []
    for result, index in zip(results, object_indices(results)):
        prediction = result.prediction_dict(with_neurons)
        if options.several_objects:
            prediction["object"] = index
        if options.with_rle:
            prediction["mask"] = encode_rle(result.full_mask())
        predictions.append(prediction)
    return predictions


def mask_file_name(name: str, position: int) -> str:
    """``<name>_<position>.png``: the mask PNG of the prediction at ``position`` in an image's record."""
    return f"{name}_{position}.png"
