"""``neuroloc evaluate``: methods side by side on a dataset with ground-truth boxes."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch

from neuroloc.classes import ClassList, ClassLookupError, read_class_names
from neuroloc.config import CONFIG_FIELDS, LocalizeConfig, box_unchanged_by, preset_for
from neuroloc.device import device_option
from neuroloc.directions import DirectionsError, directions_for
from neuroloc.evaluation.dataset import IMAGE_CLASSES, DatasetError, Sample, image_groups, load_dataset, one_sample_per_image, to_file_sizes
from neuroloc.evaluation.harness import (
    MethodRun,
    best_centre_area,
    boxes_outside,
    centre_scale_sweep,
    class_table,
    comparisons_json,
    image_sizes,
    metrics_table,
    paired_comparisons,
    reaches_outside,
    run_method,
)
from neuroloc.evaluation.methods import METHODS, DamMethod, Method, TilesMethod, build_method
from neuroloc.evaluation.report import (
    CENTRE_SWEEP_COLUMNS,
    box_count_table,
    centre_scale_section,
    class_csv,
    comparison_section,
    confidence_table,
    hardest_classes_table,
    markdown_table,
    size_table,
    write_gallery,
    write_plots,
)
from neuroloc.evidence import NonFiniteEvidence
from neuroloc.imageio import file_is_turned
from neuroloc.jsonl import strict_json, write_text_atomic
from neuroloc.masks import RefinementUnavailable, require_opencv
from neuroloc.models import LoadedModel, ModelError, load_model
from neuroloc.models.download import sha256_of
from neuroloc.options import (
    BATCH_HELP,
    MAX_THREADS,
    MODEL_HELP,
    WEIGHTS_HELP,
    class_names_option,
    directions_option,
    input_size_option,
    intensity_option,
    layers_hint,
    max_pixels_option,
    writable_folder,
)
from neuroloc.pipeline import evidence_layers
from neuroloc.tiles import MIN_TILE, TILES_NEED_DENSITY, TileRule

DEFAULT_METHODS = ("dam", "dam:paper", "dam:fast", "gradcam", "cam", "center", "full")

EVALUATE_HELP = """Compare localization methods on DATASET (a folder with images/ + boxes.csv, whose
columns are image, xmin, ymin, xmax, ymax in pixels of the image turned upright by its EXIF orientation (as
localize writes boxes; for most files the stored pixels) and the class as label (an
index), synset (a WordNet id) or class (a name); Annotations/*.xml in the ILSVRC / Pascal VOC layout, or COCO's annotations.json or
annotations/instances_<split>.json). An image with boxes of several classes is scored once for each
class, against that class's boxes (--image-classes first: only its first object's class); its lines in
predictions.jsonl carry "key": "IMAGE#LABEL". With --predicted-class such an image is scored once: its
prediction is right when its class is one of the image's, against that class's boxes.

\b
Methods (repeat --method): dam[:PRESET[:key=value;key=value]], tiles:SIZE[:PRESET[:OPTIONS]] (dam
tile by tile), gradcam, cam, center[:AREA], full, gradient, guided, file:PATH (the boxes of a JSON Lines file in localize's schema, e.g. from
`localize --engine ray`, scored as they are), and with torch-cam installed gradcampp, scorecam, layercam
and tc_gradcam (torch-cam's own Grad-CAM, to check the harness's against).
scorecam runs the network once per channel of the CAM layer that is not blank (of 1,280 for Lite0):
about 18 s per image on one core of a 2-core CPU, so give it --device cuda, --limit or --shard.
Examples:
  neuroloc evaluate ../shared/data/ilsvrc2012_val_dev --output runs/dev
  neuroloc evaluate DATA --method dam:paper --sweep kmax=10,30 --output runs/kmax
  neuroloc evaluate DATA --split test --predicted-class --output runs/top1

The class is the ground truth (GT-known localization) unless --predicted-class. Writes
<output>/<method>/predictions.jsonl (resumable: rerun the same command; a method rerun with
other settings starts afresh and moves its earlier predictions to <method>/superseded-<time>/), metrics.json,
per_class.csv (every class x method), report.md and plots. Figures are broken down by object
size, by number of true boxes and by class. The report also sets the first method against each
other one image by image (differences with 95 % bootstrap intervals), so a lead can be told from
the luck of the images. Images that cannot be read (or that a file:PATH has no line for) are left out
of the figures, named at the end and tried again by a rerun; the command then exits with status 1.
"""


def parse_method(spec: str, model_options: dict[str, Any] | None = None) -> tuple[str, Method]:
    """``dam:paper:kmax=30;k=3`` -> ("dam:paper:kmax=30;k=3", DamMethod(...)); ``center:0.6`` -> centre box of 60%;
    ``tiles:192`` (``tiles:192:small``, ``tiles:192::similarity=1``) -> the default (or a density-mode preset) tile
    by tile.

    ``model_options``: the backbone's own settings of the default preset (``ModelSpec.default_options``).
    """
    parts = spec.split(":")
    name = parts[0]
    if name not in METHODS:
        raise click.BadParameter(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}", param_hint="--method")
    most = {"dam": 3, "tiles": 4, "center": 2}.get(name)  # name:PRESET:OPTIONS, tiles:SIZE:PRESET:OPTIONS, center:AREA
    if most is not None and len(parts) > most:  # dam:fast:kmax=5:k=7 dropped k=7 without a word
        raise click.BadParameter(f"{spec}: {len(parts) - most} part(s) too many; options are joined with ';' "
                                 "(dam:PRESET:key=value;key=value)", param_hint="--method")
    if name == "dam":
        config = preset_for(parts[1] if len(parts) > 1 and parts[1] else "default", model_options)
        if len(parts) > 2:
            config = config.with_options(**_parse_options(parts[2]))
        return spec, DamMethod(_ready(config, "--method"))
    if name == "tiles":
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < MIN_TILE:
            raise click.BadParameter(f"give the tile size in pixels, at least {MIN_TILE}: tiles:256", param_hint="--method")
        config = preset_for(parts[2] if len(parts) > 2 and parts[2] else "default", model_options)
        if len(parts) > 3:
            config = config.with_options(**_parse_options(parts[3]))
        if config.mode != "density":
            raise click.BadParameter(f"{spec}: {TILES_NEED_DENSITY}", param_hint="--method")
        return spec, TilesMethod(int(parts[1]), _ready(config, "--method"))
    if name == "file":
        path = spec.partition(":")[2]
        if not path:
            raise click.BadParameter("give the JSON Lines file: file:PATH", param_hint="--method")
        try:
            return f"file:{Path(path).stem}", build_method("file", path=path)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--method") from None
    if name == "center" and len(parts) > 1:
        try:
            area = float(parts[1])
        except ValueError:
            area = math.nan
        if not 0 < area <= 1:  # also NaN
            raise click.BadParameter(f"center:AREA takes the box's share of the image, in (0, 1]: {parts[1]!r}",
                                     param_hint="--method")
        return spec, build_method("center", area=area)
    if len(parts) > 1:
        raise click.BadParameter(f"method {name!r} takes no options", param_hint="--method")
    return spec, build_method(name)


def _parse_options(text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, text.split(";")):
        key, _, value = item.partition("=")
        if key not in CONFIG_FIELDS:
            raise click.BadParameter(f"unknown option {key!r}; known: {', '.join(CONFIG_FIELDS)}", param_hint="--method")
        options[key] = _coerce(key, value, "--method")
    return options


def _coerce(key: str, value: str, option: str) -> Any:
    """``value`` as the type of the configuration field ``key``.

    Raises:
        click.BadParameter: for a number that does not read as one, naming ``option``.
    """
    default = getattr(LocalizeConfig(), key)
    if key == "density_layers":
        return tuple(value.split("+"))
    if isinstance(default, bool):
        if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise click.BadParameter(f"{key} takes true or false, not {value!r}", param_hint=option)
        return value.lower() in ("1", "true", "yes", "on")
    kind = int if isinstance(default, int) else float if isinstance(default, float) else None
    if kind is None:
        return value
    try:
        return kind(value)
    except ValueError:
        raise click.BadParameter(f"{key}={value!r}: {key} takes {'an integer' if kind is int else 'a number'}",
                                 param_hint=option) from None


class ShardType(click.ParamType):
    """``K/N``: the K-th of N interleaved shares of the images (K from 1)."""

    name = "K/N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            k, n = (int(part) for part in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not K/N, e.g. 1/4", param, ctx)
        if not 1 <= k <= n:
            self.fail(f"{value!r}: K must be from 1 to N", param, ctx)
        return k, n


def _images_at(samples: Sequence[Sample], positions: slice) -> list[Sample]:
    """The samples of the images at ``positions`` (a slice of the images, not of the samples)."""
    return [sample for group in image_groups(samples)[positions] for sample in group]


def shard_samples(samples: list[Sample], shard: tuple[int, int] | None) -> list[Sample]:
    """Every N-th image from the K-th: shards of one list are disjoint and together make all of it."""
    if shard is None:
        return samples
    k, n = shard
    return _images_at(samples, slice(k - 1, None, n))


def split_samples(samples: list[Sample], split: str) -> list[Sample]:
    """``tune`` = images at even positions in name order, ``test`` = at odd positions, ``all``; the classes of
    one image stay in the same half."""
    if split == "tune":
        return _images_at(samples, slice(0, None, 2))
    if split == "test":
        return _images_at(samples, slice(1, None, 2))
    return samples


def limit_samples(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The samples of the first ``limit`` images (all without a limit)."""
    return samples if limit is None else _images_at(samples, slice(0, limit))


@click.command("evaluate", help=EVALUATE_HELP, no_args_is_help=True)
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for results.")
@click.option("--method", "methods", multiple=True, help="Method to run (repeatable): dam[:PRESET[:OPTIONS]], tiles:SIZE[:PRESET[:OPTIONS]] (tile by tile), "
              "gradcam, cam, gradcampp, layercam, scorecam, tc_gradcam, gradient, guided, center[:AREA], full, file:PATH (boxes "
              "of a localize output). Default: " + ", ".join(DEFAULT_METHODS) + ".")
@click.option("--sweep", help="Vary one dam option: NAME=V1,V2,... (applied to every dam method).")
@click.option("--model", "model_name", default="efficientnet_lite0", show_default=True, help=MODEL_HELP)
@click.option("--weights", type=click.Path(path_type=Path), help=WEIGHTS_HELP)
@click.option("--predicted-class", is_flag=True, help="Localize the top-1 prediction (top-1 localization) instead of the true class.")
@click.option("--split", type=click.Choice(["all", "tune", "test"]), default="all", show_default=True,
              help="tune / test: the even / odd images in name order (tune on one, report on the other).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images (after --split).")
@click.option("--image-classes", type=click.Choice(IMAGE_CLASSES), default="all", show_default=True,
              help="Which classes of an image with boxes of several classes are scored: each one (one case per "
                   "class, against its own boxes), or only the class of its first object.")
@click.option("--shard", type=ShardType(),
              help="Only every N-th image from the K-th (after --split and --limit), so that several processes or "
                   "machines share one evaluation. Give each shard its own --output; to join them, append every "
                   "shard's <method>/predictions.jsonl to one output folder's and rerun there without --shard: "
                   "finished images are read, not run again (lines are matched by the image path as the dataset "
                   "gives it, so give every shard the dataset by the same path, from the same folder).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help=BATCH_HELP)
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), help="torch threads (default: torch's choice).")
@device_option()
@input_size_option(" Every method sees the same size.")
@directions_option(" 'auto' fits them over the images evaluated (after --split and --limit, before --shard).")
@class_names_option("the dataset's class column (or XML names)")
@intensity_option()
@max_pixels_option(" for tiles:SIZE")
def evaluate_command(
    dataset: Path, output: Path, methods: tuple[str, ...], sweep: str | None, model_name: str, weights: Path | None,
    predicted_class: bool, split: str, limit: int | None, batch_size: int, threads: int | None, device: torch.device,
    input_size: int | None = None, shard: tuple[int, int] | None = None, directions: str = "auto",
    class_names: Path | None = None, intensity: str = "range", image_classes: str = "all",
) -> None:
    if threads:
        torch.set_num_threads(threads)
    try:
        own = read_class_names(class_names) if class_names is not None else None
        loaded = load_dataset(dataset, own, image_classes)
        if predicted_class:  # one prediction per image: scored once, not once per class of the image
            loaded = one_sample_per_image(loaded)
        evaluated = limit_samples(split_samples(loaded, split), limit)
        samples = shard_samples(evaluated, shard)
        model = load_model(model_name, weights, device=device, class_names=class_names).at_input_size(input_size)
    except (DatasetError, ModelError, ClassLookupError) as exc:
        raise click.ClickException(str(exc)) from None
    beyond = sorted({s.label for s in samples if s.label >= len(model.classes)})
    if beyond:
        raise click.ClickException(
            f"{dataset}: class index {beyond[0]} is beyond {model_name}'s {len(model.classes)} classes")
    if not samples:
        raise click.ClickException(f"{dataset}: no images with boxes" + (" in this shard" if shard else ""))
    try:  # a dam option out of range is a usage error, as every other bad option is (exit 2)
        chosen = [parse_method(m, model.spec.default_options) for m in (methods or DEFAULT_METHODS)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None
    try:
        chosen = _expand_sweep(chosen, sweep) if sweep else chosen
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--sweep'") from None
    method_names = [name for name, _ in chosen]
    twice = sorted({name for name in method_names if method_names.count(name) > 1})
    if twice:  # each method's results go to its own folder, named after it
        raise click.BadParameter(f"{twice[0]} is given twice (each method writes to <output>/<its name>; for two "
                                 "files, give them different names)", param_hint="--method")
    _check_layers(chosen, model)
    chosen = _runnable(chosen, model, given=bool(methods))
    writable_folder(output, "'--output'")  # refused after the settings, before the work
    evaluated_images = [group[0].image for group in image_groups(evaluated)]  # for the directions fitted over them
    try:
        model = _with_fitted_directions(chosen, model, directions, evaluated_images, intensity)
    except KeyboardInterrupt:
        click.echo("\nInterrupted while fitting the feature directions, before any method ran; rerun the same "
                   "command to start.", err=True)
        sys.exit(130)
    output.mkdir(parents=True, exist_ok=True)
    sized = image_sizes(samples)  # one header read per image: the boxes' scaling and check, the centred box's scales
    sizes = {sample.image: size for sample, size in sized}
    samples = to_file_sizes(samples, sizes)  # boxes annotated at another size: to the files
    sized = [(sample, sizes[sample.image]) for sample in samples if sample.image in sizes]
    outside = boxes_outside(sized)
    pictures = list(dict.fromkeys(sample.image for sample, _ in sized))  # an image of two classes is two samples
    if outside:
        sample, (width, height) = outside[0]
        reaching = len({sample.image for sample, _ in outside})
        out_box = next(b for b in sample.boxes if reaches_outside(b, (width, height)))
        click.echo(f"neuroloc: warning: {reaching} of {len(pictures)} images have a true box reaching outside the "
                   f"picture (e.g. {sample.image.name}, {width}x{height} upright: {[round(v, 1) for v in out_box]}); "
                   "are the boxes in pixels of these files, turned upright by their EXIF orientation?", err=True)
    first_of = {sample.image: (sample, size) for sample, size in reversed(sized)}
    if scaled := [first_of[picture] for picture in pictures if first_of[picture][0].scaled_from]:
        sample, (width, height) = scaled[0]
        given = sample.scaled_from or (0, 0)
        click.echo(f"neuroloc: note: {len(scaled)} of {len(pictures)} images are not the size their annotations give "
                   f"(e.g. {sample.image.name}: {given[0]}x{given[1]} there, {width}x{height} the file): their boxes "
                   "were scaled to the files", err=True)
    if stored := [picture for picture in pictures if first_of[picture][0].stored_frame]:
        click.echo(f"neuroloc: warning: for {len(stored)} of {len(pictures)} images (e.g. {stored[0].name}) the "
                   "annotations give the size of the picture as stored, before its EXIF orientation turns it: boxes "
                   "drawn on the stored pixels are scored against the upright picture, wrongly; turn the files "
                   "upright and their boxes with them, or strip the orientation", err=True)
    turned = [picture for picture in pictures if file_is_turned(picture) and not first_of[picture][0].stored_frame]
    if turned:
        click.echo(f"neuroloc: note: {len(turned)} of {len(pictures)} images carry an EXIF orientation (e.g. "
                   f"{turned[0].name}): their boxes are read in pixels of the upright picture, as localize "
                   "writes boxes; boxes drawn on the stored pixels would be scored wrongly", err=True)
    image_count = len(image_groups(samples))
    counted = f"{image_count} images" + (f" ({len(samples)} image-class pairs)" if len(samples) > image_count else "")
    identity = _model_identity(weights, own)
    runs: list[MethodRun] = []
    for name, method in chosen:
        click.echo(f"{name}: {counted}", err=True)
        try:
            runs.append(run_method(name, method, model, samples, output, predicted_class, batch_size, intensity=intensity,
                                   model_identity=identity, sizes={sample.key: size for sample, size in sized}))
        except (NonFiniteEvidence, DirectionsError) as exc:  # every image would fail alike; finished work stays
            raise click.ClickException(f"{name} with model {model_name}: {exc}") from None
        except KeyboardInterrupt:
            click.echo(f"\nInterrupted; the finished predictions stay in {output}/<method>/predictions.jsonl. "
                       "Rerun the same command to continue.", err=True)
            sys.exit(130)
    try:  # the figures, plots and report: an interrupt here leaves every prediction done
        table = metrics_table(runs)
        header = _header(dataset, model_name, model.input_size, split, predicted_class, image_count, device)
        if len(samples) > image_count:
            header["image_class_pairs"] = len(samples)  # images with boxes of several classes: one case per class
        unreadable = sorted({key for run in runs for key in run.failed})
        if not any(run.scores for run in runs):
            example = f" (e.g. {unreadable[0]})" if unreadable else ""
            raise click.ClickException(f"no image could be scored: {len(unreadable)} of {len(samples)} unreadable or without "
                                       f"a prediction{example}; each line of {output}/<method>/predictions.jsonl says why")
        if unreadable:
            header["not_scored"] = f"{len(unreadable)} of {len(samples)}, unreadable or without a prediction (e.g. {unreadable[0]})"
        header["directions"] = (
            f"{model.directions.fingerprint} ({model.directions.images} images, {directions})" if model.directions else "none"
        )
        if shard:
            header["shard"] = "{}/{}".format(*shard)
        halves, half_runs = {}, {}
        # the halves by the images' positions before --shard (a shard's own even positions are not the tuning half)
        half_keys = {half: {s.key for s in split_samples(evaluated, half)} for half in ("tune", "test")} if split == "all" else {}
        for half, names in half_keys.items():  # the tuning and the held-out half, from the same predictions
            if not any(sample.key in names for sample in samples):  # a shard may hold one half's images only
                continue
            half_runs[half] = [run.subset(names) for run in runs]
            halves[half] = metrics_table(half_runs[half])
        comparisons = {"all": paired_comparisons(runs), **{half: paired_comparisons(r) for half, r in half_runs.items()}}
        metrics = {"run": header, "methods": table, "halves": halves, "comparisons": comparisons_json(comparisons)}
        centre_lines: list[str] = []
        if any(name.split(":")[0] == "center" for name, _ in chosen):
            metrics["centre_scales"], centre_lines = _centre_scales(sized, split, half_keys)
        per_class = class_table(runs)
        metrics["per_class"] = {name: {str(label): row for label, row in rows.items()} for name, rows in per_class.items()}
        names_by_label = {c.index: (c.synset or "", c.short_name) for c in model.classes}
        write_text_atomic(output / "per_class.csv", class_csv(per_class, names_by_label))
        write_text_atomic(output / "metrics.json", strict_json(metrics, indent=2))
        plots = write_plots(runs, table, output / "plots")
        report = ["# neuroloc evaluation", "", *(f"- {k}: {v}" for k, v in header.items()), "", markdown_table(table), ""]
        for half, half_table in halves.items():
            report += [f"## {half} half ({'even' if half == 'tune' else 'odd'} positions in name order)", "", markdown_table(half_table), ""]
        report += _breakdown_section(
            "By object size", "Size: the largest true box's share of the image area (small < 10 %, large > 50 %).",
            size_table, table, halves,
        )
        report += _breakdown_section(
            "By number of true boxes",
            "A box around several instances of the class fails IoU 0.5 with each of them and centres between them.",
            box_count_table, table, halves,
        )
        hardest = hardest_classes_table(per_class, names_by_label)
        if hardest:
            report += [
                "## By class",
                "",
                (f"GT-known per class for every method is in `per_class.csv` ({len(per_class[runs[0].name])} classes; "
                 "also mean IoU, IoU≥0.7 and classification top-1). The classes with at least two images where "
                 f"{runs[0].name} does worst:"),
                "",
                hardest,
                "",
            ]
        report += comparison_section(runs[0].name, comparisons)
        report += centre_lines
        confidences = confidence_table(table)
        if confidences:
            report += ["## Localization confidence (IoU >= 0.5 counts as correct)", "", confidences, ""]
            for half, half_table in halves.items():
                report += [f"{half} half:", "", confidence_table(half_table), ""]
        report += [f"![{p.stem}](plots/{p.name})" for p in plots]
        truths = {sample.key: sample.boxes for sample in samples}
        gallery = write_gallery(runs[0], output / runs[0].name / "predictions.jsonl", truths, output / "plots" / "gallery.png",
                                intensity=intensity)
        if gallery is not None:
            report += ["", "## Best and worst cases", "", f"![{runs[0].name}: best and worst images](plots/{gallery.name})"]
        write_text_atomic(output / "report.md", "\n".join(report) + "\n")
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted while writing the figures; every prediction is done and stays in {output}. "
                   "Rerun the same command to write them (nothing is localized again).", err=True)
        sys.exit(130)
    click.echo(markdown_table(table))
    if confidences:
        click.echo(confidences)
    if unreadable:  # the figures stand for the rest; the exit status says that some cases are missing
        click.echo(f"neuroloc: not scored: {header['not_scored']}; the lines of each method's predictions.jsonl say "
                   "why", err=True)
        sys.exit(1)


def _breakdown_section(
    title: str, intro: str, make_table: Callable[[dict[str, dict[str, float]]], str],
    table: dict[str, dict[str, float]], halves: dict[str, dict[str, dict[str, float]]],
) -> list[str]:
    """Report lines: ``make_table`` of all images, then of each half."""
    lines = [f"## {title}", "", intro, "", make_table(table), ""]
    for half, half_table in halves.items():
        lines += [f"{half} half:", "", make_table(half_table), ""]
    return lines


def _centre_scales(
    sized: list[tuple[Sample, tuple[int, int]]], split: str, half_keys: dict[str, set[str]]
) -> tuple[dict[str, Any], list[str]]:
    """The centred box at every scale, for metrics.json and the report: a baseline is only as strong as its
    best scale. With ``split="all"`` the best scale is chosen on the tuning half, as every other choice.
    ``sized``: the readable samples with their sizes (:func:`image_sizes`); ``half_keys``: the sample keys of
    each half (empty unless ``split="all"``)."""
    parts = {"all": sized}
    for half, names in half_keys.items():
        parts[half] = [(sample, size) for sample, size in sized if sample.key in names]
    sweeps = {part: centre_scale_sweep(part_sized) for part, part_sized in parts.items() if part_sized}
    if not sweeps:
        return {}, []
    chosen_on, selection_part = ("tune", "tune") if split == "all" else (split, "all")
    if selection_part not in sweeps:  # a dataset of one image has an empty half
        chosen_on, selection_part = "all", "all"
    selection = sweeps[selection_part]
    scale_free = "centre@0.2"  # every area has the same centre
    best = {key: best_centre_area(selection, key) for key, _ in CENTRE_SWEEP_COLUMNS if key != scale_free}
    return {"best_on": chosen_on, "best": best, **sweeps}, centre_scale_section(sweeps, best, chosen_on)


def _expand_sweep(chosen: list[tuple[str, Method]], sweep: str) -> list[tuple[str, Method]]:
    key, _, values = sweep.partition("=")
    if key not in CONFIG_FIELDS or not values:
        raise click.BadParameter(f"--sweep needs NAME=V1,V2 with NAME in {', '.join(CONFIG_FIELDS)}")
    if not any(isinstance(method, DamMethod) for _, method in chosen):
        raise click.BadParameter("--sweep varies a dam method's option, and no dam method is given (--method dam...)",
                                 param_hint="'--sweep'")
    expanded = []
    for name, method in chosen:
        if not isinstance(method, DamMethod):
            expanded.append((name, method))
            continue
        reasons = set()
        for value in values.split(","):
            config = method.config.with_options(**{key: _coerce(key, value, "--sweep")})
            reasons.add(box_unchanged_by(config, key))
            expanded.append((f"{name}[{key}={value}]", DamMethod(_ready(config, "--sweep"))))
        if None not in reasons:  # every variant the same boxes: rows that only repeat each other
            click.echo(f"neuroloc: warning: --sweep {key} leaves the boxes of {name} unchanged: "
                       f"{'; '.join(sorted(str(r) for r in reasons))}", err=True)
    return expanded


def _model_identity(weights: Path | None, own_classes: ClassList | None) -> dict[str, str]:
    """What, beyond the model's name, tells its predictions from another's: weights given by file (by content, so
    the same file moved is the same), and the class names given; nothing for the model's own defaults."""
    identity = {}
    if weights is not None:
        identity["weights"] = f"sha256:{sha256_of(weights)[:16]}" if weights.is_file() else str(weights.resolve())
    if own_classes is not None:
        names = "\n".join(c.name for c in own_classes)
        identity["class_names"] = f"sha256:{hashlib.sha256(names.encode()).hexdigest()[:16]}"
    return identity


def _with_fitted_directions(
    chosen: Sequence[tuple[str, Method]], model: LoadedModel, directions: str, images: list[Path], intensity: str
) -> LoadedModel:
    """The model with the feature directions the methods use (fitted once, over ``images``, for the first method
    that uses them; a method fusing other layers gets directions of its own, fitted once per set of layers); tile
    methods get directions of their own too: a tile is a zoomed-in view."""
    users = [m for _, m in chosen if isinstance(m, DamMethod) and m.config.uses_objectness]
    try:
        fits = []
        if users:
            layers = evidence_layers(model, users[0].config)[1]
            model = model.with_directions(directions_for(directions, model, layers, images, intensity))
            fits.append(model.directions)
            by_layers = {frozenset(layers): model.directions}
            for user in users[1:]:  # another set of layers (a --sweep of density_layers): a fit of its own
                own = evidence_layers(model, user.config)[1]
                if frozenset(own) not in by_layers:
                    by_layers[frozenset(own)] = directions_for(directions, model, own, images, intensity)
                    fits.append(by_layers[frozenset(own)])
                if frozenset(own) != frozenset(layers):
                    user.directions = by_layers[frozenset(own)]
        for _, method in chosen:
            if isinstance(method, TilesMethod) and method.config.uses_objectness:
                layers = evidence_layers(model, method.config)[1]
                method.directions = directions_for(directions, model, layers, images, intensity, TileRule(method.size))
                fits.append(method.directions)
        said = {mismatch for fit in fits if fit is not None and (mismatch := fit.use_warning(model)) is not None}
        for mismatch in sorted(said) if directions != "auto" else []:
            click.echo(f"neuroloc: {directions} was {mismatch}", err=True)
    except DirectionsError as exc:
        raise click.ClickException(str(exc)) from None
    return model


def _check_layers(chosen: Sequence[tuple[str, Method]], model: LoadedModel) -> None:
    """Refuse, before any work, a method whose layers (``layer``, ``density_layers``) the model does not have."""
    from neuroloc.hooks import find_layer

    for name, method in chosen:
        config = getattr(method, "config", None)
        if config is None:
            continue
        try:
            ranked, fused = evidence_layers(model, config)
            for layer in (ranked, *fused):
                find_layer(model.module, layer)
        except ValueError as exc:
            raise click.BadParameter(f"{name}: {exc}{layers_hint(exc, model.name)}", param_hint="--method") from None


def _runnable(chosen: list[tuple[str, Method]], model: LoadedModel, given: bool) -> list[tuple[str, Method]]:
    """The methods that can run on ``model``: one that cannot is refused when the user named it, and left out of
    the default list with a line saying why (CAM on a model without a pooling + linear head)."""
    runnable = []
    for name, method in chosen:
        reason = method.unavailable(model)
        if reason is not None and given:
            raise click.BadParameter(reason, param_hint="--method")
        if reason is not None:
            click.echo(f"neuroloc: {name} left out: {reason}", err=True)
        else:
            runnable.append((name, method))
    return runnable


def _ready(config: LocalizeConfig, option: str) -> LocalizeConfig:
    """``config``, once what it needs beyond the core is installed (OpenCV for ``refine="grabcut"``)."""
    if config.refine != "none":
        try:
            require_opencv()
        except RefinementUnavailable as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    return config


def _header(
    dataset: Path, model: str, input_size: int, split: str, predicted: bool, count: int, device: torch.device
) -> dict[str, Any]:
    return {
        "dataset": str(dataset),
        "split": split,
        "images": count,
        "model": model,
        "input_size": f"{input_size}x{input_size}",
        "class": ("top-1 prediction: the GT-known columns score the box alone (IoU >= 0.5 with a true box, whether "
                  "or not the class is right); top-1 loc also needs the class right") if predicted
        else "ground truth (GT-known)",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "date": time.strftime("%Y-%m-%d"),
    }
