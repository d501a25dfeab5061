"""Command-line options shared by localize, evaluate and bench (beside ``--device`` in neuroloc.device)."""

from __future__ import annotations

import math
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Here rather than in neuroloc.models, which imports torch: the CLI's --help must not.
MIN_INPUT_SIZE = 64  # below this the deepest default layers of the backbones shrink to 1x1 or 2x2
MAX_INPUT_SIZE = 1024  # ~21x the work of 224 per image; beyond it a CPU run takes seconds per image
# The paper keeps ~10 neurons, its authors' code up to 30; in neurons mode each one costs a guided-backprop map of
# the input's size, so tens of thousands would take minutes and gigabytes per image.
MAX_KMAX = 1000
# torch.set_num_threads beyond this crashed (a segfault at 100,000, an overflow beyond 2**63); no machine has more.
MAX_THREADS = 1024
MODEL_HELP = "Classifier to use; see `neuroloc models`."
WEIGHTS_HELP = ("Weights for --model, instead of the installed or cached ones: a file, or for resnet50_keras and "
                "squeezenet1_1 the downloaded tarball or its extracted folder (converted once).")
BATCH_HELP = "Images run through the network together."


def input_size_option(help_suffix: str = "") -> Any:
    """``--input-size N``: the square side images are resized to (default: the model's own, e.g. 224)."""
    return click.option(
        "--input-size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), metavar="N",
        help="Resize each image to NxN for the network instead of the model's size (e.g. 320: finer maps, tighter "
        "boxes, about 2x the time; docs/results.md)." + help_suffix,
    )


def layers_hint(exc: Exception, model_name: str) -> str:
    """For an unknown layer name, where to see the known ones ('' for any other error)."""
    from neuroloc.hooks import LayerNotFound

    return f" (`neuroloc models layers {shlex.quote(model_name)}` lists them)" if isinstance(exc, LayerNotFound) else ""


MIN_FIT_IMAGES = 20  # feature directions from fewer images are unsteady (docs/method.md)
MAX_FIT_IMAGES = 200  # more change them little (cosine > 0.97 between 100 and 650 images)


def directions_option(help_suffix: str = "") -> Any:
    """``--directions auto|none|FILE``: the feature directions of the default's objectness map."""
    return click.option(
        "--directions", default="auto", show_default=True, metavar="auto|none|FILE",
        help="Feature directions for the default's objectness map (docs/method.md): 'auto' fits them over the "
        f"images given (at most {MAX_FIT_IMAGES}, evenly spaced, no labels) and leaves them out for fewer than "
        f"{MIN_FIT_IMAGES} images; FILE: those written by `neuroloc calibrate`; 'none': without them." + help_suffix,
    )


def intensity_option() -> Any:
    """``--intensity range|stretch``: how images of more than 8 bits per sample become 8-bit."""
    return click.option(
        "--intensity", type=click.Choice(["range", "stretch"]), default="range", show_default=True,
        help="Images with more than 8 bits per sample (16-bit, 32-bit, float TIFF/PNG): 'range' maps the type's "
        "range (0-65535; signed 16-bit: -32768-32767; a float image's minimum to maximum) to 0-255; 'stretch' maps each image's 0.5th to 99.5th "
        "percentile, for 12- or 14-bit microscope or telescope data in 16-bit files. 8-bit images are unchanged.",
    )


def max_pixels_option(example: str = "") -> Any:
    """``--max-pixels N``: the largest image read, for this command (Pillow's decompression-bomb limit, which
    :func:`neuroloc.imageio.load_image` follows); the earlier limit is restored when the command ends."""

    def apply(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None:
            from PIL import Image

            earlier = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = value
            ctx.call_on_close(lambda: setattr(Image, "MAX_IMAGE_PIXELS", earlier))
        return value

    return click.option(
        "--max-pixels", type=click.IntRange(min=1), metavar="N", callback=apply, expose_value=False,
        help="Read images of up to N pixels (default: Pillow's limit, 89,478,485), e.g. large slides or sky images"
        f"{example}. Memory: about 3 bytes a pixel for the image, and more for its masks.",
    )


def class_names_option(use: str) -> Any:
    """``--class-names FILE``: names of a model's own classes, one per line; ``use`` says what takes them."""
    return click.option(
        "--class-names", "class_names", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
        help="Names of the model's own classes, one per line (line i names output i), for a classifier trained "
        f"on other classes than ImageNet's; {use} then takes these names. Without it a model with 1000 outputs "
        "has ImageNet's classes and any other class_0, class_1, ...",
    )


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities, which slip through its comparisons."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


def hold_output(output: Path) -> None:
    """Hold OUTPUT's lock until the command ends (:func:`neuroloc.jsonl.exclusive_output`).

    Raises:
        click.ClickException: when another run is writing it.
    """
    from neuroloc.jsonl import OutputBusyError, exclusive_output

    try:
        click.get_current_context().with_resource(exclusive_output(output))
    except OutputBusyError as exc:
        raise click.ClickException(str(exc)) from None


def regular_output(path: Path, option: str, ours: Callable[[Path], bool] | None = None, what: str = "") -> None:
    """Refuse an output ``path`` that exists and is not a regular file (a device such as /dev/null, a pipe): it
    is replaced by a new file when the run ends, which would destroy it. With ``ours``, also a non-empty file for
    which it is false: not an earlier output of the command (``what`` names one), but someone's data.

    Raises:
        click.BadParameter: naming ``option``.
    """
    import os
    import stat

    if str(path) in ("", "."):  # click makes '' the current folder
        raise click.BadParameter("an empty path; give a file name", param_hint=option)
    try:
        found = os.stat(path)
    except OSError:
        return  # not there (yet): written as a new file
    mode = found.st_mode
    if stat.S_ISDIR(mode):
        raise click.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    if not stat.S_ISREG(mode):
        raise click.BadParameter(f"{path} is not a regular file (a device or a pipe); the run would replace it: "
                                 "give a file name (for localize, '-' writes to stdout)", param_hint=option)
    if ours is not None and found.st_size > 0 and not ours(path):
        raise click.BadParameter(f"{path} exists and is not {what}; the run would replace "
                                 "it: give another name, or remove it first", param_hint=option)


def writable_folder(folder: Path, option: str) -> None:
    """Make ``folder`` (with its parents) and create and delete a file in it, so that an output that cannot be
    written is refused before any work is done rather than after it.

    Raises:
        click.BadParameter: naming ``option`` (e.g. ``"'--output'"``), with the system's reason.
    """
    try:
        if blocking := next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None):
            raise click.BadParameter(f"cannot write into {folder}: {blocking} is a file, not a folder", param_hint=option)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise click.BadParameter(f"cannot write into {folder}: {exc.strerror or exc}", param_hint=option) from None
