"""Feature directions: the fit, the objectness map, the file, and their use in the pipeline and the commands."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from neuroloc.cli import main
from neuroloc.config import preset_for
from neuroloc.directions import (
    DirectionFit,
    DirectionsError,
    FeatureDirections,
    directions_for,
    fit_auto,
    fit_directions,
    fit_directions_keeping_evidence,
    fit_sample,
    load_directions,
    objectness_map,
    save_directions,
)
from neuroloc.evidence import NonFiniteEvidence
from neuroloc.jsonl import new_file_mode
from neuroloc.models import ModelError
from neuroloc.options import MIN_FIT_IMAGES
from neuroloc.pipeline import evidence_layers, localize_batch, localize_from_evidence

LAYER = "layer"


def _synthetic_batch(generator: torch.Generator, axis: torch.Tensor, images: int = 4):
    """Features (N, 8, 6, 6): noise, plus ``axis`` x 5 inside a square that also holds the votes."""
    features = torch.randn(images, 8, 6, 6, generator=generator)
    inside = torch.zeros(images, 6, 6)
    inside[:, 1:4, 2:5] = 1
    features += 5 * axis[None, :, None, None] * inside[:, None]
    return {LAYER: features}, {LAYER: inside * 3 + 0.1 * torch.rand(images, 6, 6, generator=generator)}


def _fit(axis: torch.Tensor, flip_votes: bool = False, batches: int = 6) -> FeatureDirections:
    generator = torch.Generator().manual_seed(0)
    fit = DirectionFit()
    for _ in range(batches):
        activations, votes = _synthetic_batch(generator, axis)
        if flip_votes:
            votes = {LAYER: votes[LAYER].amax() - votes[LAYER]}
        fit.add(activations, votes)
    return fit.result("toy")


def test_fit_finds_the_direction_that_separates_object_from_background_on_the_votes_side() -> None:
    axis = torch.nn.functional.normalize(torch.tensor([1.0, 2, 0, 0, -1, 0, 0, 0]), dim=0)
    directions = _fit(axis)
    assert directions.images == 24
    assert float(directions.directions[LAYER] @ axis) > 0.98
    # votes on the other side of the object turn the direction round
    assert float(_fit(axis, flip_votes=True).directions[LAYER] @ axis) < -0.98


def test_fit_refuses_too_few_images() -> None:
    fit = DirectionFit()
    fit.add(*_synthetic_batch(torch.Generator().manual_seed(1), torch.ones(8) / 8**0.5, images=MIN_FIT_IMAGES - 1))
    with pytest.raises(DirectionsError, match=f"at least {MIN_FIT_IMAGES} images"):
        fit.result("toy")


def test_objectness_map_is_high_on_the_object_and_scaled_to_one() -> None:
    axis = torch.nn.functional.normalize(torch.arange(8.0) - 3.5, dim=0)
    directions = _fit(axis)
    activations, _ = _synthetic_batch(torch.Generator().manual_seed(7), axis, images=2)
    objectness = objectness_map(activations, directions, 12)
    assert objectness.shape == (2, 12, 12)
    assert float(objectness.min()) >= 0 and torch.allclose(objectness.flatten(1).amax(dim=1), torch.ones(2))
    inside, outside = objectness[:, 2:8, 4:10].mean(), objectness[:, 9:, :3].mean()
    assert inside > 4 * outside
    with pytest.raises(DirectionsError, match="fitted for layers layer"):
        objectness_map({"other": activations[LAYER]}, directions, 12)


def test_file_round_trip_and_refusals(tmp_path: Path) -> None:
    directions = _fit(torch.ones(8) / 8**0.5)
    path = save_directions(directions, tmp_path / "d.safetensors")
    again = load_directions(path, "toy")
    assert again.fingerprint == directions.fingerprint and again.images == directions.images
    assert torch.equal(again.directions[LAYER], directions.directions[LAYER])
    with pytest.raises(DirectionsError, match="fitted for model 'toy', not 'other'"):
        load_directions(path, "other")
    with pytest.raises(DirectionsError, match="no such file"):
        load_directions(tmp_path / "missing.safetensors")
    with pytest.raises(DirectionsError, match="a folder; give the file `neuroloc calibrate` wrote"):
        load_directions(tmp_path)
    (tmp_path / "bad.safetensors").write_text("not a tensor file")
    with pytest.raises(DirectionsError, match="not a feature-directions file"):
        load_directions(tmp_path / "bad.safetensors")
    assert not list(tmp_path.glob("*.partial"))


def test_fit_sample_is_evenly_spaced() -> None:
    assert fit_sample(list(range(5)), 10) == [0, 1, 2, 3, 4]
    assert fit_sample(list(range(100)), 5) == [0, 25, 50, 74, 99]


def _picture_folder(tmp_path: Path) -> Path:
    """``tmp_path/images`` holding :data:`MIN_FIT_IMAGES` of :func:`_pictures` as PNG files."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, picture in enumerate(_pictures(MIN_FIT_IMAGES)):
        picture.save(folder / f"p{i:02d}.png")
    return folder


def _pictures(count: int) -> list[Image.Image]:
    """Textured backgrounds with a bright disc at varying places: enough for a fit, quick to run."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:128, 0:128]
    pictures = []
    for i in range(count):
        rgb = rng.integers(0, 90, (128, 128, 3)).astype(np.uint8)
        cy, cx = 40 + (i * 7) % 50, 40 + (i * 13) % 50
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < 30**2] = (230, 180, 40)
        pictures.append(Image.fromarray(rgb))
    return pictures


@pytest.fixture(scope="module")
def lite0_directions(lite0) -> FeatureDirections:
    config = preset_for("default")
    return fit_directions(lite0, _pictures(MIN_FIT_IMAGES), evidence_layers(lite0, config)[1])


def test_the_default_adds_the_objectness_map_only_when_the_model_carries_directions(lite0, lite0_directions) -> None:
    picture = _pictures(1)
    config = preset_for("default")
    plain = localize_batch(lite0, picture, config, [None])[0].density
    with_map = localize_batch(lite0.with_directions(lite0_directions), picture, config, [None])[0].density
    without_weight = localize_batch(lite0.with_directions(lite0_directions), picture, config.with_options(objectness=0.0), [None])[0].density
    assert not np.allclose(plain, with_map)
    np.testing.assert_array_equal(plain, without_weight)
    assert lite0_directions.layers == ("_blocks.10", "_blocks.14") and lite0_directions.images == MIN_FIT_IMAGES


def test_directions_belong_to_one_model(lite0, lite0_directions) -> None:
    other = FeatureDirections("resnet50_keras", lite0_directions.means, lite0_directions.directions, 20)
    with pytest.raises(ModelError, match="fitted for 'resnet50_keras'"):
        lite0.with_directions(other)


def test_directions_for_each_choice(lite0, lite0_directions, tmp_path: Path) -> None:
    layers = ("_blocks.10", "_blocks.14")
    paths = []
    for i, picture in enumerate(_pictures(MIN_FIT_IMAGES)):
        paths.append(tmp_path / f"p{i:02d}.png")
        picture.save(paths[-1])
    assert directions_for("none", lite0, layers, paths) is None
    assert directions_for("auto", lite0, layers, paths[:-1]) is None  # too few to fit
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fitted = directions_for("auto", lite0, layers, paths)
        torch.set_num_threads(2)  # floats that may differ in their last bits: the same fit, for a resumed run
        again = directions_for("auto", lite0, layers, paths)
    finally:
        torch.set_num_threads(threads)
    assert fitted is not None and again is not None
    for name in layers:
        torch.testing.assert_close(fitted.directions[name], lite0_directions.directions[name], atol=1e-4, rtol=1e-4)
    assert fitted.fingerprint == again.fingerprint != lite0_directions.fingerprint  # named by what it was fitted over
    assert directions_for("auto", lite0, layers, paths[::-1]).fingerprint != fitted.fingerprint  # other images
    (tmp_path / "p00.png").write_bytes(b"broken")  # an unreadable image leaves too few: no directions
    assert directions_for("auto", lite0, layers, paths) is None
    saved = save_directions(fitted, tmp_path / "d.safetensors")
    from_file = directions_for(str(saved), lite0, layers, [])
    assert from_file.fingerprint == replace(fitted, fitted_over=None).fingerprint  # a file: named by its vectors
    with pytest.raises(DirectionsError, match="these settings fuse _blocks.14"):
        directions_for(str(saved), lite0, ("_blocks.14",), [])


def test_the_fit_keeps_each_images_evidence_and_it_localizes_as_a_pass_of_its_own(lite0, lite0_directions) -> None:
    config = preset_for("default")
    pictures = _pictures(MIN_FIT_IMAGES + 1)
    fitted, kept = fit_directions_keeping_evidence(lite0, enumerate(pictures), config)
    assert fitted.images == MIN_FIT_IMAGES + 1 and sorted(kept) == list(range(len(pictures)))
    plain = fit_directions(lite0, pictures, evidence_layers(lite0, config)[1])
    for name in fitted.layers:  # the same sums in the same order: the same directions
        torch.testing.assert_close(fitted.directions[name], plain.directions[name], atol=1e-6, rtol=1e-6)
    model = lite0.with_directions(fitted)
    own_pass = localize_batch(model, pictures[:8], config, [None] * 8)
    for i, expected in enumerate(own_pass):  # batches of 8, as localize_batch's: the very same numbers
        got = localize_from_evidence(model, [pictures[i]], kept[i].finish(config, model.directions), config)[0]
        assert got.box == expected.box and got.label == expected.label == got.top1
        assert got.probability == pytest.approx(expected.probability, rel=1e-6)
        assert got.confidence.value == pytest.approx(expected.confidence.value, abs=1e-6)
        np.testing.assert_allclose(got.density, expected.density, atol=1e-6)
        assert [n.channel for n in got.neurons] == [n.channel for n in expected.neurons]
    with pytest.raises(ValueError, match="another pass than the fit's"):
        fit_directions_keeping_evidence(lite0, enumerate(pictures), preset_for("paper"))


def test_a_batch_with_non_finite_scores_is_fitted_but_not_kept(lite0, monkeypatch) -> None:
    import neuroloc.pipeline

    real = neuroloc.pipeline.gather_pending_evidence
    calls = []

    def first_batch_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteEvidence("the model's class scores are not finite: NaN or +inf")
        return real(*args, **kwargs)

    monkeypatch.setattr(neuroloc.pipeline, "gather_pending_evidence", first_batch_fails)
    fitted, kept = fit_directions_keeping_evidence(lite0, enumerate(_pictures(MIN_FIT_IMAGES)), preset_for("default"))
    assert fitted.images == MIN_FIT_IMAGES and sorted(kept) == list(range(8, MIN_FIT_IMAGES))


def test_fit_auto_keeps_evidence_only_for_settings_that_share_the_pass(lite0, tmp_path: Path) -> None:
    folder = _picture_folder(tmp_path)
    _pictures(MIN_FIT_IMAGES + 1)[-1].save(folder / "p20.png")  # one to spare: a broken one leaves enough
    paths = sorted(folder.iterdir())
    layers = evidence_layers(lite0, preset_for("default"))[1]
    shared, kept = fit_auto(lite0, layers, paths, keep_for=preset_for("default"))
    assert shared is not None and set(kept) == set(paths)
    alone, none_kept = fit_auto(lite0, layers, paths)
    assert alone is not None and none_kept == {}
    for name in layers:
        torch.testing.assert_close(alone.directions[name], shared.directions[name], atol=1e-6, rtol=1e-6)
    row = kept[paths[0]]  # a copy of its image's part of the batch, not a view that keeps the batch alive
    assert row.evidence.votes.shape[0] == 1 and row.evidence.votes.base is None
    assert all(f.shape[0] == 1 and f.untyped_storage().nbytes() == f.numel() * f.element_size() for f in row.features.values())
    assert fit_auto(lite0, layers[:1], paths, keep_for=preset_for("default"))[1] == {}  # other layers: fitted alone
    guided = preset_for("default").with_options(class_gradient="guided")  # another pass: fitted alone
    assert fit_auto(lite0, layers, paths, keep_for=guided)[1] == {}
    (folder / "p03.png").write_bytes(b"broken")  # unreadable: neither fitted nor kept
    _, kept = fit_auto(lite0, layers, paths, keep_for=preset_for("default"))
    assert set(kept) == set(paths) - {folder / "p03.png"}


def _counting_passes(monkeypatch) -> list[int]:
    """Patch the pipeline's network pass to record how many images each call took."""
    import neuroloc.pipeline

    real = neuroloc.pipeline.gather_pending_evidence
    images: list[int] = []
    monkeypatch.setattr(neuroloc.pipeline, "gather_pending_evidence",
                        lambda model, inputs, *a, **k: images.append(inputs.shape[0]) or real(model, inputs, *a, **k))
    return images


def test_localize_with_auto_passes_each_image_through_the_network_once(lite0, tmp_path: Path, monkeypatch) -> None:
    folder = _picture_folder(tmp_path)
    (folder / "zz_broken.png").write_bytes(b"broken")
    runner = CliRunner()
    passed = _counting_passes(monkeypatch)
    shared = tmp_path / "shared.jsonl"
    result = runner.invoke(main, ["localize", str(folder), "-o", str(shared), "--batch-size", "4"])
    assert result.exit_code == 1 and f"objectness map fitted over {MIN_FIT_IMAGES} of the images" in result.stderr
    assert passed == [1] + [4] * 5  # the layer check's blank image, then the fit's pass alone, in the run's batches
    lines = [json.loads(line) for line in shared.read_text().splitlines()]
    assert [line["error"] is None for line in lines] == [True] * MIN_FIT_IMAGES + [False]
    # the very lines of localizing with the fitted map in passes of their own, batch by batch
    paths = sorted(p for p in folder.iterdir() if p.name != "zz_broken.png")
    directions = directions_for("auto", lite0, evidence_layers(lite0, preset_for("default"))[1], paths)
    fitted = lite0.with_directions(directions)
    own = [r for start in range(0, len(paths), 4) for r in localize_batch(
        fitted, [Image.open(p) for p in paths[start : start + 4]], preset_for("default"), [None] * 4)]
    assert [line["predictions"][0] for line in lines[:-1]] == [r.prediction_dict() for r in own]
    passed.clear()  # finishing a kept image fails: it is localized through a pass of its own instead
    import neuroloc.pipeline

    real_finish = neuroloc.pipeline.localize_from_evidence
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first kept image (the first call is the layer check's blank image)
            raise RuntimeError("finishing failed")
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(neuroloc.pipeline, "localize_from_evidence", fails_once)
    retried = runner.invoke(main, ["localize", str(folder), "-o", str(tmp_path / "retried.jsonl")])
    assert retried.exit_code == 1 and sum(passed) == 1 + MIN_FIT_IMAGES + 1
    retried_lines = [json.loads(line) for line in (tmp_path / "retried.jsonl").read_text().splitlines()]
    assert [line["error"] is None for line in retried_lines] == [True] * MIN_FIT_IMAGES + [False]
    monkeypatch.setattr(neuroloc.pipeline, "localize_from_evidence", real_finish)
    passed.clear()  # --explain draws each neuron's map, which the fit's pass does not keep: a pass of their own
    explained = runner.invoke(main, ["localize", str(folder), "-o", str(tmp_path / "explained.jsonl"),
                                     "--explain", str(tmp_path / "explain")])
    assert explained.exit_code == 1 and sum(passed) == 1 + MIN_FIT_IMAGES
    passed.clear()  # a class other than the images' top-1: localized in a pass of their own
    named = runner.invoke(main, ["localize", str(folder), "-o", str(tmp_path / "named.jsonl"), "--class", "0"])
    assert named.exit_code == 1 and sum(passed) == 1 + 2 * MIN_FIT_IMAGES
    top1 = lines[0]["predictions"][0]["label"]
    same = sum(line["predictions"][0]["label"] == top1 for line in lines[:-1])
    passed.clear()  # their top-1 named: the images whose top-1 it is take the fit's evidence
    again = runner.invoke(main, ["localize", str(folder), "-o", str(tmp_path / "top1.jsonl"), "--class", str(top1)])
    assert again.exit_code == 1 and sum(passed) == 1 + 2 * MIN_FIT_IMAGES - same


def test_a_kept_row_is_held_only_for_an_image_localized_for_its_top1_alone(lite0) -> None:
    from neuroloc.cli import RunOptions, _may_use

    _, kept = fit_directions_keeping_evidence(lite0, enumerate(_pictures(MIN_FIT_IMAGES)), preset_for("default"))
    row = kept[0]
    top1 = int(row.evidence.top1[0])
    path = Path("a.png")
    options = RunOptions(batch_size=8, label=None, overlay_dir=None, explain_dir=None, with_neurons=True)
    assert _may_use(row, path, options)
    assert _may_use(row, path, replace(options, label=top1)) and not _may_use(row, path, replace(options, label=top1 + 1))
    from neuroloc.sources import path_key

    for own, usable in (((top1,), True), ((top1 + 1,), False), ((top1, top1 + 1), False), ((), True)):
        assert _may_use(row, path, replace(options, image_classes={path_key(path): own})) is usable


def test_calibrate_then_localize_with_the_file(tmp_path: Path) -> None:
    folder = _picture_folder(tmp_path)
    runner = CliRunner()
    written = tmp_path / "mine.safetensors"
    (folder / "zz_empty.png").write_bytes(b"")  # left out, and said so
    result = runner.invoke(main, ["calibrate", str(folder), "-o", str(written)])
    assert result.exit_code == 0, result.output
    assert f"from {MIN_FIT_IMAGES} images" in result.output and written.is_file()
    assert "left out 1 unreadable image, e.g. " in result.output and "zz_empty.png" in result.output
    assert stat.S_IMODE(written.stat().st_mode) == new_file_mode()  # as readable as any file (safetensors: 0600)
    assert "leaves the objectness map out" not in result.output  # Lite0's default uses it
    (folder / "p00.png").unlink()  # 19 readable: too few, and the unreadable one is named on the way
    short = runner.invoke(main, ["calibrate", str(folder), "-o", str(tmp_path / "short.safetensors")])
    assert short.exit_code == 1 and "need at least 20 images; got 19" in short.output and "zz_empty.png" in short.output
    _pictures(1)[0].save(folder / "p00.png")
    assert runner.invoke(main, ["calibrate", str(folder), "-o", str(written), "--limit", "5"]).exit_code == 2
    one = str(folder / "p00.png")
    outputs = {}
    for choice in ("none", str(written)):
        out = tmp_path / f"{len(outputs)}.jsonl"
        result = runner.invoke(main, ["localize", one, "-o", str(out), "--directions", choice])
        assert result.exit_code == 0, result.output
        outputs[choice] = json.loads(out.read_text())["predictions"][0]["box"]
    auto = tmp_path / "auto.jsonl"  # one image: auto fits nothing, the same as none, and says so
    result = runner.invoke(main, ["localize", one, "-o", str(auto)])
    assert result.exit_code == 0 and f"fewer than {MIN_FIT_IMAGES} readable images" in result.stderr
    assert json.loads(auto.read_text())["predictions"][0]["box"] == outputs["none"]
    with_file = tmp_path / "1.jsonl"  # made with the file: resuming with another map would mix two kinds of box
    recorded = json.loads((tmp_path / "1.jsonl.settings.json").read_text())["directions"]
    assert recorded == f"file {load_directions(written).fingerprint}"
    for other, shown in [("none", f"directions: {recorded} -> none"), ("auto", f"directions: {recorded} -> auto")]:
        result = runner.invoke(main, ["localize", one, "-o", str(with_file), "--resume", "--directions", other])
        assert result.exit_code == 2 and shown in result.output, result.output
    again = runner.invoke(main, ["localize", one, "-o", str(with_file), "--resume", "--directions", str(written)])
    assert again.exit_code == 0 and "already done" in again.stderr, again.output
    paper = tmp_path / "paper.jsonl"  # a configuration without the objectness map records none, whatever was given
    assert runner.invoke(main, ["localize", one, "-o", str(paper), "--preset", "fast", "--kmax", "2", "--k", "1",
                                "--directions", str(written)]).exit_code == 0
    assert json.loads((tmp_path / "paper.jsonl.settings.json").read_text())["directions"] == "none"


def test_a_resumed_run_fits_the_directions_only_when_images_are_left(tmp_path: Path, monkeypatch) -> None:
    import neuroloc.directions

    folder = _picture_folder(tmp_path)
    out = tmp_path / "boxes.jsonl"
    runner = CliRunner()
    fits = []
    real_fit = neuroloc.directions.fit_auto
    monkeypatch.setattr(neuroloc.directions, "fit_auto", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    command = ["localize", str(folder), "-o", str(out), "--resume"]
    first = runner.invoke(main, command)
    assert first.exit_code == 0 and fits == [1]
    assert f"objectness map fitted over {MIN_FIT_IMAGES} of the images" in first.stderr
    finished = out.read_text()
    assert runner.invoke(main, command).exit_code == 0 and fits == [1]  # everything done: no fit
    assert out.read_text() == finished
    out.write_text("".join(finished.splitlines(keepends=True)[1:]))  # one image left: fitted again, same boxes
    assert runner.invoke(main, command).exit_code == 0 and fits == [1, 1]
    assert sorted(out.read_text().splitlines()) == sorted(finished.splitlines())


def test_calibrate_and_localize_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    for i, picture in enumerate(_pictures(3)):
        picture.save(folder / f"p{i}.png")
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", str(folder), "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and "Error: feature directions need at least 20 images; got 3" in result.output
    assert not (tmp_path / "d.safetensors").exists()
    (tmp_path / "bad.safetensors").write_text("nope")
    result = runner.invoke(main, ["localize", str(folder / "p0.png"), "--directions", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2
    assert "Invalid value for '--directions'" in result.output and "not a feature-directions file" in result.output


def test_ctrl_c_during_calibrate_says_the_file_was_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroloc.directions

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(neuroloc.directions, "fit_directions", interrupted)
    folder = tmp_path / "few"
    folder.mkdir()
    _pictures(1)[0].save(folder / "p0.png")
    result = CliRunner().invoke(main, ["calibrate", str(folder), "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 130 and "was not written" in result.output and "Aborted" not in result.output
    assert not (tmp_path / "d.safetensors").exists()


def test_localizer_calibrates_and_reads_a_file(lite0, lite0_directions, tmp_path: Path) -> None:
    from neuroloc import Localizer

    pictures = _pictures(MIN_FIT_IMAGES)
    localizer = Localizer(lite0)
    before = localizer.localize(pictures[0]).density
    fitted = localizer.calibrate(pictures)
    assert fitted.fingerprint == lite0_directions.fingerprint
    after = localizer.localize(pictures[0]).density
    assert not np.allclose(before, after)
    saved = save_directions(fitted, tmp_path / "d.safetensors")
    np.testing.assert_array_equal(Localizer(lite0, directions=saved).localize(pictures[0]).density, after)
    assert load_directions(saved).weights == fitted.weights == Path(lite0.weights).name  # recorded with the fit
    tuned = save_directions(replace(fitted, weights="tuned.pth"), tmp_path / "tuned.safetensors")
    with pytest.warns(UserWarning, match=f"fitted with weights named tuned.pth, used with {Path(lite0.weights).name}"):
        Localizer(lite0, directions=tuned)  # a fine-tuned model's features lie elsewhere
    # as the command line: directions of other layers are refused, not used for the layers they have
    one_layer = FeatureDirections("efficientnet_lite0", {"_blocks.10": fitted.means["_blocks.10"]},
                                  {"_blocks.10": fitted.directions["_blocks.10"]}, 20)
    with pytest.raises(DirectionsError, match="fitted for layers _blocks.10; these settings fuse _blocks.10, _blocks.14"):
        Localizer(lite0, directions=one_layer)
    reversed_layers = FeatureDirections("efficientnet_lite0", dict(reversed(fitted.means.items())),
                                        dict(reversed(fitted.directions.items())), 20)
    np.testing.assert_array_equal(  # the same layers in another order: the same map
        Localizer(lite0, directions=reversed_layers).localize(pictures[0]).density, after)
    wider = FeatureDirections("efficientnet_lite0", {k: torch.cat([v, v]) for k, v in fitted.means.items()},
                              {k: torch.cat([v, v]) for k, v in fitted.directions.items()}, 20)
    with pytest.raises(DirectionsError, match=r"fitted for 224 channels in layer _blocks.10, which has 112"):
        Localizer(lite0, directions=wider).localize(pictures[0])  # another network under the same name


def test_images_with_non_finite_features_are_left_out_of_the_fit() -> None:
    axis = torch.nn.functional.normalize(torch.tensor([1.0, -1, 0, 2, 0, 0, 0, 1]), dim=0)
    generator = torch.Generator().manual_seed(0)
    fit = DirectionFit()
    for _ in range(8):
        activations, votes = _synthetic_batch(generator, axis)
        activations[LAYER][0, 0, 0, 0] = float("nan")  # the first image of every batch
        fit.add(activations, votes)
    directions = fit.result("toy")
    assert directions.images == 24 and torch.isfinite(directions.directions[LAYER]).all()
    assert float(directions.directions[LAYER] @ axis) > 0.98


def test_calibrate_says_when_high_bit_images_came_out_dark(tmp_path: Path) -> None:
    """Directions fitted over 12-bit data read by the type's range would be those of dark images."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, picture in enumerate(_pictures(MIN_FIT_IMAGES)):
        grey = np.asarray(picture.convert("L"), dtype=np.uint16) * 16  # 12-bit values in a 16-bit file
        Image.fromarray(grey).save(folder / f"p{i:02d}.png")
    runner = CliRunner()
    ranged = runner.invoke(main, ["calibrate", str(folder), "-o", str(tmp_path / "r.safetensors")])
    assert ranged.exit_code == 0, ranged.output
    assert f"{MIN_FIT_IMAGES} images of more than 8 bits per sample have 99.5% of their pixels in the lowest 25%" in ranged.stderr
    stretched = runner.invoke(main, ["calibrate", str(folder), "-o", str(tmp_path / "s.safetensors"),
                                     "--intensity", "stretch"])
    assert stretched.exit_code == 0 and "came out dark" not in stretched.stderr


def test_calibrate_fits_other_layers_and_sizes_and_localize_names_a_size_mismatch(tmp_path: Path) -> None:
    folder = _picture_folder(tmp_path)
    runner = CliRunner()
    written = tmp_path / "deep.safetensors"
    fitted = runner.invoke(main, ["calibrate", str(folder), "-o", str(written), "--density-layers", "_blocks.14",
                                  "--input-size", "256"])
    assert fitted.exit_code == 0, fitted.output
    loaded = load_directions(written)
    assert loaded.layers == ("_blocks.14",) and loaded.input_size == 256
    one = str(folder / "p00.png")
    base = ["localize", one, "-o", "-", "--directions", str(written), "--density-layers", "_blocks.14"]
    same = runner.invoke(main, [*base, "--input-size", "256"])
    assert same.exit_code == 0 and "was fitted at input size" not in same.stderr, same.output
    other = runner.invoke(main, base)
    assert other.exit_code == 0 and f"{written} was fitted at input size 256, fed 224 here" in other.stderr
    refused = runner.invoke(main, ["localize", one, "-o", "-", "--directions", str(written)])  # the default's two layers
    assert refused.exit_code == 2 and "fitted for layers _blocks.14" in refused.output
    bad = runner.invoke(main, ["calibrate", str(folder), "-o", str(written), "--density-layers", "nope"])
    assert bad.exit_code == 2 and "--density-layers" in bad.output and "Traceback" not in bad.output


def test_ctrl_c_while_localize_fits_the_directions_exits_130_with_a_message(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroloc.directions

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(neuroloc.directions, "fit_directions_keeping_evidence", interrupted)
    folder = tmp_path / "many"
    folder.mkdir()
    for j, picture in enumerate(_pictures(20)):
        picture.save(folder / f"p{j}.png")
    result = CliRunner().invoke(main, ["localize", str(folder), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 130 and "Interrupted before any image was localized" in result.output
    assert "Aborted" not in result.output and not (tmp_path / "out.jsonl").exists()


def test_calibrate_says_when_the_model_s_default_leaves_the_map_out(tmp_path: Path) -> None:
    from neuroloc.models import get_spec

    torch.save(get_spec("resnet18").build().state_dict(), tmp_path / "r18.pth")
    folder = _picture_folder(tmp_path)
    result = CliRunner().invoke(main, ["calibrate", str(folder), "-o", str(tmp_path / "r.safetensors"), "--model",
                                       "resnet18", "--weights", str(tmp_path / "r18.pth")])
    assert result.exit_code == 0, result.output
    assert "resnet18's default leaves the objectness map out" in result.output and "--objectness 1" in result.output

