"""Run methods over a dataset, score them, and write predictions, metrics, plots and a report."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from neuroloc.config import LocalizeConfig
from neuroloc.device import exact_float32
from neuroloc.evaluation.dataset import Sample
from neuroloc.evaluation.methods import Method, MethodOutput, centred_box
from neuroloc.evaluation.metrics import (
    MAP_THRESHOLDS,
    PAIRED_METRICS,
    ImageScore,
    PairedDifference,
    confidence_summary,
    max_box_acc_v2_from_ious,
    paired_difference,
    per_class_summary,
    per_image_values,
    score_image,
    summarize,
    threshold_ious,
)
from neuroloc.imageio import DarkImages, ImageError, file_upright_size, load_image
from neuroloc.jsonl import encode, read_records, settings_changes, superseded_path, write_atomic, write_text_atomic
from neuroloc.models.registry import LoadedModel
from neuroloc.pipeline import image_to_input


@dataclass(frozen=True)
class MethodRun:
    name: str
    scores: list[ImageScore]
    seconds_per_image: float
    maxboxacc: dict[str, float] | None
    images: list[str] = field(default_factory=list)  # the sample key (Sample.key) of each score
    map_ious: dict[str, list[float]] = field(default_factory=dict)  # key -> threshold_ious, for map methods
    failed: tuple[str, ...] = ()  # keys of the samples whose image could not be read (their lines say why)

    def subset(self, images: set[str]) -> MethodRun:
        """The same run restricted to the samples whose keys are in ``images``."""
        keep = [j for j, name in enumerate(self.images) if name in images]
        names = [self.images[j] for j in keep]
        ious = {n: self.map_ious[n] for n in names if n in self.map_ious}
        mba = max_box_acc_v2_from_ious(list(ious.values())) if ious and len(ious) == len(names) else None
        return MethodRun(self.name, [self.scores[j] for j in keep], self.seconds_per_image, mba, names, ious,
                         tuple(key for key in self.failed if key in images))


def read_predictions(path: Path) -> dict[str, dict]:
    """Sample key (:attr:`Sample.key`: the image, or ``image#label`` for an image with several classes) -> its
    line of a predictions.jsonl (the last one wins); lines cut short by a kill, or damaged otherwise, are skipped
    (:func:`neuroloc.jsonl.read_records`), so their images are done again; empty when the file does not exist."""
    done: dict[str, dict] = {}
    for record in read_records(path):
        key = record.get("key", record["image"])
        if isinstance(key, str):
            done[key] = record
    return done


def _record(
    sample: Sample, image: Image.Image, model: LoadedModel, out: MethodOutput, label: int, seconds: float
) -> dict:
    cls = model.classes[label]
    prediction: dict[str, Any] = {"label": label, "synset": cls.synset, "name": cls.name, "box": [round(v, 2) for v in out.box],
                  "point": [round(v, 2) for v in out.pointing_point(image.size)]}
    if out.probability is not None:
        prediction["score"] = round(out.probability, 6)
    if out.confidence is not None:
        prediction["confidence"] = round(out.confidence, 4)
    return {
        "image": str(sample.image),
        **_key_field(sample),
        "width": image.size[0],
        "height": image.size[1],
        "model": model.name,
        "predictions": [prediction],
        "top1": out.top1,
        "seconds": round(seconds, 4),
        "error": None,
    }


def _key_field(sample: Sample) -> dict[str, str]:
    """``{"key": ...}`` for a sample of an image with several classes (its lines share the image); else nothing."""
    return {"key": sample.key} if sample.key != str(sample.image) else {}


def _outdated(record: dict[str, Any], sample: Sample, predicted_class: bool, size: tuple[int, int] | None = None) -> bool:
    """Whether a finished line no longer fits its case: made for another class than the data now gives it (a
    corrected label), map IoUs taken against other true boxes (corrected boxes), at other map thresholds
    (before the nineteenth session: 0.01 to 0.99), or for a picture of another ``size`` than the file now has
    (the image was replaced)."""
    if "threshold_ious" in record and len(record["threshold_ious"]) != len(MAP_THRESHOLDS):
        return True
    if size is not None and "width" in record and [record["width"], record.get("height")] != list(size):
        return True
    if "truth_boxes" in record and record["truth_boxes"] != _rounded_boxes(sample.truths_for(record.get("top1"))[1]):
        return True
    predictions = record.get("predictions")
    first = predictions[0] if isinstance(predictions, list) and predictions and isinstance(predictions[0], dict) else {}
    return not predicted_class and isinstance(first.get("label"), int) and first["label"] != sample.label


def _scorable(record: dict[str, Any]) -> bool:
    """Whether a finished line holds what scoring reads: an error, or a size, a top-1 class, a time and a first
    prediction with a box (and map IoUs as a list, if any). A damaged or hand-edited line may not; it is redone."""
    if record.get("error"):
        return True
    predictions = record.get("predictions")
    first = predictions[0] if isinstance(predictions, list) and predictions else None
    return (all(_integer(record.get(key)) for key in ("width", "height", "top1")) and _numbers(record.get("seconds"), 1)
            and isinstance(first, dict) and _numbers(first.get("box"), 4)
            and ("point" not in first or first["point"] is None or _numbers(first["point"], 2))
            and ("threshold_ious" not in record or _numbers(record["threshold_ious"], len(MAP_THRESHOLDS))))


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any, count: int) -> bool:
    """Whether ``value`` is a number (``count`` 1) or a list of ``count`` numbers (JSON's, not booleans)."""
    items = value if count != 1 else [value] if not isinstance(value, list) else None
    return isinstance(items, list) and len(items) == count and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)


def _rounded_boxes(boxes: Sequence[Sequence[float]]) -> list[list[float]]:
    return [[round(float(v), 2) for v in box] for box in boxes]


def _json_object(text: str | None) -> bool:
    """Whether ``text`` is a JSON object (as a method.json is)."""
    try:
        return text is not None and isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _text_or_none(path: Path) -> str | None:
    """The UTF-8 text of ``path``; None when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def same_settings(stored: str, current: str) -> bool:
    """Whether a stored ``method.json`` describes the settings ``current`` describes.

    A setting that a newer neuroloc added to :class:`~neuroloc.config.LocalizeConfig` is absent from
    results written before it; at its default (which keeps the earlier behaviour) it is no change, so
    upgrading does not throw finished predictions away.
    """
    try:
        old, new = json.loads(stored), json.loads(current)
    except json.JSONDecodeError:
        return False
    return isinstance(old, dict) and not settings_changes(old, new, LocalizeConfig().to_dict())


def set_aside(folder: Path, files: Sequence[Path]) -> Path:
    """Move ``files`` (those that exist) into a new ``folder/superseded-<UTC time>/`` and return it."""
    target = superseded_path(folder)
    target.mkdir(parents=True)
    for path in files:
        if path.is_file():
            path.rename(target / path.name)
    return target


def run_method(
    name: str,
    method: Method,
    model: LoadedModel,
    samples: Sequence[Sample],
    output: Path,
    predicted_class: bool = False,
    batch_size: int = 8,
    with_maps: bool = True,
    intensity: str = "range",
    model_identity: dict[str, str] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> MethodRun:
    """Localize every sample with ``method``, appending to ``output/<name>/predictions.jsonl`` (resumable);
    images of more than 8 bits per sample are read as ``intensity`` says. ``model_identity``: what tells this
    model's predictions from another's beyond its name (the digest of weights given by file, of class names).
    ``sizes``: each sample's upright picture size by key (:func:`image_sizes`); a finished line made for a
    picture of another size is redone."""
    folder = output / name
    folder.mkdir(parents=True, exist_ok=True)
    predictions = folder / "predictions.jsonl"
    description = json.dumps(
        {**method.describe(), **method.model_settings(model), "model": model.name, "input_size": model.input_size,
         "predicted_class": predicted_class, **({"intensity": intensity} if intensity != "range" else {}),
         **(model_identity or {})},
        sort_keys=True, default=str,
    )
    stamp = folder / "method.json"
    earlier = predictions.is_file() and predictions.stat().st_size > 0
    recorded = _text_or_none(stamp)
    if earlier and stamp.exists() and (recorded is None or not same_settings(recorded, description)):
        moved = set_aside(folder, (predictions, stamp))  # not this method's predictions, but finished work
        why = ("the settings differ from those of the earlier predictions" if _json_object(recorded)
               else "the method.json beside the earlier predictions cannot be read")
        tqdm.write(f"{name}: {why}; kept them in {moved}, starting afresh", file=sys.stderr)
    elif earlier and not stamp.exists():  # shards' lines joined into a new folder, as --shard's help says to
        tqdm.write(f"{name}: no method.json beside the earlier predictions (joined from shards?); they are taken as "
                   "made with this run's settings", file=sys.stderr)
    write_text_atomic(stamp, description)
    by_key = {sample.key: sample for sample in samples}
    evaluated = {str(sample.image) for sample in samples}
    # Kept: this run's cases unless outdated, and other cases (other shards, --limit); dropped: a line of an image
    # of this run under a key it no longer has (one per class before, one per image with --predicted-class now).
    done = {key: line for key, line in read_predictions(predictions).items()
            if (key in by_key and _scorable(line) and not _outdated(line, by_key[key], predicted_class, (sizes or {}).get(key)))
            or (key not in by_key and str(line.get("image")) not in evaluated)}
    write_atomic(predictions, done.values())  # drops a line cut short by a kill, and outdated ones
    todo = [s for s in samples if s.key not in done or done[s.key].get("error")]  # unread images are tried again
    dark = DarkImages()  # high-bit images that came out dark
    with open(predictions, "a", encoding="utf-8") as sink:
        for start in tqdm(range(0, len(todo), batch_size), desc=name, unit="batch", leave=False):
            batch = todo[start : start + batch_size]
            images, kept = [], []
            for sample in batch:
                try:
                    images.append(load_image(sample.image, intensity=intensity))
                    kept.append(sample)
                    dark.note(sample.image, images[-1])
                except ImageError as exc:
                    done[sample.key] = {"image": str(sample.image), **_key_field(sample), "error": str(exc), "predictions": []}
                    sink.write(encode(done[sample.key]))
            if not kept:
                continue
            labels = [s.label for s in kept]
            if predicted_class:
                with torch.no_grad(), exact_float32():
                    labels = model.module(image_to_input(images, model)).argmax(dim=1).tolist()
            began = time.perf_counter()
            outputs = method.run_files(model, images, labels, [s.image for s in kept])
            seconds = (time.perf_counter() - began) / len(kept)
            for sample, image, label, out in zip(kept, images, labels, outputs):
                if out is None:  # e.g. an image the file method's file has no line for
                    done[sample.key] = {"image": str(sample.image), **_key_field(sample), "predictions": [],
                                        "error": f"{name}: no prediction for this image"}
                    sink.write(encode(done[sample.key]))
                    continue
                record = _record(sample, image, model, out, label, seconds)
                done[sample.key] = record
                if with_maps and out.saliency is not None:  # kept per image, so a resumed run still has it
                    sy, sx = out.saliency.shape[0] / image.size[1], out.saliency.shape[1] / image.size[0]
                    _, boxes = sample.truths_for(out.top1)
                    at_map = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in boxes]
                    record["threshold_ious"] = [round(v, 4) for v in threshold_ious(out.saliency, at_map)]
                    record["truth_boxes"] = _rounded_boxes(boxes)  # what the map IoUs were taken against
                sink.write(encode(record))
            sink.flush()
            os.fsync(sink.fileno())
    if notice := dark.notice():
        tqdm.write(f"{name}: {notice}", file=sys.stderr)
    scores, times, names, map_ious, errors = [], [], [], {}, []
    for sample in samples:
        stored = done.get(sample.key)
        if not stored or stored.get("error"):
            errors += [(sample.key, stored["error"])] if stored else []
            continue
        w, h = stored["width"], stored["height"]
        prediction = stored["predictions"][0]
        label, truths = sample.truths_for(stored["top1"])
        score = score_image(prediction["box"], truths, (w, h), stored["top1"] == label, label, prediction.get("point"))
        scores.append(replace(score, confidence=prediction.get("confidence"), probability=prediction.get("score")))
        times.append(stored["seconds"])
        names.append(sample.key)
        if "threshold_ious" in stored:
            map_ious[sample.key] = stored["threshold_ious"]
    mba = max_box_acc_v2_from_ious(list(map_ious.values())) if map_ious and len(map_ious) == len(scores) else None
    if errors:
        tqdm.write(f"{name}: {len(errors)} of {len(samples)} images are not scored (e.g. {errors[0][1]}); the "
                   f"\"error\" of their lines in {predictions} says why", file=sys.stderr)
    return MethodRun(name, scores, sum(times) / max(len(times), 1), mba, names, map_ious, tuple(k for k, _ in errors))


def metrics_table(runs: Sequence[MethodRun]) -> dict[str, dict[str, float]]:
    table = {}
    for run in runs:
        row = summarize(run.scores)
        row["seconds_per_image"] = run.seconds_per_image
        row["failed"] = float(len(run.failed))
        if run.maxboxacc:
            row.update(run.maxboxacc)
        row.update(confidence_summary(run.scores))
        table[run.name] = row
    return table


def class_table(runs: Sequence[MethodRun]) -> dict[str, dict[int, dict[str, float]]]:
    """Method -> true class -> its figures (:func:`per_class_summary`)."""
    return {run.name: per_class_summary(run.scores) for run in runs}


def paired_comparisons(runs: Sequence[MethodRun]) -> dict[str, dict[str, PairedDifference]]:
    """The first run minus each other run, per metric of ``PAIRED_METRICS``, on the images both scored,
    with bootstrap intervals: whether a lead in the table is more than the luck of the images."""
    if len(runs) < 2:
        return {}
    reference = runs[0]
    comparisons = {}
    for other in runs[1:]:
        common = set(reference.images) & set(other.images)
        ours, theirs = reference.subset(common), other.subset(common)
        order = {name: j for j, name in enumerate(theirs.images)}
        aligned = [theirs.scores[order[name]] for name in ours.images]
        comparisons[other.name] = {
            metric: paired_difference(per_image_values(ours.scores, metric), per_image_values(aligned, metric))
            for metric in PAIRED_METRICS
        }
    return comparisons


def comparisons_json(comparisons: dict[str, dict[str, dict[str, PairedDifference]]]) -> dict:
    return {
        part: {name: {metric: asdict(d) for metric, d in row.items()} for name, row in rows.items()}
        for part, rows in comparisons.items()
    }


CENTRE_AREAS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)


def image_sizes(samples: Sequence[Sample]) -> list[tuple[Sample, tuple[int, int]]]:
    """Each sample with its image's upright (width, height), from the file header (EXIF orientation as
    :func:`neuroloc.imageio.load_image` applies it); unreadable files are left out."""
    sized = []
    for sample in samples:
        size = file_upright_size(sample.image)
        if size is not None:
            sized.append((sample, size))
    return sized


def boxes_outside(sized: Sequence[tuple[Sample, tuple[int, int]]], slack: float = 1.0) -> list[tuple[Sample, tuple[int, int]]]:
    """The samples of ``sized`` (:func:`image_sizes`) with a true box reaching more than ``slack`` pixels outside
    their upright picture: boxes for another file, for the stored rather than the upright picture, or in other
    units, which would make every figure wrong without a sign."""
    return [(sample, size) for sample, size in sized if any(reaches_outside(box, size, slack) for box in sample.boxes)]


def reaches_outside(box: Sequence[float], size: tuple[int, int], slack: float = 1.0) -> bool:
    """Whether ``box`` reaches more than ``slack`` pixels outside a picture of ``size`` (width, height)."""
    x0, y0, x1, y1 = box
    return x0 < -slack or y0 < -slack or x1 > size[0] + slack or y1 > size[1] + slack


def centre_scale_sweep(
    sized: Sequence[tuple[Sample, tuple[int, int]]], areas: Sequence[float] = CENTRE_AREAS
) -> dict[str, dict[str, float]]:
    """The centred-box baseline at every area of ``areas`` (share of the image) on the samples of ``sized``
    (:func:`image_sizes`): area -> table row (:func:`summarize`; the class columns are empty, as no model
    runs). The box needs only the image's size."""
    rows = {}
    for area in areas:
        scores = [score_image(centred_box(*size, area), sample.boxes, size, False) for sample, size in sized]
        row = summarize(scores)
        for key in ("top1_cls", "top1_loc"):
            row.pop(key, None)
        rows[f"{area:g}"] = row
    return rows


def best_centre_area(sweep: dict[str, dict[str, float]], metric: str) -> str:
    """The area of ``sweep`` with the highest ``metric``; ties go to the higher mean IoU, then the smaller area."""
    return max(sweep, key=lambda area: (sweep[area][metric], sweep[area]["mean_iou"], -float(area)))
