"""``neuroloc export``: a results file as COCO, Pascal VOC, YOLO, Label Studio or CSV files.

Reads the JSON Lines that ``neuroloc localize`` writes and turns them into what labelling and training
tools import: pre-annotations to correct, or boxes to train a detector on. Every file is written
atomically; the results file is only read. docs/export.md describes each format's files, the coordinate
conventions and the skip rules.

Classes: the ImageNet classes that occur among the exported boxes, sorted by ImageNet-1k index and numbered
0..n-1. That order and those names are the same in every format: line i of classes.txt is YOLO class i,
COCO category id i + 1 and the i-th Label Studio label. A class's name is its first ImageNet synonym, with
its WordNet id added where two ImageNet classes share that synonym ("crane (n02012849)").
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard
from urllib.parse import quote

import click

from neuroloc.classes import ClassLookupError, recorded_class, unique_class_names
from neuroloc.coco import Category, coco_document
from neuroloc.jsonl import finite_number, has_boxes, read_records, read_settings, strict_json, write_text_atomic
from neuroloc.masks import rle_problem
from neuroloc.options import FiniteFloatRange
from neuroloc.sources import absolute_path

FORMATS = ("coco", "voc", "yolo", "labelstudio", "csv")
# One row per box. The first columns after the image's size are those `neuroloc evaluate` reads from boxes.csv.
CSV_COLUMNS = ("image", "width", "height", "synset", "label", "xmin", "ymin", "xmax", "ymax", "name", "score",
               "confidence", "point_x", "point_y", "object")
SORTS = ("input", "confidence")
REVIEW_SHOWN = 10  # least confident images printed at the end of a --sort confidence export


class ExportError(ValueError):
    """A results file or a setting that cannot be exported; the message is one line."""


@dataclass(frozen=True)
class ExportClass:
    """A class of an export; ``index`` is its 0-based position (classes.txt line, YOLO class), ``label`` the
    model's class index (ImageNet-1k's for an ImageNet classifier), ``synset`` its WordNet id (None for a
    model's own classes)."""

    index: int
    label: int
    synset: str | None
    name: str


@dataclass(frozen=True)
class ExportBox:
    """A kept prediction, its box clamped to the image."""

    label: int  # the model's class index
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in continuous pixel coordinates
    score: float  # class probability
    confidence: float | None  # localization confidence; None in files written before it existed
    prediction: dict[str, Any]  # as recorded (mask, object ...), for COCO


@dataclass(frozen=True)
class ExportImage:
    """An image and its kept boxes (none for a background image, with ``Filters.keep_empty``)."""

    path: str  # as recorded
    shown: str  # as written into the export (relative to --image-root when given)
    name: str  # file stem for its per-image files, unique within the export
    width: int
    height: int
    model: str
    boxes: tuple[ExportBox, ...]
    file: str  # the absolute path (a relative recorded path taken from the folder the run started in)

    @property
    def confidence(self) -> float | None:
        """The least confident box's confidence; None if a box has none, or there is no box."""
        values = [b.confidence for b in self.boxes]
        if not values:
            return None
        return None if any(v is None for v in values) else min(v for v in values if v is not None)


@dataclass(frozen=True)
class Filters:
    """Which predictions are exported, and in what order."""

    min_confidence: float | None = None
    min_score: float | None = None
    sort: str = "input"  # or "confidence": least confident image first
    keep_empty: bool = False  # export images localize gave no box as images with no object (background)


# What str.splitlines() ends a line at: a path holding one cannot be a line of a list of image files.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


@dataclass
class Counts:
    """What was exported and what was skipped; a box counts under the first rule it fails."""

    unreadable: int = 0  # lines that are not a result record
    errors: int = 0  # images whose line is an error
    line_breaks: int = 0  # images whose path holds a line break: the line-based lists (images.txt ...) cannot name them
    empty: int = 0  # predictions marked empty, or whose box has no area inside the image
    below_score: int = 0
    below_confidence: int = 0
    no_box: int = 0  # images left without a box (skipped)
    background: int = 0  # images given no box by localize, exported as images with no object (keep_empty)
    images: int = 0
    boxes: int = 0


@dataclass(frozen=True)
class Selection:
    """The images and classes to export, in export order."""

    images: tuple[ExportImage, ...]
    classes: tuple[ExportClass, ...]
    counts: Counts
    sort: str

    def class_name(self, label: int) -> str:
        return next(c.name for c in self.classes if c.label == label)

    @property
    def with_confidence(self) -> bool:
        return all(b.confidence is not None for image in self.images for b in image.boxes)


@dataclass(frozen=True)
class Export:
    """The files of an export, by path relative to the output folder."""

    files: dict[str, str]  # text of each file
    links: dict[str, str]  # symbolic links: absolute path of the image each one points to
    notes: tuple[str, ...] = ()  # what the user should know about the files (one line each)


# --- reading and selecting ---------------------------------------------------------------------------------------


def load_results(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a results file, and how many of its non-blank lines are not records."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            lines = sum(1 for raw in f if raw.strip())
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = read_records(path)
    if not records:
        raise ExportError(f"{path} has no result lines (is it a JSON Lines file written by `neuroloc localize`?)")
    return records, lines - len(records)


def _image_file(record: dict[str, Any], started_in: str | None) -> str:
    """The absolute path of a record's image: its recorded path, relative to the folder the run started in."""
    return absolute_path(str(record["image"]), started_in)


def select(
    records: Sequence[dict[str, Any]], filters: Filters = Filters(), image_root: Path | None = None, unreadable: int = 0,
    started_in: str | None = None,
) -> Selection:
    """The images and boxes to export from ``records`` (as ``neuroloc localize`` writes them); relative image
    paths are taken from the folder ``started_in`` (default: this one).

    Raises:
        ExportError: for a malformed record, or a confidence filter or sort on boxes without "confidence".
    """
    counts = Counts(unreadable=unreadable)
    _refuse_repeated_images(records)
    found: list[tuple[dict[str, Any], list[ExportBox]]] = []
    for record in records:
        if not has_boxes(record):
            counts.errors += 1
            continue
        if any(c in LINE_BREAKS for c in _image_file(record, started_in)):
            counts.line_breaks += 1  # in the recorded path, or the folder it is relative to
            continue
        boxes, empty = _candidates(record)
        counts.empty += empty
        found.append((record, boxes))
    if filters.min_confidence is not None or filters.sort == "confidence":
        _require_confidence([b for _, boxes in found for b in boxes], filters)
    kept_records: list[tuple[dict[str, Any], list[ExportBox]]] = []
    for record, boxes in found:
        kept = []
        for box in boxes:
            if filters.min_score is not None and box.score < filters.min_score:
                counts.below_score += 1
            elif filters.min_confidence is not None and box.confidence is not None \
                    and box.confidence < filters.min_confidence:
                counts.below_confidence += 1
            else:
                kept.append(box)
        if kept:
            kept_records.append((record, kept))
        elif filters.keep_empty and not boxes:  # no box found, not boxes filtered out ("not sure" is no background)
            kept_records.append((record, []))
            counts.background += 1
        else:
            counts.no_box += 1
    names = unique_stems([r["image"] for r, _ in kept_records])
    files = [_image_file(r, started_in) for r, _ in kept_records]
    images = [
        ExportImage(record["image"], record["image"] if image_root is None else shown_path(file, image_root), name,
                    record["width"], record["height"], str(record.get("model") or "unknown"), tuple(boxes), file)
        for (record, boxes), name, file in zip(kept_records, names, files)
    ]
    if filters.sort == "confidence":
        images = [_boxes_by_confidence(i) for i in sorted(images, key=lambda i: _confidence_key(i.confidence))]
    counts.images = len(images)
    counts.boxes = sum(len(i.boxes) for i in images)
    return Selection(tuple(images), export_classes(b for i in images for b in i.boxes), counts, filters.sort)


def _refuse_repeated_images(records: Sequence[dict[str, Any]]) -> None:
    """Refuse an image with several lines (results files joined, or a line copied): each format holds one entry
    per image, and two of the same picture would enter a training set twice."""
    uses = Counter(os.path.normcase(os.path.normpath(record["image"])) for record in records)
    repeated = [image for image, n in uses.items() if n > 1]
    if repeated:
        raise ExportError(f"{_plural(len(repeated), 'image has', 'images have')} several result lines (e.g. "
                          f"{repeated[0]}, {uses[repeated[0]]}): keep one line per image (for several classes, "
                          "localize them in one run, e.g. --classes A,B)")


def _candidates(record: dict[str, Any]) -> tuple[list[ExportBox], int]:
    """The non-empty predictions of a record that is not an error, and how many were empty."""
    where = f"the line of {record['image']}"
    width, height = record.get("width"), record.get("height")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        raise ExportError(f"{where} has no valid \"width\" and \"height\"")
    predictions = record.get("predictions")
    if not isinstance(predictions, list) or not all(isinstance(p, dict) for p in predictions):
        raise ExportError(f"{where} has no list of \"predictions\"")
    boxes, empty = [], 0
    for prediction in predictions:
        box = None if prediction.get("empty") is True else _clamped_box(prediction.get("box"), width, height, where)
        if box is None:
            empty += 1
            continue
        label, score, confidence = prediction.get("label"), prediction.get("score"), prediction.get("confidence")
        try:
            recorded_class(prediction)
        except ClassLookupError as exc:
            raise ExportError(f"{where}: {exc}") from None
        if prediction.get("mask") is not None and (problem := rle_problem(prediction["mask"], height, width)):
            raise ExportError(f"{where} has a \"mask\" that {problem}")
        if "score" not in prediction:
            raise ExportError(f"{where} has no \"score\" (the class probability): not a `neuroloc localize` line? "
                              "(the baselines' lines of `neuroloc evaluate` carry none)")
        if finite_number(score) is None:
            raise ExportError(f"{where} has a \"score\" that is not a number: {score!r}")
        if confidence is not None and not (finite_number(confidence) is not None and 0 <= confidence <= 1):
            raise ExportError(f"{where} has a \"confidence\" that is not a number in [0, 1]: {confidence!r}")
        boxes.append(ExportBox(label, box, float(score), None if confidence is None else float(confidence), prediction))
    return boxes, empty


def _clamped_box(raw: Any, width: int, height: int, where: str) -> tuple[float, float, float, float] | None:
    """The box inside the image, or None when nothing of it is."""
    if not (isinstance(raw, list) and len(raw) == 4 and all(finite_number(v) is not None for v in raw)):
        raise ExportError(f"{where} has a \"box\" that is not [xmin, ymin, xmax, ymax]: {raw!r}")
    x0, y0 = max(0.0, float(raw[0])), max(0.0, float(raw[1]))
    x1, y1 = min(float(width), float(raw[2])), min(float(height), float(raw[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _require_confidence(boxes: list[ExportBox], filters: Filters) -> None:
    missing = sum(b.confidence is None for b in boxes)
    if not missing:
        return
    option = "--min-confidence" if filters.min_confidence is not None else "--sort confidence"
    if missing == len(boxes):
        raise ExportError(f"{option} needs the \"confidence\" of each box, and no box in this file has one "
                          "(older versions of neuroloc did not write it): localize the images again, or leave it out")
    raise ExportError(f"{option} needs the \"confidence\" of each box, and {missing} of the {len(boxes)} boxes "
                      "have none (null, or lines from an older neuroloc): localize those images again, or leave "
                      "it out")


def _boxes_by_confidence(image: ExportImage) -> ExportImage:
    return replace(image, boxes=tuple(sorted(image.boxes, key=lambda b: _confidence_key(b.confidence))))


def _confidence_key(confidence: float | None) -> float:
    return math.inf if confidence is None else confidence


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def export_classes(boxes: Iterable[ExportBox]) -> tuple[ExportClass, ...]:
    """The classes of ``boxes`` in the model's class order, numbered 0..n-1.

    An ImageNet class (:func:`neuroloc.classes.recorded_class`) gets its export name (:func:`class_names`); one
    of a model's own classes keeps the name its predictions were written with.

    Raises:
        ExportError: when two predictions of one class index carry different names.
    """
    found: dict[int, tuple[str | None, str]] = {}
    for box in boxes:
        cls = recorded_class(box.prediction)
        entry = (cls.synset, cls.name if cls.synset is None else unique_class_names()[cls.index])
        if found.setdefault(box.label, entry) != entry:
            raise ExportError(f"class {box.label} is named both {found[box.label][1]!r} and {entry[1]!r} in this "
                              "file: were its lines written by different models?")
    return tuple(ExportClass(i, label, *found[label]) for i, label in enumerate(sorted(found)))


# File names are at most 255 bytes; what is named after an image adds up to ~20 (``_12_heat.jpg``, ``_2``).
MAX_STEM_BYTES = 200


def unique_stems(paths: Sequence[str | Path], taken: Iterable[str] = ()) -> list[str]:
    """A file stem per image path, at most :data:`MAX_STEM_BYTES` long; repeats (ignoring case, for
    case-insensitive disks) get ``_2``, ``_3``..., and so do stems ``taken`` already. A :class:`Path` is a file
    of this machine, named as its system does (a backslash is part of a name on Linux); a string is a path
    recorded anywhere, Windows too."""
    used = {name.casefold() for name in taken}
    stems = []
    for path in paths:
        stem = (path.stem if isinstance(path, Path) else PurePosixPath(path.replace("\\", "/")).stem) or "image"
        while len(stem.encode("utf-8", "surrogateescape")) > MAX_STEM_BYTES:
            stem = stem[:-1]
        name, n = stem, 1
        while name.casefold() in used:
            n += 1
            name = f"{stem}_{n}"
        used.add(name.casefold())
        stems.append(name)
    return stems


def shown_path(path: str, image_root: Path | None) -> str:
    """The image path written into the export: as recorded, or relative to ``image_root`` with / separators."""
    if image_root is None:
        return path
    try:
        # real paths: a path through a linked folder and up (link/..) is where the system finds it
        relative = os.path.relpath(_located(path), _located(image_root))
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):  # e.g. the root given by its real path
            relative = os.path.relpath(os.path.realpath(path), os.path.realpath(image_root))
    except ValueError:  # another drive (Windows)
        relative = os.pardir
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise ExportError(f"image {path} is not under --image-root {image_root}")
    return Path(relative).as_posix()


def _located(path: str | Path) -> str:
    """``path`` made absolute, its ``..`` parts resolved where the system finds them (after a link, ``link/..``
    is the target's parent) and the rest kept as written (a linked image or folder keeps its own name)."""
    parts = Path(absolute_path(path)).parts
    if os.pardir not in parts:
        return os.path.normpath(os.path.join(*parts))
    last = max(i for i, part in enumerate(parts) if part == os.pardir)
    return os.path.normpath(os.path.join(os.path.realpath(os.path.join(*parts[: last + 1])), *parts[last + 1 :]))


# --- the formats -------------------------------------------------------------------------------------------------


def build_export(
    selection: Selection, fmt: str, out_dir: Path, url_prefix: str | None = None, link_images: bool = True
) -> Export:
    """The files of ``selection`` in format ``fmt`` (one of FORMATS) for the folder ``out_dir``."""
    files = {"classes.txt": "".join(f"{c.name}\n" for c in selection.classes)}
    links: dict[str, str] = {}
    notes: list[str] = []
    if fmt == "coco":
        files["annotations.json"] = strict_json(coco(selection))
    elif fmt == "voc":
        files.update({f"Annotations/{image.name}.xml": voc_xml(image, selection) for image in selection.images})
        files["ImageSets/Main/default.txt"] = "".join(f"{image.name}\n" for image in selection.images)
        if unmappable := [c.name for c in selection.classes if ":" in c.name or c.name.startswith("#")]:
            notes.append(f"labelmap.txt left out: the class name {unmappable[0]!r} holds ':' or starts with '#', which "
                         "its name:color:parts:actions lines cannot hold; CVAT's VOC import needs it: for CVAT, rename the "
                         "class in the --class-names file and localize again")
        else:
            files["labelmap.txt"] = "# label:color_rgb:parts:actions\n" + "".join(
                f"{c.name}:::\n" for c in selection.classes)
    elif fmt == "yolo":
        index = {c.label: c.index for c in selection.classes}
        files.update({f"labels/{image.name}.txt": yolo_labels(image, index) for image in selection.images})
        files["images.txt"] = "".join(f"{image.file}\n" for image in selection.images)
        files["dataset.yaml"] = yolo_dataset_yaml(selection.classes, out_dir, link_images)
        if link_images:
            links = {f"images/{image.name}{PurePosixPath(image.path).suffix}": image.file
                     for image in selection.images}
    elif fmt == "labelstudio":
        files["tasks.json"] = strict_json(labelstudio_tasks(selection, url_prefix))
        files["label_config.xml"] = labelstudio_config(selection.classes)
    elif fmt == "csv":
        files["boxes.csv"] = boxes_csv(selection)
    else:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if selection.sort == "confidence":
        files["review.txt"] = review_text(selection)
    return Export(files, links, tuple(notes))


def coco(selection: Selection) -> dict[str, Any]:
    """The COCO document: category id = class index + 1 (COCO ids start at 1; 0 is background to many trainers)."""
    categories = [Category(c.index + 1, c.label, c.name, c.synset) for c in selection.classes]
    records = [
        {"image": image.shown, "width": image.width, "height": image.height, "model": image.model, "error": None,
         "predictions": [{**b.prediction, "box": list(b.box)} for b in image.boxes]}
        for image in selection.images
    ]
    return coco_document(records, categories)


def voc_range(low: float, high: float, size: int) -> tuple[int, int]:
    """VOC's 1-based first and last pixel inside the continuous span [low, high) of an axis of ``size`` pixels.

    Pixel i (1-based) covers [i - 1, i): the first pixel is round(low) + 1 and the last round(high); a span
    narrower than that gets the one pixel holding its centre. Reading back low = first - 1 and high = last (as
    the VOC devkit and Detectron2 do) gives the span within half a pixel, within one for spans under a pixel.
    """
    first, last = _round(low) + 1, _round(high)
    if last < first:
        first = last = math.floor((low + high) / 2) + 1
    return min(max(first, 1), size), min(max(last, 1), size)


def _round(value: float) -> int:
    return math.floor(value + 0.5)  # half up, not Python's half to even


def voc_xml(image: ExportImage, selection: Selection) -> str:
    """The Pascal VOC annotation of one image of ``selection``, as labelImg and CVAT read it."""
    root = ET.Element("annotation")
    _element(root, "folder", Path(image.file).parent.name)
    _element(root, "filename", PurePosixPath(image.shown.replace("\\", "/")).name)
    _element(root, "path", image.shown)
    _element(_element(root, "source"), "database", "Unknown")
    size = _element(root, "size")
    _element(size, "width", str(image.width))
    _element(size, "height", str(image.height))
    _element(size, "depth", "3")  # neuroloc reads every image as RGB
    _element(root, "segmented", "0")
    for box in image.boxes:
        obj = _element(root, "object")
        _element(obj, "name", selection.class_name(box.label))
        _element(obj, "pose", "Unspecified")
        _element(obj, "truncated", "0")
        _element(obj, "difficult", "0")
        bndbox = _element(obj, "bndbox")
        x0, y0, x1, y1 = box.box
        xmin, xmax = voc_range(x0, x1, image.width)
        ymin, ymax = voc_range(y0, y1, image.height)
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            _element(bndbox, tag, str(value))
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _element(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = text
    return element


def yolo_labels(image: ExportImage, index: dict[int, int]) -> str:
    """One line per box: class index, then centre x, centre y, width, height as fractions of the image."""
    lines = []
    for box in image.boxes:
        x0, y0, x1, y1 = box.box
        w, h = image.width, image.height
        lines.append(f"{index[box.label]} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                     f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
    return "".join(lines)


def yaml_quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar in ASCII: JSON's escapes, except that a character beyond the 16-bit
    range is one ``\\UXXXXXXXX`` escape, where JSON writes two surrogate escapes that YAML reads as two broken
    characters."""
    return '"' + "".join(json.dumps(c)[1:-1] if ord(c) < 0x10000 else f"\\U{ord(c):08X}" for c in text) + '"'


def yolo_dataset_yaml(classes: Sequence[ExportClass], out_dir: Path, link_images: bool) -> str:
    """An Ultralytics data file; strings are quoted as YAML's double-quoted scalars (:func:`yaml_quoted`)."""
    if link_images:
        where = ("# images/<name>.<ext> link to the original images; Ultralytics finds each one's labels\n"
                 "# in labels/<name>.txt (the image path with /images/ replaced by /labels/).\n")
        images = "images"
    else:
        where = ("# images.txt lists the original images. Ultralytics looks for each one's labels at its path\n"
                 "# with /images/ replaced by /labels/: put labels/<name>.txt there, or export with --link-images.\n")
        images = "images.txt"
    names = "".join(f"  {c.index}: {yaml_quoted(c.name)}\n" for c in classes)
    return (
        "# Written by `neuroloc export --format yolo` (docs/export.md).\n" + where
        + "# train and val are the same images: split them before you measure a model trained on them.\n"
        + f"path: {yaml_quoted(os.path.abspath(out_dir))}\ntrain: {images}\nval: {images}\nnames:\n" + names
    )


def labelstudio_tasks(selection: Selection, url_prefix: str | None = None) -> list[dict[str, Any]]:
    """Label Studio tasks with the boxes as pre-annotations (coordinates in percent of the image).

    A task's prediction score is its image's confidence (least confident box) when every exported box has a
    confidence, else its least probable box's class probability; each region's score is its class probability.
    """
    by_confidence = selection.with_confidence
    tasks: list[dict[str, Any]] = []
    for n, image in enumerate(selection.images):
        if not image.boxes:  # a background image: nothing to pre-annotate
            tasks.append({"data": {"image": image_url(image.shown, url_prefix)}, "predictions": []})
            continue
        w, h = image.width, image.height
        results = []
        for j, box in enumerate(image.boxes):
            x0, y0, x1, y1 = box.box
            value = {"x": _percent(x0, w), "y": _percent(y0, h), "width": _percent(x1 - x0, w),
                     "height": _percent(y1 - y0, h), "rotation": 0,
                     "rectanglelabels": [selection.class_name(box.label)]}
            results.append({"id": f"neuroloc-{n}-{j}", "type": "rectanglelabels", "from_name": "label",
                            "to_name": "image", "original_width": w, "original_height": h, "image_rotation": 0,
                            "value": value, "score": box.score})
        score = image.confidence if by_confidence else min(b.score for b in image.boxes)
        tasks.append({"data": {"image": image_url(image.shown, url_prefix)},
                      "predictions": [{"model_version": image.model, "score": score, "result": results}]})
    return tasks


def image_url(shown: str, url_prefix: str | None) -> str:
    """What Label Studio loads: the path as written, or the URL prefix followed by the percent-encoded path."""
    if url_prefix is None:
        return shown
    return url_prefix + quote(shown.replace("\\", "/"), safe="/")


def _percent(value: float, size: int) -> float:
    return round(100 * value / size, 6)


def labelstudio_config(classes: Sequence[ExportClass]) -> str:
    """The labelling interface that matches the tasks: one rectangle label per class, in class order."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name="image", value="$image")
    labels = ET.SubElement(view, "RectangleLabels", name="label", toName="image")
    for c in classes:
        ET.SubElement(labels, "Label", value=c.name)
    ET.indent(view, space="  ")
    return ET.tostring(view, encoding="unicode") + "\n"


def boxes_csv(selection: Selection) -> str:
    """One row per box (:data:`CSV_COLUMNS`), pixels of the upright image to 2 decimals; a background image
    (``Filters.keep_empty``) is one row with only its path and size. Empty cells for a synset a model's own
    class lacks, and for a confidence or point the results file does not hold."""
    by_label = {c.label: c for c in selection.classes}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for image in selection.images:
        if not image.boxes:
            writer.writerow([image.shown, image.width, image.height] + [""] * (len(CSV_COLUMNS) - 3))
        for box in image.boxes:
            point = box.prediction.get("point")
            xy = [finite_number(v) for v in point] if isinstance(point, list) and len(point) == 2 else [None, None]
            point_cells = ["" if v is None or None in xy else _csv_number(v) for v in xy]
            confidence = "" if box.confidence is None else f"{box.confidence:.4f}"
            instance = box.prediction.get("object")  # its index within its class, with --objects multi
            writer.writerow([image.shown, image.width, image.height, by_label[box.label].synset or "", box.label,
                             *(_csv_number(v) for v in box.box), by_label[box.label].name, f"{box.score:.6g}",
                             confidence, *point_cells, instance if _is_int(instance) else ""])
    return text.getvalue()


def _csv_number(value: float) -> str:
    return f"{round(value, 2) + 0.0:.2f}".rstrip("0").rstrip(".")  # + 0.0: no "-0"


def review_text(selection: Selection) -> str:
    """Tab-separated confidence, image and classes (least confident first) of each image, in export order."""
    return "confidence\timage\tclasses\n" + "".join(f"{line}\n" for line in review_lines(selection))


def review_lines(selection: Selection) -> list[str]:
    return [
        f"{_confidence_text(image.confidence)}\t{image.path}\t"
        f"{'; '.join(dict.fromkeys(selection.class_name(b.label) for b in image.boxes))}"
        for image in selection.images
    ]


def _confidence_text(confidence: float | None) -> str:
    return "-" if confidence is None else f"{confidence:.4f}"


# --- writing -----------------------------------------------------------------------------------------------------


# Beside an export: the files exports wrote into that folder, which a later export may replace without asking.
EXPORT_RECORD = ".neuroloc-export.json"


def write_export(export: Export, out_dir: Path, results: Path, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Write every file of ``export`` atomically under ``out_dir``, refusing to replace ``results``, a file where a
    link would go, or (unless ``overwrite``) a file that no earlier export wrote there (:data:`EXPORT_RECORD`: a
    dataset's own boxes.csv or annotations.json). In the export's per-image folders, the files and links an
    earlier export wrote and this one does not are removed: left there, they would join the new dataset with
    another numbering of the classes. Returns the files removed, and the other files found there that it did not
    write (not an export's, as far as the record knows), for a warning.

    Raises:
        ExportError: when the export would replace the results file, a file by a link, or a file of another origin.
        OSError: when a file cannot be written.
    """
    for relative in [*export.files, *export.links]:
        if _same_file(out_dir / relative, results):
            raise ExportError(f"the export would overwrite the results file {results} with {relative}; "
                              "choose another --out")
    earlier, links_recorded = _exported_before(out_dir)
    foreign = sorted(r for r in export.files if r not in earlier and os.path.lexists(out_dir / r))
    if foreign and not overwrite:
        raise ExportError(f"{out_dir / foreign[0]} exists and no earlier export wrote it ({_plural(len(foreign), 'such file')}"
                          "); choose another --out, or give --overwrite to replace them")
    links = {}
    for relative, target in export.links.items():
        link = out_dir / relative
        if link.is_symlink() or not os.path.lexists(link):
            links[relative] = target
        elif not _same_file(link, target):  # the image itself already lies there: nothing to link
            raise ExportError(f"{link} exists and is not a link to {target}; choose another --out, "
                              "or --no-link-images")
    stale = _stale_files(export, out_dir)
    unrecorded = set() if links_recorded else _unrecorded_links(stale, export, out_dir, earlier)
    removed = [relative for relative in stale if relative in earlier or relative in unrecorded]
    ours = {*export.files, *links}
    # Recorded before anything is written, so that a rerun after a kill takes what this one wrote as an export's.
    _write_record(out_dir, earlier | ours)
    for relative, target in links.items():
        _link_atomic(out_dir / relative, target)
    for relative, text in export.files.items():
        write_text_atomic(out_dir / relative, text)
    for relative in removed:
        (out_dir / relative).unlink(missing_ok=True)
    _write_record(out_dir, (earlier - set(removed)) | ours)
    return removed, [relative for relative in stale if relative not in removed]


def _unrecorded_links(stale: list[str], export: Export, out_dir: Path, earlier: set[str]) -> set[str]:
    """The image links among ``stale`` of an export made before links were recorded (the caller asks only then):
    symbolic links in a folder this export links images into, after an export whose record names nothing there,
    each beside a recorded label file of its stem (labels/x.txt, Annotations/x.xml), as an export wrote them."""
    if not earlier:
        return set()
    recorded = [PurePosixPath(r) for r in earlier]
    unnamed_folders = {PurePosixPath(r).parent for r in export.links} - {r.parent for r in recorded}
    labelled = {r.stem for r in recorded if r.parent != PurePosixPath(".")}
    return {relative for relative in stale
            if (path := PurePosixPath(relative)).parent in unnamed_folders and path.stem in labelled
            and (out_dir / relative).is_symlink()}


def _write_record(out_dir: Path, files: set[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / EXPORT_RECORD, json.dumps({"files": sorted(files), "links_recorded": True}, indent=1))


def _exported_before(out_dir: Path) -> tuple[set[str], bool]:
    """The files (and links) that earlier exports recorded writing into ``out_dir`` (:data:`EXPORT_RECORD`), and
    whether the record names links (records of versions before the twenty-fourth session name files only)."""
    try:
        record = json.loads((out_dir / EXPORT_RECORD).read_text(encoding="utf-8"))
        recorded = record.get("files", [])
    except (OSError, ValueError, AttributeError):
        return set(), False
    files = {str(name) for name in recorded} if isinstance(recorded, list) else set()
    return files, record.get("links_recorded") is True


def _stale_files(export: Export, out_dir: Path) -> list[str]:
    """Links, and files of the kinds the export writes, in its per-image folders that it does not write; and an
    earlier review.txt."""
    written = {*export.files, *export.links}
    suffixes: dict[PurePosixPath, set[str]] = {}
    for relative in written:
        path = PurePosixPath(relative)
        kinds = suffixes.setdefault(path.parent, set())
        if relative in export.files:
            kinds.add(path.suffix)
    suffixes.pop(PurePosixPath("."), None)
    # review.txt lists an earlier export's images when this one is not sorted by confidence; a VOC export that
    # leaves labelmap.txt out (odd class names) leaves an earlier one naming other classes
    companions = ["review.txt"] + (["labelmap.txt"] if "ImageSets/Main/default.txt" in written else [])
    stale = [name for name in companions if name not in written and (out_dir / name).is_file()]
    for folder, kinds in suffixes.items():
        if not (out_dir / folder).is_dir():
            continue
        for entry in os.scandir(out_dir / folder):
            relative = f"{folder}/{entry.name}"
            ours = entry.is_symlink() or (entry.is_file() and PurePosixPath(entry.name).suffix in kinds)
            if ours and relative not in written:
                stale.append(relative)
    return sorted(stale)


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _link_atomic(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Outcome:
    """What an export selected, the files beside its own that no export recorded writing, the images it linked
    that do not exist (a results file moved away from the folder its run started in), and the files of an
    earlier export it removed, and notes on the files."""

    selection: Selection
    stale: tuple[str, ...] = ()
    dangling: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def export_results(
    results: Path,
    fmt: str,
    out_dir: Path,
    filters: Filters = Filters(),
    image_root: Path | None = None,
    url_prefix: str | None = None,
    link_images: bool = True,
    overwrite: bool = False,
) -> Outcome:
    """Export the results file ``results`` to ``out_dir`` in format ``fmt``; nothing is written when no image
    has a box left.

    Raises:
        ExportError: for a missing or malformed results file, or an output folder that cannot be used.
        OSError: when a file cannot be written.
    """
    check_out_dir(out_dir, results)
    records, unreadable = load_results(results)
    started_in = (read_settings(results) or {}).get("folder")  # neuroloc.cli.RUN_FOLDER
    try:
        selection = select(records, filters, image_root, unreadable, started_in if isinstance(started_in, str) else None)
    except ExportError as exc:
        raise ExportError(f"{results}: {exc}") from None
    if not selection.counts.boxes:  # background images alone (--keep-empty) make no dataset
        return Outcome(selection)
    export = build_export(selection, fmt, out_dir, url_prefix, link_images)
    removed, stale = write_export(export, out_dir, results, overwrite)
    dangling = tuple(str(target) for target in export.links.values() if not os.path.exists(target))
    return Outcome(selection, tuple(stale), dangling, tuple(removed), export.notes)


def check_out_dir(out_dir: Path, results: Path) -> None:
    """Refuse an output folder that is the results file or another existing file."""
    if _same_file(out_dir, results):
        raise ExportError(f"--out {out_dir} is the results file; give a folder for the export")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is an existing file; give a folder for the export")


# --- the command -------------------------------------------------------------------------------------------------


EXPORT_HELP = """\
Write the boxes of RESULTS (a JSON Lines file from `neuroloc localize`) as files that
labelling and training tools import, under the folder --out.

\b
  coco         annotations.json: images, categories, annotations (bbox [x, y, w, h],
               score = class probability, confidence); loads with pycocotools
  voc          Annotations/<image>.xml (Pascal VOC, 1-based integer pixels),
               ImageSets/Main/default.txt, labelmap.txt (labelImg, CVAT)
  yolo         labels/<image>.txt, dataset.yaml (Ultralytics), images/ (links),
               images.txt
  labelstudio  tasks.json (pre-annotations), label_config.xml (labelling interface)
  csv          boxes.csv: one row per box (image, size, class, box in pixels, class
               probability, confidence, point, object), for pandas or a spreadsheet

Every format also gets classes.txt: one class per line, line i = YOLO class i =
COCO category id i + 1. Classes are those exported, in the model's class order (ImageNet's
for ImageNet models).

Skipped: lines with an "error", images whose path holds a line break (no list of
image files could name them), empty predictions, boxes below --min-score or
--min-confidence, and images left without a box (--keep-empty exports those as images
with no object); the counts are printed at the end.
--sort confidence puts the least confident images first (an image's confidence is its
least confident box's) and lists them in review.txt.

\b
Examples:
  neuroloc export out.jsonl --format coco --out export/coco
  neuroloc export out.jsonl --format voc --out export/voc --min-score 0.3
  neuroloc export out.jsonl --format yolo --out export/yolo --min-confidence 0.5
  neuroloc export out.jsonl --format labelstudio --out export/ls --sort confidence \\
      --image-root photos --url-prefix "/data/local-files/?d=photos/"
  neuroloc export out.jsonl --format csv --out export/table

Details: docs/export.md.
"""


@click.command("export", help=EXPORT_HELP, no_args_is_help=True)
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), required=True, help="The files to write.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder to write into (created if needed); files of an earlier export there are replaced, "
              "others left alone.")
@click.option("--min-confidence", type=FiniteFloatRange(0, 1), metavar="C",
              help="Skip boxes whose localization confidence is below C (needs \"confidence\" in RESULTS).")
@click.option("--min-score", type=FiniteFloatRange(0, 1), metavar="P",
              help="Skip boxes whose class probability is below P.")
@click.option("--sort", type=click.Choice(SORTS), default="input", show_default=True,
              help="Order of images: as in RESULTS, or least confident first (needs \"confidence\"; "
              "writes review.txt).")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
              help="Write image paths relative to this folder (default: as recorded in RESULTS).")
@click.option("--url-prefix", metavar="URL",
              help="labelstudio: each task's image is URL followed by its path (e.g. http://host:8081/ or "
              "/data/local-files/?d=photos/); default: the path alone.")
@click.option("--link-images/--no-link-images", default=None,
              help="yolo: link each image into images/ so Ultralytics finds its labels [default: link].")
@click.option("--keep-empty", is_flag=True,
              help="Also export the images localize gave no box, as images with no object (background for a "
              "detector; e.g. tiles that found nothing); not those whose boxes a filter dropped. Check them: a "
              "missed object becomes a false background.")
@click.option("--overwrite", is_flag=True,
              help="Replace files in --out that no earlier export wrote there (refused by default: a dataset's own "
              "boxes.csv or annotations.json would be lost).")
def export_command(
    results: Path,
    fmt: str,
    out_dir: Path,
    min_confidence: float | None,
    min_score: float | None,
    sort: str,
    image_root: Path | None,
    url_prefix: str | None,
    link_images: bool | None,
    keep_empty: bool = False,
    overwrite: bool = False,
) -> None:
    """Export RESULTS (help text: EXPORT_HELP)."""
    if url_prefix is not None and fmt != "labelstudio":
        raise click.BadOptionUsage("url_prefix", "--url-prefix is for --format labelstudio")
    if link_images is not None and fmt != "yolo":
        raise click.BadOptionUsage("link_images", "--link-images / --no-link-images are for --format yolo")
    filters = Filters(min_confidence, min_score, sort, keep_empty)
    try:
        outcome = export_results(results, fmt, out_dir, filters, image_root, url_prefix, link_images is not False,
                                 overwrite)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        where = exc.filename or out_dir
        raise click.ClickException(f"cannot write the export to {where}: {exc.strerror or exc}") from None
    report(outcome.selection, fmt, out_dir, filters)
    for note in outcome.notes:
        click.echo(f"neuroloc: note: {note}", err=True)
    if outcome.removed:
        click.echo(f"neuroloc: removed {_plural(len(outcome.removed), 'file')} an earlier export wrote there and this "
                   f"one does not (e.g. {outcome.removed[0]})", err=True)
    if outcome.stale:
        click.echo(f"neuroloc: warning: {out_dir} also holds {_plural(len(outcome.stale), 'file')} this export did not "
                   f"write (e.g. {outcome.stale[0]}), from an earlier export? Export into an empty folder to be rid "
                   "of them.", err=True)
    if outcome.dangling:
        click.echo(f"neuroloc: warning: the export links {_plural(len(outcome.dangling), 'image')} that do not exist "
                   f"(e.g. {outcome.dangling[0]}): run the export from the folder `neuroloc localize` ran in, or keep "
                   f"{results.name}.settings.json beside the results, which records it", err=True)
    if not outcome.selection.counts.boxes:
        raise click.ClickException("nothing exported: no image has a box left" + (
            " (--keep-empty adds images without a box to those with one)" if outcome.selection.images else ""))


def report(selection: Selection, fmt: str, out_dir: Path, filters: Filters) -> None:
    """The closing summary on stderr: what was exported, what was skipped and why, the least confident images."""
    counts = selection.counts
    if counts.boxes:
        background = (f"; {_plural(counts.background, 'image')} without a box, as background" if counts.background
                      else "")
        click.echo(f"neuroloc: exported {_plural(counts.images, 'image')} with {_plural(counts.boxes, 'box', 'boxes')} "
                   f"({_plural(len(selection.classes), 'class', 'classes')}{background}) as {fmt} to {out_dir}", err=True)
    skipped = [
        (counts.unreadable, _plural(counts.unreadable, "unreadable line")),
        (counts.errors, _plural(counts.errors, "line with an error", "lines with an error")),
        (counts.line_breaks, _plural(counts.line_breaks, "image") + " whose path holds a line break"),
        (counts.empty, _plural(counts.empty, "empty prediction")),
        (counts.below_score, _plural(counts.below_score, "box", "boxes") + f" below --min-score {filters.min_score}"),
        (counts.below_confidence,
         _plural(counts.below_confidence, "box", "boxes") + f" below --min-confidence {filters.min_confidence}"),
        (counts.no_box, _plural(counts.no_box, "image") + " left without a box"),
    ]
    shown = [text for n, text in skipped if n]
    click.echo(f"neuroloc: skipped {', '.join(shown) if shown else 'nothing'}", err=True)
    if selection.sort == "confidence" and counts.boxes:
        lines = review_lines(selection)
        click.echo(f"neuroloc: least confident first (all {len(lines)} in {out_dir / 'review.txt'}):", err=True)
        for line in lines[:REVIEW_SHOWN]:
            click.echo("  " + line.replace("\t", "  "), err=True)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
