"""Evaluation datasets: ``images/`` + ``boxes.csv``, the ILSVRC / Pascal VOC layout (one XML per image), or COCO
(``annotations.json``, or ``annotations/instances_<split>.json``, with the images)."""

from __future__ import annotations

import csv
import io
import json
import math
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from neuroloc.classes import ClassInfo, ClassList, ClassLookupError, resolve_class
from neuroloc.imageio import file_is_turned, file_upright_size

BoxList = tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True)
class Sample:
    """One case to score: a class of an image and that class's true boxes. An image with objects of several
    classes gives one sample per class (``image_classes`` > 1)."""

    image: Path
    label: int
    boxes: BoxList
    image_classes: int = 1
    # Top-1 evaluation of an image with boxes of several classes: one sample for the image, each class with its
    # boxes here, every box in ``boxes`` (:func:`one_sample_per_image`).
    classes: tuple[tuple[int, BoxList], ...] = ()
    # The image size the annotations give (XML, COCO), which :func:`to_file_sizes` compares with the file. Where it
    # is not the file's upright size, the boxes were scaled from it to the file (an image resized after it was
    # annotated), or, when it is the stored size of a file that an EXIF orientation turns, left as they are
    # (``stored_frame``: drawn on the stored pixels, most likely)
    declared_size: tuple[int, int] | None = None
    scaled_from: tuple[int, int] | None = None
    stored_frame: bool = False

    @property
    def key(self) -> str:
        """What the harness's lines are keyed by: the image path, with ``#label`` when the image has several classes."""
        return str(self.image) if self.image_classes == 1 else f"{self.image}#{self.label}"

    def truths_for(self, predicted: object) -> tuple[int, BoxList]:
        """The class a prediction of class ``predicted`` is scored as, and the boxes it is scored against: for a
        sample of several classes, ``predicted`` and its boxes when the image has that class, else the first class
        and every box (the class is wrong); for any other sample, its own class and boxes."""
        for label, boxes in self.classes:
            if label == predicted:
                return label, boxes
        return self.label, self.boxes


def image_groups(samples: Sequence[Sample]) -> list[list[Sample]]:
    """``samples`` gathered by image, in order: an image with several classes is one group."""
    groups: dict[Path, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.image, []).append(sample)
    return list(groups.values())


def one_sample_per_image(samples: Sequence[Sample]) -> list[Sample]:
    """The samples with those of one image gathered into one (:attr:`Sample.classes`), as top-1 localization
    scores an image: once, right when its one prediction is one of its classes and finds a box of it."""
    return [group[0] if len(group) == 1 else
            Sample(group[0].image, group[0].label, tuple(box for s in group for box in s.boxes), 1,
                   tuple((s.label, s.boxes) for s in group), group[0].declared_size, group[0].scaled_from,
                   group[0].stored_frame)
            for group in image_groups(samples)]


# Which classes of an image are scored: every class with a box there (one sample each), or the first object's.
IMAGE_CLASSES = ("all", "first")


class DatasetError(ValueError):
    """A dataset folder that cannot be read."""


def has_annotations(root: str | Path) -> bool:
    """Whether ``root`` holds one of the box files :func:`load_dataset` reads (then it is a dataset, even if the
    file is broken)."""
    return _annotation_kind(Path(root)) is not None


def _annotation_kind(root: Path) -> str | None:
    """Which box files ``root`` holds: ``csv``, ``xml``, ``coco``, or None."""
    if (root / "boxes.csv").is_file():
        return "csv"
    if (root / "Annotations").is_dir() or any(root.glob("*.xml")):
        return "xml"
    return "coco" if _coco_file(root) is not None else None


def load_dataset(root: str | Path, classes: ClassList | None = None, image_classes: str = "all") -> list[Sample]:
    """Read ``root``: ``boxes.csv`` (image,synset,label,xmin,ymin,xmax,ymax) beside ``images/``,
    ``Annotations/*.xml`` (ILSVRC / VOC) beside ``images/`` or ``JPEGImages/``, or COCO: ``annotations.json``
    (as ``neuroloc export --format coco`` writes it) or the one ``annotations/instances_*.json``, with images
    under ``images/``, the split's folder (``val2017/`` for ``instances_val2017.json``) or ``root`` itself.
    Sorted by image path.

    Class names (a CSV row without ``label``, a VOC object's ``name``, a COCO category's ``synset``, index or
    ``name``) are looked up among ``classes``: a model's own (:func:`neuroloc.classes.read_class_names`), by
    default ImageNet-1k's (WordNet ids or names). ``image_classes="all"``: an image gives one sample for each
    class it has boxes of, in the order of their first object, each with that class's boxes; ``"first"``: only
    the class of its first object (COCO: its first annotation that is not a crowd). Images without objects are
    left out."""
    if image_classes not in IMAGE_CLASSES:
        raise ValueError(f"image_classes must be one of {', '.join(IMAGE_CLASSES)}, not {image_classes!r}")
    root = Path(root)
    kind = _annotation_kind(root)
    declared: dict[Path, tuple[int, int]] = {}  # the image sizes XML and COCO files give
    if kind == "csv":
        objects = _from_csv(root, classes)
    elif kind == "xml":
        objects, declared = _from_xml(root, root / "Annotations" if (root / "Annotations").is_dir() else root, classes)
    elif (coco := _coco_file(root)) is not None:
        objects, declared = _from_coco(root, coco, classes)
    else:
        raise DatasetError(f"{root}: expected boxes.csv + images/, Annotations/*.xml, or COCO's annotations.json")
    samples = []
    for image in sorted(objects, key=str):
        by_class: dict[int, list[tuple[float, float, float, float]]] = {}
        for label, box in objects[image]:
            by_class.setdefault(label, []).append(box)
        if image_classes == "first":
            by_class = dict(list(by_class.items())[:1])
        samples += [Sample(image, label, tuple(boxes), len(by_class), declared_size=declared.get(image))
                    for label, boxes in by_class.items()]
    return samples


def to_file_sizes(samples: Sequence[Sample], sizes: Mapping[Path, tuple[int, int]] | None = None) -> list[Sample]:
    """``samples`` with their boxes in their files' upright pixels: where the annotations give another image size
    (:attr:`Sample.declared_size`), scaled to the file, or marked ``stored_frame`` when that size is the stored one
    of a file that its EXIF orientation turns. The upright sizes are taken from ``sizes`` (image -> (width,
    height), as :func:`neuroloc.evaluation.harness.image_sizes` reads them; an image missing there is left as it
    is), else read from the header of each image with a declared size: call it on the samples that will be used."""
    return [_to_file_size(sample, sizes) for sample in samples]


def _to_file_size(sample: Sample, sizes: Mapping[Path, tuple[int, int]] | None) -> Sample:
    declared = sample.declared_size
    if declared is None:
        return sample
    upright = sizes.get(sample.image) if sizes is not None else file_upright_size(sample.image)
    if declared is None or upright is None or upright == declared:
        return sample
    if upright == declared[::-1] and file_is_turned(sample.image):
        return replace(sample, stored_frame=True)
    sx, sy = upright[0] / declared[0], upright[1] / declared[1]

    def scaled(boxes: BoxList) -> BoxList:
        return tuple((x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes)

    return replace(sample, boxes=scaled(sample.boxes), classes=tuple((c, scaled(b)) for c, b in sample.classes),
                   scaled_from=declared)


Objects = dict[Path, list[tuple[int, tuple[float, float, float, float]]]]  # image -> (class, box) of each object


def _from_csv(root: Path, classes: ClassList | None) -> Objects:
    objects: Objects = defaultdict(list)
    try:
        text = (root / "boxes.csv").read_text(encoding="utf-8-sig")  # -sig: Excel's "UTF-8 CSV" too
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{root / 'boxes.csv'}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from None
    with io.StringIO(text, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                box = checked_box([row[k] for k in ("xmin", "ymin", "xmax", "ymax")])
                label = _agreed_class(row, classes)
                objects[root / "images" / row["image"]].append((label, box))
            except KeyError as exc:
                raise DatasetError(f"{root / 'boxes.csv'}, line {line}: no {exc} column or value") from None
            except (ValueError, TypeError) as exc:
                raise DatasetError(f"{root / 'boxes.csv'}, line {line}: {_one_line(exc)}") from None
    return objects


def _agreed_class(row: dict[str, str], classes: ClassList | None) -> int:
    """A boxes.csv row's class index (:func:`_class_column`), checked against its other class columns: a ``label``
    and a ``synset`` that name two classes are a mistake in the file, not a choice between them."""
    column, value = _class_column(row)
    chosen = resolve_class(int(value) if column == "label" else value, classes)
    for other_column in CLASS_COLUMNS[CLASS_COLUMNS.index(column) + 1 :]:
        other_value = row.get(other_column)
        if other_value in (None, ""):
            continue
        try:
            other = resolve_class(other_value, classes)
        except ClassLookupError:  # a column this model's classes cannot read (a synset, for a model of its own)
            continue
        if other.index != chosen.index:
            raise ValueError(f"its {column} {value} ({chosen.short_name}) and its {other_column} {other_value} "
                             f"({other.short_name}) name two classes; correct one of them")
    return chosen.index


CLASS_COLUMNS = ("label", "synset", "class")  # in the order a row's class is taken from


def _class_column(row: dict[str, str]) -> tuple[str, str]:
    """A boxes.csv row's class column and value: its ``label`` (an index), else its ``synset`` (a WordNet id),
    else its ``class`` (any name, index or id, as localize's manifests give it)."""
    for column in CLASS_COLUMNS:
        if row.get(column) not in (None, ""):
            return column, row[column]
    raise ValueError("no class: give a 'label' (class index), 'synset' (WordNet id) or 'class' (name) column")


def checked_box(values: Sequence[Any]) -> tuple[float, float, float, float]:
    """``[xmin, ymin, xmax, ymax]`` as floats, which must be finite with xmin < xmax and ymin < ymax.

    Raises:
        ValueError: otherwise (TypeError for a missing value).
    """
    if len(values) != 4:
        raise ValueError(f"a box needs 4 coordinates, not {len(values)}")
    if any(v is None for v in values):
        raise TypeError("a box coordinate is missing")
    x0, y0, x1, y1 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {[x0, y0, x1, y1]} has a coordinate that is not a finite number")
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box {[x0, y0, x1, y1]} is empty or inverted (xmin < xmax and ymin < ymax expected)")
    return x0, y0, x1, y1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _from_xml(root: Path, annotations: Path, classes: ClassList | None) -> tuple[Objects, dict[Path, tuple[int, int]]]:
    image_dir = next((d for d in (root / "images", root / "JPEGImages", root) if d.is_dir()), root)
    found: Objects = {}
    sizes: dict[Path, tuple[int, int]] = {}
    named_by: dict[Path, Path] = {}
    for xml_path in sorted(annotations.glob("*.xml")):
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            raise DatasetError(f"{xml_path}: not readable XML ({exc})") from None
        filename = tree.findtext("filename") or xml_path.stem
        # VOC's protocol does not ask for objects marked difficult: a class with difficult objects only is no case
        # (nor an image of them only), but a box on a difficult object of a class that is asked for counts as found
        objects = tree.findall("object")
        difficult = [(obj.findtext("difficult") or "0").strip() == "1" for obj in objects]
        if all(difficult):
            continue
        try:
            asked = {resolve_class(obj.findtext("name", ""), classes).index
                     for obj, hard in zip(objects, difficult, strict=True) if not hard}
        except ClassLookupError as exc:
            raise DatasetError(f"{xml_path}: {exc}") from None
        # every object of a class asked for, difficult ones too; difficult ones of other classes are left out
        kept = [(obj, name) for obj in objects if (name := _class_or_none(obj.findtext("name", ""), classes)) in asked]
        objects, names = [obj for obj, _ in kept], [name for _, name in kept]
        path = image_dir / filename
        if not path.suffix:
            path = path.with_suffix(".JPEG")
        if path in named_by:  # two images of one name (from two folders): one would silently take the other's boxes
            raise DatasetError(f"{named_by[path].name} and {xml_path.name} both name the image {filename}; "
                               "give each image its own file name")
        named_by[path] = xml_path
        # ILSVRC counts pixels from 0 (boxes at x 0, none ending at the width), VOC from 1
        from_zero = "ilsvrc" in (tree.findtext("source/database") or "").lower()  # not by file name: VOC files of
        # ImageNet pictures (neuroloc's own export, labelImg) count from 1
        try:
            found[path] = [(name, _xml_box(obj, from_zero)) for obj, name in zip(objects, names)]
        except ValueError as exc:
            raise DatasetError(f"{xml_path}: {exc}") from None
        if size := _positive_size(tree.findtext("size/width"), tree.findtext("size/height")):
            sizes[path] = size
    return found, sizes


def _positive_size(width: object, height: object) -> tuple[int, int] | None:
    """A (width, height) of positive whole numbers, or None (missing, zero as some tools write, or not numbers)."""
    try:
        size = (int(str(width).strip()), int(str(height).strip()))
    except ValueError:
        return None
    return size if min(size) > 0 else None


def _class_or_none(name: str, classes: ClassList | None) -> int | None:
    try:
        return resolve_class(name, classes).index
    except ClassLookupError:  # an object marked difficult, of a class the model does not know ("person")
        return None


def _xml_box(obj: ET.Element, from_zero: bool = False) -> tuple[float, float, float, float]:
    bb = obj.find("bndbox")
    if bb is None:
        raise ValueError(f"an object ({obj.findtext('name', '')}) has no bndbox")
    # The first and the last pixel inside the box, both included. VOC numbers pixels from 1: as continuous
    # coordinates from 0 that is [xmin - 1, ymin - 1, xmax, ymax] (as Detectron2 reads it, and as the VOC export
    # writes it: docs/export.md). ILSVRC numbers them from 0 (``from_zero``): [xmin, ymin, xmax + 1, ymax + 1].
    missing = [k for k in ("xmin", "ymin", "xmax", "ymax") if not (bb.findtext(k) or "").strip()]
    if missing:
        raise ValueError(f"an object ({obj.findtext('name', '')}) has no {missing[0]} in its bndbox")
    x0, y0, x1, y1 = (float(bb.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
    return checked_box([x0, y0, x1 + 1, y1 + 1] if from_zero else [x0 - 1, y0 - 1, x1, y1])


def _coco_file(root: Path) -> Path | None:
    if (root / "annotations.json").is_file():
        return root / "annotations.json"
    found = sorted((root / "annotations").glob("instances_*.json")) if (root / "annotations").is_dir() else []
    if len(found) > 1:
        raise DatasetError(f"{root / 'annotations'}: {len(found)} instances_*.json files; give a folder with one")
    return found[0] if found else None


def _from_coco(root: Path, path: Path, classes: ClassList | None) -> tuple[Objects, dict[Path, tuple[int, int]]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
        images = {int(im["id"]): str(im["file_name"]) for im in document["images"]}
        given_sizes = {int(im["id"]): size for im in document["images"]
                       if (size := _positive_size(im.get("width"), im.get("height")))}
        if (twice := _repeated(int(im["id"]) for im in document["images"])) is not None:
            raise DatasetError(f"{path}: two images have the id {twice}; their boxes cannot be told apart")
        if (shared := _repeated(str(im["file_name"]) for im in document["images"])) is not None:
            raise DatasetError(f"{path}: two image entries name the file {shared!r}; give each image once")
        categories = {int(c["id"]): c for c in document["categories"]}
        annotations = [a for a in document["annotations"] if not a.get("iscrowd")]
        used = {int(a["category_id"]) for a in annotations}  # a category without boxes need not be a class here
        labels = {cid: _coco_class(categories[cid], classes).index for cid in used}
        grouped: dict[int, list[tuple[int, tuple[float, float, float, float]]]] = defaultdict(list)
        for a in annotations:
            x, y, w, h = (float(v) for v in a["bbox"])
            grouped[int(a["image_id"])].append((labels[int(a["category_id"])], checked_box([x, y, x + w, y + h])))
    except ClassLookupError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None
    split = path.stem.removeprefix("instances_") if path.parent.name == "annotations" else None
    folders = [root / "images", *([root / split] if split else []), root]
    found: Objects = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for image_id, objects in grouped.items():
        if image_id not in images:
            raise DatasetError(f"{path}: an annotation names image id {image_id}, which is not among its images")
        name = images[image_id]
        image = next((folder / name for folder in folders if (folder / name).is_file()), folders[0] / name)
        found[image] = objects
        if image_id in given_sizes:
            sizes[image] = given_sizes[image_id]
    return found, sizes


def _repeated(values: Iterable[Any]) -> Any:
    """The first value given twice, or None."""
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _coco_class(category: dict[str, Any], classes: ClassList | None) -> ClassInfo:
    """A category's class: by its WordNet id, else its class index, else its name."""
    for key in ("synset", "imagenet_index", "class_index", "name"):
        if category.get(key) is not None:
            return resolve_class(category[key], classes)
    raise KeyError("name")
