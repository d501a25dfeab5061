"""Issue 3, item 3 (continued): torch.compile and int8 for the default and paper presets, timed in one run.

Usage: python scripts/compile_options.py [N_IMAGES] [--batch B] [PRESET ...]   (first N dev images,
default 48; batch 1; presets default and paper unless named)

Every variant runs on its own copy of the embedded EfficientNet-Lite0, 1 thread, on decoded
images (decoding is not timed). After a warm-up (the first image is timed on its own: it includes
compiling), the variants are timed interleaved: repeat r runs every variant once over all images, so
load from other jobs hits them alike. Boxes are compared with the eager run of the same preset.

Variants (a variant that raises is reported with its error, not timed):
- eager: the pipeline as it is.
- whole module compiled: ``net.compile()`` in place; the pipeline's hooks are registered afterwards.
- each block compiled: every ``_blocks.N`` compiled in place (hooks on and inside blocks traced by dynamo).
- lower part no_grad, eager: the layers below the lowest evidence layer run under ``torch.no_grad``, the
  rest with autograd (the control for the next line: what skipping autograd alone gives); only valid
  when no gradient below that layer is needed (density mode without neuron maps, as in the default).
- --compile: :func:`neuroloc.compiled.compile_model`, what ``--compile`` does: the same cut with the lower
  part compiled (inductor, freezing) in density mode, and every forward with grad disabled and no hooks
  registered (the paper's re-scoring) sent to a compiled copy; everything else runs eagerly.
- int8 dynamic classifier: ``torch.ao.quantization.quantize_dynamic`` on the Linear head.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo.config
from torch import nn

from neuroloc.compiled import compile_model
from neuroloc.config import PRESETS
from neuroloc.evaluation.dataset import load_dataset
from neuroloc.evaluation.methods import GradCamMethod
from neuroloc.imageio import load_image
from neuroloc.models import load_model
from neuroloc.models.registry import LoadedModel
from neuroloc.pipeline import evidence_layers, localize_batch

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "ilsvrc2012_val_dev"
REPEATS = 3
MOVED_PX = 0.5  # a box "changed" when a coordinate moved by more than this (pixels of the original image)


def _copy(base: LoadedModel, module: nn.Module | None = None) -> LoadedModel:
    return dataclasses.replace(base, module=module or copy.deepcopy(base.module))


def eager(base: LoadedModel, _preset: str) -> LoadedModel:
    return _copy(base)


def whole_compiled(base: LoadedModel, _preset: str) -> LoadedModel:
    model = _copy(base)
    model.module.compile()
    return model


def blocks_compiled(base: LoadedModel, _preset: str) -> LoadedModel:
    model = _copy(base)
    for block in model.module._blocks:
        block.compile()
    return model


def lower_no_grad_eager(base: LoadedModel, preset: str) -> LoadedModel:
    model = _copy(base)
    net = model.module
    lowest = evidence_layers(model, PRESETS[preset])[0]
    config = PRESETS[preset]
    if config.mode != "density":
        raise ValueError("needs density mode (no gradient below the evidence layer)")
    cut = int(lowest.split(".")[1])  # _blocks.N: blocks N.. keep autograd
    lower = nn.Sequential(net._conv_stem, net._bn0, net._stem_act, *net._blocks[:cut])
    whole = net.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return whole(x)
        with torch.no_grad():
            h = lower(x)
        h.requires_grad_(True)  # DAM differentiates at _blocks.N and above only
        for block in net._blocks[cut:]:
            h = block(h)
        h = net._head_act(net._bn1(net._conv_head(h)))
        return net._fc(torch.flatten(net._avg_pooling(h), 1))

    net.forward = forward
    return model


def compiled(base: LoadedModel, preset: str) -> LoadedModel:
    return compile_model(base, PRESETS[preset])


def int8_classifier(base: LoadedModel, _preset: str) -> LoadedModel:
    module = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base.module), {nn.Linear}, dtype=torch.qint8)
    return _copy(base, module)


VARIANTS: dict[str, dict[str, Callable[[LoadedModel, str], LoadedModel]]] = {
    "default": {
        "eager": eager,
        "whole module compiled, hooks registered after": whole_compiled,
        "each block compiled": blocks_compiled,
        "lower part no_grad, eager": lower_no_grad_eager,
        "--compile (lower part no_grad + compiled)": compiled,
        "int8 dynamic classifier (Linear)": int8_classifier,
    },
    "paper": {
        "eager": eager,
        "--compile (no-grad re-scoring forwards compiled)": compiled,
        "each block compiled": blocks_compiled,
    },
}


BATCH = 1


def run(model: LoadedModel, images, labels, preset: str) -> tuple[float, list]:
    boxes, began = [], time.perf_counter()
    for i in range(0, len(images), BATCH):
        boxes += [r.box for r in localize_batch(model, images[i : i + BATCH], PRESETS[preset], labels[i : i + BATCH])]
    return (time.perf_counter() - began) / len(images), boxes


def gradcam(model: LoadedModel, images, labels) -> float:
    method, began = GradCamMethod(), time.perf_counter()
    for i in range(0, len(images), BATCH):
        method.run(model, images[i : i + BATCH], labels[i : i + BATCH])
    return (time.perf_counter() - began) / len(images)


def moved(boxes: list, reference: list, tolerance: float) -> int:
    return sum(max(abs(a - b) for a, b in zip(x, y)) > tolerance for x, y in zip(boxes, reference))


def main() -> None:
    args = sys.argv[1:]
    count = int(args.pop(0)) if args and args[0].isdigit() else 48
    if "--batch" in args:
        global BATCH
        at = args.index("--batch")
        BATCH = int(args[at + 1])
        del args[at : at + 2]
    presets = args or list(VARIANTS)
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # blocks share one forward: one graph per block shape
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))  # cold compiles
    samples = load_dataset(DEV)[:count]
    images, labels = [load_image(s.image) for s in samples], [s.label for s in samples]
    base = load_model("efficientnet_lite0")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {count} dev images, batch {BATCH}", flush=True)
    rows = []
    for preset in presets:
        models, first, failed = {}, {}, {}
        for name, prepare in VARIANTS[preset].items():
            began = time.perf_counter()
            try:
                model = prepare(base, preset)
                run(model, images[:BATCH], labels[:BATCH], preset)  # compiles here
                first[name] = time.perf_counter() - began
                run(model, images[BATCH : 4 * BATCH], labels[BATCH : 4 * BATCH], preset)
                models[name] = model
            except Exception as exc:  # noqa: BLE001 - reported in the table
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}"
            print(f"# {preset} / {name}: prepared ({time.perf_counter() - began:.1f} s)", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {name: [] for name in models}
        boxes: dict[str, list] = {}
        cam_times = []
        for _ in range(REPEATS):
            for name, model in models.items():
                seconds, boxes[name] = run(model, images, labels, preset)
                times[name].append(seconds)
            cam_times.append(gradcam(models["eager"], images, labels))
        reference, plain = boxes["eager"], statistics.median(times["eager"])
        cam = statistics.median(cam_times)
        for name in VARIANTS[preset]:
            if name in failed:
                rows.append(f"| {preset} | {name} | – | – | – | {failed[name]} |")
                continue
            s = statistics.median(times[name])
            changed = moved(boxes[name], reference, MOVED_PX)
            rows.append(f"| {preset} | {name} | {first[name]:.1f} | {s:.4f} | {s / plain:.2f} ({s / cam:.1f}x Grad-CAM) "
                        f"| {changed} of {count} (>{MOVED_PX} px); {moved(boxes[name], reference, 1e-3)} >0.001 px |")
        rows.append(f"| {preset} | Grad-CAM (eager), same run | – | {cam:.4f} | – | – |")
    print(f"\n| preset | variant | first batch of {BATCH} s (incl. compile) | s/img (median of {REPEATS}) "
          "| ratio to eager | boxes changed vs eager |")
    print("|---|---|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
