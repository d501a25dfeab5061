"""``neuroloc bench``: the staged run equals ``localize_batch``, the JSON figures, bad options.

Kept small for the shared two-core machine: two generated images, one timed repeat, no warm-up, one thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from neuroloc.bench import STAGES, PresetResult, StageClock, batches, results_table, staged_localize
from neuroloc.cli import main
from neuroloc.config import PRESETS
from neuroloc.imageio import load_image
from neuroloc.pipeline import localize_batch

QUICK = ["--images", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]



@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Two small generated pictures (no boxes: bench localizes their top-1 class)."""
    images = tmp_path / "pictures"
    images.mkdir()
    yy, xx = np.mgrid[0:120, 0:160]
    for i in range(2):
        rgb = np.stack([xx * 255 // 160, yy * 255 // 120, (xx * yy + 60 * i) % 256], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(images / f"p{i}.png")
    return images


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, ["bench", *(str(a) for a in args)])


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_staged_run_gives_the_same_localizations_as_localize_batch(lite0, fullres_dir: Path, preset: str) -> None:
    paths = sorted((fullres_dir / "images").glob("*.JPEG"))[:3]
    assert len(paths) == 3
    images = [load_image(p) for p in paths]
    config = PRESETS[preset]
    expected = localize_batch(lite0, images, config, [None] * 3)
    clock = StageClock()
    staged = staged_localize(lite0, images, config, [None] * 3, clock)
    for want, got in zip(expected, staged):
        assert got.box == want.box
        assert (got.label, got.probability, got.empty) == (want.label, want.probability, want.empty)
        assert got.layer == want.layer
        assert got.neurons == want.neurons
        assert np.array_equal(got.mask, want.mask)
        assert (got.density is None) == (want.density is None)
        if want.density is not None:
            assert np.array_equal(got.density, want.density)
    ran = {s for s in STAGES if s in clock.entered}
    if preset == "paper":
        assert {"forward", "dam_backward", "guided_backprop", "blobs", "rescoring", "box"} <= ran
    else:  # density mode: no per-neuron maps, no re-scoring
        assert "guided_backprop" not in ran and "rescoring" not in ran
    assert all(clock.seconds[s] > 0 for s in ran)


def test_json_has_the_figures_and_the_ratio_is_the_quotient(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run(folder, *QUICK, "--preset", "default", "--preset", "fast", "--json", out)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    header = document["header"]
    assert {"machine", "torch", "threads", "batch_size", "device", "model", "images", "memory"} <= set(header)
    assert {"platform", "cpu_model", "cpu_count"} <= set(header["machine"])
    assert header["threads"] == 1 and header["images"] == 2 and header["device"] == "cpu"
    assert header["random_weights"] is False
    assert list(document["presets"]) == ["default", "fast"]
    for figures in document["presets"].values():
        assert {"seconds_per_image", "gradcam_seconds_per_image", "ratio", "stages", "peak_rss_mb"} <= set(figures)
        assert set(figures["stages"]) == set(STAGES)
        assert figures["ratio"] == figures["seconds_per_image"] / figures["gradcam_seconds_per_image"]
        assert figures["seconds_per_image"] == pytest.approx(sum(figures["stages"].values()))  # one repeat
        assert figures["gradcam_seconds_per_image"] > figures["gradcam_decode_seconds_per_image"] > 0
    assert document["presets"]["fast"]["stages"]["guided_backprop"] > 0
    assert document["presets"]["default"]["stages"]["guided_backprop"] == 0
    assert "ratio neuroloc / Grad-CAM" in result.stdout and "| default | fast |" in result.stdout


def test_refine_times_the_grabcut_stage(folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("cv2", reason="OpenCV not installed (pip install opencv-python-headless)")
    out = tmp_path / "bench.json"
    result = run(folder, *QUICK, "--refine", "grabcut", "--json", out)
    assert result.exit_code == 0, result.output
    (figures,) = json.loads(out.read_text())["presets"].values()
    assert list(json.loads(out.read_text())["presets"]) == ["default --refine grabcut"]
    assert figures["stages"]["refine"] > 0
    result = run(folder, *QUICK, "--refine", "grabcut", "--preset", "paper")
    assert result.exit_code != 0 and "preset 'paper' has none" in error_lines(result)[0]


def test_random_weights_are_labelled_and_synthetic_images_are_the_default(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run("--random-weights", *QUICK, "--images", "1", "--json", out)
    assert result.exit_code == 0, result.output
    header = json.loads(out.read_text())["header"]
    assert header["random_weights"] is True and "RANDOM WEIGHTS" in header["weights"]
    assert header["source"].startswith("synthetic")
    assert "RANDOM WEIGHTS" in result.stdout
    assert header["input_size"] == 224 and "input 224x224" in result.stdout


def test_input_size_is_used_and_reported(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run("--random-weights", *QUICK, "--images", "1", "--input-size", "96", "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["header"]["input_size"] == 96 and "input 96x96" in result.stdout


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--preset", "nosuch"], "unknown preset 'nosuch'"),
        (["--images", "0"], "--images"),
        (["--repeats", "0"], "--repeats"),
        (["--warmup", "-1"], "--warmup"),
        (["--batch-size", "0"], "--batch-size"),
        (["--threads", "0"], "--threads"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda"], "--device cuda"),
        (["--model", "nosuch"], "unknown model 'nosuch'"),
        (["--weights", "MISSING"], "does not exist"),
        (["--weights", "GARBAGE"], "cannot read weights file"),
        (["--weights", "GARBAGE", "--random-weights"], "exclude each other"),
        (["--json", "."], "is a directory"),
        (["--input-size", "10"], "--input-size"),
        (["--compile", "--warmup", "0"], "--compile compiles in the warm-up: give --warmup 1 or more"),
    ],
)
def test_bad_options_give_one_error_line(folder: Path, tmp_path: Path, options: list[str], expected: str) -> None:
    (tmp_path / "GARBAGE").write_text("not a checkpoint")
    options = [str(tmp_path / o) if o in ("MISSING", "GARBAGE", ".") else o for o in options]
    result = run(folder, *QUICK, *options)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    (line,) = error_lines(result)
    assert expected in line, result.output


def test_a_folder_without_images_and_a_missing_folder_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run(tmp_path / "empty", *QUICK)
    assert result.exit_code != 0 and "no image files" in error_lines(result)[0]
    result = run(tmp_path / "nope", *QUICK)
    assert result.exit_code == 2 and "does not exist" in error_lines(result)[0]


def test_unreadable_images_are_passed_over_and_counted(folder: Path) -> None:
    """A broken file does not stop the bench: it times the first --images readable ones and says which it skipped."""
    (folder / "a_broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    result = run(folder, *QUICK, "--preset", "paper")
    assert result.exit_code == 0, result.output
    assert "bench: passed over" in result.output and "a_broken.jpg" in result.output
    assert "- images: 2 from" in result.output and "(1 unreadable passed over)" in result.output
    for picture in folder.glob("p*.png"):
        picture.write_bytes(b"")
    result = run(folder, *QUICK)
    assert result.exit_code == 1 and error_lines(result) == [f"Error: {folder}: no readable images"]


def test_stage_clock_batches_and_table() -> None:
    clock = StageClock()
    with clock.stage("forward"):
        pass
    assert clock.entered == {"forward"} and clock.seconds["forward"] >= 0
    with pytest.raises(ValueError, match="unknown stage"), clock.stage("nosuch"):
        pass
    assert [len(b) for b in batches(list(range(5)), 2)] == [2, 2, 1]
    stages = dict.fromkeys(STAGES, 0.0) | {"decode": 0.1, "forward": 0.3}
    result = PresetResult("p", stages, ("decode", "forward"), 0.4, 0.1, 0.2, None, None, (0.4,), (0.2,))
    assert result.ratio == 2.0 and result.to_dict()["ratio"] == 2.0
    table = results_table([result])
    assert "| re-scoring forward | – |" in table and "0.3000 (75%)" in table and "**2.0x**" in table
    assert "GFLOPs" not in table and "fit" not in table  # not counted: no rows
    counted = PresetResult("p", stages, ("decode", "forward"), 0.4, 0.1, 0.2, None, None, (0.4,), (0.2,),
                           gflops=3.0, gradcam_gflops=1.5, fit_seconds_per_image=0.2, auto_run_seconds_per_image=0.3)
    table = results_table([counted])
    assert "| conv/matmul FLOP ratio neuroloc / Grad-CAM | 2.0x |" in table
    assert "| ratio with a fit of its own (the Ray engine, --explain, the multi-object options) | 3.0x |" in table
    assert "timed once) | 0.3000 |" in table and "| ratio of that run | 1.5x |" in table


def test_flops_are_counted_with_torchs_formulas_through_leaf_gradients() -> None:
    """A 1x1 convolution of 2 to 3 channels on 4x4 pixels: 2 * 2 * 3 * 16 = 192 forward; torch's own counter
    fails where a gradient is taken with respect to a leaf inside the model, as DAM takes it."""
    import torch

    from neuroloc.bench import gflops_per_image

    conv = torch.nn.Conv2d(2, 3, 1, bias=False)
    x = torch.ones(1, 2, 4, 4)
    assert gflops_per_image(lambda: conv(x)) * 1e9 == 192
    leaf = torch.ones(1, 2, 4, 4, requires_grad=True)
    assert gflops_per_image(lambda: torch.autograd.grad(conv(leaf).sum(), leaf)) * 1e9 > 192  # backward counted


def test_the_default_is_timed_with_feature_directions_fitted_apart(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run(*QUICK, "--images", "20", "--json", out)
    assert result.exit_code == 0, result.output
    header = json.loads(out.read_text())["header"]
    assert header["directions"].startswith("fitted over 20 images in ") and header["directions"].endswith("the fit row)")
    assert "- feature directions: fitted over 20 images" in result.stdout
    fit = json.loads(out.read_text())["presets"]["default"]["fit_seconds_per_image"]
    assert fit > 0 and f"| feature-direction fit alone (once per command), spread over these images | {fit:.4f} |" in result.stdout
    assert "| ratio with a fit of its own " in result.stdout
    auto_run = json.loads(out.read_text())["presets"]["default"]["auto_run_seconds_per_image"]
    assert auto_run > 0 and f"the fit's pass shared (top-1 classes, timed once) | {auto_run:.4f} |" in result.stdout
    result = run(*QUICK, "--images", "20", "--directions", "none", "--preset", "paper", "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["header"]["directions"] == "not used by these presets"
    few = run(*QUICK, "--images", "3", "--json", out)  # auto over 3 images: none, and why
    assert few.exit_code == 0, few.output
    assert json.loads(out.read_text())["header"]["directions"] == "none (auto: fewer than 20 readable images)"


def test_an_unwritable_json_path_is_refused_before_the_benchmark(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = run("--random-weights", *QUICK, "--images", "1", "--json", tmp_path / "file" / "b.json")
    assert result.exit_code == 2 and "'--json'" in error_lines(result)[0]
    assert result.stdout == ""  # no table: nothing was timed


def test_a_json_path_that_is_empty_a_folder_or_an_image_is_refused_before_the_benchmark(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "boxes.csv").write_text("image,synset,label,xmin,ymin,xmax,ymax\n")
    for path, message in (("", "an empty path; give a file name"), (tmp_path, "is a directory"),
                          (tmp_path / "photo.jpg", "photo.jpg is an image; it would be overwritten"),
                          (tmp_path / "boxes.csv", "boxes.csv exists and is no bench result")):
        result = run("--random-weights", *QUICK, "--images", "1", "--json", path)
        assert result.exit_code == 2 and message in error_lines(result)[0] and result.stdout == "", result.output
    assert (tmp_path / "boxes.csv").read_text().startswith("image,synset")
    assert run("--random-weights", *QUICK, "--images", "1", "--json", tmp_path / "b.json").exit_code == 0
    assert run("--random-weights", *QUICK, "--images", "1", "--json", tmp_path / "b.json").exit_code == 0  # its own
    (tmp_path / "empty.json").write_text("")  # made beforehand, as mktemp does
    assert run("--random-weights", *QUICK, "--images", "1", "--json", tmp_path / "empty.json").exit_code == 0


def test_a_dataset_whose_boxes_cannot_be_read_is_said_and_timed_with_top1_classes(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    (tmp_path / "boxes.csv").write_text("image,synset,label,xmin,ymin,xmax,ymax\na.png,n01440764,0,1,1,20\n")
    result = run(tmp_path, *QUICK, "--images", "1")
    assert result.exit_code == 0 and "boxes.csv, line 2" in result.stderr and "top-1 class instead" in result.stderr
    (tmp_path / "boxes.csv").write_text("image,class,xmin,ymin,xmax,ymax\na.png,debris,1,1,20,20\n")  # its own class
    assert run(tmp_path, *QUICK, "--images", "1").exit_code == 0  # timed all the same


def test_directions_fitted_at_another_input_size_are_said_in_the_header(tmp_path: Path) -> None:
    import torch

    from neuroloc.directions import FeatureDirections, save_directions

    channels = {"_blocks.10": 112, "_blocks.14": 192}
    unit = {name: torch.nn.functional.normalize(torch.ones(c), dim=0) for name, c in channels.items()}
    fitted = FeatureDirections("efficientnet_lite0", {n: torch.zeros(c) for n, c in channels.items()}, unit, 20, 224)
    save_directions(fitted, tmp_path / "d224.safetensors")
    out = tmp_path / "bench.json"
    result = run(*QUICK, "--images", "1", "--input-size", "320", "--directions", tmp_path / "d224.safetensors",
                 "--json", out)
    assert result.exit_code == 0, result.output
    assert "was fitted at input size 224, fed 320 here" in result.output
    assert json.loads(out.read_text())["header"]["directions"].endswith("fits it at this size)")

