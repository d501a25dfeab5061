"""COCO detection/segmentation JSON from a run's records, for the tools that read COCO results.

The document has the keys of a COCO annotation file: ``images`` (id, file_name, width, height),
``categories`` (the classes that occur: id = the model's class index, name, and for ImageNet classes synset),
``annotations``, one per prediction: bbox [x, y, width, height] in pixels, score (the class probability),
segmentation (COCO compressed RLE at the image's resolution) and its area, iscrowd 0, and ``object``
(the object's index within its class) and ``confidence`` (the localization confidence) where the record has
them. Images whose line is an error are left out. ``neuroloc export`` passes its own categories (ids 1..n in
classes.txt order, see docs/export.md); each category then also names its ``imagenet_index`` (ImageNet classes)
or ``class_index`` (a model's own classes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from neuroloc.classes import recorded_class, unique_class_names
from neuroloc.jsonl import has_boxes, write_text_atomic
from neuroloc.masks import rle_area

DESCRIPTION = "neuroloc localizations"  # how a COCO document written by neuroloc describes itself


@dataclass(frozen=True)
class Category:
    """A COCO category: its id in the file, and the model's class it stands for (``synset``: its WordNet id
    for an ImageNet class, None for a model's own class)."""

    id: int
    label: int
    name: str
    synset: str | None

    def as_json(self, with_index: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.id, "name": self.name}
        if self.synset is not None:
            entry["synset"] = self.synset
        if with_index:
            entry["imagenet_index" if self.synset is not None else "class_index"] = self.label
        entry["supercategory"] = "imagenet" if self.synset is not None else "object"
        return entry


def coco_document(records: Iterable[dict[str, Any]], categories: Sequence[Category] | None = None) -> dict[str, Any]:
    """The COCO document of JSON Lines records (as ``neuroloc localize`` writes them), in their order.

    Without ``categories`` a category's id is the model's class index; with them, every prediction's class must
    be one of them, and they are the document's categories in their order.
    """
    ids = None if categories is None else {c.label: c.id for c in categories}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    models: set[str] = set()
    records_seen: list[dict[str, Any]] = []
    for record in records:
        if not has_boxes(record) or record.get("width") is None:
            continue
        records_seen.append(record)
        image_id = len(images) + 1
        size = {"width": record["width"], "height": record["height"]}
        images.append({"id": image_id, "file_name": record["image"], **size})
        models.add(str(record.get("model")))
        for prediction in record.get("predictions", []):
            if prediction.get("empty") is not True:  # no region found: a box "here" would be a false detection
                annotations.append(_annotation(prediction, image_id, len(annotations) + 1, ids))
    if categories is None:
        category_list = [c.as_json(with_index=False) for c in _record_categories(records_seen)]
        rule = "category id = the model's class index"
    else:
        category_list = [c.as_json(with_index=True) for c in categories]
        rule = "imagenet_index / class_index = the model's class index"
    info = {
        "description": f"{DESCRIPTION} ({rule})",
        "version": _version(),
        "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": ", ".join(sorted(models)),
    }
    return {"info": info, "licenses": [], "images": images, "categories": category_list, "annotations": annotations}


def _annotation(
    prediction: dict[str, Any], image_id: int, annotation_id: int, ids: dict[int, int] | None = None
) -> dict[str, Any]:
    x0, y0, x1, y1 = prediction["box"]
    label = prediction["label"]
    if ids is not None and label not in ids:
        raise ValueError(f"class {label} of image {image_id} is not among the categories")
    annotation: dict[str, Any] = {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": label if ids is None else ids[label],
        "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
        "score": prediction["score"],
        "iscrowd": 0,
    }
    mask = prediction.get("mask")
    if mask is not None:
        annotation["segmentation"] = mask
        annotation["area"] = rle_area(mask)
    else:
        annotation["area"] = round((x1 - x0) * (y1 - y0), 2)
    if "object" in prediction:
        annotation["object"] = prediction["object"]
    if prediction.get("confidence") is not None:
        annotation["confidence"] = prediction["confidence"]
    return annotation


def _record_categories(records: Iterable[dict[str, Any]]) -> list[Category]:
    """The categories of the predictions in ``records`` (id = class index), by index: an ImageNet class under its
    first synonym (with its WordNet id where two classes share it), a model's own class under the name its
    predictions carry."""
    found: dict[int, Category] = {}
    for record in records:
        for prediction in record.get("predictions", []):
            if prediction.get("empty") is True:
                continue
            cls = recorded_class(prediction)
            found.setdefault(cls.index, Category(cls.index, cls.index,
                                                 unique_class_names()[cls.index] if cls.synset else cls.name, cls.synset))
    return [found[label] for label in sorted(found)]


def is_coco_file(path: Path) -> bool:
    """Whether ``path`` holds a COCO document that neuroloc wrote (:func:`coco_document`'s ``info``), which a new run
    may replace; a dataset's own COCO annotations are not."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    info = document.get("info") if isinstance(document, dict) else None
    return isinstance(info, dict) and str(info.get("description", "")).startswith(DESCRIPTION)


def write_coco(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write the COCO document of ``records`` to ``path`` atomically (a complete file or none)."""
    return write_text_atomic(Path(path), json.dumps(coco_document(records), ensure_ascii=False))


def _version() -> str:
    try:
        return metadata.version("neuroloc")
    except metadata.PackageNotFoundError:
        return "unknown"
