"""Small objects in large images: whole-image localization against --tile, on mosaics of dev images.

    python scripts/eval_tiles.py [--images 100] [--grid 4] [--tiles 128,192,256,340] [--directions none|tiles]

ILSVRC photos show their object large. To ask how neuroloc finds an object that covers a small part of a
large image, each of ``--images`` dev images (every other one of the held-out half, odd positions in
name order) is placed in a random cell of a GRID x GRID mosaic whose other cells hold dev images of other
classes (227 x 227 pixels each, so a 4 x 4 mosaic is 908 x 908). The true class is given. Per mosaic:

* the whole image, the default preset (one box), as `neuroloc localize --class` gives;
* tiles of several sizes (`--tile`, overlap 0.25): every object found for the class.

Reported: whether the most probable box hits the true box (IoU >= 0.5; the GT-known test), whether any box
does (recall), boxes per mosaic, mosaics with no box, seconds per mosaic. The mosaics are built in memory
from ../shared and never written. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neuroloc.blobs import box_iou
from neuroloc.config import PRESETS
from neuroloc.evaluation.command import split_samples
from neuroloc.evaluation.dataset import load_dataset
from neuroloc.imageio import load_image
from neuroloc.models import load_model
from neuroloc.pipeline import localize_batch
from neuroloc.tiles import TileRule, localize_tiled

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ilsvrc2012_val_dev"


def mosaics(grid: int, count: int, seed: int = 0):
    """(mosaic, label, true boxes in mosaic pixels) for ``count`` held-out dev images."""
    samples = load_dataset(DEV)
    held_out = split_samples(samples, "test")[::2][:count]
    rng = random.Random(seed)
    for target in held_out:
        others = [s for s in samples if s.label != target.label]
        cells = [target, *rng.sample(others, grid * grid - 1)]
        order = list(range(grid * grid))
        rng.shuffle(order)
        side = 227
        canvas = Image.new("RGB", (side * grid, side * grid))
        truths = []
        for sample, slot in zip(cells, order):
            picture = load_image(sample.image)
            sx, sy = side / picture.width, side / picture.height
            x, y = side * (slot % grid), side * (slot // grid)
            canvas.paste(picture.resize((side, side), Image.Resampling.BILINEAR), (x, y))
            if sample is target:
                truths = [(x + b[0] * sx, y + b[1] * sy, x + b[2] * sx, y + b[3] * sy) for b in sample.boxes]
        yield canvas, target.label, truths


def score(boxes: list[tuple[float, ...]], truths: list[tuple[float, ...]]) -> tuple[bool, bool]:
    hits = [max(box_iou(b, t) for t in truths) >= 0.5 for b in boxes]
    return (bool(hits[0]) if hits else False), any(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--tiles", default="192,256,340")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--directions", choices=["none", "tiles"], default="none",
                        help="tiles: for each tile size, fit the objectness map's feature directions over 200 of "
                        "the mosaics' tiles of that size (evenly spaced, no labels), as `--tile --directions auto` does")
    args = parser.parse_args()
    if not DEV.is_dir():
        raise SystemExit(f"skipped: the dev set is not at {DEV}")
    torch.set_num_threads(args.threads)
    model = load_model("efficientnet_lite0")
    config = PRESETS["default"]
    sizes = [int(s) for s in args.tiles.split(",")]
    methods = ["whole image"] + [f"tiles {s}" for s in sizes]
    rows = {m: {"first": [], "any": [], "boxes": [], "none": [], "seconds": []} for m in methods}
    tiled_models = dict.fromkeys(sizes, model)
    if args.directions == "tiles":
        from neuroloc.directions import DirectionsError, fit_directions, fit_sample
        from neuroloc.pipeline import evidence_layers
        from neuroloc.tiles import tile_boxes

        for size in sizes:
            crops = [(canvas, box) for canvas, _, _ in mosaics(args.grid, args.images)
                     for box in tile_boxes(canvas.width, canvas.height, TileRule(size))]
            chosen = fit_sample(crops, 200)
            pictures = (canvas.crop(box) for canvas, box in chosen)
            try:
                tiled_models[size] = model.with_directions(fit_directions(model, pictures, evidence_layers(model, config)[1]))
            except DirectionsError as exc:
                raise SystemExit(f"--directions tiles: {exc} (tiles of {size} px; give more --images)") from None
    for canvas, label, truths in mosaics(args.grid, args.images):
        for method in methods:
            began = time.perf_counter()
            if method == "whole image":
                boxes = [localize_batch(model, [canvas], config, [label])[0].box]
            else:
                size = int(method.split()[1])
                boxes = [r.box for r in localize_tiled(tiled_models[size], canvas, config, [label], TileRule(size))]
            row = rows[method]
            row["seconds"].append(time.perf_counter() - began)
            first, any_hit = score(boxes, truths)
            row["first"].append(first)
            row["any"].append(any_hit)
            row["boxes"].append(len(boxes))
            row["none"].append(not boxes)
    side = 227 * args.grid
    print(f"{args.images} mosaics of {args.grid} x {args.grid} dev images ({side} x {side} pixels), true class "
          f"given, EfficientNet-Lite0, default preset, objectness map: {args.directions}\n")
    print("| method | most probable box hits (GT-known) | any box hits | boxes per mosaic | mosaics with no box | s per mosaic |")
    print("|---|---|---|---|---|---|")
    for method, row in rows.items():
        print(f"| {method} | {100 * np.mean(row['first']):.1f} | {100 * np.mean(row['any']):.1f} | "
              f"{np.mean(row['boxes']):.2f} | {100 * np.mean(row['none']):.1f} % | {np.mean(row['seconds']):.2f} |")


if __name__ == "__main__":
    main()
