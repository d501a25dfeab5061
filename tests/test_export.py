"""``neuroloc export``: COCO, Pascal VOC, YOLO, Label Studio and CSV files read back, skip rules, order, refusals.

Records are built here (no model runs); images are non-square so that swapped axes would show.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from neuroloc.classes import imagenet_classes
from neuroloc.cli import main
from neuroloc.export import CSV_COLUMNS, FORMATS, Filters, select, unique_stems, voc_range
from neuroloc.jsonl import write_atomic

TABBY, CRANE_BIRD, CRANE_MACHINE, GOLDFISH = 281, 134, 517, 1
NAMES = {TABBY: "tabby", CRANE_BIRD: "crane (n02012849)", CRANE_MACHINE: "crane (n03126707)", GOLDFISH: "goldfish"}


def prediction(
    label: int, score: float, box: list[float], confidence: float | None = None, **extra: Any
) -> dict[str, Any]:
    out = {"label": label, "synset": "n0", "name": "as recorded", "score": score, "box": box, "layer": "_blocks.10",
           "empty": False, **extra}
    if confidence is not None:
        out["confidence"] = confidence
    return out


def record(image: str, size: tuple[int, int] | None, predictions: list[dict[str, Any]], error: str | None = None
           ) -> dict[str, Any]:
    width, height = size if size else (None, None)
    return {"image": image, "width": width, "height": height, "model": "efficientnet_lite0",
            "predictions": predictions, "error": error}


def sample_records() -> list[dict[str, Any]]:
    """Five lines: two good non-square images, an error, an image whose only box is empty, one more good image."""
    return [
        record("photos/wide.jpg", (640, 480), [
            prediction(TABBY, 0.8, [12.4, 30.6, 400.2, 479.7], 0.7),
            prediction(CRANE_BIRD, 0.15, [0.0, 0.0, 640.0, 480.0], 0.9),
        ]),
        record("photos/tall.jpg", (300, 500), [
            prediction(CRANE_MACHINE, 0.6, [20.5, 100.25, 280.75, 499.5], 0.35),
            prediction(3, 0.01, [0.0, 0.0, 0.0, 0.0], 0.5, empty=True),
        ]),
        record("photos/broken.jpg", None, [], error="not an image"),
        record("photos/blank.png", (640, 480), [prediction(GOLDFISH, 0.3, [5.0, 5.0, 9.0, 9.0], 0.6, empty=True)]),
        record("more/tall.jpg", (300, 500), [prediction(GOLDFISH, 0.05, [150.2, 0.4, 299.6, 250.0], 0.95)]),
    ]


def kept_boxes() -> dict[str, list[tuple[int, list[float]]]]:
    """The boxes an export without filters keeps, by image path."""
    return {
        "photos/wide.jpg": [(TABBY, [12.4, 30.6, 400.2, 479.7]), (CRANE_BIRD, [0.0, 0.0, 640.0, 480.0])],
        "photos/tall.jpg": [(CRANE_MACHINE, [20.5, 100.25, 280.75, 499.5])],
        "more/tall.jpg": [(GOLDFISH, [150.2, 0.4, 299.6, 250.0])],
    }


SIZES = {"photos/wide.jpg": (640, 480), "photos/tall.jpg": (300, 500), "more/tall.jpg": (300, 500)}


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder holding the (dummy) images the records name, as after `neuroloc localize photos/ more/`."""
    monkeypatch.chdir(tmp_path)
    for path in ["photos/wide.jpg", "photos/tall.jpg", "photos/blank.png", "more/tall.jpg"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"not really a picture")
    return tmp_path


def write_results(folder: Path, records: list[dict[str, Any]], name: str = "out.jsonl") -> Path:
    path = folder / name
    write_atomic(path, records)
    return path


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def export(results: Path, fmt: str, out: Path, *options: Any) -> Result:
    result = run("export", results, "--format", fmt, "--out", out, *options)
    assert result.exit_code == 0, result.output
    return result


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error")]


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0
    (line,) = error_lines(result)
    for fragment in fragments:
        assert fragment in line, line


def assert_close(got: list[float], want: list[float], tolerance: float = 1.0) -> None:
    assert len(got) == len(want) and all(abs(g - w) <= tolerance for g, w in zip(got, want)), (got, want)


def classes_txt(out: Path) -> list[str]:
    return (out / "classes.txt").read_text(encoding="utf-8").splitlines()


# --- COCO ---------------------------------------------------------------------------------------------------------


def test_coco_document_has_the_kept_boxes_with_score_confidence_and_compact_category_ids(workdir: Path) -> None:
    out = workdir / "coco"
    export(write_results(workdir, sample_records()), "coco", out)
    doc = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    assert [i["file_name"] for i in doc["images"]] == list(kept_boxes())
    assert [(i["width"], i["height"]) for i in doc["images"]] == [SIZES[p] for p in kept_boxes()]
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3, 4]
    assert [c["imagenet_index"] for c in doc["categories"]] == [GOLDFISH, CRANE_BIRD, TABBY, CRANE_MACHINE]
    assert [c["name"] for c in doc["categories"]] == classes_txt(out)
    first = doc["annotations"][0]
    assert first["score"] == 0.8 and first["confidence"] == 0.7 and first["category_id"] == 3
    assert_close(first["bbox"], [12.4, 30.6, 400.2 - 12.4, 479.7 - 30.6], 0.01)
    assert len(doc["annotations"]) == 4 and not list(out.glob("*.tmp"))


def test_coco_round_trip_through_pycocotools(workdir: Path) -> None:
    coco_api = pytest.importorskip("pycocotools.coco", reason="pycocotools not installed (pip install pycocotools)")
    out = workdir / "coco"
    export(write_results(workdir, sample_records()), "coco", out)
    coco = coco_api.COCO(str(out / "annotations.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for image in coco.loadImgs(coco.getImgIds()):
        want = kept_boxes()[image["file_name"]]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert [names[a["category_id"]] for a in annotations] == [NAMES[label] for label, _ in want]
        for annotation, (_, box) in zip(annotations, want):
            x, y, w, h = annotation["bbox"]
            assert_close([x, y, x + w, y + h], box)
            assert x >= 0 and x + w <= image["width"] and y >= 0 and y + h <= image["height"]


# --- Pascal VOC ---------------------------------------------------------------------------------------------------


def test_voc_files_read_back_within_a_pixel(workdir: Path) -> None:
    out = workdir / "voc"
    export(write_results(workdir, sample_records()), "voc", out)
    stems = (out / "ImageSets" / "Main" / "default.txt").read_text(encoding="utf-8").splitlines()
    assert stems == ["wide", "tall", "tall_2"]
    assert sorted(p.name for p in (out / "Annotations").iterdir()) == ["tall.xml", "tall_2.xml", "wide.xml"]
    for stem, (path, want) in zip(stems, kept_boxes().items()):
        root = ET.parse(out / "Annotations" / f"{stem}.xml").getroot()
        assert root.tag == "annotation"
        assert root.findtext("folder") == Path(path).parent.name
        assert root.findtext("filename") == Path(path).name and root.findtext("path") == path
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert (width, height) == SIZES[path] and root.findtext("size/depth") == "3"
        objects = root.findall("object")
        assert [o.findtext("name") for o in objects] == [NAMES[label] for label, _ in want]
        for obj, (_, box) in zip(objects, want):
            assert [obj.findtext(t) for t in ("pose", "truncated", "difficult")] == ["Unspecified", "0", "0"]
            xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height
            assert_close([xmin - 1, ymin - 1, xmax, ymax], box, 0.5)
    from neuroloc.evaluation.dataset import DatasetError, load_dataset  # evaluate reads the export back the same way

    with pytest.raises(DatasetError, match="tall.xml and tall_2.xml both name the image tall.jpg"):
        load_dataset(out)  # photos/tall.jpg and more/tall.jpg: evaluate could not tell them apart
    (out / "Annotations" / "tall_2.xml").unlink()
    read = {(s.image.name, s.label): s.boxes for s in load_dataset(out)}
    for path in ("photos/wide.jpg", "photos/tall.jpg"):
        for label, box in kept_boxes()[path]:  # a shared class name ("crane (n02012849)") reads back too
            assert_close(list(read[(Path(path).name, label)][0]), box, 0.5)
    labelmap = (out / "labelmap.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(":")[0] for line in labelmap[1:]] == classes_txt(out)


@pytest.mark.parametrize("size", [1, 7, 300, 641])
def test_voc_range_is_one_based_inclusive_and_round_trips_within_a_pixel(size: int) -> None:
    assert voc_range(0.0, float(size), size) == (1, size)  # the whole axis
    assert voc_range(0.0, 1.0, size) == (1, 1)  # the first pixel
    steps = [i / 8 for i in range(0, 8 * size + 1)]
    for low in steps[::3]:
        for high in steps[::5]:
            if high <= low:
                continue
            first, last = voc_range(low, high, size)
            assert 1 <= first <= last <= size
            assert abs((first - 1) - low) <= 1 and abs(last - high) <= 1
            if high - low >= 1:
                assert abs((first - 1) - low) <= 0.5 and abs(last - high) <= 0.5


# --- YOLO ---------------------------------------------------------------------------------------------------------


def test_yolo_labels_read_back_and_the_dataset_file_matches_classes_txt(workdir: Path) -> None:
    out = workdir / "yolo"
    export(write_results(workdir, sample_records()), "yolo", out)
    classes = classes_txt(out)
    assert classes == ["goldfish", "crane (n02012849)", "tabby", "crane (n03126707)"]
    for stem, (path, want) in zip(["wide", "tall", "tall_2"], kept_boxes().items()):
        width, height = SIZES[path]
        rows = [line.split() for line in (out / "labels" / f"{stem}.txt").read_text(encoding="utf-8").splitlines()]
        assert [classes[int(r[0])] for r in rows] == [NAMES[label] for label, _ in want]
        for row, (_, box) in zip(rows, want):
            cx, cy, w, h = (float(v) for v in row[1:])
            assert all(0 <= v <= 1 for v in (cx, cy, w, h))
            assert_close([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height],
                         box, 0.01)
        image = out / "images" / f"{stem}{Path(path).suffix}"
        assert image.is_symlink() and image.resolve() == (workdir / path).resolve()
    assert (out / "images.txt").read_text(encoding="utf-8").splitlines() == [str(workdir / p) for p in kept_boxes()]
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    dataset = yaml.safe_load((out / "dataset.yaml").read_text(encoding="utf-8"))
    assert dataset["path"] == str(out) and dataset["train"] == dataset["val"] == "images"
    assert dataset["names"] == dict(enumerate(classes))


def test_yolo_links_to_images_that_are_not_there_are_warned_of(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A results file copied away from its run (no settings file beside it) and exported from elsewhere."""
    results = write_results(workdir, sample_records())
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = export(results, "yolo", elsewhere / "yolo")
    assert "warning: the export links 3 images that do not exist" in result.output and "settings.json" in result.output
    monkeypatch.chdir(workdir)
    assert "do not exist" not in export(results, "yolo", workdir / "yolo2").output


def test_yolo_without_links_points_the_dataset_at_the_image_list(workdir: Path) -> None:
    out = workdir / "yolo"
    export(write_results(workdir, sample_records()), "yolo", out, "--no-link-images")
    assert not (out / "images").exists()
    text = (out / "dataset.yaml").read_text(encoding="utf-8")
    assert "\ntrain: images.txt\nval: images.txt\n" in text


# --- Label Studio -------------------------------------------------------------------------------------------------


def test_labelstudio_tasks_read_back_to_pixels_and_match_the_config(workdir: Path) -> None:
    out = workdir / "ls"
    export(write_results(workdir, sample_records()), "labelstudio", out)
    tasks = json.loads((out / "tasks.json").read_text(encoding="utf-8"))
    config = ET.parse(out / "label_config.xml").getroot()
    assert config.tag == "View"
    image_tag, labels_tag = config.find("Image"), config.find("RectangleLabels")
    assert image_tag.attrib == {"name": "image", "value": "$image"}
    assert labels_tag.get("name") == "label" and labels_tag.get("toName") == "image"
    assert [label.get("value") for label in labels_tag.findall("Label")] == classes_txt(out)
    assert [t["data"]["image"] for t in tasks] == list(kept_boxes())
    for task in tasks:
        want = kept_boxes()[task["data"]["image"]]
        (predicted,) = task["predictions"]
        assert predicted["model_version"] == "efficientnet_lite0"
        assert predicted["score"] == {"photos/wide.jpg": 0.7, "photos/tall.jpg": 0.35, "more/tall.jpg": 0.95}[
            task["data"]["image"]]  # the image's confidence: its least confident box's
        assert len(predicted["result"]) == len(want)
        for result, (label, box) in zip(predicted["result"], want):
            assert (result["type"], result["from_name"], result["to_name"]) == ("rectanglelabels", "label", "image")
            w, h = result["original_width"], result["original_height"]
            assert (w, h) == SIZES[task["data"]["image"]] and result["image_rotation"] == 0
            value = result["value"]
            assert value["rectanglelabels"] == [NAMES[label]] and value["rotation"] == 0
            x0, y0 = value["x"] * w / 100, value["y"] * h / 100
            assert_close([x0, y0, x0 + value["width"] * w / 100, y0 + value["height"] * h / 100], box, 0.01)


def test_labelstudio_image_urls_from_root_and_prefix(workdir: Path) -> None:
    out = workdir / "ls"
    results = write_results(workdir, sample_records())
    export(results, "labelstudio", out, "--image-root", workdir, "--url-prefix", "/data/local-files/?d=")
    tasks = json.loads((out / "tasks.json").read_text(encoding="utf-8"))
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d={p}" for p in kept_boxes()]
    export(results, "labelstudio", out, "--image-root", workdir / "photos", "--min-score", 0.1,
           "--url-prefix", "http://localhost:8081/")
    tasks = json.loads((out / "tasks.json").read_text(encoding="utf-8"))
    assert [t["data"]["image"] for t in tasks] == ["http://localhost:8081/wide.jpg", "http://localhost:8081/tall.jpg"]
    assert_one_line_error(run("export", results, "-f", "labelstudio", "-o", out, "--image-root", workdir / "photos"),
                          "more/tall.jpg", "is not under --image-root")


def test_the_export_of_an_odd_file_name_is_escaped(workdir: Path) -> None:
    odd = "photos/a & b <c> 'd'.jpg"
    results = write_results(workdir, [record(odd, (640, 480), [prediction(TABBY, 0.9, [1.0, 2.0, 3.0, 4.0], 0.5)])])
    export(results, "voc", workdir / "voc")
    assert ET.parse(workdir / "voc" / "Annotations" / "a & b <c> 'd'.xml").getroot().findtext("path") == odd
    export(results, "labelstudio", workdir / "ls", "--url-prefix", "http://h/")
    (task,) = json.loads((workdir / "ls" / "tasks.json").read_text(encoding="utf-8"))
    assert task["data"]["image"] == "http://h/photos/a%20%26%20b%20%3Cc%3E%20%27d%27.jpg"


# --- classes ------------------------------------------------------------------------------------------------------


def test_every_format_has_the_same_classes_in_the_same_order(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    for fmt in FORMATS:
        export(results, fmt, workdir / fmt)
    classes = classes_txt(workdir / "coco")
    assert classes == [NAMES[label] for label in sorted(NAMES)]  # ImageNet order: 1, 134, 281, 517
    assert all(classes_txt(workdir / fmt) == classes for fmt in FORMATS)
    coco = json.loads((workdir / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert {c["id"] - 1: c["name"] for c in coco["categories"]} == dict(enumerate(classes))
    by_image = {i["id"]: i["file_name"] for i in coco["images"]}
    coco_labels = [(by_image[a["image_id"]], a["category_id"] - 1) for a in coco["annotations"]]
    yolo_labels = [
        (path, int(line.split()[0]))
        for stem, path in zip(["wide", "tall", "tall_2"], kept_boxes())
        for line in (workdir / "yolo" / "labels" / f"{stem}.txt").read_text(encoding="utf-8").splitlines()
    ]
    tasks = json.loads((workdir / "labelstudio" / "tasks.json").read_text(encoding="utf-8"))
    ls_labels = [(t["data"]["image"], classes.index(r["value"]["rectanglelabels"][0]))
                 for t in tasks for r in t["predictions"][0]["result"]]
    voc_labels = [
        (path, classes.index(o.findtext("name")))
        for stem, path in zip(["wide", "tall", "tall_2"], kept_boxes())
        for o in ET.parse(workdir / "voc" / "Annotations" / f"{stem}.xml").getroot().findall("object")
    ]
    assert coco_labels == yolo_labels == ls_labels == voc_labels
    config = ET.parse(workdir / "labelstudio" / "label_config.xml").getroot()
    assert [label.get("value") for label in config.iter("Label")] == classes


def test_classes_that_share_a_name_keep_their_wordnet_id() -> None:
    selection = select([record("a.jpg", (40, 30), [prediction(CRANE_MACHINE, 0.5, [1.0, 1.0, 9.0, 9.0]),
                                                   prediction(638, 0.5, [1.0, 1.0, 9.0, 9.0])])])
    assert [c.name for c in selection.classes] == ["crane (n03126707)", "maillot (n03710637)"]
    assert [c.index for c in selection.classes] == [0, 1]


def test_localize_s_coco_file_keeps_the_wordnet_id_of_classes_that_share_a_name_too() -> None:
    from neuroloc.coco import coco_document

    document = coco_document(sample_records())  # what `neuroloc localize --coco` writes: id = class index
    names = {c["id"]: c["name"] for c in document["categories"]}
    assert {i: names[i] for i in NAMES} == NAMES


def test_repeated_file_stems_get_a_number_ignoring_case() -> None:
    assert unique_stems(["a/x.jpg", "b/X.png", "c/x_2.jpg", "x.jpeg", "d\\y.jpg"]) == ["x", "X_2", "x_2_2", "x_3", "y"]


# --- skip rules ---------------------------------------------------------------------------------------------------


def test_error_lines_empty_predictions_and_images_without_a_box_are_skipped_and_counted(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    result = export(results, "coco", workdir / "coco")
    assert "exported 3 images with 4 boxes (4 classes) as coco" in result.stderr
    assert "skipped 1 line with an error, 2 empty predictions, 1 image left without a box" in result.stderr
    for fmt in FORMATS:
        export(results, fmt, workdir / fmt)
    written = [p.as_posix() for fmt in FORMATS for p in (workdir / fmt).rglob("*")]
    assert written and not [p for p in written if "blank" in p or "broken" in p or p.endswith(".tmp")]
    unsaved = record("photos/unsaved.jpg", (50, 40), [prediction(TABBY, 0.8, [1.0, 2.0, 30.0, 40.0], 0.7)],
                     error="localized, but cannot save its picture: disk full")  # its boxes are there
    kept = export(write_results(workdir, [*sample_records(), unsaved], "unsaved.jsonl"), "voc", workdir / "unsaved")
    assert "exported 4 images with 5 boxes" in kept.stderr and (workdir / "unsaved" / "Annotations" / "unsaved.xml").is_file()


def test_images_whose_path_holds_a_line_break_are_skipped_and_counted(workdir: Path) -> None:
    """One image per line in images.txt and ImageSets: a name holding a newline would be read as two images."""
    broken = [record(name, (64, 48), [prediction(TABBY, 0.8, [1.0, 2.0, 30.0, 40.0], 0.7)])
              for name in ("photos/new\nline.jpg", "photos/carriage\rreturn.jpg", "photos/plain.jpg")]
    results = write_results(workdir, broken, "breaks.jsonl")
    for fmt in ("yolo", "voc"):
        result = export(results, fmt, workdir / fmt)
        assert "exported 1 image with 1 box" in result.stderr and "skipped 2 images whose path holds a line break" in result.stderr
    (listed,) = (workdir / "yolo" / "images.txt").read_text(encoding="utf-8").splitlines()
    assert listed.endswith("plain.jpg")
    from neuroloc.export import select

    relative = [record("a.jpg", (64, 48), [prediction(TABBY, 0.8, [1.0, 2.0, 30.0, 40.0], 0.7)])]
    assert select(relative, started_in=str(workdir / "we\u2028ird")).counts.line_breaks == 1  # the folder's name
    assert select(relative, started_in=str(workdir)).counts.line_breaks == 0
    (workdir / "here\u2028now").mkdir()
    os.chdir(workdir / "here\u2028now")  # no recorded folder: the paths are this folder's
    assert select(relative).counts.line_breaks == 1


def test_min_score_and_min_confidence_filter_boxes(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    result = export(results, "coco", workdir / "coco", "--min-score", 0.1, "--min-confidence", 0.5)
    doc = json.loads((workdir / "coco" / "annotations.json").read_text(encoding="utf-8"))
    # tabby 0.8/0.7 and bird crane 0.15/0.9 stay; machine crane (confidence 0.35) and goldfish (score 0.05) go.
    assert [i["file_name"] for i in doc["images"]] == ["photos/wide.jpg"]
    assert [c["imagenet_index"] for c in doc["categories"]] == [CRANE_BIRD, TABBY]
    assert [a["category_id"] for a in doc["annotations"]] == [2, 1]
    assert ("1 box below --min-score 0.1, 1 box below --min-confidence 0.5, 3 images left without a box"
            in result.stderr)
    result = export(results, "yolo", workdir / "yolo", "--min-score", 0.5)
    assert classes_txt(workdir / "yolo") == ["tabby", "crane (n03126707)"]
    assert sorted(p.name for p in (workdir / "yolo" / "labels").iterdir()) == ["tall.txt", "wide.txt"]
    assert (workdir / "yolo" / "labels" / "wide.txt").read_text(encoding="utf-8").startswith("0 ")


def test_confidence_filters_and_sort_need_confidence_fields(workdir: Path) -> None:
    old = [record(r["image"], (r["width"], r["height"]) if r["width"] else None,
                  [{k: v for k, v in p.items() if k != "confidence"} for p in r["predictions"]], r["error"])
           for r in sample_records()]
    results = write_results(workdir, old, "old.jsonl")
    for option in (["--min-confidence", 0.5], ["--sort", "confidence"]):
        result = run("export", results, "-f", "coco", "-o", workdir / "coco", *option)
        assert_one_line_error(result, option[0], "\"confidence\"", "no box in this file has one")
        assert not (workdir / "coco").exists()
    export(results, "coco", workdir / "coco", "--min-score", 0.1)  # without them an older file is fine
    doc = json.loads((workdir / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert doc["annotations"] and not any("confidence" in a for a in doc["annotations"])
    export(results, "labelstudio", workdir / "ls")  # each task's score: its least probable box's probability
    tasks = json.loads((workdir / "ls" / "tasks.json").read_text(encoding="utf-8"))
    assert [t["predictions"][0]["score"] for t in tasks] == [0.15, 0.6, 0.05]
    mixed = sample_records()
    del mixed[0]["predictions"][1]["confidence"]
    result = run("export", write_results(workdir, mixed, "mixed.jsonl"), "-f", "voc", "-o", workdir / "voc",
                 "--sort", "confidence")
    assert_one_line_error(result, "1 of the 4 boxes have none")
    mixed[0]["predictions"][1]["confidence"] = None  # a box the localizer could not rate
    result = run("export", write_results(workdir, mixed, "mixed.jsonl"), "-f", "voc", "-o", workdir / "voc",
                 "--min-confidence", 0.1)
    assert_one_line_error(result, "--min-confidence", "1 of the 4 boxes have none")


def test_nothing_left_to_export_is_an_error_and_writes_nothing(workdir: Path) -> None:
    result = run("export", write_results(workdir, sample_records()), "-f", "yolo", "-o", workdir / "yolo",
                 "--min-score", 0.99)
    assert_one_line_error(result, "nothing exported")
    assert "4 images left without a box" in result.stderr and not (workdir / "yolo").exists()
    background = run("export", write_results(workdir, [record("photos/nothing.jpg", (300, 500), [])]), "-f",
                     "labelstudio", "-o", workdir / "ls", "--keep-empty")  # no class: an empty label list no tool takes
    assert_one_line_error(background, "nothing exported: no image has a box left (--keep-empty adds")
    assert "neuroloc: exported" not in background.stderr and not (workdir / "ls").exists()


# --- order --------------------------------------------------------------------------------------------------------


def test_the_review_names_each_class_of_an_image_once(workdir: Path) -> None:
    """Two objects of one class are one name in review.txt, not "tabby; tabby"."""
    objects = [prediction(TABBY, 0.8, [1.0, 1.0, 50.0, 50.0], 0.6, object=0),
               prediction(TABBY, 0.8, [60.0, 60.0, 90.0, 90.0], 0.5, object=1),
               prediction(GOLDFISH, 0.1, [5.0, 5.0, 30.0, 30.0], 0.7)]
    results = write_results(workdir, [record("photos/wide.jpg", (640, 480), objects)])
    export(results, "coco", workdir / "coco", "--sort", "confidence")
    review = (workdir / "coco" / "review.txt").read_text(encoding="utf-8").splitlines()
    assert review[1] == "0.5000\tphotos/wide.jpg\ttabby; goldfish"


def test_sort_confidence_puts_the_least_confident_images_first(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    # image confidence = its least confident box: tall 0.35, wide min(0.7, 0.9) = 0.7, more/tall 0.95
    order = ["photos/tall.jpg", "photos/wide.jpg", "more/tall.jpg"]
    result = export(results, "coco", workdir / "coco", "--sort", "confidence")
    doc = json.loads((workdir / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert [i["file_name"] for i in doc["images"]] == order
    assert [a["image_id"] for a in doc["annotations"]] == [1, 2, 2, 3]
    assert [a["confidence"] for a in doc["annotations"]] == [0.35, 0.7, 0.9, 0.95]
    review = (workdir / "coco" / "review.txt").read_text(encoding="utf-8").splitlines()
    assert review == ["confidence\timage\tclasses", "0.3500\tphotos/tall.jpg\tcrane (n03126707)",
                      "0.7000\tphotos/wide.jpg\ttabby; crane (n02012849)", "0.9500\tmore/tall.jpg\tgoldfish"]
    printed = result.stderr.splitlines()
    start = next(i for i, line in enumerate(printed) if "least confident first" in line)
    assert [line.split()[1] for line in printed[start + 1 :]] == order
    export(results, "labelstudio", workdir / "ls", "--sort", "confidence")
    tasks = json.loads((workdir / "ls" / "tasks.json").read_text(encoding="utf-8"))
    assert [t["data"]["image"] for t in tasks] == order
    assert [t["predictions"][0]["score"] for t in tasks] == [0.35, 0.7, 0.95]
    export(results, "labelstudio", workdir / "ls_input")
    tasks = json.loads((workdir / "ls_input" / "tasks.json").read_text(encoding="utf-8"))
    assert [t["data"]["image"] for t in tasks] == list(kept_boxes())
    assert not (workdir / "ls_input" / "review.txt").exists()


# --- safety and errors --------------------------------------------------------------------------------------------


def test_the_results_file_is_never_changed(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    before = hashlib.sha256(results.read_bytes()).hexdigest()
    for fmt in FORMATS:
        export(results, fmt, workdir, "--sort", "confidence")  # into the results file's own folder
    assert hashlib.sha256(results.read_bytes()).hexdigest() == before
    assert not list(workdir.rglob("*.tmp"))


def test_refuses_to_write_over_the_results_or_into_a_file(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    before = results.read_bytes()
    assert_one_line_error(run("export", results, "-f", "coco", "-o", results), "is the results file")
    other = workdir / "notes.txt"
    other.write_text("keep me", encoding="utf-8")
    assert_one_line_error(run("export", results, "-f", "coco", "-o", other), "is an existing file")
    assert other.read_text(encoding="utf-8") == "keep me"
    named_like_output = write_results(workdir, sample_records(), "classes.txt")
    assert_one_line_error(run("export", named_like_output, "-f", "yolo", "-o", workdir), "would overwrite")
    assert named_like_output.read_bytes() == before and not (workdir / "labels").exists()


def test_a_file_no_earlier_export_wrote_is_replaced_only_with_overwrite(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    (workdir / "dataset").mkdir()
    truth = workdir / "dataset" / "boxes.csv"
    truth.write_text("image,synset,label,xmin,ymin,xmax,ymax\n", encoding="utf-8")  # a dataset's ground truth
    refused = run("export", results, "-f", "csv", "-o", workdir / "dataset")
    assert_one_line_error(refused, "boxes.csv exists and no earlier export wrote it (1 such file)", "--overwrite")
    assert truth.read_text(encoding="utf-8") == "image,synset,label,xmin,ymin,xmax,ymax\n"
    export(results, "csv", workdir / "dataset", "--overwrite")
    assert truth.read_text(encoding="utf-8").startswith("image,width,height")
    export(results, "csv", workdir / "dataset", "--min-score", 0.5)  # its own earlier export: replaced as before


def test_yolo_never_replaces_a_file_with_a_link_and_keeps_images_already_in_place(workdir: Path) -> None:
    # Images already in Ultralytics' layout: <out>/images/<name>; exporting into <out> links nothing.
    (workdir / "ds" / "images").mkdir(parents=True)
    (workdir / "ds" / "images" / "cat.jpg").write_bytes(b"the picture")
    (workdir / "ds" / "images" / "dog.jpg").write_bytes(b"a picture without a result")
    results = write_results(workdir, [record("ds/images/cat.jpg", (640, 480),
                                             [prediction(TABBY, 0.9, [1.0, 2.0, 300.0, 400.0], 0.5)])])
    assert "warning" not in export(results, "yolo", workdir / "ds").stderr  # dog.jpg is the user's, not stale
    image = workdir / "ds" / "images" / "cat.jpg"
    assert not image.is_symlink() and image.read_bytes() == b"the picture"
    assert (workdir / "ds" / "labels" / "cat.txt").read_text(encoding="utf-8").startswith("0 ")
    (workdir / "other" / "images").mkdir(parents=True)
    (workdir / "other" / "images" / "cat.jpg").write_bytes(b"another picture")
    result = run("export", results, "-f", "yolo", "-o", workdir / "other")
    assert_one_line_error(result, "is not a link to", "--no-link-images")
    assert (workdir / "other" / "images" / "cat.jpg").read_bytes() == b"another picture"
    assert not (workdir / "other" / "labels").exists()


def test_files_of_an_earlier_export_are_removed_and_other_files_reported(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    export(results, "voc", workdir / "voc")
    result = export(results, "voc", workdir / "voc", "--min-score", 0.5)
    assert "removed 1 file an earlier export wrote there and this one does not (e.g. Annotations/tall_2.xml)" \
        in result.stderr and "warning" not in result.stderr
    assert not (workdir / "voc" / "Annotations" / "tall_2.xml").exists()
    assert (workdir / "voc" / "ImageSets" / "Main" / "default.txt").read_text(encoding="utf-8") == "wide\ntall\n"
    export(results, "yolo", workdir / "yolo")
    (workdir / "yolo" / "labels" / "mine.txt").write_text("0 0.5 0.5 1 1\n", encoding="utf-8")  # the user's own
    result = export(results, "yolo", workdir / "yolo", "--min-score", 0.5)  # fewer classes: numbered anew
    assert "removed 2 files an earlier export wrote there" in result.stderr
    assert "also holds 1 file this export did not write (e.g. labels/mine.txt)" in result.stderr
    labels = {p.name for p in (workdir / "yolo" / "labels").iterdir()}
    images = {p.name for p in (workdir / "yolo" / "images").iterdir()}
    assert labels == {"wide.txt", "tall.txt", "mine.txt"} and images == {"wide.jpg", "tall.jpg"}
    assert (workdir / "yolo" / "labels" / "mine.txt").exists()
    export(results, "csv", workdir / "csv", "--sort", "confidence")
    result = export(results, "csv", workdir / "csv")  # the earlier review.txt no longer describes the export
    assert "removed 1 file" in result.stderr and not (workdir / "csv" / "review.txt").exists()


def test_image_links_of_an_export_that_recorded_no_links_are_removed_with_their_labels(workdir: Path) -> None:
    """Versions before the twenty-fourth session recorded the files an export wrote, not its links: a link left
    without its label file would be a background image to Ultralytics."""
    results = write_results(workdir, sample_records())
    export(results, "yolo", workdir / "yolo")
    record_file = workdir / "yolo" / ".neuroloc-export.json"
    files = json.loads(record_file.read_text(encoding="utf-8"))["files"]
    record_file.write_text(json.dumps({"files": [f for f in files if not f.startswith("images/")]}), encoding="utf-8")
    result = export(results, "yolo", workdir / "yolo", "--min-score", 0.5)
    assert "removed 2 files" in result.stderr and "warning" not in result.stderr, result.output
    assert {p.stem for p in (workdir / "yolo" / "images").iterdir()} == {p.stem for p in (workdir / "yolo" / "labels").iterdir()}
    # A link of no exported image (no label of its stem) is the user's, whatever the record: kept with a warning
    record_file.write_text(json.dumps({"files": [f for f in files if not f.startswith("images/")]}), encoding="utf-8")
    (workdir / "yolo" / "images" / "own.jpg").symlink_to(workdir / "photos" / "wide.jpg")
    kept = export(results, "yolo", workdir / "yolo", "--min-score", 0.5)
    assert "images/own.jpg" in kept.stderr and (workdir / "yolo" / "images" / "own.jpg").is_symlink()
    (workdir / "yolo" / "images" / "own.jpg").unlink()
    # A record of this version names its links: a link it does not name is the user's, kept with a warning
    (workdir / "yolo" / "images" / "mine.jpg").symlink_to(workdir / "photos" / "wide.jpg")
    kept = export(results, "yolo", workdir / "yolo", "--min-score", 0.5)
    assert "also holds 1 file this export did not write (e.g. images/mine.jpg)" in kept.stderr
    assert (workdir / "yolo" / "images" / "mine.jpg").is_symlink()


def test_an_export_killed_part_way_is_finished_by_running_it_again(workdir: Path, monkeypatch) -> None:
    import neuroloc.export as export_module

    results = write_results(workdir, sample_records())
    real_write = export_module.write_text_atomic
    written = []

    def killed_after_two(path: Path, text: str) -> None:
        if len(written) == 2 and path.name != export_module.EXPORT_RECORD:
            raise KeyboardInterrupt
        real_write(path, text)
        if path.name != export_module.EXPORT_RECORD:
            written.append(path)

    monkeypatch.setattr(export_module, "write_text_atomic", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        export_module.export_results(results, "voc", workdir / "voc")
    monkeypatch.setattr(export_module, "write_text_atomic", real_write)
    assert len(written) == 2
    rerun = export(results, "voc", workdir / "voc")  # no --overwrite needed: the files are an export's
    assert rerun.exit_code == 0 and "warning" not in rerun.stderr, rerun.output
    assert (workdir / "voc" / "ImageSets" / "Main" / "default.txt").is_file()


def test_missing_corrupt_and_malformed_results_are_one_line_errors(workdir: Path) -> None:
    out = workdir / "out"
    assert_one_line_error(run("export", workdir / "nope.jsonl", "-f", "coco", "-o", out), "does not exist")
    garbage = workdir / "garbage.jsonl"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 binary\n")
    assert_one_line_error(run("export", garbage, "-f", "coco", "-o", out), "has no result lines")
    bad = sample_records()
    bad[1]["predictions"][0]["box"] = [1, 2, "x", 4]
    assert_one_line_error(run("export", write_results(workdir, bad, "bad.jsonl"), "-f", "voc", "-o", out),
                          "photos/tall.jpg", "\"box\"")
    bad = sample_records()
    bad[0]["predictions"][0]["label"] = 1000
    assert_one_line_error(run("export", write_results(workdir, bad, "bad.jsonl"), "-f", "voc", "-o", out), "\"label\"")
    bad = sample_records()
    bad[0]["width"] = None
    assert_one_line_error(run("export", write_results(workdir, bad, "bad.jsonl"), "-f", "voc", "-o", out), "\"width\"")
    bad = sample_records()
    del bad[0]["predictions"][0]["label"]
    assert_one_line_error(run("export", write_results(workdir, bad, "bad.jsonl"), "-f", "voc", "-o", out),
                          "the line of photos/wide.jpg: no \"label\" (the class index)")
    for mask, problem in (({"size": [480, 640], "counts": "abc"}, "unreadable \"counts\""),
                          ("xyz", "is not COCO RLE"),
                          ({"size": [10, 10], "counts": "52"}, "has the size [10, 10], not the image's [480, 640]"),
                          ({"size": [480, 640], "counts": [5, 5]}, "do not cover a 480x640 mask")):
        bad = sample_records()
        bad[0]["predictions"][0]["mask"] = mask  # a hand-edited line; COCO would carry it as the segmentation
        assert_one_line_error(run("export", write_results(workdir, bad, "bad.jsonl"), "-f", "coco", "-o", out),
                              "photos/wide.jpg has a \"mask\" that", problem)
    bad = sample_records()
    bad.append(bad[0])  # two results files joined
    assert_one_line_error(run("export", write_results(workdir, bad, "bad.jsonl"), "-f", "yolo", "-o", out),
                          "1 image has several result lines (e.g. photos/wide.jpg, 2)", "--classes")
    bad = sample_records()
    del bad[0]["predictions"][0]["score"]  # as the baselines of `neuroloc evaluate` write their lines
    assert_one_line_error(run("export", write_results(workdir, bad, "bad.jsonl"), "-f", "coco", "-o", out),
                          "has no \"score\"", "baselines")
    assert not out.exists()


def test_a_results_file_saved_with_a_byte_order_mark_loses_no_line(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    results.write_bytes(b"\xef\xbb\xbf" + results.read_bytes())  # as some editors save UTF-8
    result = export(results, "csv", workdir / "csv")
    assert "exported 3 images" in result.stderr and "unreadable" not in result.stderr


def test_unreadable_lines_are_skipped_and_counted(workdir: Path) -> None:
    results = write_results(workdir, sample_records())
    with open(results, "a", encoding="utf-8") as f:
        f.write("{not json\n{\"image\": \"cut-off")
    result = export(results, "coco", workdir / "coco")
    assert "skipped 2 unreadable lines, 1 line with an error" in result.stderr


@pytest.mark.parametrize("options, message", [
    (["--format", "pdf"], "'pdf' is not one of"),
    (["--format", "coco", "--min-score", "2"], "0<=x<=1"),
    (["--format", "coco"], "Missing option '-o' / '--out'"),
    (["--format", "coco", "--out", "o", "--url-prefix", "http://h/"], "--url-prefix is for --format labelstudio"),
    (["--format", "voc", "--out", "o", "--link-images"], "are for --format yolo"),
    (["--format", "coco", "--out", "o", "--sort", "score"], "'score' is not one of"),
])
def test_bad_options_are_one_line_usage_errors(workdir: Path, options: list[str], message: str) -> None:
    result = run("export", write_results(workdir, sample_records()), *options)
    assert result.exit_code == 2
    assert_one_line_error(result, message)


def test_select_keeps_the_input_order_by_default_and_clamps_boxes() -> None:
    records = [record("a.jpg", (100, 50), [prediction(TABBY, 0.9, [-3.0, 10.0, 120.0, 60.0], 0.2)]),
               record("b.jpg", (50, 100), [prediction(TABBY, 0.9, [1.0, 2.0, 3.0, 4.0], 0.1)])]
    selection = select(records, Filters())
    assert [i.path for i in selection.images] == ["a.jpg", "b.jpg"]
    assert selection.images[0].boxes[0].box == (0.0, 10.0, 100.0, 50.0)
    assert [i.path for i in select(records, Filters(sort="confidence")).images] == ["b.jpg", "a.jpg"]


def test_export_is_listed_in_the_main_help() -> None:
    result = run("--help")
    assert result.exit_code == 0 and "export" in result.output


def test_keep_empty_exports_images_without_a_box_as_background(workdir: Path) -> None:
    records = [
        record("photos/wide.jpg", (640, 480), [prediction(TABBY, 0.8, [12.4, 30.6, 400.2, 479.7], 0.7)]),
        record("photos/nothing.jpg", (300, 500), []),  # e.g. no tile showed the class
        record("photos/broken.jpg", None, [], error="not an image"),
        record("photos/unsure.jpg", (300, 300), [prediction(TABBY, 0.9, [10, 10, 200, 200], 0.1)]),
    ]
    results = write_results(workdir, records)
    skipped = export(results, "yolo", workdir / "plain", "--min-confidence", 0.5)
    assert skipped.exit_code == 0 and not (workdir / "plain" / "labels" / "nothing.txt").exists()
    assert "2 images left without a box" in skipped.output
    for fmt in FORMATS:
        out = workdir / f"kept_{fmt}"
        result = export(results, fmt, out, "--keep-empty", "--sort", "confidence", "--min-confidence", 0.5)
        assert result.exit_code == 0, result.output
        assert "exported 2 images with 1 box (1 class; 1 image without a box, as background)" in result.output
        assert "1 image left without a box" in result.output  # unsure.jpg: a filtered box is no background
        assert "1 line with an error" in result.output
        assert (out / "review.txt").read_text().splitlines()[-1].startswith("-\tphotos/nothing.jpg")  # last
    assert (workdir / "kept_yolo" / "labels" / "nothing.txt").read_text() == ""
    assert (workdir / "kept_yolo" / "labels" / "wide.txt").read_text().startswith("0 ")
    document = json.loads((workdir / "kept_coco" / "annotations.json").read_text())
    assert len(document["images"]) == 2 and len(document["annotations"]) == 1
    voc = ET.parse(workdir / "kept_voc" / "Annotations" / "nothing.xml").getroot()
    assert voc.find("object") is None and voc.find("size/width").text == "300"
    tasks = json.loads((workdir / "kept_labelstudio" / "tasks.json").read_text())
    assert [len(t["predictions"]) for t in tasks] == [1, 0] and tasks[1]["data"]["image"] == "photos/nothing.jpg"
    rows = list(csv.reader(io.StringIO((workdir / "kept_csv" / "boxes.csv").read_text())))
    assert rows[-1] == ["photos/nothing.jpg", "300", "500"] + [""] * (len(CSV_COLUMNS) - 3)


# --- CSV ----------------------------------------------------------------------------------------------------------


def test_csv_has_a_row_per_box_with_class_probability_confidence_and_point(workdir: Path) -> None:
    records = sample_records()
    records[0]["predictions"][0]["point"] = [200.004, 250.5]
    records[1]["predictions"][0]["object"] = 1
    export(write_results(workdir, records), "csv", workdir / "csv")
    rows = list(csv.DictReader(io.StringIO((workdir / "csv" / "boxes.csv").read_text(encoding="utf-8"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["image"], int(r["label"])) for r in rows] == [(p, label) for p, boxes in kept_boxes().items()
                                                             for label, _ in boxes]
    for row, (_, box) in zip(rows, [b for boxes in kept_boxes().values() for b in boxes]):
        assert_close([float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")], box, tolerance=0.005)
        assert (int(row["width"]), int(row["height"])) == SIZES[row["image"]]
        assert row["name"] == NAMES[int(row["label"])]
        assert row["synset"] == imagenet_classes()[int(row["label"])].synset
    assert [(r["score"], r["confidence"]) for r in rows] == [("0.8", "0.7000"), ("0.15", "0.9000"),
                                                             ("0.6", "0.3500"), ("0.05", "0.9500")]
    assert [(r["point_x"], r["point_y"]) for r in rows] == [("200", "250.5")] + [("", "")] * 3
    assert [r["object"] for r in rows] == ["", "", "1", ""]


def test_csv_exported_against_the_image_folder_is_a_dataset_evaluate_reads(workdir: Path) -> None:
    """Checked in a spreadsheet, the file can serve as ground truth: boxes.csv beside images/."""
    from neuroloc.evaluation.dataset import load_dataset

    records = [r for r in sample_records() if r["image"].startswith("photos/")]
    export(write_results(workdir, records), "csv", workdir / "truth", "--image-root", "photos", "--min-score", 0.5)
    (workdir / "truth" / "images").symlink_to(workdir / "photos")
    samples = load_dataset(workdir / "truth")
    assert [(s.image.name, s.label) for s in samples] == [("tall.jpg", CRANE_MACHINE), ("wide.jpg", TABBY)]
    assert_close(list(samples[1].boxes[0]), [12.4, 30.6, 400.2, 479.7], tolerance=0.005)


def test_class_names_with_odd_characters_survive_yolo_and_leave_out_the_voc_label_map(workdir: Path) -> None:
    names = ["scratch:deep", "#dent", "smile \U0001F600", "quote \" and \\ back"]
    records = [record(f"photos/p{i}.jpg", (100, 80), [prediction(i, 0.9, [1.0, 2.0, 50.0, 60.0], 0.5, synset=None,
                                                                  name=name)])
               for i, name in enumerate(names)]
    results = write_results(workdir, records)
    voc = export(results, "voc", workdir / "voc")
    assert voc.exit_code == 0 and "note: labelmap.txt left out: the class name 'scratch:deep'" in voc.stderr
    assert not (workdir / "voc" / "labelmap.txt").exists()
    assert (workdir / "voc" / "classes.txt").read_text(encoding="utf-8").splitlines() == names
    plain = export(write_results(workdir, records[2:], "plain.jsonl"), "voc", workdir / "voc_plain")
    assert "note" not in plain.stderr
    assert (workdir / "voc_plain" / "labelmap.txt").read_text(encoding="utf-8").splitlines()[1:] == \
        [f"{name}:::" for name in names[2:]]
    again = export(results, "voc", workdir / "voc_plain")  # the earlier label map would name other classes
    assert "labelmap.txt left out" in again.stderr and not (workdir / "voc_plain" / "labelmap.txt").exists()
    export(results, "yolo", workdir / "yolo")
    text = (workdir / "yolo" / "dataset.yaml").read_text(encoding="utf-8")
    assert text.isascii() and "\\U0001F600" in text
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    assert yaml.safe_load(text)["names"] == dict(enumerate(names))


def test_a_path_through_a_linked_folder_and_up_links_the_image_the_system_finds(workdir: Path) -> None:
    """``lists/../photos/x.jpg`` where ``lists`` links elsewhere: the system resolves ``..`` from the link's
    target, while os.path.abspath cut it by text and named another file (the Ray engine failed every such image)."""
    from neuroloc.sources import absolute_path

    (workdir / "real" / "lists").mkdir(parents=True)
    (workdir / "real" / "photos").mkdir()
    (workdir / "real" / "photos" / "x.jpg").write_bytes(b"the picture")
    (workdir / "lists").symlink_to(workdir / "real" / "lists")
    relative = "lists/../photos/x.jpg"  # as a manifest in lists/ names it
    assert os.path.exists(absolute_path(relative, workdir)) and not os.path.exists(os.path.abspath(workdir / relative))
    results = write_results(workdir, [record(relative, (64, 48), [prediction(TABBY, 0.8, [1.0, 2.0, 30.0, 40.0], 0.7)])])
    result = export(results, "yolo", workdir / "yolo")
    assert result.exit_code == 0 and "do not exist" not in result.stderr, result.output
    assert (workdir / "yolo" / "images" / "x.jpg").read_bytes() == b"the picture"
    export(results, "csv", workdir / "csv", "--image-root", workdir / "real")
    assert (workdir / "csv" / "boxes.csv").read_text(encoding="utf-8").splitlines()[1].startswith("photos/x.jpg,")


def test_image_root_keeps_the_names_of_linked_images_and_folders(workdir: Path) -> None:
    """--image-root relates paths as written: an image that is a link, or lies in a linked folder under the root,
    keeps the name the user sees (resolving every link named the link's target instead, or refused it)."""
    (workdir / "store" / "2024").mkdir(parents=True)
    (workdir / "store" / "IMG_0001.jpg").write_bytes(b"a")
    (workdir / "store" / "2024" / "a.jpg").write_bytes(b"b")
    (workdir / "photos").mkdir(exist_ok=True)
    (workdir / "photos" / "cat.jpg").symlink_to(workdir / "store" / "IMG_0001.jpg")
    (workdir / "photos" / "2024").symlink_to(workdir / "store" / "2024")
    box = [prediction(TABBY, 0.8, [1.0, 2.0, 30.0, 40.0], 0.7)]
    results = write_results(workdir, [record("photos/cat.jpg", (64, 48), box), record("photos/2024/a.jpg", (64, 48), box)])
    result = export(results, "csv", workdir / "csv", "--image-root", workdir / "photos")
    assert result.exit_code == 0, result.output
    rows = (workdir / "csv" / "boxes.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["cat.jpg", "2024/a.jpg"]
