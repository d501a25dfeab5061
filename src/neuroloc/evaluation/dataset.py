"""Evaluation datasets: ``images/`` + ``boxes.csv``, the ILSVRC / Pascal VOC layout (one XML per image), or COCO
(``annotations.json``, or ``annotations/instances_<split>.json``, with the images)."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroloc.classes import ClassInfo, ClassList, ClassLookupError, resolve_class

BoxList = tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True)
class Sample:
    image: Path
    label: int
    boxes: BoxList


class DatasetError(ValueError):
    """A dataset folder that cannot be read."""


def load_dataset(root: str | Path, classes: ClassList | None = None) -> list[Sample]:
    """Read ``root``: ``boxes.csv`` (image,synset,label,xmin,ymin,xmax,ymax) beside ``images/``,
    or ``Annotations/*.xml`` (ILSVRC / VOC) beside ``images/`` or ``JPEGImages/``. Sorted by image name.

    or COCO: ``annotations.json`` (as ``neuroloc export --format coco`` writes it) or the one
    ``annotations/instances_*.json``, with images under ``images/``, the split's folder (``val2017/`` for
    ``instances_val2017.json``) or ``root`` itself.

    Class names (a CSV row without ``label``, a VOC object's ``name``, a COCO category's ``synset``, index or
    ``name``) are looked up among ``classes``: a model's own (:func:`neuroloc.classes.read_class_names`), by
    default ImageNet-1k's (WordNet ids or names). An image takes the class of its first object (COCO: its first
    annotation that is not a crowd) and the boxes of that class; images without objects are left out."""
    root = Path(root)
    if (root / "boxes.csv").is_file():
        return _from_csv(root, classes)
    annotations = root / "Annotations"
    if annotations.is_dir() or list(root.glob("*.xml")):
        return _from_xml(root, annotations if annotations.is_dir() else root, classes)
    coco = _coco_file(root)
    if coco is not None:
        return _from_coco(root, coco, classes)
    raise DatasetError(f"{root}: expected boxes.csv + images/, Annotations/*.xml, or COCO's annotations.json")


def _from_csv(root: Path, classes: ClassList | None) -> list[Sample]:
    grouped: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    labels: dict[str, int] = {}
    with open(root / "boxes.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                box = tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                given = row.get("label") not in (None, "")
                label = int(row["label"]) if given else resolve_class(row["synset"], classes).index
            except (KeyError, ValueError) as exc:
                raise DatasetError(f"{root / 'boxes.csv'}: bad row {row}: {exc}") from None
            grouped[row["image"]].append(box)  # type: ignore[arg-type]
            labels[row["image"]] = label
    images = root / "images"
    return [Sample(images / name, labels[name], tuple(grouped[name])) for name in sorted(grouped)]


def _from_xml(root: Path, annotations: Path, classes: ClassList | None) -> list[Sample]:
    image_dir = next((d for d in (root / "images", root / "JPEGImages", root) if d.is_dir()), root)
    samples = []
    for xml_path in sorted(annotations.glob("*.xml")):
        tree = ET.parse(xml_path).getroot()
        filename = tree.findtext("filename") or xml_path.stem
        objects = tree.findall("object")
        if not objects:
            continue
        try:
            names = [resolve_class(obj.findtext("name", ""), classes).index for obj in objects]
        except ClassLookupError as exc:
            raise DatasetError(f"{xml_path}: {exc}") from None
        label = names[0]
        boxes = []
        for obj, name in zip(objects, names):
            if name != label:
                continue
            bb = obj.find("bndbox")
            boxes.append(tuple(float(bb.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax")))
        path = image_dir / filename
        if not path.suffix:
            path = path.with_suffix(".JPEG")
        samples.append(Sample(path, label, tuple(boxes)))  # type: ignore[arg-type]
    return samples


def _coco_file(root: Path) -> Path | None:
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    found = sorted((root / "annotations").glob("instances_*.json")) if (root / "annotations").is_dir() else []
    if len(found) > 1:
        raise DatasetError(f"{root / 'annotations'}: {len(found)} instances_*.json files; give a folder with one")
    return found[0] if found else None


def _from_coco(root: Path, path: Path, classes: ClassList | None) -> list[Sample]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        images = {int(im["id"]): str(im["file_name"]) for im in document["images"]}
        categories = {int(c["id"]): c for c in document["categories"]}
        annotations = [a for a in document["annotations"] if not a.get("iscrowd")]
        used = {int(a["category_id"]) for a in annotations}  # a category without boxes need not be a class here
        labels = {cid: _coco_class(categories[cid], classes).index for cid in used}
        grouped: dict[int, list[tuple[int, tuple[float, float, float, float]]]] = defaultdict(list)
        for a in annotations:
            x, y, w, h = (float(v) for v in a["bbox"])
            grouped[int(a["image_id"])].append((labels[int(a["category_id"])], (x, y, x + w, y + h)))
    except ClassLookupError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None
    split = path.stem.removeprefix("instances_") if path.parent.name == "annotations" else None
    folders = [root / "images", *([root / split] if split else []), root]
    samples = []
    for image_id, objects in grouped.items():
        if image_id not in images:
            raise DatasetError(f"{path}: an annotation names image id {image_id}, which is not among its images")
        name = images[image_id]
        image = next((folder / name for folder in folders if (folder / name).is_file()), folders[0] / name)
        label = objects[0][0]
        samples.append(Sample(image, label, tuple(box for lab, box in objects if lab == label)))
    return sorted(samples, key=lambda s: str(s.image))


def _coco_class(category: dict[str, Any], classes: ClassList | None) -> ClassInfo:
    """A category's class: by its WordNet id, else its class index, else its name."""
    for key in ("synset", "imagenet_index", "class_index", "name"):
        if category.get(key) is not None:
            return resolve_class(category[key], classes)
    raise KeyError("name")
