"""Command-line options shared by localize, evaluate and bench (beside ``--device`` in neuroloc.device)."""

from __future__ import annotations

from typing import Any

# Here rather than in neuroloc.models, which imports torch: the CLI's --help must not.
MIN_INPUT_SIZE = 64  # below this the deepest default layers of the backbones shrink to 1x1 or 2x2
MAX_INPUT_SIZE = 1024  # ~21x the work of 224 per image; beyond it a CPU run takes seconds per image


def input_size_option(help_suffix: str = "") -> Any:
    """``--input-size N``: the square side images are resized to (default: the model's own, e.g. 224)."""
    import click

    return click.option(
        "--input-size", type=click.IntRange(MIN_INPUT_SIZE, MAX_INPUT_SIZE), metavar="N",
        help="Resize each image to NxN for the network instead of the model's size (e.g. 320: finer maps, tighter "
        "boxes, about 2x the time; docs/results.md)." + help_suffix,
    )
