"""Evaluation datasets: ``images/`` + ``boxes.csv``, or the ILSVRC / Pascal VOC layout (one XML per image)."""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from neuroloc.classes import ClassList, ClassLookupError, resolve_class

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

    Class names (a CSV row without ``label``, a VOC object's ``name``) are looked up among ``classes``: a
    model's own (:func:`neuroloc.classes.read_class_names`), by default ImageNet-1k's (WordNet ids or names)."""
    root = Path(root)
    if (root / "boxes.csv").is_file():
        return _from_csv(root, classes)
    annotations = root / "Annotations"
    if annotations.is_dir() or list(root.glob("*.xml")):
        return _from_xml(root, annotations if annotations.is_dir() else root, classes)
    raise DatasetError(f"{root}: expected boxes.csv + images/, or Annotations/*.xml")


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
