"""Run methods over a dataset, score them, and write predictions, metrics, plots and a report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from neuroloc.classes import imagenet_classes
from neuroloc.evaluation.dataset import Sample
from neuroloc.evaluation.methods import Method
from neuroloc.evaluation.metrics import ImageScore, max_box_acc_v2, score_image, summarize
from neuroloc.imageio import ImageError, load_image
from neuroloc.models.registry import LoadedModel


@dataclass(frozen=True)
class MethodRun:
    name: str
    scores: list[ImageScore]
    seconds_per_image: float
    maxboxacc: dict[str, float] | None


def _read_done(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        done[record["image"]] = record
    return done


def _record(sample: Sample, image: Image.Image, model: str, box, label: int, top1: int, seconds: float) -> dict:
    cls = imagenet_classes()[label]
    return {
        "image": str(sample.image),
        "width": image.size[0],
        "height": image.size[1],
        "model": model,
        "predictions": [{"label": label, "synset": cls.synset, "name": cls.name, "box": [round(v, 2) for v in box]}],
        "top1": top1,
        "seconds": round(seconds, 4),
        "error": None,
    }


def run_method(
    name: str,
    method: Method,
    model: LoadedModel,
    samples: Sequence[Sample],
    output: Path,
    predicted_class: bool = False,
    batch_size: int = 8,
    with_maps: bool = True,
) -> MethodRun:
    """Localize every sample with ``method``, appending to ``output/<name>/predictions.jsonl`` (resumable)."""
    folder = output / name
    folder.mkdir(parents=True, exist_ok=True)
    predictions = folder / "predictions.jsonl"
    description = json.dumps({**method.describe(), "model": model.name, "predicted_class": predicted_class}, sort_keys=True, default=str)
    stamp = folder / "method.json"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") != description:
        predictions.unlink(missing_ok=True)  # settings changed: earlier predictions are not this method's
    stamp.write_text(description, encoding="utf-8")
    done = _read_done(predictions)
    _rewrite(predictions, done.values())
    maps, map_truths = [], []
    todo = [s for s in samples if str(s.image) not in done]
    with open(predictions, "a", encoding="utf-8") as sink:
        for start in tqdm(range(0, len(todo), batch_size), desc=name, unit="batch", leave=False):
            batch = todo[start : start + batch_size]
            images, kept = [], []
            for sample in batch:
                try:
                    images.append(load_image(sample.image))
                    kept.append(sample)
                except ImageError as exc:
                    done[str(sample.image)] = {"image": str(sample.image), "error": str(exc), "predictions": []}
                    sink.write(json.dumps(done[str(sample.image)]) + "\n")
            if not kept:
                continue
            labels = [s.label for s in kept]
            if predicted_class:
                from neuroloc.pipeline import image_to_input
                import torch

                with torch.no_grad():
                    labels = model.module(image_to_input(images, model)).argmax(dim=1).tolist()
            began = time.perf_counter()
            outputs = method.run(model, images, labels)
            seconds = (time.perf_counter() - began) / len(kept)
            for sample, image, label, out in zip(kept, images, labels, outputs):
                record = _record(sample, image, model.name, out.box, label, out.top1, seconds)
                done[str(sample.image)] = record
                sink.write(json.dumps(record) + "\n")
                if with_maps and out.saliency is not None:
                    scale = (out.saliency.shape[1] / image.size[0], out.saliency.shape[0] / image.size[1])
                    maps.append(out.saliency)
                    map_truths.append([(b[0] * scale[0], b[1] * scale[1], b[2] * scale[0], b[3] * scale[1]) for b in sample.boxes])
            sink.flush()
            os.fsync(sink.fileno())
    scores, times = [], []
    for sample in samples:
        record = done.get(str(sample.image))
        if not record or record.get("error"):
            continue
        w, h = record["width"], record["height"]
        box = record["predictions"][0]["box"]
        scores.append(score_image(box, sample.boxes, (w, h), record["top1"] == sample.label))
        times.append(record["seconds"])
    mba = max_box_acc_v2(maps, map_truths) if maps and len(maps) == len(samples) else None
    return MethodRun(name, scores, sum(times) / max(len(times), 1), mba)


def _rewrite(path: Path, records) -> None:
    """Atomically rewrite ``path`` with the complete records only (drops a line cut short by a kill)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def metrics_table(runs: Sequence[MethodRun]) -> dict[str, dict[str, float]]:
    table = {}
    for run in runs:
        row = summarize(run.scores)
        row["seconds_per_image"] = run.seconds_per_image
        if run.maxboxacc:
            row.update(run.maxboxacc)
        table[run.name] = row
    return table
