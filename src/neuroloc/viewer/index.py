"""The results a viewer shows, indexed once at start-up into an in-memory SQLite table.

RESULTS is either a JSON Lines file written by ``neuroloc localize`` (one source, ``results``) or a
folder written by ``neuroloc evaluate`` (one source per method, ``<out>/<method>/predictions.jsonl``,
with the ground-truth boxes of the dataset named in ``metrics.json`` and the IoU of each box).

Only the fields the gallery sorts, filters and draws are kept in memory; the full line of an item
(with its neurons) is read back from its file by byte offset when its page asks for it, so 100,000
results cost a few tens of MB.

The table lives in memory and is built from the files at every start-up, so it is never stale and
has no schema to migrate: a file written before a field existed (``confidence`` in older results)
simply has NULL there, which sorts last and fails every range filter.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc.classes import imagenet_classes, short_class_name
from neuroloc.jsonl import finite_number, finite_values, read_settings

JSONL_SOURCE = "results"
UPLOAD_SOURCE = "upload"
MISS_IOU = 0.5  # an evaluated box with a lower IoU is a miss (GT-known localization's threshold)

# gallery sort keys -> (SQL for ascending, SQL for descending order), never user text. Missing values
# (NULL) come last either way; each expression has its own index, so a page of any order is an index walk.
HIGH_TEXT = "char(1114111)"
SORTS = {
    "index": ("pos", "pos"),
    "name": ("name", "name"),
    "class": (f"COALESCE(class_name, {HIGH_TEXT})", "COALESCE(class_name, '')"),
    "score": ("COALESCE(score, 1e308)", "COALESCE(score, -1e308)"),
    "confidence": ("COALESCE(confidence, 1e308)", "COALESCE(confidence, -1e308)"),
    "iou": ("COALESCE(iou, 1e308)", "COALESCE(iou, -1e308)"),
}
STATUSES = ("all", "ok", "error", "miss", "hit", "wrong_class", "empty")


class IndexError_(ValueError):
    """RESULTS cannot be read as a localize JSONL or an evaluate folder."""


class QueryError(ValueError):
    """A gallery query with an unknown sort, status or a malformed number."""


@dataclass
class Source:
    """One set of predictions: a JSONL file (or the uploads)."""

    name: str
    path: Path | None
    count: int = 0
    bad_lines: int = 0
    method: dict[str, Any] | None = None  # method.json of an evaluate method folder, or a localize run's settings
    tiled: bool = False  # a localize run with --tile (its settings file): directions fitted over tiles, not lines


@dataclass
class ResultsIndex:
    """Every result of RESULTS, ready for paged queries."""

    root: Path  # the results folder (an evaluate folder, or the JSONL's folder)
    mode: str  # "jsonl" or "evaluation"
    results_path: Path
    sources: dict[str, Source] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    dataset: Path | None = None
    warnings: list[str] = field(default_factory=list)
    model_name: str | None = None
    intensity: str | None = None  # how a localize run read high-bit images (its settings file), when recorded
    run_folder: Path | None = None  # the folder a localize run started in (its settings file): its relative paths' base

    def __post_init__(self) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self._uploads: dict[int, dict[str, Any]] = {}
        self._db.execute(
            """CREATE TABLE items (
                id INTEGER PRIMARY KEY, source TEXT NOT NULL, pos INTEGER NOT NULL, image TEXT NOT NULL,
                path BLOB NOT NULL, name TEXT NOT NULL, offset INTEGER, length INTEGER, label INTEGER, class_name TEXT,
                score REAL, confidence REAL, iou REAL, correct INTEGER, empty INTEGER, error TEXT,
                width INTEGER, height INTEGER, boxes TEXT, gt TEXT)"""
        )
        self._bases: list[Path] = []

    # --- building ---------------------------------------------------------------------------------------

    def add_rows(self, rows: list[tuple]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO items (source, pos, image, path, name, offset, length, label, class_name, score,"
                " confidence, iou, correct, empty, error, width, height, boxes, gt)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )

    def finish(self) -> None:
        with self._lock:
            expressions = dict.fromkeys(e for pair in SORTS.values() for e in pair)
            for n, expression in enumerate(expressions):
                self._db.execute(f"CREATE INDEX idx_sort{n} ON items (source, {expression}, pos)")
            self._db.execute("CREATE INDEX idx_label ON items (source, label, pos)")
            self._db.execute("ANALYZE")
            self._db.commit()

    # --- queries ----------------------------------------------------------------------------------------

    def query(
        self,
        source: str,
        offset: int = 0,
        limit: int = 60,
        sort: str = "index",
        order: str = "asc",
        label: int | None = None,
        text: str | None = None,
        status: str = "all",
        min_score: float | None = None,
        max_score: float | None = None,
        min_iou: float | None = None,
        max_iou: float | None = None,
        min_confidence: float | None = None,
        max_confidence: float | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, the page of items) for one source."""
        if sort not in SORTS:
            raise QueryError(f"unknown sort {sort!r}; choose from {', '.join(SORTS)}")
        if order not in ("asc", "desc"):
            raise QueryError("order must be asc or desc")
        if status not in STATUSES:
            raise QueryError(f"unknown status {status!r}; choose from {', '.join(STATUSES)}")
        where: list[str] = ["source = ?"]
        args: list[object] = [source]
        if label is not None:
            where.append("label = ?")
            args.append(label)
        if text:
            where.append("(name LIKE ? ESCAPE '\\' OR class_name LIKE ? ESCAPE '\\')")
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            args += [pattern, pattern]
        ranges = (("score", min_score, max_score), ("iou", min_iou, max_iou),
                  ("confidence", min_confidence, max_confidence))
        for column, low, high in ranges:
            # written as the sort expressions, so their indexes serve the range (NULL is never in it)
            if low is not None:
                where.append(f"COALESCE({column}, -1e308) >= ?")
                args.append(max(low, -1e307))
            if high is not None:
                where.append(f"COALESCE({column}, 1e308) <= ?")
                args.append(min(high, 1e307))
        where.append(
            {
                "all": "1",
                "ok": "error IS NULL",
                "error": "error IS NOT NULL",
                "miss": f"iou < {MISS_IOU}",
                "hit": f"iou >= {MISS_IOU}",
                "wrong_class": "correct = 0",
                "empty": "empty = 1",
            }[status]
        )
        clause = " AND ".join(where)
        direction = "DESC" if order == "desc" else "ASC"
        expression = SORTS[sort][order == "desc"]
        sql = f"SELECT * FROM items WHERE {clause} ORDER BY {expression} {direction}, pos {direction} LIMIT ? OFFSET ?"
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM items WHERE {clause}", args).fetchone()[0]
            cursor = self._db.execute(sql, [*args, max(0, limit), max(0, offset)])
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        return total, [_public(row) for row in rows]

    def row(self, item_id: int) -> dict[str, Any] | None:
        """The indexed fields of one item (None: no such item)."""
        if item_id not in _INT64:
            return None
        with self._lock:
            cursor = self._db.execute("SELECT * FROM items WHERE id = ?", (item_id,))
            found = cursor.fetchone()
            if found is None:
                return None
            return dict(zip([d[0] for d in cursor.description], found))

    def item(self, item_id: int) -> dict[str, Any] | None:
        """The public form of one item, with its full record read back from its file."""
        row = self.row(item_id)
        if row is None:
            return None
        out = _public(row)
        out["record"] = self.record(row)
        return out

    def record(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The item's full JSON line (None when its file changed since the start-up)."""
        if row["source"] == UPLOAD_SOURCE:
            return self._uploads.get(row["id"])
        source = self.sources.get(row["source"])
        if source is None or source.path is None:
            return None
        try:
            with open(source.path, "rb") as f:
                f.seek(row["offset"])
                record = json.loads(f.read(row["length"]).decode("utf-8-sig"))  # a BOM opens the first line
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        same = isinstance(record, dict) and isinstance(record.get("image"), str) and path_bytes(record["image"]) == row["path"]
        return record if same else None

    def summary(self, source: str) -> dict[str, Any]:
        """Counts and the classes present, for the gallery's filters."""
        with self._lock:
            classes = self._db.execute(
                "SELECT label, class_name, COUNT(*) FROM items WHERE source = ? AND label IS NOT NULL"
                " GROUP BY label ORDER BY class_name",
                (source,),
            ).fetchall()
            counts = self._db.execute(
                "SELECT COUNT(*), SUM(error IS NOT NULL), COUNT(score), COUNT(iou), SUM(iou < ?), SUM(correct = 0),"
                " COUNT(confidence) FROM items WHERE source = ?",
                (MISS_IOU, source),
            ).fetchone()
        total, errors, scored, with_iou, misses, wrong, confident = (c or 0 for c in counts)
        return {
            "total": total,
            "errors": errors,
            "has_score": scored > 0,
            "has_confidence": confident > 0,
            "has_iou": with_iou > 0,
            "misses": misses,
            "wrong_class": wrong,
            "classes": [{"label": lab, "name": name, "count": n} for lab, name, n in classes],
        }

    def cases(self, source: str, n: int = 8) -> dict[str, list[dict[str, Any]]]:
        """The best and the worst ``n`` items of a source by IoU."""
        _, best = self.query(source, 0, n, sort="iou", order="desc", status="ok")
        _, worst = self.query(source, 0, n, sort="iou", order="asc", status="ok")
        return {"best": [b for b in best if b["iou"] is not None], "worst": [w for w in worst if w["iou"] is not None]}

    # --- uploads ----------------------------------------------------------------------------------------

    def add_upload(self, path: Path, display_name: str, record: dict[str, Any]) -> int:
        """Add an uploaded image as an item of the ``upload`` source; its id."""
        prediction = (record.get("predictions") or [{}])[0]
        with self._lock:
            pos = self._db.execute("SELECT COUNT(*) FROM items WHERE source = ?", (UPLOAD_SOURCE,)).fetchone()[0]
            cursor = self._db.execute(
                "INSERT INTO items (source, pos, image, path, name, label, class_name, score, confidence, empty, error,"
                " width, height, boxes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (UPLOAD_SOURCE, pos, displayable(str(path)), os.fsencode(path), displayable(display_name),
                 prediction.get("label"), _short(prediction),
                 finite_number(prediction.get("score")), _confidence(prediction.get("confidence")),
                 int(bool(prediction.get("empty"))), None, record.get("width"),
                 record.get("height"), json.dumps(_boxes(record))),
            )
            item_id = cursor.lastrowid
            if item_id is None:
                raise RuntimeError("SQLite gave no row id for an inserted item")
            self._uploads[item_id] = record
        source = self.sources.setdefault(UPLOAD_SOURCE, Source(UPLOAD_SOURCE, None))
        source.count += 1
        return item_id

    def update_upload(self, item_id: int, display_name: str, record: dict[str, Any]) -> None:
        """An uploaded picture sent again: the item takes the new name and result."""
        prediction = (record.get("predictions") or [{}])[0]
        with self._lock:
            self._db.execute(
                "UPDATE items SET name = ?, label = ?, class_name = ?, score = ?, confidence = ?, empty = ?, boxes = ?"
                " WHERE id = ? AND source = ?",
                (displayable(display_name), prediction.get("label"), _short(prediction),
                 finite_number(prediction.get("score")), _confidence(prediction.get("confidence")),
                 int(bool(prediction.get("empty"))), json.dumps(_boxes(record)), item_id, UPLOAD_SOURCE),
            )
            if item_id in self._uploads:
                self._uploads[item_id] = record

    # --- image paths ------------------------------------------------------------------------------------

    def image_path(self, row: dict[str, Any]) -> Path:
        """Where the item's image is: a relative path is tried from the folder the run started in (its settings
        file says), the current folder, then the results folder and the folders above it (a run writes paths
        relative to where it was started)."""
        path = Path(os.fsdecode(row["path"]))
        if path.is_absolute() or row["source"] == UPLOAD_SOURCE:
            return path
        bases = self._bases or [Path.cwd()]
        for base in bases:  # in this order every time: an item must not change files with what was opened before
            if (base / path).exists():
                return base / path
        return bases[0] / path

    def set_bases(self, bases: list[Path]) -> None:
        self._bases = list(dict.fromkeys(bases))


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "source": row["source"],
        "image": row["image"],
        "name": row["name"],
        "label": row["label"],
        "class": row["class_name"],
        "score": row["score"],
        "confidence": row["confidence"],
        "iou": row["iou"],
        "correct": None if row["correct"] is None else bool(row["correct"]),
        "empty": bool(row["empty"]),
        "error": row["error"],
        "width": row["width"],
        "height": row["height"],
        "boxes": json.loads(row["boxes"]) if row["boxes"] else [],
        "gt": json.loads(row["gt"]) if row["gt"] else [],
    }


def _short(prediction: dict[str, Any]) -> str | None:
    name, synset = prediction.get("name"), prediction.get("synset")
    return displayable(short_class_name(str(name), synset if isinstance(synset, str) else None)) if name else None


def displayable(text: str) -> str:
    """``text`` with each lone surrogate (a byte of a file name that is not UTF-8, as ``localize`` writes it)
    replaced by U+FFFD: SQLite and JSON responses take only valid Unicode."""
    return _SURROGATES.sub("\ufffd", text)


_SURROGATES = re.compile("[\ud800-\udfff]")


def path_bytes(image: str) -> bytes:
    """The file name a line's ``image`` stands for, as bytes (its lone surrogates the bytes they escape)."""
    try:
        return image.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name gives (from a \\ud800 escape in the JSON)
        return image.encode("utf-8", "surrogatepass")


_INT64 = range(-(2**63), 2**63)


def _integer(value: Any) -> int | None:
    """``value`` when it is an integer SQLite can hold (not bool), else None."""
    return value if type(value) is int and value in _INT64 else None


def _confidence(value: Any) -> float | None:
    """A prediction's ``confidence``: a number in [0, 1], else None (absent in older files, or malformed)."""
    number = finite_number(value)
    return number if number is not None and 0.0 <= number <= 1.0 else None


_PLAIN_NUMBERS = (int, float)  # not bool


def _numbers(value: Any, count: int) -> list[float] | None:
    """``value`` as ``count`` finite floats, or None when it is anything else."""
    if isinstance(value, list) and len(value) == count and all(type(v) in _PLAIN_NUMBERS for v in value):
        numbers = [float(v) for v in value]
        if math.isfinite(sum(numbers)):
            return numbers
    return None


def _box(value: Any) -> list[float] | None:
    return _numbers(value, 4)


def _boxes(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The boxes of a record's predictions, for drawing: box, point (None when absent), label, short name,
    score, confidence."""
    out = []
    predictions = record.get("predictions")
    for prediction in predictions if isinstance(predictions, list) else []:
        if not isinstance(prediction, dict):
            continue
        box = _box(prediction.get("box"))
        if box is not None:
            out.append({"box": box, "point": _numbers(prediction.get("point"), 2), "label": _integer(prediction.get("label")),
                        "name": _short(prediction),
                        "score": finite_number(prediction.get("score")),
                        "confidence": _confidence(prediction.get("confidence"))})
    return out


# The neurons of a line are not indexed; skipping them halves the start-up on large files. A neuron is
# a flat object of numbers, so the list ends at the first "]"; a line this does not fit is parsed whole.
_NEURONS = re.compile(rb'"neurons":\s*\[[^\]]*\]')


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(_NEURONS.sub(b'"neurons": []', raw))
    except ValueError:
        return json.loads(raw)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for each line of a file."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            yield offset, raw
            offset += len(raw)


def _row(source: str, pos: int, offset: int, raw: bytes, record: dict[str, Any],
         truths: dict[str, tuple[int, list[list[float]]]] | None) -> tuple:
    image = str(record["image"])
    predictions = record.get("predictions")
    first = predictions[0] if isinstance(predictions, list) and predictions and isinstance(predictions[0], dict) else {}
    label = _integer(first.get("label"))
    class_name = _short(first)
    if class_name is None and label is not None and 0 <= label < len(imagenet_classes()):
        class_name = imagenet_classes()[label].short_name
    boxes = _boxes(record)
    iou = correct = None
    gt: list[list[float]] = []
    if truths is not None:
        key, top1 = record.get("key"), record.get("top1")
        found = truths.get(key) if isinstance(key, str) else None
        if found is None and isinstance(top1, int):  # --predicted-class: an image of several classes, by its top-1
            found = truths.get(f"{image}#{top1}")
        found = found or truths.get(image) or truths.get(os.path.basename(image))
        if found is not None:
            gt_label, gt = found
            if boxes and record.get("error") is None:
                from neuroloc.evaluation.metrics import best_iou

                iou = round(best_iou(boxes[0]["box"], gt), 6)
            correct = None if not isinstance(top1, int) else int(top1 == gt_label)
    error = record.get("error")
    shown = displayable(image)
    return (
        source, pos, shown, path_bytes(image), os.path.basename(shown) or shown, offset, len(raw), label, class_name,
        finite_number(first.get("score")), _confidence(first.get("confidence")), iou, correct, int(bool(first.get("empty"))),
        None if error is None else displayable(str(error)), _integer(record.get("width")), _integer(record.get("height")),
        json.dumps(boxes), json.dumps(gt) if gt else None,
    )


def _index_file(index: ResultsIndex, source: Source, truths: dict | None) -> None:
    rows: list[tuple] = []
    pos = 0
    for offset, raw in _lines(source.path):  # type: ignore[arg-type]
        if not raw.strip():
            continue
        try:
            record = _parse(raw)
        except ValueError:  # also UnicodeDecodeError, json.JSONDecodeError
            source.bad_lines += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            source.bad_lines += 1
            continue
        if index.model_name is None and isinstance(record.get("model"), str):
            index.model_name = record["model"]
        rows.append(_row(source.name, pos, offset, raw, record, truths))
        pos += 1
        if len(rows) >= 5000:
            index.add_rows(rows)
            rows = []
    index.add_rows(rows)
    source.count = pos
    if source.bad_lines:
        index.warnings.append(f"{source.path}: {source.bad_lines} unreadable lines skipped")


def _ancestors(folder: Path, levels: int = 4) -> list[Path]:
    out = [folder]
    for _ in range(levels):
        if folder.parent == folder:
            break
        folder = folder.parent
        out.append(folder)
    return out


def load_results(results: str | Path) -> ResultsIndex:
    """Index RESULTS: a localize JSONL file or an evaluate output folder.

    Raises:
        IndexError_: when it is neither.
    """
    path = Path(results)
    if path.is_file():
        root = path.resolve().parent
        index = ResultsIndex(root=root, mode="jsonl", results_path=path)
        source = Source(JSONL_SOURCE, path)
        index.sources[source.name] = source
        _take_run_settings(index, source, read_settings(path))
        _index_file(index, source, None)
    elif path.is_dir():
        index = _load_evaluation(path)
    else:
        raise IndexError_(f"{path}: no such file or folder")
    index.set_bases([*([index.run_folder] if index.run_folder else []), Path.cwd(), *_ancestors(index.root)])
    index.finish()
    return index


def _take_run_settings(index: ResultsIndex, source: Source, settings: dict[str, Any] | None) -> None:
    """A localize run's settings file (``OUTPUT.settings.json``): its configuration becomes the source's method, so
    that the page's knobs start from it as from an evaluate method's method.json; its folder and intensity are kept."""
    if settings is None:
        return
    if isinstance(settings.get("folder"), str):
        index.run_folder = Path(settings["folder"])
    if isinstance(settings.get("intensity"), str):
        index.intensity = settings["intensity"]
    if isinstance(settings.get("config"), dict):
        source.method = {"method": "dam", **settings["config"], "directions": settings.get("directions")}
    multi = settings.get("multi")
    source.tiled = isinstance(multi, dict) and bool(multi.get("tiles"))


def _load_evaluation(folder: Path) -> ResultsIndex:
    metrics_file = folder / "metrics.json"
    metrics = None
    if metrics_file.is_file():
        try:
            metrics = finite_values(json.loads(metrics_file.read_text(encoding="utf-8")))  # older files hold NaN
        except (OSError, ValueError) as exc:
            raise IndexError_(f"{metrics_file}: not readable JSON ({exc})") from None
        if not isinstance(metrics, dict):
            raise IndexError_(f"{metrics_file}: not an evaluate metrics file")
    method_dirs = sorted(p.parent for p in folder.glob("*/predictions.jsonl") if p.is_file())
    if not method_dirs:
        raise IndexError_(
            f"{folder}: not an evaluate output folder (no <method>/predictions.jsonl); give a localize .jsonl file"
        )
    methods = (metrics or {}).get("methods")
    order = list(methods) if isinstance(methods, dict) else []  # the table's order first
    method_dirs.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    index = ResultsIndex(root=folder.resolve(), mode="evaluation", results_path=folder, metrics=metrics)
    run = (metrics or {}).get("run")
    run = run if isinstance(run, dict) else {}  # a file edited by hand: the run's facts are then unknown
    index.model_name = run.get("model") if isinstance(run.get("model"), str) else None
    truths = _ground_truth(index, folder, run.get("dataset"))
    for method_dir in method_dirs:
        source = Source(method_dir.name, method_dir / "predictions.jsonl")
        stamp = method_dir / "method.json"
        if stamp.is_file():
            try:
                method = json.loads(stamp.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                method = None
            source.method = method if isinstance(method, dict) else None
        index.sources[source.name] = source
        _index_file(index, source, truths)
    return index


def _ground_truth(index: ResultsIndex, folder: Path, dataset: Any) -> dict[str, tuple[int, list[list[float]]]] | None:
    """image (as the harness writes it, and its file name) -> (label, boxes), from the evaluated dataset."""
    from neuroloc.evaluation.dataset import DatasetError, load_dataset, to_file_sizes

    if not isinstance(dataset, str) or not dataset:
        index.warnings.append("metrics.json names no dataset: no ground-truth boxes or IoU")
        return None
    candidates = [Path(dataset)] if Path(dataset).is_absolute() else [
        base / dataset for base in [Path.cwd(), *_ancestors(folder.resolve())]
    ]
    for candidate in candidates:
        if candidate.is_dir():
            try:
                samples = to_file_sizes(load_dataset(candidate))  # as evaluate scored them
            except (DatasetError, OSError, ValueError) as exc:
                index.warnings.append(f"dataset {candidate}: {exc}; no ground-truth boxes")
                return None
            index.dataset = candidate.resolve()
            truths: dict[str, tuple[int, list[list[float]]]] = {}
            for sample in samples:
                value = (sample.label, [list(map(float, b)) for b in sample.boxes])
                truths.setdefault(sample.image.name, value)  # an image with several classes: its first by name
                # the harness keys its lines by str(sample.image) of the dataset path it was given, and adds
                # "#label" (its line's "key") for an image with several classes
                given = str(Path(dataset) / sample.image.relative_to(candidate))
                truths.setdefault(given, value)
                truths.setdefault(str(sample.image), value)
                if sample.image_classes > 1:
                    truths[f"{given}#{sample.label}"] = truths[sample.key] = value
            return truths
    index.warnings.append(f"dataset {dataset} (from metrics.json) not found: no ground-truth boxes or IoU")
    return None
