"""``neuroloc bench``: seconds per image of each preset, stage by stage, against Grad-CAM on the same images.

The staged run below is :func:`neuroloc.pipeline.localize_batch` itself, given a clock
around each step; ``tests/test_bench.py`` checks that it gives the same localizations as
``localize_batch``.
Decoding (file to RGB picture) is timed on its own, the same way for neuroloc and for Grad-CAM, and is
part of both totals.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from neuroloc import pipeline
from neuroloc.classes import classes_for
from neuroloc.compiled import compile_model
from neuroloc.config import PRESETS, LocalizeConfig, preset_for
from neuroloc.device import device_option, exact_float32, synchronize
from neuroloc.directions import shares_fit_pass
from neuroloc.imageio import IMAGE_SUFFIXES, ImageError, load_image
from neuroloc.jsonl import strict_json
from neuroloc.masks import REFINE_METHODS, RefinementUnavailable, require_opencv
from neuroloc.models.registry import LoadedModel
from neuroloc.options import (
    BATCH_HELP,
    MAX_THREADS,
    MIN_FIT_IMAGES,
    MODEL_HELP,
    WEIGHTS_HELP,
    directions_option,
    input_size_option,
    regular_output,
    writable_folder,
)
from neuroloc.pipeline import image_to_input
from neuroloc.result import Localization

STAGES: tuple[str, ...] = (
    "decode", "resize", "forward", "dam_backward", "guided_backprop", "blobs", "refine", "rescoring", "confidence",
    "box",
)
STAGE_TITLES: dict[str, str] = {
    "decode": "decode (file to RGB)",
    "resize": "resize + normalise",
    "forward": "forward with hooks",
    "dam_backward": "DAM backward (+ vote fusion)",
    "guided_backprop": "guided backprop (per neuron)",
    "blobs": "blob processing / regions",
    "refine": "GrabCut refinement of the region",
    "rescoring": "re-scoring forward",
    "confidence": "localization confidence",
    "box": "union + box + result",
}
SYNTHETIC_SIZE = (500, 375)  # a typical ILSVRC photo


# --- the staged pipeline -------------------------------------------------------------------------------------


@dataclass
class StageClock:
    """Wall-clock seconds spent in each stage, summed over the calls made while it is passed around.

    With ``device`` a GPU, its queued work is waited for (``torch.cuda.synchronize``) before each clock
    read, so a stage is charged for the kernels it launched, not the next stage.
    """

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    entered: set[str] = field(default_factory=set)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in the block to ``name``."""
        if name not in self.seconds:
            raise ValueError(f"unknown stage {name!r}")
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start
            self.entered.add(name)


def staged_localize(
    model: LoadedModel,
    images: Sequence[Image.Image],
    config: LocalizeConfig,
    labels: Sequence[int | None],
    clock: StageClock,
) -> list[Localization]:
    """:func:`neuroloc.pipeline.localize_batch` (``keep_maps=False``) with each step timed on ``clock``."""
    return pipeline.localize_batch(model, images, config, labels, stage=clock.stage)


# --- what is measured ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchItem:
    """One image file and the class localized in it (the same for neuroloc and Grad-CAM)."""

    path: Path
    label: int


@dataclass(frozen=True)
class BenchOptions:
    """How the images are run: batch size, untimed warm-up passes and timed repeats."""

    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1


@dataclass(frozen=True)
class PresetResult:
    """Median figures of one preset over the timed repeats, per image."""

    name: str
    stages: dict[str, float]  # median seconds per image of each stage
    ran: tuple[str, ...]  # stages this preset actually has
    seconds_per_image: float  # median over repeats of the total (decode included)
    gradcam_decode: float
    gradcam_seconds_per_image: float  # median over repeats, decode included
    peak_rss_mb: float | None
    gradcam_peak_rss_mb: float | None
    repeat_seconds: tuple[float, ...]
    gradcam_repeat_seconds: tuple[float, ...]
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated over the pass; None off CUDA
    gradcam_peak_gpu_mb: float | None = None
    gflops: float | None = None  # per image, torch's FLOP counter on the first image (forward and backward)
    gradcam_gflops: float | None = None
    fit_seconds_per_image: float = 0.0  # the feature directions' fit of this command, spread over its images
    # a `localize --directions auto` run over the images (top-1 classes), the fit's pass shared, timed once
    auto_run_seconds_per_image: float | None = None

    @property
    def ratio(self) -> float:
        """How many times Grad-CAM's time per image neuroloc takes."""
        return self.seconds_per_image / self.gradcam_seconds_per_image

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds_per_image": self.seconds_per_image,
            "gradcam_seconds_per_image": self.gradcam_seconds_per_image,
            "ratio": self.ratio,
            "stages": self.stages,
            "stages_run": list(self.ran),
            "gradcam_decode_seconds_per_image": self.gradcam_decode,
            "peak_rss_mb": self.peak_rss_mb,
            "gradcam_peak_rss_mb": self.gradcam_peak_rss_mb,
            "repeat_seconds_per_image": list(self.repeat_seconds),
            "gradcam_repeat_seconds_per_image": list(self.gradcam_repeat_seconds),
            "peak_gpu_mb": self.peak_gpu_mb,
            "gradcam_peak_gpu_mb": self.gradcam_peak_gpu_mb,
            "gflops_per_image": self.gflops,
            "gradcam_gflops_per_image": self.gradcam_gflops,
            "fit_seconds_per_image": self.fit_seconds_per_image,
            "auto_run_seconds_per_image": self.auto_run_seconds_per_image,
        }


def batches(items: Sequence[BenchItem], size: int) -> list[Sequence[BenchItem]]:
    """``items`` cut into consecutive batches of ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def decode(batch: Sequence[BenchItem], clock: StageClock) -> list[Image.Image]:
    """Read the batch's files as RGB pictures, timed as ``decode``."""
    with clock.stage("decode"):
        return [load_image(item.path) for item in batch]


def dam_pass(model: LoadedModel, items: Sequence[BenchItem], config: LocalizeConfig, batch_size: int) -> StageClock:
    """Decode and localize every image once, batch by batch."""
    clock = StageClock(device=model.device)
    for batch in batches(items, batch_size):
        images = decode(batch, clock)
        staged_localize(model, images, config, [item.label for item in batch], clock)
    return clock


def gradcam_pass(model: LoadedModel, items: Sequence[BenchItem], batch_size: int) -> tuple[float, float]:
    """Decode and run Grad-CAM (:class:`GradCamMethod`) on every image once: (decode seconds, Grad-CAM seconds)."""
    from neuroloc.evaluation.methods import GradCamMethod

    method = GradCamMethod()
    clock = StageClock(device=model.device)
    spent = 0.0
    for batch in batches(items, batch_size):
        images = decode(batch, clock)
        synchronize(clock.device)
        start = time.perf_counter()
        method.run(model, images, [item.label for item in batch])
        synchronize(clock.device)
        spent += time.perf_counter() - start
    return clock.seconds["decode"], spent


class FlopCount(TorchDispatchMode):
    """Counts the floating-point operations run inside the block with torch's own per-operator formulas
    (``torch.utils.flop_counter``; a multiply-add is two). Those cover convolutions, matrix products and attention,
    forward and backward: element-wise operations, pooling and the work done outside torch (NumPy, OpenCV) are not
    counted. ``FlopCounterMode`` itself cannot be used: its module
    tracker hooks the backward pass, which fails under the leaf gradients that DAM and guided backprop take."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (formula := flop_registry.get(func._overloadpacket)) is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def gflops_per_image(run: Callable[[], object]) -> float:
    """Billions of floating-point operations ``run`` does (one image), as :class:`FlopCount` counts them."""
    counter = FlopCount()
    with counter:
        run()
    return counter.total / 1e9


def count_flops(model: LoadedModel, item: BenchItem, config: LocalizeConfig) -> tuple[float, float]:
    """(neuroloc's, Grad-CAM's) GFLOPs for one image, the first of the bench's."""
    from neuroloc.evaluation.methods import GradCamMethod

    image = load_image(item.path)
    return (gflops_per_image(lambda: pipeline.localize_batch(model, [image], config, [item.label])),
            gflops_per_image(lambda: GradCamMethod().run(model, [image], [item.label])))


def auto_run_seconds(model: LoadedModel, items: Sequence[BenchItem], config: LocalizeConfig, batch_size: int) -> float:
    """Seconds a ``localize --directions auto`` run over ``items`` takes with ``config`` (which
    :func:`neuroloc.directions.shares_fit_pass`), each image's top-1 class localized, decoding included: the fit's
    pass, which keeps each fitted image's evidence, then each image's box drawn from it (an image beyond the fit's
    sample, or whose evidence was not kept, through a pass of its own). ``model``: without directions."""
    from neuroloc.directions import fit_auto

    synchronize(model.device)
    start = time.perf_counter()
    directions, kept = fit_auto(model, pipeline.evidence_layers(model, config)[1], [item.path for item in items],
                                keep_for=config, batch_size=batch_size)
    fitted = model.with_directions(directions)
    for batch in batches(items, batch_size):
        rest = []
        for item in batch:
            image = load_image(item.path)
            if item.path in kept:
                pipeline.localize_from_evidence(fitted, [image], kept.pop(item.path).finish(config, directions), config)
            else:
                rest.append(image)
        if rest:
            pipeline.localize_batch(fitted, rest, config, [None] * len(rest))
    synchronize(model.device)
    return time.perf_counter() - start


def measure_preset(
    name: str,
    model: LoadedModel,
    items: Sequence[BenchItem],
    config: LocalizeConfig,
    options: BenchOptions,
    memory: MemoryProbe,
    gradcam_model: LoadedModel | None = None,
    fit_seconds_per_image: float = 0.0,
    auto_model: LoadedModel | None = None,
) -> PresetResult:
    """Warm up, then time ``options.repeats`` passes of the preset and of Grad-CAM, alternating; count both
    one's floating-point operations on the first image.

    Grad-CAM runs on ``gradcam_model`` if given (``--compile`` keeps it on the eager model).
    ``fit_seconds_per_image``: the command's feature-direction fit, spread over the images, for presets that use it.
    ``auto_model``: the model without directions, given when the command fits them (``--directions auto``): a
    preset that shares the fit's pass also times a whole ``localize`` run with it (:func:`auto_run_seconds`).
    """
    gradcam_model = gradcam_model or model
    for _ in range(options.warmup):
        dam_pass(model, items, config, options.batch_size)
        gradcam_pass(gradcam_model, items, options.batch_size)
    count = len(items)
    dam_clocks: list[StageClock] = []
    cam_runs: list[tuple[float, float]] = []
    dam_peaks: list[float | None] = []
    cam_peaks: list[float | None] = []
    dam_gpu: list[float | None] = []
    cam_gpu: list[float | None] = []
    for _ in range(options.repeats):
        memory.reset()
        dam_clocks.append(dam_pass(model, items, config, options.batch_size))
        dam_peaks.append(memory.peak_mb())
        dam_gpu.append(memory.peak_gpu_mb())
        memory.reset()
        cam_runs.append(gradcam_pass(gradcam_model, items, options.batch_size))
        cam_peaks.append(memory.peak_mb())
        cam_gpu.append(memory.peak_gpu_mb())
    stages = {s: statistics.median(c.seconds[s] for c in dam_clocks) / count for s in STAGES}
    totals = tuple(sum(c.seconds.values()) / count for c in dam_clocks)
    cam_totals = tuple((d + g) / count for d, g in cam_runs)
    gflops, gradcam_gflops = count_flops(gradcam_model, items[0], config)
    auto_run = None
    if auto_model is not None and shares_fit_pass(config):
        auto_run = auto_run_seconds(auto_model, items, config, options.batch_size) / count
    return PresetResult(
        name=name,
        stages=stages,
        ran=tuple(s for s in STAGES if s in dam_clocks[0].entered),
        seconds_per_image=statistics.median(totals),
        gradcam_decode=statistics.median(d for d, _ in cam_runs) / count,
        gradcam_seconds_per_image=statistics.median(cam_totals),
        peak_rss_mb=_max_or_none(dam_peaks),
        gradcam_peak_rss_mb=_max_or_none(cam_peaks),
        repeat_seconds=totals,
        gradcam_repeat_seconds=cam_totals,
        peak_gpu_mb=_max_or_none(dam_gpu),
        gradcam_peak_gpu_mb=_max_or_none(cam_gpu),
        gflops=gflops,
        gradcam_gflops=gradcam_gflops,
        fit_seconds_per_image=fit_seconds_per_image if config.uses_objectness else 0.0,
        auto_run_seconds_per_image=auto_run,
    )


def _max_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


# --- memory ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryProbe:
    """Peak resident set size of this process.

    On Linux the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` before each
    measured pass (after handing freed heap back with ``malloc_trim``), so each pass gets its own peak; it
    is the whole process's resident set, model and interpreter included. Elsewhere (or if the reset is
    refused) it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss``: the peak since the process started,
    never reset, so a preset that needs less than an earlier one shows the earlier peak. psutil is not
    used: it reports the current RSS, not a peak, on Linux.

    On a CUDA device (``cuda``) the peak of GPU memory held by tensors, ``torch.cuda.max_memory_allocated``,
    is reset and read per pass too (the RSS then covers the host side only).
    """

    resettable: bool
    cuda: torch.device | None = None

    @classmethod
    def detect(cls, device: torch.device | None = None) -> MemoryProbe:
        cuda = device if device is not None and device.type == "cuda" else None
        return cls(resettable=_reset_peak_rss() and _vm_hwm_mb() is not None, cuda=cuda)

    @property
    def method(self) -> str:
        if self.resettable:
            return "peak RSS per pass (whole process): Linux VmHWM, reset via /proc/self/clear_refs after malloc_trim"
        return "peak RSS since process start: getrusage ru_maxrss (not reset between presets)"

    def reset(self) -> None:
        """Start a new peak: hand freed heap back to the system first, so the last pass's leftovers do not count."""
        if self.resettable:
            _trim_heap()
            _reset_peak_rss()
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
            torch.cuda.reset_peak_memory_stats(self.cuda)

    def peak_mb(self) -> float | None:
        if self.resettable:
            return _vm_hwm_mb()
        return _ru_maxrss_mb()

    def peak_gpu_mb(self) -> float | None:
        """Peak GPU memory allocated to tensors since :meth:`reset`, in MB; None off CUDA."""
        if self.cuda is None:
            return None
        torch.cuda.synchronize(self.cuda)
        return torch.cuda.max_memory_allocated(self.cuda) / 2**20


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: return free heap pages, which would otherwise stay in the resident set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _vm_hwm_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _ru_maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    """Resident set size now (Linux ``/proc/self/statm``), or None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- inputs, model, header ----------------------------------------------------------------------------------


def collect_items(source: Path, count: int, model: LoadedModel) -> tuple[list[BenchItem], list[str]]:
    """The first ``count`` readable images of a dataset (its true classes) or of an image folder (top-1
    classes), and a one-line reason for each unreadable image passed over (it would stop the timed passes)."""
    from neuroloc.evaluation.dataset import DatasetError, has_annotations, load_dataset

    try:
        samples = load_dataset(source) or None  # no boxes in it (an .xml that is no annotation): a folder
    except DatasetError as exc:
        if has_annotations(source):  # said, since the help promises a dataset's true classes
            click.echo(f"bench: the boxes of {source} cannot be read ({exc}); timing each image's top-1 class "
                       "instead", err=True)
        samples = None
    candidates: list[tuple[Path, int | None]]
    if samples is not None:
        candidates = [(s.image, s.label) for s in samples]
    else:
        from neuroloc.cli import find_images  # imported here: neuroloc.cli imports this module

        candidates = [(path, None) for path in find_images([str(source)])]
    items: list[BenchItem] = []
    skipped: list[str] = []
    for path, label in candidates:
        if len(items) == count:
            break
        try:
            image = load_image(path)
        except ImageError as exc:
            skipped.append(str(exc))
            continue
        items.append(BenchItem(path, label if label is not None else _top1(model, image)))
    return items, skipped


def top1_label(model: LoadedModel, path: Path) -> int:
    """The classifier's top-1 class for one image file (untimed; fixes the class before timing)."""
    return _top1(model, load_image(path))


def _top1(model: LoadedModel, image: Image.Image) -> int:
    with torch.no_grad(), exact_float32():
        return int(model.module(image_to_input([image], model)).argmax())


def write_synthetic_images(folder: Path, count: int) -> list[Path]:
    """``count`` reproducible noisy-gradient JPEGs of :data:`SYNTHETIC_SIZE` in ``folder``."""
    rng = np.random.default_rng(0)
    width, height = SYNTHETIC_SIZE
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(count):
        base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy + 40 * i) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"synthetic_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def random_weights_model(name: str, seed: int = 0) -> LoadedModel:
    """Model ``name`` with its architecture's random initialisation (for timing only: its boxes mean nothing)."""
    from neuroloc.models import get_spec

    spec = get_spec(name)
    assert spec.build is not None
    torch.manual_seed(seed)
    module = spec.build().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    weights = f"RANDOM WEIGHTS (seed {seed}): timing only, boxes meaningless"
    with torch.no_grad():
        outputs = module(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[1]
    return LoadedModel(name=name, module=module, spec=spec, weights=weights, classes=classes_for(outputs))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :func:`platform.processor` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_model(device: str | torch.device) -> str | None:
    """The GPU's name and CUDA version for a CUDA device, else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"


def bench_header(
    model: LoadedModel, source: str, count: int, options: BenchOptions, device: str | torch.device,
    memory: MemoryProbe, random_weights: bool,
) -> dict[str, Any]:
    """The facts the numbers depend on."""
    return {
        "machine": {"platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": gpu_model(device),
        "model": model.name,
        "input_size": model.input_size,
        "weights": model.weights,
        "random_weights": random_weights,
        "source": source,
        "images": count,
        "batch_size": options.batch_size,
        "repeats": options.repeats,
        "warmup": options.warmup,
        "statistic": "median over repeats of seconds per image; decode included in both totals",
        "memory": memory.method,
        "rss_after_load_mb": current_rss_mb(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# --- output ----------------------------------------------------------------------------------------------------


def header_lines(header: dict[str, Any]) -> list[str]:
    """The header as Markdown list items."""
    machine = header["machine"]
    weights = f"**{header['weights']}**" if header["random_weights"] else header["weights"]
    rss = header["rss_after_load_mb"]
    gpu = f" ({header['gpu']})" if header.get("gpu") else ""
    return [
        f"- machine: {machine['platform']}, {machine['cpu_model']}, {machine['cpu_count']} CPUs",
        (f"- torch {header['torch']}, threads: {header['threads']}, device: {header['device']}{gpu}, "
         f"python {header['python']}"),
        f"- model: {header['model']} (weights: {weights}), input {header['input_size']}x{header['input_size']}",
        f"- images: {header['images']} from {header['source']}, batch size {header['batch_size']}"
        + (f" ({header['unreadable_passed_over']} unreadable passed over)" if header.get("unreadable_passed_over") else ""),
        f"- repeats: {header['repeats']} timed after {header['warmup']} warm-up; {header['statistic']}",
        f"- memory: {header['memory']}" + (f"; RSS after loading the model: {rss:.0f} MB" if rss else ""),
    ] + ([("- --compile: neuroloc's hook-free, gradient-free forwards compiled (compiled in the warm-up); "
           "Grad-CAM eager")] if header.get("compile") else []) + (
        [f"- feature directions: {header['directions']}"] if header.get("directions") else [])


def results_table(results: Sequence[PresetResult]) -> str:
    """Markdown table: one row per stage and summary figure, one column per preset (seconds per image)."""
    head = "| seconds per image | " + " | ".join(r.name for r in results) + " |"
    rule = "|---|" + "---:|" * len(results)
    rows = [head, rule]
    for stage in STAGES:
        cells = [_stage_cell(r, stage) for r in results]
        rows.append(f"| {STAGE_TITLES[stage]} | " + " | ".join(cells) + " |")
    rows.append("| **total (neuroloc)** | " + " | ".join(f"**{r.seconds_per_image:.4f}**" for r in results) + " |")
    rows.append("| Grad-CAM, same images (decode incl.) | "
                + " | ".join(f"{r.gradcam_seconds_per_image:.4f}" for r in results) + " |")
    rows.append("| Grad-CAM decode part | " + " | ".join(f"{r.gradcam_decode:.4f}" for r in results) + " |")
    rows.append("| **ratio neuroloc / Grad-CAM** | " + " | ".join(f"**{r.ratio:.1f}x**" for r in results) + " |")
    if any(r.fit_seconds_per_image for r in results):
        rows.append("| feature-direction fit alone (once per command), spread over these images | "
                    + " | ".join(f"{r.fit_seconds_per_image:.4f}" if r.fit_seconds_per_image else "–" for r in results) + " |")
        rows.append("| ratio with a fit of its own (the Ray engine, --explain, the multi-object options) | " + " | ".join(
            f"{(r.seconds_per_image + r.fit_seconds_per_image) / r.gradcam_seconds_per_image:.1f}x" for r in results) + " |")
    if any(r.auto_run_seconds_per_image for r in results):
        rows.append("| `localize` run with --directions auto, the fit's pass shared (top-1 classes, timed once) | "
                    + " | ".join(_seconds(r.auto_run_seconds_per_image) for r in results) + " |")
        rows.append("| ratio of that run | " + " | ".join(
            "–" if r.auto_run_seconds_per_image is None else f"{r.auto_run_seconds_per_image / r.gradcam_seconds_per_image:.1f}x"
            for r in results) + " |")
    if all(r.gflops is not None and r.gradcam_gflops for r in results):
        rows.append("| conv/matmul GFLOPs per image (torch's formulas, first image; not NumPy or GrabCut work) | "
                    + " | ".join(f"{r.gflops:.2f}" for r in results) + " |")
        rows.append("| conv/matmul GFLOPs per image, Grad-CAM | "
                    + " | ".join(f"{r.gradcam_gflops:.2f}" for r in results) + " |")
        rows.append("| conv/matmul FLOP ratio neuroloc / Grad-CAM | "
                    + " | ".join(f"{(r.gflops or 0) / (r.gradcam_gflops or 1):.1f}x" for r in results) + " |")
    rows.append("| peak RSS MB (neuroloc) | " + " | ".join(_mb(r.peak_rss_mb) for r in results) + " |")
    rows.append("| peak RSS MB (Grad-CAM) | " + " | ".join(_mb(r.gradcam_peak_rss_mb) for r in results) + " |")
    if any(r.peak_gpu_mb is not None for r in results):
        rows.append("| peak GPU MB (neuroloc) | " + " | ".join(_mb(r.peak_gpu_mb) for r in results) + " |")
        rows.append("| peak GPU MB (Grad-CAM) | " + " | ".join(_mb(r.gradcam_peak_gpu_mb) for r in results) + " |")
    return "\n".join(rows)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _stage_cell(result: PresetResult, stage: str) -> str:
    if stage not in result.ran:
        return "–"
    seconds = result.stages[stage]
    return f"{seconds:.4f} ({100 * seconds / result.seconds_per_image:.0f}%)"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def write_json(path: Path, header: dict[str, Any], results: Sequence[PresetResult]) -> None:
    """Write the header and every preset's figures to ``path`` (replaced in one step)."""
    document = {"header": header, "presets": {r.name: r.to_dict() for r in results}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(strict_json(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- the command -------------------------------------------------------------------------------------------


BENCH_HELP = """Time neuroloc's presets stage by stage against Grad-CAM on the same images.

\b
DATASET_OR_FOLDER is an evaluation dataset (images/ + boxes.csv, or Annotations/*.xml; its true
classes are localized) or a folder of images (the top-1 class, found before timing). Without it,
reproducible synthetic 500x375 JPEGs are used.
Examples:
  neuroloc bench ../shared/data/ilsvrc2012_val_dev --threads 1 --preset default --preset paper
  neuroloc bench photos/ --images 8 --batch-size 4 --json bench.json
  neuroloc bench --model vgg16 --random-weights --images 4 --preset fast

Each repeat decodes and localizes every image, then decodes and runs Grad-CAM on them; the figures
are medians over the repeats of seconds per image, after the warm-up passes. Decoding is timed on
its own and included in both totals; the ratio is neuroloc's total over Grad-CAM's.
"""


def _check_presets(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in value if name not in PRESETS]
    if unknown:
        raise click.BadParameter(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}")
    return tuple(dict.fromkeys(value)) or ("default",)


@click.command("bench", help=BENCH_HELP)
@click.argument("source", metavar="[DATASET_OR_FOLDER]", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_name", default="efficientnet_lite0", show_default=True, help=MODEL_HELP)
@click.option("--weights", type=click.Path(exists=True, path_type=Path), help=WEIGHTS_HELP)
@click.option("--random-weights", is_flag=True, help="Random initialisation instead of weights (timing only).")
@click.option("--preset", "presets", multiple=True, callback=_check_presets,
              help=f"Preset to time (repeatable; default: default). One of {', '.join(PRESETS)}.")
@click.option("--images", "count", type=click.IntRange(min=1), default=32, show_default=True,
              help="Use the first N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help=BATCH_HELP)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed passes.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed passes first.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), help="torch threads (default: torch's choice).")
@device_option(" On CUDA the clocks wait for the GPU (torch.cuda.synchronize) and peak GPU memory is reported.")
@input_size_option(" Grad-CAM is timed at the same size.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the figures here.")
@click.option("--compile", "use_compile", is_flag=True,
              help="Time neuroloc with torch.compile where results stay the same (neuroloc.compiled; compiling "
              "happens in the warm-up). Grad-CAM stays eager.")
@click.option("--refine", type=click.Choice(REFINE_METHODS), default="none", show_default=True,
              help="Time the density-mode presets with their region redrawn by GrabCut (needs OpenCV).")
@directions_option(" The fit, over the benchmark's images, happens once before the timing and is reported apart.")
def bench_command(
    source: Path | None, model_name: str, weights: Path | None, random_weights: bool, presets: tuple[str, ...],
    count: int, batch_size: int, repeats: int, warmup: int, threads: int | None, device: torch.device,
    json_path: Path | None,
    use_compile: bool = False,
    input_size: int | None = None,
    refine: str = "none",
    directions: str = "auto",
) -> None:
    from neuroloc.models import ModelError, load_model

    if random_weights and weights is not None:
        raise click.UsageError("--random-weights and --weights exclude each other")
    if json_path is not None:  # before the benchmark, not after it
        regular_output(json_path, "'--json'")
        if json_path.suffix.lower() in IMAGE_SUFFIXES and json_path.exists():
            raise click.BadParameter(f"{json_path} is an image; it would be overwritten", param_hint="'--json'")
        if json_path.is_file() and not _is_bench_result(json_path):
            raise click.BadParameter(f"{json_path} exists and is no bench result (a dataset's boxes.csv?); it would be "
                                     "overwritten: give another name", param_hint="'--json'")
        writable_folder(json_path.parent, "'--json'")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model = random_weights_model(model_name) if random_weights else load_model(model_name, weights)
        model = model.at_input_size(input_size)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    model.to(device)
    configs = {name: preset_for(name, model.spec.default_options) for name in presets}
    if refine != "none":
        neurons_mode = [name for name, config in configs.items() if config.mode != "density"]
        if neurons_mode:
            raise click.UsageError(f"--refine redraws density-mode regions; preset {neurons_mode[0]!r} has none")
        try:
            require_opencv()
        except RefinementUnavailable as exc:
            raise click.UsageError(str(exc)) from None
        configs = {f"{name} --refine {refine}": config.with_options(refine=refine) for name, config in configs.items()}
    if use_compile and device.type != "cpu":
        raise click.UsageError(f"--compile is measured for the CPU only; leave it out with --device {device}")
    if use_compile and warmup == 0:  # the first pass compiles: timed, it would be the compiler's time
        raise click.UsageError("--compile compiles in the warm-up: give --warmup 1 or more")
    options = BenchOptions(batch_size=batch_size, repeats=repeats, warmup=warmup)
    with tempfile.TemporaryDirectory(prefix="neuroloc-bench-") as scratch:
        if source is None:
            paths = write_synthetic_images(Path(scratch), count)
            items = [BenchItem(p, top1_label(model, p)) for p in paths]
            skipped: list[str] = []
            described = f"synthetic {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} JPEGs"
        else:
            items, skipped = _items_or_fail(source, count, model)
            described = str(source)
        bare = model
        model, header_directions, fit_seconds = _with_directions(model, configs, directions, [item.path for item in items])
        memory = MemoryProbe.detect(device)
        header = bench_header(model, described, len(items), options, device, memory, random_weights)
        header["compile"] = use_compile
        header["directions"] = header_directions
        header["unreadable_passed_over"] = len(skipped)
        results = []
        for name, config in configs.items():
            click.echo(f"bench: {name}: {len(items)} images x ({warmup} warm-up + {repeats} timed)", err=True)
            timed = compile_model(model, config) if use_compile else model
            results.append(measure_preset(name, timed, items, config, options, memory, gradcam_model=model,
                                          fit_seconds_per_image=fit_seconds / len(items),
                                          auto_model=bare if fit_seconds and not use_compile else None))
    click.echo("# neuroloc bench\n\n" + "\n".join(header_lines(header)) + "\n\n" + results_table(results))
    if json_path is not None:
        write_json(json_path, header, results)


def _with_directions(
    model: LoadedModel, configs: dict[str, LocalizeConfig], choice: str, paths: list[Path]
) -> tuple[LoadedModel, str, float]:
    """The model with ``--directions`` for the density-mode presets that use them, a line for the header, and the
    seconds the fit took (0 when none was fitted: `localize` fits them on every run with ``auto``)."""
    from neuroloc.directions import DirectionsError, directions_for
    from neuroloc.pipeline import evidence_layers

    users = [c for c in configs.values() if c.uses_objectness]
    if not users:
        return model, "not used by these presets", 0.0
    began = time.perf_counter()
    try:
        fitted = directions_for(choice, model, evidence_layers(model, users[0])[1], paths)
    except DirectionsError as exc:
        raise click.BadParameter(str(exc), param_hint="'--directions'") from None
    seconds = time.perf_counter() - began
    if fitted is None:
        return model, (f"none (auto: fewer than {MIN_FIT_IMAGES} readable images)" if choice == "auto" else "none"), 0.0
    how = (f"fitted over {fitted.images} images in {seconds:.1f} s (timed apart: the fit row)" if choice == "auto"
           else f"from {choice}")
    if mismatch := fitted.use_warning(model):
        how += f"; {mismatch}"
        click.echo(f"bench: {choice} was {mismatch}", err=True)
    return model.with_directions(fitted), how, seconds if choice == "auto" else 0.0


def _is_bench_result(path: Path) -> bool:
    """Whether ``path`` holds what ``bench --json`` writes (a run may replace an earlier run's file)."""
    try:
        size = path.stat().st_size
        if size == 0:  # an empty file made for it (mktemp) is no one's data
            return True
        if size > MAX_BENCH_JSON_BYTES:
            return False
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and {"header", "presets"} <= set(document)


MAX_BENCH_JSON_BYTES = 10_000_000  # a bench result is a few kB; a larger file is someone's data, not read


def _items_or_fail(source: Path, count: int, model: LoadedModel) -> tuple[list[BenchItem], list[str]]:
    try:
        items, skipped = collect_items(source, count, model)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="DATASET_OR_FOLDER") from None
    for reason in skipped:
        click.echo(f"bench: passed over {reason}", err=True)
    if not items:
        raise click.ClickException(f"{source}: no readable images" if skipped else f"{source}: no images")
    return items, skipped
