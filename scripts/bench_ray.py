"""Images/second of the single-process path vs the Ray engine with 1 and 2 actors, and Ray's start-up cost.

    python scripts/bench_ray.py ../shared/data/ilsvrc2012_val_dev/images --count 160 --rounds 2

Single process: localize_chunk (what `neuroloc localize` runs per batch) with 1 torch thread, model loaded
beforehand. Ray: a local Ray with --cpus CPUs (ray.init timed apart), then localize_dataset over from_items
of the paths, timed from building the dataset to the last row (actor start and model load included: what
a job pays), for each pool size; a job of one batch per actor gives the fixed cost, and the difference the
marginal rate. Prints one line per measurement; docs/ray.md has the numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("--count", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=float, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[: args.count]
    torch.set_num_threads(1)

    import ray

    from neuroloc.cli import RunOptions, localize_chunk, unique_names
    from neuroloc.config import PRESETS
    from neuroloc.engines.ray_engine import localize_dataset
    from neuroloc.models import load_model

    config = PRESETS["default"]
    model = load_model("efficientnet_lite0", allow_download=False)
    options = RunOptions(args.batch_size, None, None, None, True)
    names = unique_names(paths)
    began = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray.init (local, {args.cpus:g} CPUs): {time.perf_counter() - began:.1f} s", flush=True)
    try:
        for round_ in range(args.rounds):
            began = time.perf_counter()
            for start in range(0, len(paths), args.batch_size):
                localize_chunk(model, config, paths[start : start + args.batch_size], names, options)
            took = time.perf_counter() - began
            print(f"round {round_}: single process, 1 thread: {len(paths)} images in {took:.1f} s = "
                  f"{len(paths) / took:.2f} img/s", flush=True)
            for workers in (int(w) for w in args.workers.split(",")):
                small = args.batch_size * workers  # a job this small is mostly start-up: actors, model loads
                times = {n: ray_job(ray, localize_dataset, config, paths[:n], args.batch_size, workers) for n in (small, len(paths))}
                extra = times[len(paths)] - times[small]
                marginal = f"{(len(paths) - small) / extra:.2f} img/s" if extra > 0 else "not measurable (give more --count)"
                print(f"round {round_}: ray, {workers} actor(s): {len(paths)} images in {times[len(paths)]:.1f} s = "
                      f"{len(paths) / times[len(paths)]:.2f} img/s end to end; a {small}-image job takes "
                      f"{times[small]:.1f} s; marginal rate {marginal}", flush=True)
    finally:
        ray.shutdown()


def ray_job(ray, localize_dataset, config, paths, batch_size, workers) -> float:
    """Seconds from building the dataset to its last row."""
    began = time.perf_counter()
    ds = ray.data.from_items([{"path": str(p)} for p in paths], override_num_blocks=max(2 * workers, len(paths) // batch_size))
    rows = sum(b.num_rows for b in localize_dataset(ds, config=config, batch_size=batch_size, workers=workers)
               .iter_batches(batch_size=None, batch_format="pyarrow"))
    assert rows == len(paths)
    return time.perf_counter() - began


if __name__ == "__main__":
    main()
