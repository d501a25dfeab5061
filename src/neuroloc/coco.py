"""COCO detection/segmentation JSON from a run's records, for the tools that read COCO results.

The document has the keys of a COCO annotation file: ``images`` (id, file_name, width, height),
``categories`` (the ImageNet classes that occur: id = ImageNet-1k index, name, synset), and
``annotations``, one per prediction: bbox [x, y, width, height] in pixels, score (the class probability),
segmentation (COCO compressed RLE at the image's resolution) and its area, iscrowd 0, and ``object``
(the object's index within its class) and ``confidence`` (the localization confidence) where the record has
them. Images whose line is an error are left out. ``neuroloc export`` passes its own categories (ids 1..n in
classes.txt order, see docs/export.md); each category then also names its ``imagenet_index``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from neuroloc.classes import imagenet_classes
from neuroloc.jsonl import write_text_atomic
from neuroloc.masks import rle_area


@dataclass(frozen=True)
class Category:
    """A COCO category: its id in the file, and the ImageNet-1k class it stands for."""

    id: int
    imagenet_index: int
    name: str
    synset: str


def coco_document(records: Iterable[dict[str, Any]], categories: Sequence[Category] | None = None) -> dict[str, Any]:
    """The COCO document of JSON Lines records (as ``neuroloc localize`` writes them), in their order.

    Without ``categories`` a category's id is its ImageNet-1k index; with them, every prediction's class must
    be one of them, and they are the document's categories in their order.
    """
    ids = None if categories is None else {c.imagenet_index: c.id for c in categories}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    models: set[str] = set()
    for record in records:
        if record.get("error") is not None or record.get("width") is None:
            continue
        image_id = len(images) + 1
        size = {"width": record["width"], "height": record["height"]}
        images.append({"id": image_id, "file_name": record["image"], **size})
        models.add(str(record.get("model")))
        for prediction in record.get("predictions", []):
            annotations.append(_annotation(prediction, image_id, len(annotations) + 1, ids))
    if categories is None:
        used = {a["category_id"] for a in annotations}
        category_list = [
            {"id": c.index, "name": c.short_name, "synset": c.synset, "supercategory": "imagenet"}
            for c in imagenet_classes()
            if c.index in used
        ]
        rule = "category id = ImageNet-1k class index"
    else:
        category_list = [
            {"id": c.id, "name": c.name, "synset": c.synset, "imagenet_index": c.imagenet_index,
             "supercategory": "imagenet"}
            for c in categories
        ]
        rule = "imagenet_index = ImageNet-1k class index"
    info = {
        "description": f"neuroloc localizations ({rule})",
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


def write_coco(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write the COCO document of ``records`` to ``path`` atomically (a complete file or none)."""
    return write_text_atomic(Path(path), json.dumps(coco_document(records), ensure_ascii=False))


def _version() -> str:
    try:
        return metadata.version("neuroloc")
    except metadata.PackageNotFoundError:
        return "unknown"
