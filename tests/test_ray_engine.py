"""The Ray Data engine (issue 9): same boxes as the single-process path, per-row errors, resume, actor restarts.

Tests that start Ray need ``pip install "neuroloc[ray]"`` and skip with a message without it. They share one
local Ray (num_cpus=2, shut down in a finally) and each has a time limit, so a hung Ray cannot hang CI.
"""

from __future__ import annotations

import csv
import faulthandler
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from image_cases import write_bad_cases
from neuroloc.cli import main
from neuroloc.config import PRESETS
from neuroloc.engines.ray_engine import PoolPlan, plan_pool

DEV_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ilsvrc2012_val_dev" / "images"
RECORD_KEYS = {"image", "width", "height", "model", "predictions", "error"}
TEST_LIMIT_S = 240  # one test; the slowest (40 images on a busy 2-core machine) takes about a minute


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fail a test that runs over TEST_LIMIT_S; kill the whole process (with tracebacks) if even that is stuck."""

    def too_long(signum: int, frame: Any) -> None:
        raise TimeoutError(f"Ray test ran over {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(TEST_LIMIT_S)
    faulthandler.dump_traceback_later(TEST_LIMIT_S + 60, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray with 2 CPUs for this module's tests, always shut down."""
    ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "neuroloc[ray]" to run the Ray engine tests')
    pytest.importorskip("ray.data", reason='Ray Data is not installed: pip install "neuroloc[ray]"')
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dev_images() -> list[Path]:
    found = sorted(DEV_IMAGES.glob("*.JPEG"))[:40]
    if len(found) < 40:
        pytest.skip(f"dev images not found at {DEV_IMAGES} (expected <repo>/../shared/data/ilsvrc2012_val_dev/images)")
    return found


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def reference_boxes(
    model: Any, paths: list[Path], batch_size: int = 8, intensity: str = "range"
) -> dict[str, tuple[int, list[float]]]:
    """label and box of each image by the single-process path (localize_batch, default preset)."""
    from neuroloc.imageio import load_image
    from neuroloc.pipeline import localize_batch

    out = {}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        pictures = [load_image(p, intensity=intensity) for p in chunk]
        for path, result in zip(chunk, localize_batch(model, pictures, PRESETS["default"])):
            out[str(path)] = (result.label, [round(v, 2) for v in result.box])
    return out


def assert_same_boxes(lines: list[dict[str, Any]], expected: dict[str, tuple[int, list[float]]]) -> None:
    assert sorted(r["image"] for r in lines) == sorted(expected), "every image exactly once"
    for record in lines:
        assert set(record) == RECORD_KEYS and record["error"] is None, record
        label, box = expected[record["image"]]
        prediction = record["predictions"][0]
        assert prediction["label"] == label, record["image"]
        assert prediction["box"] == pytest.approx(box, abs=1e-3), record["image"]


def assert_same_json(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal JSON values, numbers to 1e-4: an actor runs torch with other threads, which moves a class
    probability in its 6th decimal."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same_json(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for j, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_json(a, b, f"{where}/{j}")
    elif isinstance(ours, float) or isinstance(theirs, float):
        assert ours == pytest.approx(theirs, abs=1e-4), where
    else:
        assert ours == theirs, where


class CapturedDataset:
    """Stands in for a Ray Dataset: keeps the options localize_dataset gives map_batches, and builds the actor
    here, in this process, from its constructor arguments."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}

    def map_batches(self, actor: Any, **options: Any) -> Any:
        self.options = options
        return actor(*options["fn_constructor_args"])


# --- without Ray ------------------------------------------------------------------------------------------------


def test_plan_pool_always_leaves_cpu_for_reads() -> None:
    for cpus in (0.5, 1, 1.5, 2, 3, 4, 8, 16, 96):
        for workers in (None, 1, 2, 3, 8):
            plan = plan_pool(cpus, workers)
            reserve = 1.0 if cpus >= 2 else cpus / 2
            assert plan.workers >= 1 and plan.torch_threads >= 1
            assert plan.workers * plan.cpus_per_worker <= cpus - reserve + 1e-9, (cpus, workers, plan)
    assert plan_pool(2) == plan_pool(2, 1)
    assert plan_pool(16).workers == 15 and plan_pool(16).cpus_per_worker == 1
    assert plan_pool(16, 3).torch_threads == 5
    with pytest.raises(ValueError):
        plan_pool(0)
    with pytest.raises(ValueError, match=r"100000 workers x 0.01 CPU do not fit on the 1 CPU\(s\).*at most 100"):
        plan_pool(2, 100000)  # Ray had started 100 actors and waited for the rest for ever


def test_plan_pool_gives_each_gpu_actor_its_share() -> None:
    assert plan_pool(8, gpus_per_worker=1, total_gpus=2) == PoolPlan(2, 1, 1, 1)  # an actor per GPU, a CPU each
    assert plan_pool(8, gpus_per_worker=0.5, total_gpus=2).workers == 4  # two actors share a GPU
    assert plan_pool(8, gpus_per_worker=0.4, total_gpus=2).workers == 4  # a share is never split over two GPUs
    assert plan_pool(8, 1, gpus_per_worker=1, total_gpus=2) == PoolPlan(1, 1, 1, 1)
    assert plan_pool(8, None, 3, gpus_per_worker=1, total_gpus=2) == PoolPlan(2, 3, 3, 1)  # CPUs asked for
    assert plan_pool(1.5, gpus_per_worker=1, total_gpus=2) == PoolPlan(2, 0.37, 1, 1)  # fewer CPUs to spare
    assert plan_pool(64, gpus_per_worker=1, total_gpus=1).cpus_per_worker == 1  # not the whole cluster's CPUs
    assert plan_pool(8).gpus_per_worker == 0
    for cpus, workers, share, gpus, reason in (
        (8, None, 1, 0, "the Ray cluster has no GPUs"),
        (8, 3, 1, 2, "3 worker(s) x 1 GPU do not fit on the cluster's 2 GPU(s)"),
        (8, 5, 0.4, 2, "5 worker(s) x 0.4 GPU do not fit"),
        (8, None, 1, 0.5, "1 worker(s) x 1 GPU do not fit"),
        (8, None, 1.5, 2, "a share of one GPU"),
    ):
        with pytest.raises(ValueError, match=re.escape(reason)):
            plan_pool(cpus, workers, gpus_per_worker=share, total_gpus=gpus)


def test_without_ray_the_command_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"not read")
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray -> ImportError
    result = run("localize", image, "--engine", "ray", "-o", tmp_path / "out.jsonl")
    assert result.exit_code != 0
    assert 'pip install "neuroloc[ray]"' in result.output


def test_an_output_that_is_an_image_in_a_source_folder_is_refused_before_ray_starts(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason='Ray is not installed: pip install "neuroloc[ray]"')
    from PIL import Image

    (tmp_path / "photos").mkdir()
    image = tmp_path / "photos" / "a.png"
    Image.radial_gradient("L").convert("RGB").save(image)
    before = image.read_bytes()
    result = run("localize", tmp_path / "photos", "--engine", "ray", "-o", image)
    assert result.exit_code == 2 and "is one of the images it reads; it would be overwritten" in result.output
    assert image.read_bytes() == before


def test_a_cluster_address_that_does_not_answer_is_one_line_error(tmp_path: Path) -> None:
    """ray.init waits without end for an address where nothing answers; a ray:// address needs Ray Client."""
    import socket
    import time

    pytest.importorskip("ray", reason='Ray is not installed: pip install "neuroloc[ray]"')
    picture = tmp_path / "a.png"
    from PIL import Image

    Image.radial_gradient("L").convert("RGB").save(picture)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        began = time.monotonic()
        result = run("localize", picture, "--engine", "ray", "--address", address, "-o", tmp_path / "out.jsonl")
        assert result.exit_code == 1 and time.monotonic() - began < 60, result.output
        (line,) = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert f"cannot join the Ray cluster at {address}: nothing answers" in line


# --- with a local Ray ---------------------------------------------------------------------------------------------


def test_ray_gives_the_single_process_boxes(ray_local: Any, dev_images: list[Path], lite0: Any, tmp_path: Path) -> None:
    out = tmp_path / "ray.jsonl"
    result = run("localize", *dev_images, "--engine", "ray", "--workers", "2", "--batch-size", "8", "-o", out)
    assert result.exit_code == 0, result.output
    # 40 images: --directions auto fits the feature directions over them, on the driver, for every actor
    from neuroloc.directions import directions_for

    fitted = lite0.with_directions(directions_for("auto", lite0, ("_blocks.10", "_blocks.14"), dev_images))
    assert fitted.directions is not None
    assert_same_boxes(read_lines(out), reference_boxes(fitted, dev_images))


def test_several_classes_and_objects_are_the_local_engine_s(ray_local: Any, dev_images: list[Path], tmp_path: Path) -> None:
    """--classes / --top / --objects multi / --rle / --coco / --refine / --tile / --input-size with Ray: the local
    engine's lines, record for record (GrabCut redraws density mode's region, and neurons mode's masks)."""
    pytest.importorskip("cv2", reason="--refine grabcut needs OpenCV: pip install opencv-python-headless")
    images = dev_images[:4]
    with open(DEV_IMAGES.parent / "boxes.csv", newline="", encoding="utf-8") as f:
        truth = {row["image"]: row["synset"] for row in csv.DictReader(f)}
    own = ",".join(truth[p.name] for p in images)
    for args in (["--top", "2", "--objects", "multi", "--rle", "--input-size", "256"], ["--classes", "tabby,goldfish"],
                 ["--classes", own, "--tile", "128", "--rle"],
                 ["--top", "2", "--refine", "grabcut", "--rle"], ["--preset", "paper", "--refine", "grabcut", "--rle"]):
        lines = {}
        for engine in ("local", "ray"):
            out = tmp_path / f"{engine}.jsonl"
            coco = tmp_path / f"{engine}.coco.json"
            result = run("localize", *images, "--engine", engine, "--no-neurons", "-o", out, "--coco", coco, *args)
            assert result.exit_code == 0, result.output
            lines[engine] = {r["image"]: r for r in read_lines(out)}
            assert f"COCO results in {coco}" in result.output
        assert_same_json(lines["ray"], lines["local"])  # every prediction of every image (each localized alone in both)
        ray_coco, local_coco = (json.loads((tmp_path / f"{engine}.coco.json").read_text()) for engine in ("ray", "local"))
        ray_coco.pop("info"), local_coco.pop("info")  # the time each was written
        assert_same_json(ray_coco, local_coco)
        counts = {len(r["predictions"]) for r in lines["ray"].values()}
        if "--tile" in args:  # the tiles whose top-1 is one of the classes
            assert max(counts) >= 1
        elif "--preset" not in args:  # two classes an image
            assert min(counts) >= 2


def test_the_actors_write_the_local_engine_s_pictures(ray_local: Any, dev_images: list[Path], tmp_path: Path) -> None:
    """--overlay, --explain, --heatmaps and --masks with Ray: the same files, named as the local engine names
    them (a repeated file name gets _2), the masks identical."""
    import numpy as np
    from PIL import Image

    twin = tmp_path / "twin" / dev_images[0].name  # the same stem twice: named over all images, not per batch
    twin.parent.mkdir()
    twin.write_bytes(dev_images[1].read_bytes())
    images = [*dev_images[:2], twin]
    for engine in ("local", "ray"):
        out = tmp_path / engine
        result = run("localize", *images, "--engine", engine, "--no-neurons", "--batch-size", "2", "--top", "2",
                     "-o", out / "out.jsonl", "--overlay", out / "o", "--explain", out / "e", "--heatmaps", out / "h",
                     "--masks", out / "m")
        assert result.exit_code == 0, result.output
        assert all(r["error"] is None for r in read_lines(out / "out.jsonl"))
    for folder in ("o", "e", "h", "m"):
        files = sorted(p.name for p in (tmp_path / "local" / folder).iterdir())
        assert files and files == sorted(p.name for p in (tmp_path / "ray" / folder).iterdir()), folder
    assert f"{dev_images[0].stem}_2.jpg" in {p.name for p in (tmp_path / "ray" / "o").iterdir()}
    for mask in (tmp_path / "local" / "m").iterdir():
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(tmp_path / "ray" / "m" / mask.name)))


def test_a_manifest_s_classes_reach_the_actors(ray_local: Any, dev_images: list[Path], tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    a, b, c = dev_images[:3]
    manifest.write_text(f"path,class\n{a},tabby\n{b},goldfish\n{b},tabby\n{c},\n", encoding="utf-8")
    lines = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.jsonl"
        result = run("localize", manifest, "--engine", engine, "--no-neurons", "-o", out)
        assert result.exit_code == 0, result.output
        lines[engine] = {r["image"]: r for r in read_lines(out)}
    assert_same_json(lines["ray"], lines["local"])
    assert [p["label"] for p in lines["ray"][str(b)]["predictions"]] == [1, 281]
    assert [p["label"] for p in lines["ray"][str(a)]["predictions"]] == [281]


def test_api_reads_bytes_with_read_binary_files(ray_local: Any, dev_images: list[Path], lite0: Any, tmp_path: Path) -> None:
    from neuroloc.engines.ray_engine import localize_dataset

    bad = tmp_path / "text_as.jpg"
    bad.write_text("not an image", encoding="utf-8")
    paths = [*dev_images[:6], bad]
    ds = ray_local.data.read_binary_files([str(p) for p in paths], include_paths=True)
    rows = localize_dataset(ds, batch_size=4).take_all()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)
    assert all("bytes" not in r for r in rows)
    failed = [r for r in rows if r["error"] is not None]
    assert [r["path"] for r in failed] == [str(bad)] and failed[0]["box"] is None and "not an image" in failed[0]["error"]
    expected = reference_boxes(lite0, dev_images[:6])
    good = [r for r in rows if r["error"] is None]
    assert_same_boxes([json.loads(r["record"]) for r in good], expected)
    for row in good:  # the flat columns agree with the record
        assert row["box"] == json.loads(row["record"])["predictions"][0]["box"]
        assert row["label"] == expected[row["path"]][0] and row["width"] > 0


def twelve_bit_copies(paths: list[Path], folder: Path) -> list[Path]:
    """Grey copies of ``paths`` as 12-bit data in 16-bit PNGs, which ``--intensity range`` leaves dark."""
    import numpy as np
    from PIL import Image

    from neuroloc.imageio import load_image

    deep = []
    for path in paths:
        deep.append(folder / f"{path.stem}.png")
        Image.fromarray(np.asarray(load_image(path).convert("L"), dtype=np.uint16) * 16 + 7).save(deep[-1])
    return deep


def test_actors_read_deep_images_as_asked(ray_local: Any, dev_images: list[Path], lite0: Any, tmp_path: Path) -> None:
    from neuroloc.engines.ray_engine import localize_dataset

    deep = twelve_bit_copies(dev_images[:4], tmp_path)
    ds = ray_local.data.read_binary_files([str(p) for p in deep], include_paths=True)
    rows = localize_dataset(ds, batch_size=2, intensity="stretch").take_all()
    assert_same_boxes([json.loads(r["record"]) for r in rows], reference_boxes(lite0, deep, intensity="stretch"))
    assert all(r["range_used"] is None for r in rows)  # only pictures read with "range" have one
    dark = localize_dataset(ray_local.data.from_items([{"path": str(deep[0])}]), batch_size=1).take_all()
    assert 0 < dark[0]["range_used"] < 0.25


def test_the_command_passes_the_pixel_limit_and_tells_of_dark_images(ray_local: Any, dev_images: list[Path],
                                                                     tmp_path: Path) -> None:
    deep = twelve_bit_copies(dev_images[:2], tmp_path)
    out = tmp_path / "out.jsonl"
    result = run("localize", *deep, "--engine", "ray", "--no-neurons", "-o", out)
    assert result.exit_code == 0, result.output
    assert "2 images of more than 8 bits" in result.output and "--intensity stretch" in result.output
    stretched = run("localize", *deep, "--engine", "ray", "--no-neurons", "--intensity", "stretch", "-o", tmp_path / "s.jsonl")
    assert stretched.exit_code == 0 and "came out dark" not in stretched.output
    small = run("localize", dev_images[0], "--engine", "ray", "--max-pixels", 1000, "-o", tmp_path / "small.jsonl")
    assert small.exit_code == 1, small.output  # the actor, another process, read with the command's limit
    assert "over the limit of 1,000" in read_lines(tmp_path / "small.jsonl")[0]["error"]


def test_bad_files_are_rows_and_resume_skips_what_is_done(ray_local: Any, dev_images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    bad = sorted(write_bad_cases(folder).values())
    inputs = [*dev_images[:5], *bad, folder / "missing.jpg"]
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"{p}\n" for p in inputs), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run("localize", manifest, "--engine", "ray", "--batch-size", "3", "--no-neurons", "-o", out)
    assert result.exit_code == 1, result.output  # failures are reported, not fatal
    lines = read_lines(out)
    assert sorted(r["image"] for r in lines) == sorted(map(str, inputs)), "every input exactly once"
    failed = {r["image"] for r in lines if r["error"]}
    assert failed == {str(p) for p in [*bad, folder / "missing.jpg"]}
    # A run killed after 3 lines: --resume keeps them, redoes the failed ones, does the rest, no duplicates.
    done = [r for r in lines if r["error"] is None]
    (tmp_path / "out.jsonl.partial").write_text("".join(json.dumps(r) + "\n" for r in done[:3]) + '{"image": "cut',
                                                encoding="utf-8")
    out.unlink()
    result = run("localize", manifest, "--engine", "ray", "--no-neurons", "--resume", "-o", out)
    assert "3 already done" in result.output and "2 localized" in result.output, result.output
    again = read_lines(out)
    assert sorted(r["image"] for r in again) == sorted(map(str, inputs))
    assert {r["image"]: r["predictions"] for r in again if not r["error"]} == {r["image"]: r["predictions"] for r in done}


def test_a_killed_actor_is_restarted_and_its_batch_retried(ray_local: Any, dev_images: list[Path], tmp_path: Path) -> None:
    from neuroloc.engines.ray_engine import localize_dataset

    marker = tmp_path / "kill-once"
    marker.write_text("", encoding="utf-8")
    flag = str(marker)

    def fragile_model() -> Any:  # pickled by value into the actor: it dies in its first forward pass
        from neuroloc.models import load_model

        model = load_model("efficientnet_lite0", allow_download=False)

        def die_once(module: Any, args: Any) -> None:
            if os.path.exists(flag):
                os.remove(flag)
                os._exit(1)

        model.module.register_forward_pre_hook(die_once)
        return model

    paths = [str(p) for p in dev_images[:8]]
    ds = ray_local.data.from_items([{"path": p} for p in paths], override_num_blocks=2)
    rows = localize_dataset(ds, fragile_model, batch_size=4, workers=1, max_restarts=2, max_task_retries=2).take_all()
    assert not marker.exists(), "the actor was never killed"
    assert sorted(r["path"] for r in rows) == sorted(paths), "every image exactly once"
    assert all(r["error"] is None and len(r["box"]) == 4 for r in rows)


def test_ray_names_a_fine_tuned_models_own_classes(ray_local: Any, dev_images: list[Path], lite0: Any, tmp_path: Path) -> None:
    import torch

    state = {k: v.clone() for k, v in lite0.module.state_dict().items()}
    state["_fc.weight"], state["_fc.bias"] = state["_fc.weight"][[1, 2, 3]], state["_fc.bias"][[1, 2, 3]]
    torch.save(state, tmp_path / "three.pth")
    (tmp_path / "names.txt").write_text("fish\nshark\nwhite shark\n", encoding="utf-8")
    out = tmp_path / "ray.jsonl"
    result = run("localize", *dev_images[:2], "--engine", "ray", "--workers", "1", "--weights", tmp_path / "three.pth",
                 "--class-names", tmp_path / "names.txt", "--class", "shark", "-o", out)
    assert result.exit_code == 0, result.output
    assert [(p["label"], p["name"], p["synset"]) for line in read_lines(out) for p in line["predictions"]] == [
        (1, "shark", None)] * 2
    refused = run("localize", *dev_images[:2], "--engine", "ray", "--weights", tmp_path / "three.pth",
                  "--class-names", tmp_path / "names.txt", "--class", "tabby", "-o", tmp_path / "x.jsonl")
    assert refused.exit_code == 2 and "unknown class 'tabby'" in refused.output
    from functools import partial

    from neuroloc.engines.ray_engine import localize_dataset
    from neuroloc.models import load_model

    # the API's target is looked up among the model's own classes, not ImageNet's (where 'shark' is no class)
    loader = partial(load_model, "efficientnet_lite0", tmp_path / "three.pth", class_names=tmp_path / "names.txt")
    ds = ray_local.data.from_items([{"path": str(dev_images[0])}])
    (row,) = localize_dataset(ds, loader, target="shark", workers=1).take_all()
    assert row["error"] is None and row["label"] == 1


def test_each_actor_compiles_its_model_for_compile(
    ray_local: Any, dev_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compile with Ray: the option reaches the actors, each compiles its own model (a compiled module does not
    travel between processes), and the lines are those of the local engine's --compile."""
    from neuroloc.engines import ray_engine

    asked: list[bool] = []
    real_localize_dataset = ray_engine.localize_dataset

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("use_compile", False))
        return real_localize_dataset(*args, **kwargs)

    monkeypatch.setattr(ray_engine, "localize_dataset", recording)
    images = dev_images[:3]
    lines = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.jsonl"
        threads = ["--threads", "1"] if engine == "local" else []  # Ray's actors set their own (refused there)
        result = run("localize", *images, "--engine", engine, "--compile", "--no-neurons", "--batch-size", "3",
                     *threads, "-o", out)
        assert result.exit_code == 0, result.output
        lines[engine] = {r["image"]: r for r in read_lines(out)}
    assert asked == [True]
    assert_same_json(lines["ray"], lines["local"])

    for use_compile in (False, True):
        actor = real_localize_dataset(CapturedDataset(), "efficientnet_lite0", PRESETS["default"], use_compile=use_compile)
        assert ("forward" in vars(actor.model.module)) is use_compile  # compile_model replaces a copy's forward


def test_gpu_actors_hold_a_gpu_each_and_run_the_network_there(
    ray_local: Any, dev_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--gpus-per-worker: the pool asks Ray for the GPUs, each actor moves its model to cuda, and its lines are
    the CPU actor's. Without a GPU here, the cluster's GPUs are declared and "cuda" is the stand-in accelerator
    of tests/fake_accelerator.py, which fails where a CUDA tensor would (NumPy on it, devices mixed)."""
    import pyarrow as pa

    from fake_accelerator import accelerator, on_accelerator
    from neuroloc.engines import ray_engine
    from neuroloc.models import LoadedModel

    moved_to: list[str] = []

    def to_stand_in(model: LoadedModel, device: Any) -> LoadedModel:
        moved_to.append(str(device))
        return on_accelerator(model)

    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 2.0})
    monkeypatch.setattr(LoadedModel, "to", to_stand_in)
    cpu_ds, gpu_ds = CapturedDataset(), CapturedDataset()
    on_cpu = ray_engine.localize_dataset(cpu_ds, "efficientnet_lite0", PRESETS["default"])
    assert "num_gpus" not in cpu_ds.options and moved_to == []
    on_gpu = ray_engine.localize_dataset(gpu_ds, "efficientnet_lite0", PRESETS["default"], gpus_per_worker=0.5)
    assert gpu_ds.options["num_gpus"] == 0.5 and gpu_ds.options["compute"].min_size == 4
    assert moved_to == ["cuda"]
    batch = pa.table({"path": [str(p) for p in dev_images[:2]]})
    with accelerator():
        lines = on_gpu(batch).column("record").to_pylist()
    expected = on_cpu(batch).column("record").to_pylist()
    assert_same_json([json.loads(line) for line in lines], [json.loads(line) for line in expected])
    with pytest.raises(ValueError, match="compiling is for actors on the CPU"):
        ray_engine.localize_dataset(CapturedDataset(), use_compile=True, gpus_per_worker=1)
    moved_to.clear()
    by_remote_args = CapturedDataset()  # Ray's own num_gpus puts the model on the GPU too; the caller's num_cpus wins
    ray_engine.localize_dataset(by_remote_args, "efficientnet_lite0", ray_remote_args={"num_gpus": 1, "num_cpus": 0.5})
    assert by_remote_args.options["num_gpus"] == 1 and by_remote_args.options["num_cpus"] == 0.5 and moved_to == ["cuda"]


def test_the_command_refuses_gpus_the_cluster_lacks(ray_local: Any, dev_images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    for args, reason in (
        (["--engine", "ray", "--gpus-per-worker", "1"], "Error: --engine ray: the Ray cluster has no GPUs"),
        (["--gpus-per-worker", "1"], "--gpus-per-worker is for --engine ray; here, use --device cuda"),
        (["--engine", "ray", "--gpus-per-worker", "1", "--compile"], "--compile is for the CPU"),
        (["--engine", "ray", "--gpus-per-worker", "2"], "2.0 is not in the range 0<x<=1"),
    ):
        result = run("localize", dev_images[0], "-o", out, *args)
        assert result.exit_code != 0 and reason in result.output, (args, result.output)
        assert list(tmp_path.iterdir()) == []  # refused before any file is made


def test_the_command_hands_its_gpu_share_to_the_pool(
    ray_local: Any, dev_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from neuroloc.engines import ray_engine

    class Stop(Exception):
        pass

    asked: list[float] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["gpus_per_worker"])
        raise Stop  # a job that asks for GPUs this cluster does not have would wait for them

    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    monkeypatch.setattr(ray_engine, "localize_dataset", recording)
    result = run("localize", dev_images[0], "--engine", "ray", "--gpus-per-worker", "0.5", "-o", tmp_path / "out.jsonl")
    assert isinstance(result.exception, Stop) and asked == [0.5]


def test_api_actors_take_the_directions_file_and_the_backbone_s_own_default(
    ray_local: Any, dev_images: list[Path], lite0: Any, tmp_path: Path
) -> None:
    """``directions=FILE`` gives the actors the objectness map that ``Localizer(directions=FILE)`` uses, and
    without a config each actor takes the default preset with its backbone's own settings."""
    import dataclasses

    import pyarrow as pa

    from neuroloc.config import preset_for
    from neuroloc.directions import fit_directions, save_directions
    from neuroloc.engines.ray_engine import localize_dataset
    from neuroloc.imageio import load_image
    from neuroloc.pipeline import Localizer, evidence_layers

    layers = evidence_layers(lite0, preset_for("default"))[1]
    saved = save_directions(fit_directions(lite0, [load_image(p) for p in dev_images[:20]], layers),
                            tmp_path / "d.safetensors")
    batch = pa.table({"path": [str(p) for p in dev_images[20:23]]})
    actor = localize_dataset(CapturedDataset(), "efficientnet_lite0", directions=saved)
    boxes = [json.loads(r)["predictions"][0]["box"] for r in actor(batch).column("record").to_pylist()]
    with_map = Localizer(lite0, directions=saved)
    expected = [[round(v, 2) for v in with_map.localize(p).box] for p in dev_images[20:23]]
    for box, box_expected in zip(boxes, expected, strict=True):
        assert box == pytest.approx(box_expected, abs=1e-3)
    without = [[round(v, 2) for v in Localizer(lite0).localize(p).box] for p in dev_images[20:23]]
    assert without != expected  # the map moved at least one box, so the comparison above means something

    def tuned() -> Any:
        return dataclasses.replace(lite0, spec=dataclasses.replace(lite0.spec, default_options={"cut": "mass"}))

    assert localize_dataset(CapturedDataset(), tuned).config.cut == "mass"
    assert localize_dataset(CapturedDataset(), tuned, PRESETS["default"]).config.cut == "otsu"
