"""Memory of the objects a tiled run keeps: how tiles' regions are joined into objects, on a synthetic image.

    python scripts/tile_mask_memory.py [--side 8192] [--tile 256] [--share 0.2]

A SIDE x SIDE image is cut into TILE x TILE tiles; about SHARE of them (seeded) hold one region (40 x 60
pixels). The tiles' results are joined as `neuroloc localize --tile` joins them (``neuroloc.tiles._join``;
no network runs). Printed: tiles with a region, objects, the join's peak memory (tracemalloc), the bytes
of masks the objects keep, what full-size masks would hold, and the seconds taken.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from neuroloc.confidence import Confidence
from neuroloc.result import Localization
from neuroloc.tiles import _join


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--share", type=float, default=0.2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    region = np.zeros((args.tile, args.tile), dtype=bool)
    region[100:140, 90:150] = True
    tiles = []
    for y in range(0, args.side, args.tile):
        for x in range(0, args.side, args.tile):
            if rng.random() < args.share:
                found = Localization(box=(0, 0, 1, 1), label=7, synset=None, name="x", probability=0.8, neurons=(),
                                     mask=region, image_size=(args.tile, args.tile), layer="x", top1=7,
                                     confidence=Confidence(0.8, 0.5, None), point=(5.0, 5.0))
                tiles.append(((x, y, x + args.tile, y + args.tile), found))
    tracemalloc.start()
    began = time.perf_counter()
    objects = _join(tiles, (args.side, args.side))
    seconds = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    kept = sum(o.mask.nbytes for o in objects)
    print(f"| tiles with a region | objects | join peak MB | masks kept MB | full-size masks MB | s |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {len(tiles)} | {len(objects)} | {peak / 2**20:.0f} | {kept / 2**20:.2f} | "
          f"{len(objects) * args.side**2 / 2**20:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
