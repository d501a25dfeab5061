"""Issue 3, item 3: CPU options for the default preset, timed in one run, boxes compared with the plain run.

Usage: python scripts/cpu_options.py [N_IMAGES]   (first N dev images, 1 thread unless stated)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from neuroloc.config import PRESETS
from neuroloc.evaluation.dataset import load_dataset
from neuroloc.imageio import load_image
from neuroloc.models import load_model
from neuroloc.pipeline import localize_batch

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "ilsvrc2012_val_dev"


def run(model, images, labels, batch: int, autocast: bool) -> tuple[float, list]:
    boxes, began = [], time.perf_counter()
    for start in range(0, len(images), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results = localize_batch(model, images[start : start + batch], PRESETS["default"], labels[start : start + batch])
        boxes += [r.box for r in results]
    return (time.perf_counter() - began) / len(images), boxes


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 48
    samples = load_dataset(DEV)[:count]
    images, labels = [load_image(s.image) for s in samples], [s.label for s in samples]
    model = load_model("efficientnet_lite0")
    variants = {
        "plain, 1 thread, batch 1": dict(threads=1, batch=1),
        "batch 8": dict(threads=1, batch=8),
        "2 threads": dict(threads=2, batch=1),
        "channels_last": dict(threads=1, batch=1, channels_last=True),
        "bf16 autocast": dict(threads=1, batch=1, autocast=True),
    }
    reference = None
    print(f"| variant ({count} dev images, default preset) | s/img (median of 3) | boxes changed |")
    print("|---|---:|---:|")
    for name, v in variants.items():
        torch.set_num_threads(v["threads"])
        model.module.to(memory_format=torch.channels_last if v.get("channels_last") else torch.contiguous_format)
        run(model, images[:4], labels[:4], v["batch"], v.get("autocast", False))  # warm-up
        times, boxes = [], None
        for _ in range(3):
            seconds, boxes = run(model, images, labels, v["batch"], v.get("autocast", False))
            times.append(seconds)
        reference = reference or boxes
        changed = sum(max(abs(a - b) for a, b in zip(x, y)) > 1e-3 for x, y in zip(boxes, reference))
        print(f"| {name} | {statistics.median(times):.4f} | {changed} |", flush=True)


if __name__ == "__main__":
    main()
