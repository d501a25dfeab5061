"""Localize a whole collection with Ray Data, on one machine or a cluster (issue 9).

Two entry points:

* :func:`localize_dataset` adds prediction columns to any ``ray.data.Dataset`` with a ``path`` column
  (files to read in the workers) and/or a ``bytes`` column (e.g. from ``ray.data.read_binary_files(...,
  include_paths=True)``). Images are decoded inside the actors with :mod:`neuroloc.imageio`, so a bad
  image is an ``error`` in its row, never a failed job.
* :func:`run_from_cli` is ``neuroloc localize SOURCES --engine ray``: the same JSON Lines file, resume
  and exit status as the local path, with SOURCES that may also be manifests (.txt, .csv, .parquet).

The localization runs in ``map_batches`` over a fixed pool of actors; each loads the model once, and runs it
on CPUs or, with ``gpus_per_worker``, on a share of one of the cluster's CUDA GPUs. An actor
that dies is restarted by Ray and its batch retried (``max_restarts`` / ``max_task_retries``). Ray itself is
an optional extra: ``pip install "neuroloc[ray]"``. Guide and measurements: docs/ray.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroloc.config import LocalizeConfig
from neuroloc.sources import absolute_path

if TYPE_CHECKING:
    import pyarrow
    import ray.data

    from neuroloc.cli import Tally
    from neuroloc.directions import FeatureDirections
    from neuroloc.jsonl import RecordWriter
    from neuroloc.models import LoadedModel
    from neuroloc.multi import MultiOptions

INSTALL_HINT = 'the Ray engine needs Ray Data, which is not installed: pip install "neuroloc[ray]" (or "ray[data]>=2.9")'
# An input column with each row's own classes (a list of class indices; empty or null: target, else the top-1).
CLASSES_COLUMN = "classes"
# An input column naming each row's picture files (<name>.jpg ...); without it, the path's stem.
NAME_COLUMN = "name"
# Columns localize_dataset adds (an input column of the same name is replaced).
OUTPUT_COLUMNS = ("width", "height", "model", "label", "synset", "class_name", "score", "box", "error", "record",
                  "range_used")


class RayMissingError(ImportError):
    """Ray Data is not installed; the message says how to install it."""


def import_ray() -> Any:
    """``ray`` with ``ray.data`` imported, or :class:`RayMissingError` with the install command."""
    try:
        import ray
        import ray.data  # ray without the [data] extra lacks pyarrow/pandas
    except ImportError as exc:
        raise RayMissingError(f"{INSTALL_HINT} ({exc})") from None
    return ray


# --- sizing the actor pool -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolPlan:
    """How many actors, how many CPUs (and GPUs) Ray reserves for each, and how many torch threads each uses."""

    workers: int
    cpus_per_worker: float
    torch_threads: int
    gpus_per_worker: float = 0.0


def plan_pool(
    total_cpus: float,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    *,
    gpus_per_worker: float = 0.0,
    total_gpus: float = 0.0,
) -> PoolPlan:
    """An actor pool that cannot starve the rest of the job, on any machine size.

    One CPU (half the machine below 2 CPUs) is left to Ray Data's read tasks and the driver: an actor
    pool holding every CPU made a read_binary_files job hang on 2 CPUs (Ray 2.60). The other CPUs are
    shared by the ``workers`` actors (default: one per remaining CPU), fractionally if needed; each actor
    runs torch with as many threads as whole CPUs it holds (at least 1).

    With ``gpus_per_worker`` (a share of one GPU, or 1), each actor also holds that much of one of the
    cluster's ``total_gpus`` GPUs (whole GPUs: a share is never split over two), and the pool defaults to as
    many actors as the GPUs hold. A GPU actor asks for one CPU by default (less when the cluster has fewer to
    spare): its network runs on the GPU, and GPU nodes often have few CPUs.

    Raises:
        ValueError: a pool the cluster cannot hold (Ray would wait for it for ever), or bad numbers.
    """
    if total_cpus <= 0:
        raise ValueError(f"the Ray cluster has no CPUs ({total_cpus})")
    if not 0 <= gpus_per_worker <= 1:
        raise ValueError(f"GPUs per worker must be a share of one GPU (0 to 1), got {gpus_per_worker:g}")
    reserve = 1.0 if total_cpus >= 2 else total_cpus / 2
    usable = total_cpus - reserve
    if gpus_per_worker > 0:
        if total_gpus <= 0:
            raise ValueError("the Ray cluster has no GPUs")
        fits = math.floor(total_gpus + 1e-9) * math.floor(1 / gpus_per_worker + 1e-9)
        wanted = max(1, fits) if workers is None else workers
        if wanted > fits:
            raise ValueError(f"{wanted} worker(s) x {gpus_per_worker:g} GPU do not fit on the cluster's "
                             f"{total_gpus:g} GPU(s)")
        workers = wanted
    if workers is None:
        workers = max(1, int(usable))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cpus_per_worker is None:
        cpus_per_worker = math.floor(usable / workers * 100) / 100  # Ray accepts fractions; round down
        if gpus_per_worker > 0:
            cpus_per_worker = min(1.0, cpus_per_worker)
    cpus_per_worker = max(0.01, cpus_per_worker)
    if workers * cpus_per_worker > usable + 1e-9:  # Ray would start those that fit and wait for the rest for ever
        most = max(1, math.floor(usable / cpus_per_worker + 1e-9))
        raise ValueError(f"{workers} workers x {cpus_per_worker:g} CPU do not fit on the {usable:g} CPU(s) the cluster "
                         f"leaves them (one is kept for reading): at most {most}")
    return PoolPlan(workers, cpus_per_worker, max(1, int(cpus_per_worker)), gpus_per_worker)


# --- the actor ------------------------------------------------------------------------------------------------


class _LocalizeActor:
    """One actor of the pool: loads the model once, then localizes batches (pyarrow tables)."""

    def __init__(
        self,
        model: str | Callable[[], LoadedModel],
        weights: str | None,
        config: LocalizeConfig | None,
        target: str | int | None,
        with_neurons: bool,
        torch_threads: int,
        path_column: str,
        bytes_column: str,
        intensity: str = "range",
        max_pixels: int | None = None,
        multi: MultiOptions | None = None,
        pictures: dict[str, Path | None] | None = None,
        use_compile: bool = False,
        on_gpu: bool = False,
        directions: str | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        from neuroloc.classes import resolve_class
        from neuroloc.cli import RunOptions
        from neuroloc.config import preset_for
        from neuroloc.models import load_model

        self.model = model() if callable(model) else load_model(model, weights)
        # among the model's own classes (a fine-tuned head, class names of its own), not ImageNet's
        label = None if target is None else resolve_class(target, self.model.classes).index
        if directions is not None:
            from neuroloc.directions import load_directions

            self.model = self.model.with_directions(load_directions(directions, self.model.name))
        config = config or preset_for("default", self.model.spec.default_options)
        if on_gpu:  # Ray shows the actor only the GPU it was given, as cuda
            self.model = self.model.to("cuda")
        folders = pictures or {}
        if use_compile:  # compiled here, in the actor's process: a compiled module does not travel
            from neuroloc.compiled import compile_model

            self.model = compile_model(self.model, config, keep_maps=folders.get("explain_dir") is not None)
        self.config = config
        self.options = RunOptions(batch_size=1, label=label, overlay_dir=folders.get("overlay_dir"),
                                  explain_dir=folders.get("explain_dir"), with_neurons=with_neurons, multi=multi,
                                  intensity=intensity, heatmap_dir=folders.get("heatmap_dir"))
        self.path_column = path_column
        self.bytes_column = bytes_column
        self.max_pixels = max_pixels

    def __call__(self, batch: pyarrow.Table) -> pyarrow.Table:
        import pyarrow as pa

        from neuroloc.cli import _describe, _localize_each, _one_line, make_record, save_pictures
        from neuroloc.imageio import ImageError, decode_image, load_image, range_used

        n = batch.num_rows
        names = batch.column_names
        paths = batch.column(self.path_column).to_pylist() if self.path_column in names else [None] * n
        own = batch.column(CLASSES_COLUMN).to_pylist() if CLASSES_COLUMN in names else None
        stems = batch.column(NAME_COLUMN).to_pylist() if NAME_COLUMN in names else [None] * n
        data = batch.column(self.bytes_column).to_pylist() if self.bytes_column in names else None
        images: dict[int, Any] = {}
        errors: dict[int, str] = {}
        for i in range(n):
            try:
                if data is not None:
                    images[i] = decode_image(data[i] or b"", str(paths[i] or f"row {i}"), self.max_pixels,
                                             self.options.intensity)
                elif (path := paths[i]) is None:
                    errors[i] = f"row has no {self.path_column!r} (or {self.bytes_column!r}) value"
                else:
                    images[i] = load_image(path, self.max_pixels, intensity=self.options.intensity)
            except ImageError as exc:
                errors[i] = _one_line(exc)
            except Exception as exc:  # noqa: BLE001 - e.g. a path that is not a string: the row's error
                errors[i] = f"cannot read image: {type(exc).__name__}: {_one_line(exc)}"
        ready = sorted(images)
        outcomes = _localize_each(self.model, [images[i] for i in ready], self.config, self.options,
                                  None if own is None else [tuple(own[i] or ()) for i in ready])
        records = []
        neurons, multi = self.options.with_neurons, self.options.multi
        for i in range(n):
            path = str(paths[i]) if paths[i] is not None else f"row {i}"
            if i in errors:
                records.append(make_record(path, self.model.name, None, None, errors[i], neurons, multi))  # type: ignore[arg-type]
                continue
            outcome = outcomes[ready.index(i)]
            if isinstance(outcome, Exception):
                records.append(make_record(path, self.model.name, images[i], None, _describe(outcome), neurons, multi))  # type: ignore[arg-type]
            else:
                given = paths[i]
                stem = stems[i] or (Path(given).stem if given is not None else f"row{i}")
                error = save_pictures(images[i], outcome, stem, self.options)
                records.append(make_record(path, self.model.name, images[i], outcome, error, neurons, multi))  # type: ignore[arg-type]
        used = [range_used(images[i]) if i in images else None for i in range(n)]
        return _with_columns(batch, records, used, self.bytes_column, pa)


def _with_columns(
    batch: pyarrow.Table, records: list[dict[str, Any]], used: list[float | None], bytes_column: str, pa: Any
) -> pyarrow.Table:
    from neuroloc.jsonl import encode

    keep = [c for c in batch.column_names if c != bytes_column and c not in OUTPUT_COLUMNS]
    table = batch.select(keep)
    first = [r["predictions"][0] if r["predictions"] else {} for r in records]
    columns = {
        "width": pa.array([r["width"] for r in records], pa.int64()),
        "height": pa.array([r["height"] for r in records], pa.int64()),
        "model": pa.array([r["model"] for r in records], pa.string()),
        "label": pa.array([p.get("label") for p in first], pa.int64()),
        "synset": pa.array([p.get("synset") for p in first], pa.string()),
        "class_name": pa.array([p.get("name") for p in first], pa.string()),
        "score": pa.array([p.get("score") for p in first], pa.float64()),
        "box": pa.array([p.get("box") for p in first], pa.list_(pa.float64())),
        "error": pa.array([r["error"] for r in records], pa.string()),
        "record": pa.array([encode(r).rstrip("\n") for r in records], pa.string()),
        "range_used": pa.array(used, pa.float64()),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


# --- the Python API ---------------------------------------------------------------------------------------------


def localize_dataset(
    ds: ray.data.Dataset,
    model: str | Callable[[], LoadedModel] = "efficientnet_lite0",
    config: LocalizeConfig | None = None,
    *,
    weights: str | Path | None = None,
    target: str | int | None = None,
    path_column: str = "path",
    bytes_column: str = "bytes",
    batch_size: int = 8,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    with_neurons: bool = True,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    ray_remote_args: dict[str, Any] | None = None,
    intensity: str = "range",
    max_pixels: int | None = None,
    multi: MultiOptions | None = None,
    pictures: dict[str, Path | None] | None = None,
    use_compile: bool = False,
    gpus_per_worker: float = 0.0,
    directions: str | Path | None = None,
) -> ray.data.Dataset:
    """``ds`` with the localization of each row's image added as columns (lazy, like any Ray Dataset).

    Each row names its image by ``path_column`` (read in the actor) or carries its file's bytes in
    ``bytes_column`` (then ``path_column``, if present, only names it). A ``classes`` column (lists of class
    indices) gives each row its own classes; a row with several is localized for each. A ``name`` column names
    its picture files (default: the path's stem).

    Added columns: ``width``, ``height``, ``model``, ``label``, ``synset``, ``class_name``, ``score``, ``box``
    ([xmin, ymin, xmax, ymax] in pixels, null on error; these are the first prediction's), ``error`` (null when
    localized), ``record`` (the row's line of ``neuroloc localize``'s JSON Lines output, as a string, with every
    prediction) and ``range_used`` (for images of more than 8 bits read with ``range``,
    :func:`neuroloc.imageio.range_used`: below 0.25 the picture came out dark; null otherwise); the bytes
    column is dropped.

    Args:
        model: a model name (``neuroloc models``) or ``package.module:factory``, loaded once per actor,
            or a picklable zero-argument function returning a :class:`~neuroloc.models.LoadedModel`.
        config: the method's parameters (default: the ``default`` preset with the backbone's own settings).
        weights: weights file for ``model``; it must be readable at this path on every node.
        target: localize this class (index, WordNet id or name) instead of each image's top-1; each actor looks
            it up among its model's classes (a fine-tuned head's own), so an unknown one fails there.
        batch_size: images per network batch (and per Ray task).
        workers, cpus_per_worker: the actor pool (default: :func:`plan_pool` for the cluster's CPUs).
        max_restarts, max_task_retries: how often Ray restarts a dead actor and retries its batch.
        ray_remote_args: more Ray options for the actors (e.g. ``{"memory": 2e9}``); they win. A ``num_gpus``
            among them is ``gpus_per_worker``.
        intensity: how images of more than 8 bits per sample are read (:data:`neuroloc.imageio.INTENSITIES`).
        max_pixels: the largest image the actors read (default: Pillow's limit in the actor's process).
        multi: several classes or objects per image (:class:`neuroloc.multi.MultiOptions`), all of them in
            ``record``, tile by tile with ``multi.tiles``. GrabCut (``refine``) needs OpenCV on every node;
            without it each row gets the error. Mask files go to ``multi.masks_dir``.
        pictures: folders for the pictures of ``neuroloc localize`` (keys ``overlay_dir``, ``explain_dir``,
            ``heatmap_dir``), written by the actors: on a cluster, a folder every node shares.
        use_compile: each actor compiles its model's gradient-free forwards, as ``--compile`` does
            (:func:`neuroloc.compiled.compile_model`; inductor needs a C++ compiler on every node).
        gpus_per_worker: run each actor's network on a CUDA GPU, holding this share of one (1: a whole GPU;
            0.5: two actors share one); the pool defaults to as many actors as the cluster's GPUs hold.
        directions: a file of feature directions (``neuroloc calibrate``) for the default's objectness map,
            read by each actor (at this path on every node, as the weights). Without it (and without a
            ``model`` function that returns a model with some) the map is left out, as ``--directions none``.

    Raises:
        ValueError: a pool the cluster cannot hold (no GPUs, too many workers for them), or --compile with GPUs.
    """
    ray = import_ray()
    if not ray.is_initialized():
        ray.init()
    extra = dict(ray_remote_args or {})
    if "num_gpus" in extra:  # GPUs asked for this way are the actors' GPUs too: the model must go there
        asked = float(extra.pop("num_gpus"))
        if gpus_per_worker and asked != gpus_per_worker:
            raise ValueError(f"num_gpus {asked:g} in ray_remote_args and gpus_per_worker {gpus_per_worker:g} differ")
        gpus_per_worker = asked
    if use_compile and gpus_per_worker > 0:
        raise ValueError("compiling is for actors on the CPU; leave out the GPUs or the compiling")
    resources = ray.cluster_resources()
    plan = plan_pool(resources.get("CPU", 1.0), workers, cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     total_gpus=resources.get("GPU", 0.0))
    remote_args = {"max_restarts": max_restarts, "max_task_retries": max_task_retries, **extra}
    options = dict(
        fn_constructor_args=(
            model, None if weights is None else str(weights), config, target, with_neurons,
            plan.torch_threads, path_column, bytes_column, intensity, max_pixels, multi, pictures, use_compile,
            plan.gpus_per_worker > 0, None if directions is None else str(directions),
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        num_cpus=plan.cpus_per_worker,
        **({"num_gpus": plan.gpus_per_worker} if plan.gpus_per_worker > 0 else {}),
    )
    with warnings.catch_warnings():
        # Ray 2.60 warns that extra remote args (max_restarts ...) will move to named parameters in 2.64.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        try:
            return ds.map_batches(_LocalizeActor, **{**options, **remote_args})  # the caller's remote args win
        except TypeError as exc:  # a Ray without **ray_remote_args: its actor pools restart and retry by default
            if "unexpected keyword" not in str(exc) or ray_remote_args:
                raise
            return ds.map_batches(_LocalizeActor, **options)


# --- the command line -------------------------------------------------------------------------------------------


def run_from_cli(
    sources: Sequence[str],
    output: Path | None,
    resume: bool,
    model_name: str,
    weights: Path | None,
    config: LocalizeConfig,
    target: str | None,
    with_neurons: bool,
    batch_size: int,
    address: str | None,
    workers: int | None,
    *,
    directions: str = "none",
    class_names: Path | None = None,
    intensity: str = "range",
    max_pixels: int | None = None,
    multi: MultiOptions | None = None,
    class_list: str | None = None,
    listed: dict[Path, list[str]] | None = None,
    pictures: dict[str, Path | None] | None = None,
    input_size: int | None = None,
    use_compile: bool = False,
    gpus_per_worker: float = 0.0,
) -> Tally:
    """``neuroloc localize --engine ray``: localize SOURCES with Ray Data and write the JSON Lines output
    exactly as the local path does (OUTPUT.partial, flushed line by line, renamed when complete; --resume).

    Connects to ``address`` (or ``$RAY_ADDRESS``), else starts Ray on this machine, and shuts down only a
    Ray it started. The merged file is written by this process, on this machine. ``multi``: several classes
    or objects per image, with the classes that ``class_list`` (--classes) names; ``listed``: each image's own
    classes from a manifest's ``class`` column (:func:`neuroloc.cli.listed_classes`); ``pictures``: the
    --overlay, --explain and --heatmaps folders (:func:`localize_dataset`); ``input_size``: --input-size;
    ``use_compile``: --compile, in each actor; ``gpus_per_worker``: --gpus-per-worker.

    Raises:
        click.ClickException: without Ray, or when the Ray job itself fails (the finished lines stay in
            OUTPUT.partial for --resume).
    """
    import click

    from neuroloc.cli import (
        Tally,
        _prepare_output,
        _progress,
        directions_setting,
        images_to_localize,
        interrupted_before_any_line,
        load_checked_model,
        refuse_foreign_outputs,
        refuse_overwriting_images,
        resolve_listed,
        resolve_target,
        run_directions,
        run_settings,
        with_class_list,
        writes_pictures,
    )
    from neuroloc.jsonl import RecordWriter, finish, partial_path
    from neuroloc.sources import path_key

    try:
        ray = import_ray()
    except RayMissingError as exc:
        raise click.ClickException(str(exc)) from None
    images = images_to_localize(sources, [*(pictures or {}).values(), multi.masks_dir if multi is not None else None])
    outputs = {"'--output'": output, "'--coco'": multi.coco if multi is not None else None}
    refuse_overwriting_images(images, outputs)
    refuse_foreign_outputs(outputs)
    model = load_checked_model(model_name, weights, config, input_size=input_size, class_names=class_names)  # fails early
    label = resolve_target(target, model.classes)
    multi = with_class_list(multi, class_list, model.classes)
    own = resolve_listed(listed or {}, model.classes)
    tiles = multi.tiles if multi is not None else None
    started = not ray.is_initialized()
    began = time.perf_counter()
    try:
        if started:
            _init_ray(ray, address)
    except KeyboardInterrupt:
        click.echo("\nInterrupted while Ray started; nothing was localized.", err=True)
        sys.exit(130)
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # ours below counts images
        resources = ray.cluster_resources()
        try:  # before any fitting or file: a pool the cluster cannot hold is a one-line error
            pool = plan_pool(resources.get("CPU", 1.0), workers, gpus_per_worker=gpus_per_worker,
                             total_gpus=resources.get("GPU", 0.0))
        except ValueError as exc:
            raise click.UsageError(f"--engine ray: {exc}") from None
        resumed = (output, run_settings(model, config, label, intensity, with_neurons, multi, own,
                                        directions_setting(directions, None, config))) \
            if resume and output is not None else None
        fitted, _ = run_directions(directions, model, config, images, intensity, tiles, resumed)  # once, for every actor
        settings = run_settings(model, config, label, intensity, with_neurons, multi, own,
                                directions_setting(directions, fitted, config))
        done, names = _prepare_output(output, images, settings, resume, writes_pictures((pictures or {}).values(), multi))
        todo = [p for p in images if path_key(p) not in done]
        tally = Tally(skipped=len(images) - len(todo))
        if not todo:
            if output:
                finish(partial_path(output), output)
            return tally
        blocks = min(len(todo), max(math.ceil(len(todo) / batch_size), 2 * pool.workers))  # work for every actor
        # absolute: an actor's working folder is where its node's Ray started, not this one (lines name the
        # images as given again, in _write_lines)
        rows: list[dict[str, Any]] = [{"path": absolute_path(p), NAME_COLUMN: names[p]} for p in todo]
        if own is not None:
            for row, path in zip(rows, todo):
                row[CLASSES_COLUMN] = list(own.get(path_key(path), ()))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        weights_at, names_at = _absolute(weights), _absolute(class_names)
        loader = partial(_load_for_actor, model_name, weights_at, fitted, names_at, input_size)
        out = localize_dataset(  # each actor loads the model by name, as checked above
            ds, loader, config, weights=weights_at, target=label, batch_size=batch_size, workers=workers,
            with_neurons=with_neurons, intensity=intensity, max_pixels=max_pixels,
            multi=None if multi is None else replace(multi, masks_dir=_absolute(multi.masks_dir)),
            pictures={kind: _absolute(folder) for kind, folder in pictures.items()} if pictures else pictures,
            use_compile=use_compile, gpus_per_worker=gpus_per_worker,
        )
        # (no select_columns: a Project step is a task asking for a whole CPU, which a 1-CPU machine lacks)
        gpus = f", {pool.workers} actors on GPUs" if gpus_per_worker > 0 else ""
        click.echo(f"neuroloc: Ray ready in {time.perf_counter() - began:.1f} s "
                   f"({resources.get('CPU', 0):g} CPUs{gpus}); localizing {len(todo)} images", err=True)
        writer = RecordWriter.append_to(partial_path(output)) if output else RecordWriter(sys.stdout, durable=False)
        try:
            with writer, _progress(len(todo)) as bar:
                _write_lines(out, todo, model.name, writer, tally, bar.update)
        except KeyboardInterrupt:
            if output:
                click.echo(f"\nInterrupted; {tally.done + tally.failed} new lines are in {partial_path(output)}. "
                           "Rerun the same command with --resume to continue.", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the Ray job failed (e.g. actors died more than max_restarts times)
            where = f"; {tally.done + tally.failed} new lines are in {partial_path(output)}, rerun with --resume" if output else ""
            raise click.ClickException(f"the Ray job failed: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}{where}") from None
    except KeyboardInterrupt:  # while Ray started or the directions were fitted: before any line
        interrupted_before_any_line(resume)
    finally:
        if started:
            ray.shutdown()
    if output:
        finish(partial_path(output), output)
    return tally


def _write_lines(
    out: ray.data.Dataset, todo: list[Path], model_name: str, writer: RecordWriter, tally: Tally,
    advance: Callable[[int], object],
) -> None:
    """Write each image of ``todo`` once as Ray's rows arrive (a retried batch cannot give an image twice), then
    a line for each image Ray lost; count them in ``tally``."""
    from neuroloc.sources import path_key

    wanted = {path_key(p): p for p in todo}
    seen: set[str] = set()
    # batch_format="pyarrow" gives pyarrow Tables; Ray's annotation is the union of every format's type
    batch: Any
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        for line, used in zip(batch.column("record").to_pylist(), batch.column("range_used").to_pylist()):
            record = json.loads(line)
            key = path_key(record["image"])
            if key in seen or key not in wanted:
                continue
            seen.add(key)
            given, read = str(wanted[key]), record["image"]  # the path as given, as the local engine writes it
            record["image"] = given
            if isinstance(record.get("error"), str):
                record["error"] = record["error"].replace(read, given)
            tally.dark.note_range(record["image"], used)
            writer.write(record)
            tally.failed += record["error"] is not None
            tally.done += record["error"] is None
            advance(1)
    for key, path in wanted.items():
        if key not in seen:
            writer.write(_lost_record(path, model_name))
            tally.failed += 1


def _absolute(path: Path | None) -> Path | None:
    """``path`` from this folder, for an actor whose working folder is elsewhere."""
    return None if path is None else Path(absolute_path(path))


def _load_for_actor(
    model_name: str, weights: Path | None, directions: FeatureDirections | None, class_names: Path | None,
    input_size: int | None = None,
) -> LoadedModel:
    """An actor's model, fed ``input_size`` images (None: its own size), with the feature directions fitted on
    the driver and the class names it was given (the file must be readable at this path on every node, as the
    weights)."""
    from neuroloc.models import load_model

    model = load_model(model_name, weights, class_names=class_names).at_input_size(input_size)
    return model.with_directions(directions)


CONNECT_TIMEOUT = 10.0  # seconds to reach a cluster's address before ray.init, which waits without end


def _init_ray(ray: Any, address: str | None) -> None:
    """Start a local Ray, or join the cluster at ``address`` (else ``$RAY_ADDRESS``).

    Raises:
        click.ClickException: when that cluster cannot be reached or joined, in one line.
    """
    import logging

    import click

    from neuroloc.imageio import first_line

    # no per-run execution plans, and no tracebacks of a failed job ahead of neuroloc's one-line error
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    given = address or os.environ.get("RAY_ADDRESS")
    try:
        if given:
            _reachable(given)
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise click.ClickException(f"cannot join the Ray cluster at {given}: {first_line(exc)}") from None
    except ValueError as exc:  # e.g. ray:// without Ray Client
        hint = ' (pip install "ray[client]" on this machine)' if "ray[client]" in str(exc) else ""
        raise click.ClickException(f"cannot join the Ray cluster at {given}: {first_line(exc)}{hint}") from None


def _reachable(address: str) -> None:
    """Raise ConnectionError when ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``; ``auto`` is left to Ray)
    does not accept a connection within :data:`CONNECT_TIMEOUT`."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc.strerror or exc})") from None



def _lost_record(path: Path, model_name: str) -> dict[str, Any]:
    return {"image": str(path), "width": None, "height": None, "model": model_name, "predictions": [],
            "error": "not returned by the Ray job; rerun with --resume"}
