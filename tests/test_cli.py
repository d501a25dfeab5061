"""The ``neuroloc`` command: JSON Lines output, pictures, broken inputs, bad options, resuming.

Runs the real EfficientNet-Lite0 on a handful of small inputs with one thread and few neurons, so the
whole file takes well under a minute on a shared two-core machine.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from image_cases import BAD_CASES, GOOD_CASES, SIZE, real_images, write_bad_cases, write_good_cases
from neuroloc.cli import find_images, main, unique_names

FAST = ["--threads", "1", "--preset", "fast", "--kmax", "3", "--k", "2"]
RECORD_KEYS = {"image", "width", "height", "model", "predictions", "error"}



@pytest.fixture(scope="module")
def photos() -> list[Path]:
    found = real_images(3)
    if len(found) < 3:
        pytest.skip(f"shared images not found at {Path(__file__).resolve().parents[2] / 'shared'}")
    return found


@pytest.fixture()
def small_image(tmp_path: Path) -> Path:
    path = tmp_path / "small.png"
    Image.radial_gradient("L").convert("RGB").save(path)
    return path


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def by_name(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {Path(r["image"]).name: r for r in lines}


def assert_box_inside(record: dict[str, Any]) -> None:
    assert record["error"] is None, record["error"]
    (prediction,) = record["predictions"]
    x0, y0, x1, y1 = prediction["box"]
    assert 0 <= x0 < x1 <= record["width"] and 0 <= y0 < y1 <= record["height"]
    assert 0 <= prediction["label"] < 1000 and 0 < prediction["score"] <= 1


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error")]


def test_localize_writes_one_line_per_image_and_pictures(tmp_path: Path, photos: list[Path]) -> None:
    out = tmp_path / "out.jsonl"
    result = run("localize", *photos, "-o", out, "--threads", 1, "--kmax", 4, "--k", 2,
                 "--overlay", tmp_path / "overlay", "--explain", tmp_path / "explain")
    assert result.exit_code == 0, result.output
    lines = records(out)
    assert [r["image"] for r in lines] == [str(p) for p in photos]
    for record, photo in zip(lines, photos):
        assert set(record) == RECORD_KEYS and record["model"] == "efficientnet_lite0"
        with Image.open(photo) as raw:
            assert (record["width"], record["height"]) == raw.size
        assert_box_inside(record)
        assert len(record["predictions"][0]["neurons"]) == 4
        with Image.open(tmp_path / "overlay" / f"{photo.stem}.jpg") as drawn:
            assert drawn.size == raw.size
        assert (tmp_path / "explain" / f"{photo.stem}.png").stat().st_size > 10_000
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert "3 localized" in result.stderr


def test_broken_files_get_an_error_line_and_the_rest_go_on(tmp_path: Path, photos: list[Path]) -> None:
    bad = write_bad_cases(tmp_path / "bad")
    good = write_good_cases(tmp_path / "good")
    inputs = [bad["text_as.jpg"], good["gray_L.png"], bad["empty.jpg"], photos[0], bad["truncated.jpg"],
              *[good[name] for name in GOOD_CASES[1:]], bad["bomb.png"]]
    out = tmp_path / "out.jsonl"
    result = run("localize", *inputs, "-o", out, "--batch-size", 4, "--no-neurons", *FAST)
    assert result.exit_code == 1
    assert f"{len(BAD_CASES)} failed" in result.stderr and "Traceback" not in result.output
    lines = by_name(records(out))
    assert len(lines) == len(inputs)
    reasons = {"text_as.jpg": "not an image", "empty.jpg": "empty", "truncated.jpg": "cannot decode",
               "bomb.png": "is over the limit of 89,478,485"}
    for name, reason in reasons.items():
        record = lines[name]
        assert reason in record["error"] and "\n" not in record["error"]
        assert record["predictions"] == [] and record["width"] is None
    for name in (*GOOD_CASES, photos[0].name):
        assert_box_inside(lines[name])
    assert (lines["exif_rotated.jpg"]["width"], lines["exif_rotated.jpg"]["height"]) == SIZE  # upright


def test_images_one_pixel_wide_are_drawn_by_explain_and_a_failing_picture_loses_no_line(
    tmp_path: Path, small_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for size in ((1, 1), (1, 300)):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / f"thin_{size[1]}.png")
    out = tmp_path / "out.jsonl"
    result = run("localize", tmp_path / "thin_1.png", tmp_path / "thin_300.png", "-o", out, "--explain",
                 tmp_path / "steps", "--threads", "1", "--directions", "none")  # density mode: regions outlined
    assert result.exit_code == 0, result.output  # a contour needs 2x2: none is drawn, the figure is
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["thin_1.png", "thin_300.png"]
    import neuroloc.viz

    def broken(*args: Any, **kwargs: Any) -> None:
        raise TypeError("a drawing library's own error")

    monkeypatch.setattr(neuroloc.viz, "explain_figure", broken)
    again = run("localize", small_image, "-o", tmp_path / "again.jsonl", "--explain", tmp_path / "s2", *FAST)
    assert again.exit_code == 1
    (line,) = records(tmp_path / "again.jsonl")
    assert line["error"] == "localized, but cannot save its picture: a drawing library's own error"
    assert line["predictions"]


def test_a_failing_image_does_not_fail_its_batch(
    tmp_path: Path, small_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import neuroloc.pipeline

    real = neuroloc.pipeline.localize_batch
    poison = tmp_path / "poison.png"
    Image.new("RGB", (123, 77), "white").save(poison)

    def fragile(model: Any, images: list[Image.Image], *args: Any, **kwargs: Any) -> Any:
        if any(im.size == (123, 77) for im in images):
            raise RuntimeError("simulated failure\nwith a second line")
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(neuroloc.pipeline, "localize_batch", fragile)
    out = tmp_path / "out.jsonl"
    result = run("localize", small_image, poison, "-o", out, *FAST)
    assert result.exit_code == 1
    lines = by_name(records(out))
    assert lines["poison.png"]["error"] == "localization failed: RuntimeError: simulated failure with a second line"
    assert_box_inside(lines["small.png"])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--kmax", "0"], "--kmax"),
        (["--kmax", "5000"], "'--kmax': 5000 is not in the range 1<=x<=1000"),
        (["--class", ""], "Invalid value for '--class': empty class name"),
        (["--percentile", "150"], "--percentile"),
        (["--kmax", "5", "--k", "7"], "k must be between 1 and kmax=5"),
        (["--morphology", "x9"], "bad morphology step"),
        (["--class", "nosuchthing"], "unknown class 'nosuchthing'"),
        (["--class", "crane"], "ambiguous"),
        (["--model", "nosuch"], "unknown model 'nosuch'"),
        (["--layer", "nosuch"], ("Invalid value for '--layer': layer 'nosuch' not found in the model "
                                "(`neuroloc models layers efficientnet_lite0` lists them)")),
        (["--density-layers", "_blocks.10,nosuch"], "Invalid value for '--density-layers': layer 'nosuch' not found"),
        (["--layer", "_fc"], "(N, C, H, W)"),
        (["--weights", "MISSING"], "does not exist"),
        (["--weights", "GARBAGE"], "cannot read weights file"),
        (["-o", "-", "--resume"], "--resume needs an output file"),
        (["--overlay", "GARBAGE/drawn"], "Invalid value for '--overlay'"),
        (["-o", "GARBAGE/out.jsonl"], "GARBAGE is a file, not a folder"),
        (["--objects", "multi", "--masks", "GARBAGE/m"], "Invalid value for '--masks'"),
        (["-o", "."], "is a folder"),
        (["--similarity", "-1"], "--similarity"),
        (["--mass-power", "0"], "--mass-power"),
        (["--input-size", "32"], "--input-size"),
        (["--input-size", "5000"], "--input-size"),
        (["--similarity", "inf"], "'--similarity': inf is not a finite number"),  # FloatRange lets these through
        (["--level", "nan"], "'--level': nan is not a finite number"),
        (["--min-ratio", "nan"], "'--min-ratio': nan is not a finite number"),
        (["--objects", "multi", "--min-peak", "nan"], "'--min-peak': nan is not a finite number"),
    ],
)
def test_bad_options_give_one_clear_error(tmp_path: Path, small_image: Path, options: list[str], expected: str) -> None:
    (tmp_path / "GARBAGE").write_text("not a checkpoint")
    options = [str(tmp_path / o) if o in ("MISSING", "GARBAGE", ".") or o.startswith("GARBAGE/") else o for o in options]
    result = run("localize", small_image, "-o", tmp_path / "out.jsonl", "--threads", 1, *options)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # no uncaught exception
    (line,) = error_lines(result)
    assert expected in line, result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_source_is_refused(tmp_path: Path) -> None:
    result = run("localize", tmp_path / "nope.jpg", "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and "no such file or folder" in error_lines(result)[0]
    result = run("localize", str(tmp_path / "*.jpg"), "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and "no image files found" in error_lines(result)[0]


def test_a_class_given_by_part_of_its_name_is_named_in_full(tmp_path: Path, small_image: Path) -> None:
    result = run("localize", small_image, "-o", tmp_path / "o.jsonl", *FAST, "--class", "tabb")
    assert result.exit_code == 0 and "class 'tabb' taken as 281 tabby (n02123045)" in result.output
    result = run("localize", small_image, "-o", tmp_path / "p.jsonl", *FAST, "--class", "tabby")
    assert result.exit_code == 0 and "taken as" not in result.output  # a full name: nothing to tell


def test_a_real_process_prints_no_traceback(small_image: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "neuroloc.cli", "localize", str(small_image), "--class", "crane"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "Error: Invalid value for '--class'" in done.stderr


def test_resume_finishes_what_a_kill_left(tmp_path: Path, photos: list[Path]) -> None:
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    first = run("localize", *photos, "-o", out, *FAST)
    assert first.exit_code == 0, first.output
    complete = out.read_text(encoding="utf-8").splitlines(keepends=True)

    # Killed while writing its third line: the .partial file ends in half a line.
    partial.write_text(complete[0] + complete[1] + complete[2][: len(complete[2]) // 2], encoding="utf-8")
    out.unlink()
    assert_resumes(out, photos, redone=1)

    # A finished file missing one line (say, deleted by hand).
    out.write_text(complete[0] + complete[2], encoding="utf-8")
    assert_resumes(out, photos, redone=1)

    # A failed image is tried again.
    failed = dict(json.loads(complete[1]), error="cannot decode image", predictions=[])
    out.write_text(complete[0] + json.dumps(failed) + "\n" + complete[2], encoding="utf-8")
    assert_resumes(out, photos, redone=1)

    # A line that parses but is not a localization (hand-edited, another tool's) is redone, not kept.
    mangled = dict(json.loads(complete[1]), predictions="junk")
    out.write_text(complete[0] + json.dumps(mangled) + "\n" + complete[2], encoding="utf-8")
    assert_resumes(out, photos, redone=1)

    # Nothing to do: the file is left as it is.
    assert_resumes(out, photos, redone=0)


def test_a_run_without_resume_keeps_what_an_interrupted_run_left(tmp_path: Path, small_image: Path) -> None:
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    interrupted = json.dumps({"image": "done-before.jpg", "model": "efficientnet_lite0", "error": None}) + "\n"
    partial.write_text(interrupted, encoding="utf-8")
    result = run("localize", small_image, "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert [r["image"] for r in records(out)] == [str(small_image)]  # started afresh, as documented
    (kept,) = tmp_path.glob("out.jsonl.superseded-*.partial")
    assert kept.read_text(encoding="utf-8") == interrupted
    assert "1 finished line(s) of an interrupted run moved to" in result.stderr and "--resume" in result.stderr


def assert_resumes(out: Path, photos: list[Path], redone: int) -> None:
    result = run("localize", *photos, "-o", out, "--resume", *FAST)
    assert result.exit_code == 0, result.output
    assert f"{redone} localized, {len(photos) - redone} already done" in result.stderr
    lines = records(out)
    assert sorted(r["image"] for r in lines) == sorted(str(p) for p in photos)
    for record in lines:
        assert_box_inside(record)
    assert not out.with_name(out.name + ".partial").exists()


def test_resume_refuses_another_model(tmp_path: Path, small_image: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"image": "x.jpg", "model": "vgg16", "error": None}) + "\n", encoding="utf-8")
    result = run("localize", small_image, "-o", out, "--resume", *FAST)
    assert result.exit_code == 2 and "written with model vgg16" in error_lines(result)[0]


def test_resume_refuses_other_settings_recorded_beside_the_output(tmp_path: Path, small_image: Path, monkeypatch) -> None:
    """A resumed run must not mix lines made with other settings; where pictures go, or how many threads, is no
    change. A file without recorded settings (older versions) resumes as before, with a note; a damaged one is refused."""
    out = tmp_path / "out.jsonl"
    first = run("localize", small_image, "-o", out, *FAST)
    assert first.exit_code == 0, first.output
    recorded = json.loads((tmp_path / "out.jsonl.settings.json").read_text())
    assert recorded["model"] == "efficientnet_lite0" and recorded["config"]["kmax"] == 3 and recorded["class"] is None
    assert not list(tmp_path.glob("*.partial*"))  # the settings went with the finished file
    same = run("localize", small_image, "-o", out, "--resume", *FAST, "--overlay", tmp_path / "drawn")
    assert same.exit_code == 0 and "already done" in same.stderr, same.output
    for extra, change in [(["--kmax", "4"], "config.kmax: 3 -> 4"), (["--class", "tabby"], "class: None -> 281"),
                          (["--intensity", "stretch"], "intensity: range -> stretch")]:
        result = run("localize", small_image, "-o", out, "--resume", *FAST, *extra)
        assert result.exit_code == 2, result.output
        (line,) = error_lines(result)
        assert "out.jsonl was made with other settings (" in line and change in line and "settings.json" in line
    masks = run("localize", small_image, "-o", out, "--resume", *FAST, "--masks", tmp_path / "masks")
    assert masks.exit_code == 2, masks.output  # the finished image would have no mask
    assert error_lines(masks) == [(f"Error: {out} was made with other settings (multi.masks: False -> True; see "
                                  f"{out}.settings.json); its lines and masks would not all have been made alike: resume "
                                  "with the mask options it was made with (--masks, --rle, --coco), or start afresh "
                                  "without --resume")]
    for first, then in ((["--rle"], ["--coco", tmp_path / "c.json"]), (["--coco", tmp_path / "c.json"], [])):
        assert run("localize", small_image, "-o", tmp_path / "rle.jsonl", *FAST, *first).exit_code == 0
        resumed = run("localize", small_image, "-o", tmp_path / "rle.jsonl", "--resume", *FAST, *then)
        assert resumed.exit_code == (0 if then else 2), resumed.output  # --coco implies --rle: same lines
    assert "multi.rle: True -> False" in error_lines(resumed)[0]
    recorded["multi"] = None  # as versions before the twenty-second session recorded a run without multi options
    (tmp_path / "out.jsonl.settings.json").write_text(json.dumps(recorded))
    assert run("localize", small_image, "-o", out, "--resume", *FAST).exit_code == 0
    layered, density = tmp_path / "layered.jsonl", ["--directions", "none", "--kmax", "3"]  # density mode (default)
    given = run("localize", small_image, "-o", layered, *density, "--density-layers", "_blocks.14,_blocks.10,_blocks.14")
    assert given.exit_code == 0, given.output
    recorded_layers = tmp_path / "layered.jsonl.settings.json"
    assert json.loads(recorded_layers.read_text())["config"]["density_layers"] == ["_blocks.10", "_blocks.14"]
    assert records(layered)[0]["predictions"][0]["layer"] == "_blocks.10"  # the lowest's neurons
    reordered = run("localize", small_image, "-o", layered, "--resume", *density, "--density-layers", "_blocks.10,_blocks.14")
    assert reordered.exit_code == 0 and "already done" in reordered.stderr, reordered.output  # the same lines
    earlier = json.loads(recorded_layers.read_text())
    earlier["config"]["density_layers"] = ["_blocks.14", "_blocks.10"]  # as versions that reported _blocks.14's recorded
    recorded_layers.write_text(json.dumps(earlier))
    older = run("localize", small_image, "-o", layered, "--resume", *density, "--density-layers", "_blocks.14,_blocks.10")
    assert older.exit_code == 2 and "reported the neurons of the first density layer listed (_blocks.14)" in older.output
    earlier["config"]["density_layers"] = ["_blocks.10", "_blocks.14", "_blocks.10"]  # the lowest first: the same lines
    recorded_layers.write_text(json.dumps(earlier))
    same = run("localize", small_image, "-o", layered, "--resume", *density, "--density-layers", "_blocks.14,_blocks.10")
    assert same.exit_code == 0 and "already done" in same.stderr, same.output
    import neuroloc.cli as cli

    monkeypatch.setattr(cli, "_layer_aliases", lambda name: {"b10": "_blocks.10"})  # as VGG's conv5_2 is features.27
    earlier["config"]["density_layers"] = ["b10", "_blocks.14"]  # recorded as given, before module names were
    recorded_layers.write_text(json.dumps(earlier))
    aliased = run("localize", small_image, "-o", layered, "--resume", *density, "--density-layers", "_blocks.10,_blocks.14")
    assert aliased.exit_code == 0 and "already done" in aliased.stderr, aliased.output
    neurons = tmp_path / "neurons.jsonl"  # in neurons mode the density layers only feed the confidence: any order
    assert run("localize", small_image, "-o", neurons, *FAST, "--density-layers", "_blocks.10,_blocks.14").exit_code == 0
    recorded_neurons = tmp_path / "neurons.jsonl.settings.json"
    made = json.loads(recorded_neurons.read_text())
    made["config"]["density_layers"] = ["_blocks.14", "_blocks.10"]
    recorded_neurons.write_text(json.dumps(made))
    resumed_neurons = run("localize", small_image, "-o", neurons, "--resume", *FAST, "--density-layers", "_blocks.10,_blocks.14")
    assert resumed_neurons.exit_code == 0 and "already done" in resumed_neurons.stderr, resumed_neurons.output
    (tmp_path / "out.jsonl.settings.json").write_bytes(b'{"model": "efficientnet_lite0", "con')  # cut short
    damaged = run("localize", small_image, "-o", out, "--resume", *FAST, "--kmax", "4")
    assert damaged.exit_code == 2 and error_lines(damaged) == [
        (f"Error: {out}.settings.json cannot be read (JSONDecodeError): what made the finished lines of {out} is "
        "unknown; repair or remove that file (its lines are then kept as they are), or start afresh without --resume")]
    (tmp_path / "out.jsonl.settings.json").unlink()
    older = run("localize", small_image, "-o", out, "--resume", *FAST, "--kmax", "4")
    assert older.exit_code == 0 and (tmp_path / "out.jsonl.settings.json").is_file()
    assert f"note: {out} has no recorded settings" in older.stderr and "1 finished lines are kept" in older.stderr


def test_settings_record_density_layers_by_module_name_in_the_networks_order() -> None:
    """VGG16's conv5_3 and layer11 (conv5_2) are the same layers as features.29 and features.27, in any order."""
    from types import SimpleNamespace

    import torch

    from neuroloc.cli import run_settings
    from neuroloc.config import PRESETS
    from neuroloc.models import get_spec

    spec = get_spec("vgg16")
    with torch.device("meta"):
        vgg = SimpleNamespace(name="vgg16", weights="vgg16-397923af.pth", input_size=224, module=spec.build(), spec=spec)
    for layers in (("conv5_3", "layer11"), ("conv5_2", "conv5_3", "conv5_2"), ("features.29", "features.27")):
        settings = run_settings(vgg, PRESETS["default"].with_options(density_layers=layers), None, "range", True)  # type: ignore[arg-type]
        assert tuple(settings["config"]["density_layers"]) == ("features.27", "features.29"), layers


def test_settings_of_a_mask_run_written_before_masks_were_recorded_resume(tmp_path: Path, small_image: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert run("localize", small_image, "-o", out, *FAST, "--coco", tmp_path / "c.json").exit_code == 0
    settings = tmp_path / "out.jsonl.settings.json"
    recorded = json.loads(settings.read_text())
    del recorded["multi"]["masks"], recorded["multi"]["rle_option"]
    recorded["multi"]["rle"] = False  # as 58c703d recorded --coco (its "rle" was --rle alone)
    settings.write_text(json.dumps(recorded))
    again = run("localize", small_image, "-o", out, "--resume", *FAST, "--coco", tmp_path / "c.json")
    assert again.exit_code == 0 and "already done" in again.stderr, again.output
    recorded["multi"]["rle"] = True  # an --rle run of that version: resumed without --rle, its lines would mix
    settings.write_text(json.dumps(recorded))
    mixed = run("localize", small_image, "-o", out, "--resume", *FAST)
    assert mixed.exit_code == 2 and "multi.rle: True -> False" in error_lines(mixed)[0], mixed.output
    settings.write_text(json.dumps(recorded))
    assert run("localize", small_image, "-o", out, "--resume", *FAST, "--rle").exit_code == 0
    settings.write_text(json.dumps(recorded))
    other = run("localize", small_image, "-o", out, "--resume", *FAST, "--kmax", "4", "--masks", tmp_path / "m")
    assert other.exit_code == 2 and "resume with the same options" in error_lines(other)[0]  # not only masks


def test_settings_a_newer_version_adds_at_their_default_are_no_change() -> None:
    from neuroloc.config import LocalizeConfig
    from neuroloc.jsonl import settings_changes

    defaults = {"config": LocalizeConfig().to_dict()}
    current = {"model": "m", "config": LocalizeConfig().to_dict()}
    older = {"model": "m", "config": {k: v for k, v in current["config"].items() if k != "refine"}}
    assert settings_changes(older, current, defaults) == []
    refined = {"model": "m", "config": {**current["config"], "refine": "grabcut"}}
    assert settings_changes(older, refined, defaults) == ["config.refine: (not set) -> grabcut"]
    assert settings_changes({**current, "gone": 1}, current, defaults) == ["gone: 1 -> (not set)"]


def test_output_to_stdout(small_image: Path) -> None:
    result = run("localize", small_image, "-o", "-", "--no-neurons", *FAST)
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert record["image"] == str(small_image) and "neurons" not in record["predictions"][0]
    assert set(record["predictions"][0]["confidence_parts"]) == {"stability", "concentration", "agreement"}  # kept
    assert_box_inside(record)
    assert "results in stdout" in result.stderr


def test_sources_expand_folders_and_globs_sorted_and_once(tmp_path: Path) -> None:
    for rel in ("b/2.png", "b/deep/1.JPG", "a.jpg", "notes.dat"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = find_images([str(tmp_path / "b"), str(tmp_path / "*.jpg"), str(tmp_path / "b" / "2.png"),
                         str(tmp_path / "notes.dat")])  # a file named is taken whatever its suffix (but a manifest's)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["b/2.png", "b/deep/1.JPG", "a.jpg", "notes.dat"]


def test_picture_names_stay_unique() -> None:
    names = unique_names([Path("a/x.jpg"), Path("b/x.png"), Path("x_2.jpg"), Path("y.jpg")])
    assert list(names.values()) == ["x", "x_2", "x_2_2", "y"]
    # names differing only in case are one file on a case-insensitive disk (macOS, Windows): told apart too
    assert list(unique_names([Path("a/My Cat.jpg"), Path("b/my cat.JPG")]).values()) == ["My Cat", "my cat_2"]
    # a file of this machine is named as its system does: a backslash is part of a Linux name, not a folder
    assert list(unique_names([Path("q\"uote\\.jpg")]).values()) == (["q\"uote\\"] if os.sep == "/" else [".jpg"])
    # a name near the 255-byte limit leaves room for the pictures' suffixes ("_12_heat.jpg"), still unique
    long = unique_names([Path("é" * 127 + ".png"), Path("é" * 126 + "x.png")])
    assert all(len((n + "_12_heat.jpg").encode()) <= 255 for n in long.values()) and list(long.values()) == ["é" * 100, "é" * 100 + "_2"]


def test_resume_keeps_the_picture_names_of_the_images_it_finished(tmp_path: Path, photos: list[Path]) -> None:
    """An image added before --resume whose name sorts first must not take a finished image's picture names
    (it would write over its overlay and masks)."""
    source = tmp_path / "photos"
    (source / "b").mkdir(parents=True)
    (source / "b" / "x.jpg").write_bytes(photos[0].read_bytes())
    out = tmp_path / "out.jsonl"
    args = ["-o", out, "--overlay", tmp_path / "drawn", "--masks", tmp_path / "masks", *FAST]
    assert run("localize", source, *args).exit_code == 0
    overlay, mask = (tmp_path / "drawn" / "x.jpg").read_bytes(), (tmp_path / "masks" / "x_0.png").read_bytes()
    (source / "a").mkdir()
    (source / "a" / "x.jpg").write_bytes(photos[1].read_bytes())
    assert run("localize", source, *args, "--resume").exit_code == 0
    assert {p.name for p in (tmp_path / "drawn").iterdir()} == {"x.jpg", "x_2.jpg"}
    assert {p.name for p in (tmp_path / "masks").iterdir()} == {"x_0.png", "x_2_0.png"}
    assert (tmp_path / "drawn" / "x.jpg").read_bytes() == overlay and (tmp_path / "masks" / "x_0.png").read_bytes() == mask
    recorded = json.loads((tmp_path / "out.jsonl.settings.json").read_text())["picture_names"]
    assert sorted(recorded.values()) == ["x", "x_2"]


def test_recorded_picture_names_are_plain_stems_only() -> None:
    from neuroloc.cli import PICTURE_NAMES, recorded_picture_names

    settings = {PICTURE_NAMES: {"/p/a.jpg": "a", "/p/b.jpg": "../b", "/p/c.jpg": "..", "/p/d.jpg": "", "/p/e.jpg": 3}}
    assert recorded_picture_names(settings) == {"/p/a.jpg": "a"}
    assert recorded_picture_names({PICTURE_NAMES: ["a"]}) == recorded_picture_names(None) == {}
    names = unique_names([Path("/p/a.jpg"), Path("/q/a.jpg"), Path("/p/b.jpg")], {"/q/a.jpg": "a", "/gone/b.jpg": "b"})
    assert names == {Path("/p/a.jpg"): "a_2", Path("/q/a.jpg"): "a", Path("/p/b.jpg"): "b_2"}


def test_models_classes_and_version() -> None:
    listing = run("models")
    assert listing.exit_code == 0 and "efficientnet_lite0" in listing.output and "_blocks.10" in listing.output
    assert "present" in listing.output.split("efficientnet_lite1")[0]
    resnet = listing.output.split("resnet50_keras\n")[1].split("squeezenet1_1\n")[0]
    assert "default preset here with: cut=fraction, level=0.3, similarity=0.0, objectness=0.0 (" in resnet
    assert "large preset here with: mass_power=2.0" in resnet
    found = run("classes", "tabby")
    assert found.exit_code == 0 and "281  n02123045  tabby" in found.output
    assert run("classes", "zzzz").exit_code == 1
    version = run("--version")
    assert version.exit_code == 0 and "0.1.0" in version.output
    assert "localize" in run("--help").output


def test_main_help_lists_every_command_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from neuroloc.cli import main\n"
        "out = CliRunner().invoke(main, ['--help']).output\n"
        "print(out)\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("bench", "classes", "evaluate", "export", "localize", "models", "view"):
        assert f"\n  {command} " in out
    assert out.rstrip().endswith("torch not loaded")


def test_python_dash_m_runs_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "neuroloc", "classes", "tabby"], capture_output=True, text=True)
    assert done.returncode == 0 and "281  n02123045  tabby" in done.stdout
    usage = subprocess.run([sys.executable, "-m", "neuroloc", "localize"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Usage: neuroloc localize" in usage.stderr


@pytest.mark.parametrize("command", ["evaluate", "bench", "export", "view"])
def test_lazy_commands_load_when_asked_for(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {command}" in result.output or f"Usage: neuroloc {command}" in result.output


def test_level_alone_means_the_fraction_cut_and_mass_alone_the_mass_cut() -> None:
    from neuroloc.cli import build_config

    assert build_config("default").cut == "otsu"
    assert build_config("default", cut="otsu").cut == "otsu"
    assert (build_config("default", level=0.4).cut, build_config("default", level=0.4).level) == ("fraction", 0.4)
    assert (build_config("paper", mass=0.8).cut, build_config("paper", mass=0.8).mass) == ("mass", 0.8)
    assert build_config("default", cut="mass", level=0.4).cut == "mass"
    earlier = build_config("default", similarity=0.0, mass=0.9, mass_power=2.5)  # the votes-only default before
    assert (earlier.similarity, earlier.mass, earlier.mass_power, earlier.cut) == (0.0, 0.9, 2.5, "mass")


def test_intensity_stretch_reads_twelve_bit_photos_like_their_eight_bit_originals(tmp_path: Path, photos: list[Path]) -> None:
    """12-bit data in 16-bit files: read by the type's range they are nearly black and misclassified;
    stretched, they get the classes of the same photos as 8-bit grey images (19 of 20 on the full-resolution set)."""
    import numpy as np

    from neuroloc.imageio import load_image

    for folder in ("eight", "twelve"):
        (tmp_path / folder).mkdir()
    for photo in photos:
        grey = np.asarray(load_image(photo).convert("L"), dtype=np.uint16)
        Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight" / f"{photo.stem}.png")
        Image.fromarray(grey * 16 + 7).save(tmp_path / "twelve" / f"{photo.stem}.png")
    labels = {}
    for name, folder, extra in [("eight", "eight", []), ("range", "twelve", []),
                                ("stretch", "twelve", ["--intensity", "stretch"])]:
        out = tmp_path / f"{name}.jsonl"
        result = run("localize", tmp_path / folder, "-o", out, "--threads", "1", *extra)
        assert result.exit_code == 0, result.output
        labels[name] = [r["predictions"][0]["label"] for r in sorted(records(out), key=lambda r: r["image"])]
        dim_notice = f"{len(photos)} images of more than 8 bits per sample have 99.5% of their pixels in the lowest 25%"
        assert (dim_notice in result.stderr) == (name == "range"), result.stderr  # the hint to stretch them
    assert labels["stretch"] == labels["eight"]
    assert labels["range"] != labels["eight"]
    assert "Invalid value for '--intensity'" in run("localize", tmp_path / "twelve", "--intensity", "loud").output


def test_an_output_that_cannot_be_written_is_refused_before_any_work(small_image: Path, tmp_path: Path) -> None:
    """A path under a file (or a read-only disk) fails in one line up front, not with a traceback after the batch."""
    blocked = tmp_path / "a_file.txt"
    blocked.write_text("in the way")
    dataset = tmp_path / "data"
    (dataset / "images").mkdir(parents=True)
    (dataset / "images" / "a.png").write_bytes(small_image.read_bytes())
    (dataset / "boxes.csv").write_text("image,synset,label,xmin,ymin,xmax,ymax\na.png,n01440764,0,10,10,200,200\n")
    commands = {
        "localize": ["localize", small_image, "-o", blocked / "out.jsonl"],
        "localize --coco": ["localize", small_image, "-o", tmp_path / "ok.jsonl", "--coco", blocked / "c.json"],
        "calibrate": ["calibrate", small_image, "-o", blocked / "d.safetensors"],
        "evaluate": ["evaluate", dataset, "--method", "center", "--output", blocked / "run"],
    }
    for name, args in commands.items():
        result = run(*args)
        assert result.exit_code == 2, (name, result.output)
        (line,) = [line for line in result.output.splitlines() if line.startswith("Error")]
        option = "'--coco'" if name.endswith("--coco") else "'--output'"
        assert f"Invalid value for {option}: cannot write into {blocked}" in line, (name, line)
    assert not (tmp_path / "ok.jsonl").exists()  # refused before localizing


def test_heatmaps_draw_the_map_each_region_is_cut_from(tmp_path: Path, photos: list[Path]) -> None:
    import numpy as np

    photo = photos[0]
    result = run("localize", photo, "-o", tmp_path / "out.jsonl", "--threads", "1", "--top", "2",
                 "--heatmaps", tmp_path / "heat", "--masks", tmp_path / "masks")
    assert result.exit_code == 0, result.output
    with Image.open(photo) as original:
        size = original.size
    for j in (0, 1):
        grey = Image.open(tmp_path / "heat" / f"{photo.stem}_{j}_map.png")
        heat = Image.open(tmp_path / "heat" / f"{photo.stem}_{j}_heat.jpg")
        assert grey.mode == "L" and grey.size == heat.size == size
        values = np.asarray(grey, dtype=np.float32)
        mask = np.asarray(Image.open(tmp_path / "masks" / f"{photo.stem}_{j}.png")) > 0
        assert values.max() >= 250 and values[mask].mean() > 2 * values[~mask].mean()  # the region is where it is high
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "heat" / f"{photo.stem}_0_map.png")),
                              np.asarray(Image.open(tmp_path / "heat" / f"{photo.stem}_1_map.png")))  # one map a class
    refused = run("localize", photo, "-o", tmp_path / "x.jsonl", "--heatmaps", tmp_path / "h2", "--tile", "128",
                  "--class", "tabby")
    assert refused.exit_code == 2 and "it does not work with --tile" in error_lines(refused)[0]
    assert not (tmp_path / "h2").exists()


def test_neurons_mode_heat_maps_count_the_kept_blobs_over_each_pixel(tmp_path: Path, photos: list[Path]) -> None:
    import numpy as np

    from neuroloc.pipeline import Localizer
    from neuroloc.viz import map_at_image_size, region_source_map

    photo = photos[0]
    result = Localizer(preset="paper").localize(photo, keep_maps=True)
    kept = [j for j, neuron in enumerate(result.neurons) if neuron.kept]
    share = region_source_map(result)
    count = result.blobs[kept].sum(axis=0)
    assert len(kept) == 5 and share.shape == result.blobs.shape[1:] and share.max() == 1.0
    assert np.allclose(share, count / count.max())  # how many of the 5 kept blobs cover each pixel
    assert np.array_equal(share > 0, result.blobs[kept].any(axis=0))  # its non-zero part is the union
    covered = map_at_image_size(result) > 0.1
    assert (covered & result.mask).sum() / (covered | result.mask).sum() > 0.8  # the union, at the image's size
    out = run("localize", photo, "-o", tmp_path / "out.jsonl", "--threads", "1", "--preset", "paper",
              "--heatmaps", tmp_path / "heat")
    assert out.exit_code == 0, out.output
    grey = np.asarray(Image.open(tmp_path / "heat" / f"{photo.stem}_0_map.png"))
    assert grey.max() == 255 and grey.shape == result.mask.shape
    assert (tmp_path / "heat" / f"{photo.stem}_0_heat.jpg").exists()


def test_a_result_without_a_map_has_no_heat_picture() -> None:
    import numpy as np

    from neuroloc.result import Localization
    from neuroloc.viz import map_at_image_size

    bare = Localization(box=(0, 0, 4, 4), label=1, synset=None, name="x", probability=0.5, neurons=(),
                        mask=np.ones((4, 4), bool), image_size=(4, 4), layer="l")
    with pytest.raises(ValueError, match="heat maps come from density mode or from neurons mode's kept blobs"):
        map_at_image_size(bare)


def test_localize_takes_a_manifest_of_images(tmp_path: Path, small_image: Path) -> None:
    """A list of files (relative to the list's folder) for batches too long for a command line; a listed file
    that is missing becomes its own error line, and the run goes on."""
    (tmp_path / "sub").mkdir()
    other = tmp_path / "sub" / "other.png"
    other.write_bytes(small_image.read_bytes())
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# images to do\n{small_image.name}\n\nsub/other.png\nsub/missing.png\n")
    out = tmp_path / "out.jsonl"
    result = run("localize", manifest, "-o", out, *FAST)
    assert result.exit_code == 1, result.output  # one listed file is missing
    lines = {Path(r["image"]).name: r for r in records(out)}
    assert set(lines) == {"small.png", "other.png", "missing.png"}
    assert lines["missing.png"]["error"].endswith("no such file") and lines["other.png"]["error"] is None
    (tmp_path / "empty.txt").write_text("# nothing\n")
    empty = run("localize", tmp_path / "empty.txt", "-o", out)
    assert empty.exit_code == 2 and "manifest" in error_lines(empty)[0] and "lists no images" in error_lines(empty)[0]


def test_a_manifest_s_class_column_gives_each_image_its_own_classes(tmp_path: Path, photos: list[Path]) -> None:
    """Image-level labels (a dataset to bootstrap boxes for): each image is localized for the classes its rows
    name, in row order; an image without one gets its top-1; the same box as --class for a single class."""
    from neuroloc.sources import manifest_classes

    one, two, none = photos
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,class\n{one},tabby\n{two},n01443537\n{two},281\n{two},goldfish\n{none},\n",
                        encoding="utf-8")
    assert manifest_classes([str(manifest)]) == {one: ["tabby"], two: ["n01443537", "281", "goldfish"]}
    out = tmp_path / "out.jsonl"
    result = run("localize", manifest, "-o", out, "--threads", "1")
    assert result.exit_code == 0, result.output
    lines = {Path(r["image"]): r for r in records(out)}
    assert [p["label"] for p in lines[one]["predictions"]] == [281]
    assert [p["label"] for p in lines[two]["predictions"]] == [1, 281]  # goldfish, named twice, once
    alone = tmp_path / "alone.jsonl"
    assert run("localize", one, "-o", alone, "--threads", "1", "--class", "tabby").exit_code == 0
    assert lines[one]["predictions"] == records(alone)[0]["predictions"]
    assert len(lines[none]["predictions"]) == 1  # the top-1
    for extra, flag in ((["--class", "tabby"], "--class"), (["--top", "2"], "--top"), (["--classes", "tabby"], "--classes")):
        refused = run("localize", manifest, "-o", tmp_path / "x.jsonl", *extra)
        assert refused.exit_code == 2 and f"'class' column names each image's classes; leave out {flag}" in refused.output
    for extra in ([], ["--class", "tabby"]):  # the same advice with and without --class: no circle between two refusals
        tiled = run("localize", manifest, "-o", tmp_path / "x.jsonl", "--tile", "64", *extra)
        assert tiled.exit_code == 2 and "'class' column does not work with --tile" in tiled.output
        assert "list the images without it" in tiled.output
    manifest.write_text(f"path,class\n{one},tabby\n,canoe\n", encoding="utf-8")  # a class without its image
    pathless = run("localize", manifest, "-o", tmp_path / "x.jsonl")
    assert pathless.exit_code == 2 and "cannot read manifest: line 3 of labels.csv has no path" in pathless.output
    manifest.write_text(f"path,class\n{one},no such animal\n", encoding="utf-8")
    unknown = run("localize", manifest, "-o", tmp_path / "x.jsonl", "--threads", "1")
    assert unknown.exit_code == 2 and "unknown class 'no such animal'" in unknown.output and one.name in unknown.output
    manifest.write_text(f"path,class\n{one},goldfish\n", encoding="utf-8")  # other classes: no resume into out
    resumed = run("localize", manifest, "-o", out, "--threads", "1", "--resume")
    assert resumed.exit_code != 0 and "image_classes" in resumed.output


def test_max_pixels_sets_the_largest_image_for_the_command_only(tmp_path: Path, small_image: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    out = tmp_path / "out.jsonl"
    small = run("localize", small_image, "-o", out, "--max-pixels", 1000, *FAST)  # the picture has 65,536
    assert small.exit_code == 1, small.output
    (line,) = records(out)
    assert "256x256 pixels is over the limit of 1,000;" in line["error"] and "--max-pixels" in line["error"]
    assert before == Image.MAX_IMAGE_PIXELS  # restored when the command ends
    assert run("localize", small_image, "-o", out, *FAST).exit_code == 0
    assert run("localize", small_image, "-o", out, "--max-pixels", 0).exit_code == 2


def test_manifests_txt_csv_parquet(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "list.txt").write_text("# a comment\nsub/a.jpg\n\n/abs/b.png\n", encoding="utf-8")
    (tmp_path / "list.csv").write_text("id,image\n1,sub/a.jpg\n2,c.jpg\n", encoding="utf-8")
    (tmp_path / "bad.csv").write_text("id,file\n1,a.jpg\n", encoding="utf-8")
    assert find_images([str(tmp_path / "list.txt")]) == [tmp_path / "sub" / "a.jpg", Path("/abs/b.png")]
    # listed in two manifests: once, first place kept
    assert find_images([str(tmp_path / "list.txt"), str(tmp_path / "list.csv")]) == [
        tmp_path / "sub" / "a.jpg", Path("/abs/b.png"), tmp_path / "c.jpg"]
    import click

    with pytest.raises(click.BadParameter, match="no 'path' or 'image' column"):
        find_images([str(tmp_path / "bad.csv")])
    pa = pytest.importorskip("pyarrow", reason="pyarrow (installed with ray[data]) reads .parquet manifests")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x.jpg", "sub/y.jpg"], "n": [1, 2]}), tmp_path / "list.parquet")
    assert find_images([str(tmp_path / "list.parquet")]) == [tmp_path / "x.jpg", tmp_path / "sub" / "y.jpg"]


def test_a_file_name_in_another_encoding_is_localized_resumed_and_exported(tmp_path: Path) -> None:
    """A Latin-1 name (bytes that are not UTF-8) is one image among others, not a crash of the batch: its line
    holds the name with JSON escapes that read back to the same file, and every export format writes it."""
    import os

    folder = tmp_path / "d"
    folder.mkdir()
    odd = os.fsencode(folder) + b"/caf\xe9.jpg"
    try:
        Image.new("RGB", (64, 48), (200, 30, 30)).save(odd)
    except OSError:
        pytest.skip("this file system takes only UTF-8 names")
    Image.new("RGB", (64, 48), (30, 200, 30)).save(folder / "z.jpg")
    out = tmp_path / "out.jsonl"
    result = run("localize", folder, "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    lines = out.read_bytes().decode("utf-8").splitlines()  # still valid UTF-8
    images = [json.loads(line)["image"] for line in lines]
    assert os.fsencode(images[0]) == odd and all(json.loads(line)["error"] is None for line in lines)
    assert "already done" in run("localize", folder, "-o", out, "--resume", *FAST).stderr
    for kind in ("coco", "csv", "yolo", "voc", "labelstudio"):
        exported = run("export", out, "--format", kind, "--out", tmp_path / kind)
        assert exported.exit_code == 0, (kind, exported.output)
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_bytes().decode("utf-8"))
    assert os.fsencode(coco["images"][0]["file_name"]).endswith(b"caf\xe9.jpg")


def test_results_are_as_readable_as_other_files_the_user_writes(tmp_path: Path, small_image: Path) -> None:
    import os
    import stat

    previous = os.umask(0o022)
    try:
        out = tmp_path / "out.jsonl"
        assert run("localize", small_image, "-o", out, *FAST).exit_code == 0
        exported = run("export", out, "--format", "coco", "--out", tmp_path / "coco")
        assert exported.exit_code == 0, exported.output
    finally:
        os.umask(previous)
    for path in (out, tmp_path / "out.jsonl.settings.json", tmp_path / "coco" / "annotations.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_relative_image_paths_are_taken_from_the_folder_the_run_started_in(
    tmp_path: Path, small_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume from another folder would match no line and redo (and repeat) every image: it is refused; an
    export from another folder links and lists the images the lines name."""
    import shutil

    (tmp_path / "imgs").mkdir()
    shutil.copy(small_image, tmp_path / "imgs" / "a.png")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run("localize", "imgs", "-o", "out.jsonl", *FAST).exit_code == 0
    assert json.loads(Path("out.jsonl.settings.json").read_text())["folder"] == str(tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    moved = run("localize", "../imgs", "-o", "../out.jsonl", "--resume", *FAST)
    assert moved.exit_code == 2 and f"relative to {tmp_path}, where it was started" in error_lines(moved)[0]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1
    exported = run("export", "../out.jsonl", "--format", "yolo", "--out", "y")
    assert exported.exit_code == 0, exported.output
    assert Path("y/images.txt").read_text() == f"{tmp_path / 'imgs' / 'a.png'}\n"
    assert (Path("y/images/a.png").resolve() == (tmp_path / "imgs" / "a.png").resolve())
    monkeypatch.chdir(tmp_path)
    assert "already done" in run("localize", "imgs", "-o", "out.jsonl", "--resume", *FAST).stderr


def test_a_second_run_on_the_same_output_stops_at_once(tmp_path: Path, small_image: Path) -> None:
    from neuroloc.jsonl import exclusive_output

    out = tmp_path / "out.jsonl"
    with exclusive_output(out):  # as a first run holds it
        second = run("localize", small_image, "-o", out, *FAST)
        assert second.exit_code == 1 and f"another run is writing {out}" in error_lines(second)[0]
        assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()
    done = run("localize", small_image, "-o", out, *FAST)
    assert done.exit_code == 0 and out.is_file()
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_an_output_that_is_also_a_source_is_refused(tmp_path: Path, small_image: Path) -> None:
    before = small_image.read_bytes()
    result = run("localize", small_image, "-o", small_image, *FAST)
    assert result.exit_code == 2 and "is also among SOURCES" in error_lines(result)[0]
    assert small_image.read_bytes() == before
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{small_image}\n")
    assert run("localize", manifest, "-o", manifest, *FAST).exit_code == 2


def test_outputs_that_would_overwrite_an_image_or_the_results_are_refused(tmp_path: Path, small_image: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    image = folder / "a.png"
    image.write_bytes(small_image.read_bytes())
    out = tmp_path / "out.jsonl"
    cases = [
        (["-o", image], "'--output': " + f"{image} is one of the images it reads"),  # found in the folder given
        (["-o", out, "--coco", image], f"'--coco': {image} is also among SOURCES"),
        (["-o", out, "--coco", out], "is the output or a file kept beside it"),
        (["-o", out, "--coco", tmp_path / "out.jsonl.settings.json"], "is the output or a file kept beside it"),
    ]
    for options, expected in cases:
        sources = [image] if "--coco" in options and options[-1] == image else [folder]
        result = run("localize", *sources, *options, *FAST)
        assert result.exit_code == 2 and expected in error_lines(result)[0], (options, result.output)
    assert image.read_bytes() == small_image.read_bytes() and not out.exists()
    found = run("localize", folder, "-o", out, "--coco", image, *FAST)  # the image found in the folder, as --coco
    assert found.exit_code == 2 and f"'--coco': {image} is one of the images" in error_lines(found)[0]
    link = tmp_path / "link.png"
    link.symlink_to(image)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{image}\n", encoding="utf-8")
    for sources, target in (([link], image), ([image], link), ([manifest], image)):  # through a link or a manifest
        result = run("localize", *sources, "-o", target, *FAST)
        assert result.exit_code == 2 and "it would be overwritten" in error_lines(result)[0], (sources, target)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for option in ("-o", "--coco"):
        special = run("localize", image, *(["-o", out] if option == "--coco" else []), option, fifo, *FAST)
        assert special.exit_code == 2 and "is not a regular file (a device or a pipe)" in error_lines(special)[0]
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    calibrated = run("calibrate", folder, "-o", image)
    assert calibrated.exit_code == 2 and "is one of the images it reads" in error_lines(calibrated)[0]
    assert image.read_bytes() == small_image.read_bytes()


def test_manifests_with_a_byte_order_mark_read_as_without(tmp_path: Path, small_image: Path) -> None:
    (tmp_path / "list.txt").write_text(f"{small_image}\n", encoding="utf-8-sig")
    (tmp_path / "list.csv").write_text(f"path,class\n{small_image},tabby\n", encoding="utf-8-sig")  # Excel's CSV UTF-8
    assert find_images([str(tmp_path / "list.txt")]) == find_images([str(tmp_path / "list.csv")]) == [small_image]


def test_a_recursive_glob_through_a_link_loop_gives_each_file_once(tmp_path: Path) -> None:
    import os

    (tmp_path / "loop" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "loop" / "a" / "ok.jpg")
    os.symlink("..", tmp_path / "loop" / "a" / "up")
    found = find_images([str(tmp_path / "loop" / "**" / "*.jpg")])
    assert found == [tmp_path / "loop" / "a" / "ok.jpg"]


def test_a_folder_s_broken_links_get_error_lines_and_unreadable_folders_are_told(
    tmp_path: Path, small_image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(small_image, folder / "a.png")
    (folder / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    (folder / "c.jpg").symlink_to(folder / "c.jpg")  # a loop
    os.mkfifo(folder / "d.png")  # a pipe named like an image is no image (reading it would wait for ever)
    out = tmp_path / "out.jsonl"
    done = run("localize", str(folder), "-o", str(out), "--directions", "none")
    lines = {Path(r["image"]).name: r["error"] for r in map(json.loads, out.read_text().splitlines())}
    assert done.exit_code == 1 and lines["a.png"] is None, done.output
    assert "no such file (a link to nothing)" in lines["b.jpg"] and "Too many levels of symbolic links" in lines["c.jpg"]

    walk = os.walk

    def walk_with_a_locked_folder(top, onerror=None, **kwargs):  # as root no folder is unreadable
        onerror(PermissionError(13, "Permission denied", str(folder / "locked")))
        yield from walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(os, "walk", walk_with_a_locked_folder)
    assert [p.name for p in find_images([str(folder)])] == ["a.png", "b.jpg", "c.jpg"]
    told = capsys.readouterr().err
    assert "1 folder(s) under" in told and "their images are left out (e.g." in told and "locked: Permission denied" in told


def test_sources_that_cannot_be_looked_up_become_error_lines_not_manifest_errors(tmp_path: Path, small_image: Path) -> None:
    out = tmp_path / "out.jsonl"
    long_name = str(tmp_path / ("y" * 300 + ".csv"))
    done = run("localize", str(small_image), long_name, "-o", str(out), "--directions", "none")
    errors = [r["error"] for r in map(json.loads, out.read_text().splitlines())]
    assert done.exit_code == 1 and "manifest" not in done.output, done.output
    assert errors[0] is None and "cannot read (File name too long)" in errors[1]


def test_pictures_written_into_a_source_folder_are_not_localized_next_time(tmp_path: Path, small_image: Path) -> None:
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(small_image, photos / "a.png")
    for again in (False, True):
        result = run("localize", photos, "-o", tmp_path / "out.jsonl", "--overlay", photos / "drawn", *FAST)
        assert result.exit_code == 0, result.output
        assert [json.loads(line)["image"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [
            str(photos / "a.png")]
        said = f"left out 1 image in the folders this run writes pictures into (--overlay, --masks ...), e.g. {photos}"
        assert (said in result.output) == again  # the first run's overlay, left out and said
    assert (photos / "drawn" / "a.jpg").is_file()
    same = run("localize", photos / "drawn", "-o", tmp_path / "o2.jsonl", "--overlay", photos / "drawn", *FAST)
    assert same.exit_code == 2 and "every image lies in a folder this run writes pictures into" in error_lines(same)[0]
    (photos / "sub").mkdir()
    shutil.copy(small_image, photos / "sub" / "a.jpg")  # its overlay, photos/a.jpg, would replace this photo
    shutil.copy(small_image, photos / "a.jpg")
    above = run("localize", photos, "-o", tmp_path / "o3.jsonl", "--overlay", photos, *FAST)
    assert above.exit_code == 2 and "every image lies in a folder" in error_lines(above)[0], above.output


def test_outputs_that_would_clash_with_pictures_or_be_empty_are_refused_before_any_work(small_image: Path, tmp_path: Path) -> None:
    pictures = tmp_path / "pictures"
    cases = [(["-o", ""], "'--output': an empty path; give a file name"),
             (["-o", tmp_path], f"'--output': {tmp_path} is a folder; give a file name"),
             (["-o", tmp_path / "r.jsonl", "--coco", ""], "'--coco': an empty path"),
             (["-o", pictures / "a.png", "--explain", pictures], "is named like a picture in a folder this run writes"),
             (["-o", tmp_path / "r.jsonl", "--overlay", pictures, "--coco", pictures / "a.jpg"], "'--coco': "),
             (["-o", tmp_path / "r.jsonl", "--explain", pictures, "--masks", pictures], "--explain and --masks name the same folder"),
             (["-o", tmp_path / "r.jsonl", "--overlay", pictures, "--heatmaps", pictures], "--overlay and --heatmaps name"),
             (["-o", tmp_path / "r.jsonl", "--explain", pictures, "--heatmaps", pictures], "--explain and --heatmaps name")]
    for options, message in cases:
        result = run("localize", small_image, *FAST, *options)
        assert result.exit_code == 2 and message in error_lines(result)[0], (options, result.output)
    fine = run("localize", small_image, *FAST, "-o", pictures / "results.jsonl", "--overlay", pictures,
               "--masks", pictures)  # their names never clash: <name>.jpg and <name>_<j>.png
    assert fine.exit_code == 0, fine.output  # results beside the pictures, under a name no picture takes


def test_outputs_replace_only_earlier_outputs_not_someones_data(tmp_path: Path, small_image: Path) -> None:
    """-o, --coco and calibrate's -o may replace what an earlier run wrote, never a file of other contents."""
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,label,xmin,ymin,xmax,ymax\na.jpg,1,0,0,5,5\n")
    for options, message in ((["-o", boxes], f"'--output': {boxes} exists and is not an earlier results file"),
                             (["-o", tmp_path / "r.jsonl", "--coco", boxes], f"'--coco': {boxes} exists and is not a COCO results file")):
        result = run("localize", small_image, *FAST, *options)
        assert result.exit_code == 2 and message in error_lines(result)[0], result.output
    truth = tmp_path / "instances_val.json"  # a dataset's COCO annotations have images and annotations too
    truth.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}))
    refused = run("localize", small_image, *FAST, "-o", tmp_path / "r.jsonl", "--coco", truth)
    assert refused.exit_code == 2 and "is not a COCO results file" in error_lines(refused)[0], refused.output
    assert json.loads(truth.read_text())["images"] == [{"id": 1, "file_name": "a.jpg"}]
    calibrated = run("calibrate", small_image, "-o", boxes, "--limit", "20")
    assert calibrated.exit_code == 2 and f"{boxes} exists and is not a file of feature directions" in calibrated.output
    assert boxes.read_text().startswith("image,label")
    out, coco = tmp_path / "out.jsonl", tmp_path / "coco.json"
    for _ in range(2):  # the second run replaces the first one's files
        again = run("localize", small_image, *FAST, "-o", out, "--coco", coco)
        assert again.exit_code == 0, again.output
    (tmp_path / "out.jsonl.settings.json").unlink()  # an older version's output: its first line names an image
    assert run("localize", small_image, *FAST, "-o", out).exit_code == 0


def test_ray_options_without_the_ray_engine_are_refused(small_image: Path) -> None:
    for option, value in (("--workers", "2"), ("--address", "auto")):
        result = run("localize", small_image, "-o", "-", option, value)
        assert result.exit_code == 2 and f"{option} is for --engine ray" in error_lines(result)[0], result.output
    threads = run("localize", small_image, "-o", "-", "--engine", "ray", "--threads", "1")  # the actors set their own
    assert threads.exit_code == 2 and "--threads is for the local engine" in error_lines(threads)[0], threads.output


def test_empty_layer_names_are_refused_not_taken_as_the_default(small_image: Path) -> None:
    for option, message in (("--layer", "layer is an empty name"), ("--density-layers", "must name at least one layer")):
        result = run("localize", small_image, "-o", "-", option, "")
        assert result.exit_code == 2 and message in error_lines(result)[0], result.output


def test_options_that_have_no_effect_are_named(small_image: Path, tmp_path: Path) -> None:
    cases = [(["--cut", "otsu", "--level", "0.5"], "--level has no effect: the otsu cut takes no level"),
             (["--mode", "neurons", "--cut", "mass"], "--cut has no effect: the neurons mode cuts no map"),
             (["--objectness", "0", "--directions", str(tmp_path / "d.safetensors")],
              "--directions has no effect: these settings add no objectness map"),
             (["--k", "3", "--rescoring", "crop"], "--k has no effect: the density mode unites no k neurons"),
             (["--rescoring", "crop"], "--rescoring has no effect: the density mode re-scores no neuron regions"),
             (["--layer", "_blocks.10", "--density-layers", "_blocks.10,_blocks.15"],
              "--layer has no effect: in density mode --density-layers names the layers")]
    for options, warning in cases:
        result = run("localize", small_image, "-o", "-", "--threads", "1", *options)
        assert result.exit_code == 0 and warning in result.stderr, result.output
    quiet = run("localize", small_image, "-o", "-", "--threads", "1", "--level", "0.4")  # a level alone: the fraction cut
    assert quiet.exit_code == 0 and "no effect" not in quiet.stderr


def test_an_output_given_as_a_link_is_written_where_it_points(tmp_path: Path, small_image: Path) -> None:
    import os

    (tmp_path / "store").mkdir()
    os.symlink(tmp_path / "store" / "boxes.jsonl", tmp_path / "out.jsonl")  # the target does not exist yet
    result = run("localize", small_image, "-o", tmp_path / "out.jsonl", *FAST)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.jsonl").is_symlink() and len(records(tmp_path / "store" / "boxes.jsonl")) == 1
    assert (tmp_path / "store" / "boxes.jsonl.settings.json").is_file()
