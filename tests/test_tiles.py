"""Tile by tile localization (--tile): tile geometry, joining regions across tiles, the real model, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from neuroloc.confidence import Confidence
from neuroloc.masks import decode_rle, load_mask_png
from neuroloc.result import Localization
from neuroloc.tiles import TileRule, _join, tile_boxes, tile_starts

CHAMELEON = "ILSVRC2012_val_00008570.JPEG"  # African chameleon, class 47


def test_tile_starts_cover_the_side_and_end_at_its_edge():
    assert tile_starts(100, 128, 0.25) == [0]  # shorter than a tile: one tile
    assert tile_starts(128, 128, 0.25) == [0]
    assert tile_starts(500, 200, 0.25) == [0, 150, 300]  # stride 150; the last ends at 500
    assert tile_starts(520, 200, 0.25) == [0, 150, 300, 320]
    assert tile_starts(400, 200, 0.0) == [0, 200]


def test_tile_boxes_cover_every_pixel():
    boxes = tile_boxes(530, 210, TileRule(200))
    covered = np.zeros((210, 530), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        assert x1 - x0 <= 200 and y1 - y0 <= 200 and x1 <= 530 and y1 <= 210
        covered[y0:y1, x0:x1] = True
    assert covered.all() and len(boxes) == 4 * 2


@pytest.mark.parametrize(("size", "overlap", "min_score"), [(16, 0.25, 0.0), (64, -0.1, 0.0), (64, 0.8, 0.0), (64, 0.2, 1.5)])
def test_bad_tile_rules_are_refused(size: int, overlap: float, min_score: float):
    with pytest.raises(ValueError, match="tile"):
        TileRule(size, overlap, min_score)


def _tile_result(mask: np.ndarray, probability: float, point: tuple[float, float]) -> Localization:
    return Localization(box=(0.0, 0.0, 1.0, 1.0), label=7, synset=None, name="class_7", probability=probability,
                        neurons=(), mask=mask, image_size=mask.shape[::-1], layer="x", top1=7,
                        confidence=Confidence(probability, 0.5, None), point=point)


def test_regions_that_overlap_across_tiles_join_and_separate_ones_stay_apart():
    left, right, far = (np.zeros((10, 10), dtype=bool) for _ in range(3))
    left[2:6, 6:10] = True  # reaches the right edge of the first tile ...
    right[2:6, 0:4] = True  # ... and goes on in the second, which starts 6 pixels further
    far[8:10, 8:10] = True
    tiles = [((0, 0, 10, 10), _tile_result(left, 0.6, (8.0, 3.0))),
             ((6, 0, 16, 10), _tile_result(right, 0.9, (1.0, 4.0))),
             ((20, 10, 30, 20), _tile_result(far, 0.3, (9.0, 9.0)))]
    joined = _join(tiles, (30, 20))
    assert len(joined) == 2
    one, other = sorted(joined, key=lambda r: r.box)
    assert one.box == (6.0, 2.0, 10.0, 6.0) and one.mask.sum() == 16
    assert one.mask.shape == (4, 4) and one.mask_origin == (6, 2)  # the box's window only: light on memory
    expected = np.zeros((20, 30), dtype=bool)
    expected[2:6, 6:10] = True
    assert np.array_equal(one.full_mask(), expected)
    assert one.probability == 0.9 and one.point == (7.0, 4.0)  # the most probable tile's, in image pixels
    assert one.confidence == Confidence(0.9, 0.5, None) and one.neurons == ()
    assert other.box == (28.0, 18.0, 30.0, 20.0) and other.probability == 0.3
    assert _join([], (30, 20)) == []


@pytest.fixture(scope="module")
def mosaic(fullres_dir: Path) -> tuple[Image.Image, int]:
    """Nine full-resolution photos at 200 x 200 in a 3 x 3 mosaic; the chameleon in the middle cell."""
    from neuroloc.imageio import load_image

    with open(fullres_dir / "boxes.csv", newline="") as f:
        labels = {row["image"]: int(row["label"]) for row in csv.DictReader(f)}
    others = [n for n in sorted(labels) if n != CHAMELEON][:8]
    canvas = Image.new("RGB", (600, 600))
    for k, name in enumerate([*others[:4], CHAMELEON, *others[4:]]):
        canvas.paste(load_image(fullres_dir / "images" / name).resize((200, 200)), (200 * (k % 3), 200 * (k // 3)))
    return canvas, labels[CHAMELEON]


def test_tiles_find_the_chameleon_in_its_cell_and_nothing_for_an_absent_class(lite0, mosaic):
    from neuroloc.config import PRESETS
    from neuroloc.tiles import localize_tiled

    canvas, label = mosaic
    found = localize_tiled(lite0, canvas, PRESETS["default"], [label], TileRule(150))
    assert found and found[0].label == label and found[0].probability > 0.5
    x0, y0, x1, y1 = found[0].box
    assert 200 <= (x0 + x1) / 2 <= 400 and 200 <= (y0 + y1) / 2 <= 400  # the middle cell
    full = found[0].full_mask()
    assert full.shape == (600, 600) and full[int(y0):int(y1), int(x0):int(x1)].any() and full.sum() == found[0].mask.sum()
    px, py = found[0].point
    assert x0 <= px <= x1 and y0 <= py <= y1
    assert localize_tiled(lite0, canvas, PRESETS["default"], [281], TileRule(150)) == []  # no tabby anywhere
    strict = localize_tiled(lite0, canvas, PRESETS["default"], [label], TileRule(150, min_score=0.999))
    assert len(strict) <= len(found)
    with pytest.raises(ValueError, match="name at least one class"):
        localize_tiled(lite0, canvas, PRESETS["default"], [], TileRule(150))
    with pytest.raises(ValueError, match="they need mode density"):  # the paper's blob dots: one object each
        localize_tiled(lite0, canvas, PRESETS["paper"], [label], TileRule(150))


def test_the_api_finds_the_same_objects(lite0, mosaic):
    from neuroloc.config import PRESETS
    from neuroloc.pipeline import Localizer
    from neuroloc.tiles import localize_tiled

    canvas, label = mosaic
    expected = localize_tiled(lite0, canvas, PRESETS["default"], [label], TileRule(150))
    found = Localizer(lite0).localize_tiles(canvas, "African chameleon", tile=150)
    assert [r.box for r in found] == [r.box for r in expected]
    confident = Localizer(lite0).localize_tiles(canvas, [label, "tabby"], tile=150, min_score=0.5)
    assert confident and all(r.label == label and r.probability >= 0.5 for r in confident)
    as_tensor = Localizer(lite0).localize_tiles(canvas, torch.tensor([label, 281]), tile=150, min_score=0.5)
    assert [r.box for r in as_tensor] == [r.box for r in confident]  # classes as localize_many takes them


def test_localize_with_tiles_writes_objects_masks_and_an_overlay(mosaic, tmp_path: Path):
    from neuroloc.cli import main

    canvas, label = mosaic
    canvas.save(tmp_path / "mosaic.png")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["localize", str(tmp_path / "mosaic.png"), "--class", str(label), "--tile", "150",
                                       "-o", str(out), "--masks", str(tmp_path / "m"), "--overlay", str(tmp_path / "o"),
                                       "--threads", "1", "--rle"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    predictions = record["predictions"]
    assert predictions and [p["object"] for p in predictions] == list(range(len(predictions)))
    assert all(p["label"] == label and p["neurons"] == [] for p in predictions)
    assert (tmp_path / "o" / "mosaic.jpg").is_file()
    for j, prediction in enumerate(predictions):  # each object's mask at the image's size, inside its own box
        for mask in (decode_rle(prediction["mask"]), load_mask_png(tmp_path / "m" / f"mosaic_{j}.png")):
            assert mask.shape == (canvas.height, canvas.width)
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1] == pytest.approx(prediction["box"], abs=0.01)
    absent = CliRunner().invoke(main, ["localize", str(tmp_path / "mosaic.png"), "--class", "tabby", "--tile", "150",
                                       "-o", str(tmp_path / "none.jsonl"), "--overlay", str(tmp_path / "o2")])
    assert absent.exit_code == 0, absent.output
    (nothing,) = [json.loads(line) for line in (tmp_path / "none.jsonl").read_text().splitlines()]
    assert nothing["predictions"] == [] and nothing["error"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--tile", "150"], "give --class or --classes"),
    (["--tile", "150", "--class", "tabby", "--top", "2"], "not --top or --min-ratio"),
    (["--tile-overlap", "0.5", "--class", "tabby"], "add --tile"),
    (["--tile", "150", "--class", "tabby", "--objects", "multi"], "leave out --objects multi"),
    (["--tile", "150", "--class", "tabby", "--explain", "x"], "does not work with --tile"),
    (["--tile", "150", "--class", "tabby", "--preset", "paper"], "--tile joins the regions of the DAM vote map"),
    (["--tile", "16", "--class", "tabby"], "16 is not in the range x>=32"),
    (["--tile", "150", "--class", "tabby", "--tile-overlap", "0.9"], "0.9 is not in the range"),
])
def test_bad_tile_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str):
    from neuroloc.cli import main

    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (90, 120, 30)).save(picture)
    result = CliRunner().invoke(main, ["localize", str(picture), "-o", str(tmp_path / "o.jsonl"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_auto_directions_for_tiles_are_fitted_over_tiles(lite0, mosaic, tmp_path: Path):
    from neuroloc.cli import main
    from neuroloc.tiles import fit_tile_directions

    canvas, label = mosaic
    canvas.save(tmp_path / "mosaic.png")
    layers = ("_blocks.10", "_blocks.14")
    fitted = fit_tile_directions(lite0, layers, [tmp_path / "mosaic.png"], TileRule(150))
    assert fitted is not None and fitted.images == len(tile_boxes(600, 600, TileRule(150))) == 36  # 6 x 6 tiles
    assert fit_tile_directions(lite0, layers, [tmp_path / "mosaic.png"], TileRule(300)) is None  # 3 x 3 tiles
    assert fit_tile_directions(lite0, layers, [], TileRule(150)) is None
    result = CliRunner().invoke(main, ["localize", str(tmp_path / "mosaic.png"), "--class", str(label), "--tile", "150",
                                       "-o", str(tmp_path / "out.jsonl"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "objectness map fitted over 36 tiles" in result.output


def test_evaluate_takes_tiles_as_a_method(mosaic, fullres_dir: Path, tmp_path: Path):
    from neuroloc.cli import main
    from neuroloc.evaluation.command import parse_method
    from neuroloc.evaluation.methods import TilesMethod

    _name, method = parse_method("tiles:192:small:similarity=1")
    assert isinstance(method, TilesMethod) and method.size == 192 and method.config.similarity == 1
    for bad in ("tiles", "tiles:x", "tiles:16"):
        with pytest.raises(Exception, match="tile size"):
            parse_method(bad)
    with pytest.raises(Exception, match="tiles:192:paper: tiles join the regions of the DAM vote map"):
        parse_method("tiles:192:paper")  # scattered blobs would join into hundreds of dot-sized objects
    canvas, label = mosaic
    (tmp_path / "data" / "images").mkdir(parents=True)
    canvas.save(tmp_path / "data" / "images" / "mosaic.png")
    with open(fullres_dir / "boxes.csv", newline="") as f:  # the chameleon's boxes, moved into the middle cell
        rows = [r for r in csv.DictReader(f) if r["image"] == CHAMELEON]
    width, height = Image.open(fullres_dir / "images" / CHAMELEON).size
    lines = ["image,synset,label,xmin,ymin,xmax,ymax"]
    for r in rows:
        box = [200 + float(r["xmin"]) * 200 / width, 200 + float(r["ymin"]) * 200 / height,
               200 + float(r["xmax"]) * 200 / width, 200 + float(r["ymax"]) * 200 / height]
        lines.append(f"mosaic.png,{r['synset']},{r['label']}," + ",".join(f"{v:.1f}" for v in box))
    (tmp_path / "data" / "boxes.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "data"), "--output", str(out), "--method", "tiles:150",
                                       "--method", "full", "--directions", "none", "--threads", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    assert metrics["tiles:150"]["gt_known"] == 100.0 and metrics["full"]["gt_known"] == 0.0
    (record,) = [json.loads(line) for line in (out / "tiles:150" / "predictions.jsonl").read_text().splitlines()]
    assert record["predictions"][0]["label"] == label and record["predictions"][0]["point"] is not None


def test_calibrate_fits_directions_over_tiles_for_later_tiled_runs(mosaic, tmp_path: Path):
    from neuroloc.cli import main
    from neuroloc.directions import load_directions

    canvas, label = mosaic
    canvas.save(tmp_path / "mosaic.png")
    saved = tmp_path / "tiles.safetensors"
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "mosaic.png"), "--tile", "150", "-o", str(saved)])
    assert result.exit_code == 0, result.output
    assert "from 36 tiles of 150 pixels" in result.output and load_directions(saved).images == 36
    few = CliRunner().invoke(main, ["calibrate", str(tmp_path / "mosaic.png"), "--tile", "300", "-o", str(tmp_path / "x")])
    assert few.exit_code == 1 and "fewer than 20 readable tiles of 300 pixels" in few.output
    used = CliRunner().invoke(main, ["localize", str(tmp_path / "mosaic.png"), "--class", str(label), "--tile", "150",
                                     "--directions", str(saved), "-o", str(tmp_path / "out.jsonl")])
    assert used.exit_code == 0, used.output
    assert json.loads((tmp_path / "out.jsonl").read_text())["predictions"]


def test_a_localizations_arrays_are_read_only():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:4, 2:4] = True
    result = _tile_result(mask, 0.5, (3.0, 3.0))
    with pytest.raises(ValueError, match="read-only"):
        result.mask[0, 0] = True
    windowed = _join([((0, 0, 10, 10), result)], (30, 20))[0]
    assert windowed.mask_origin is not None
    with pytest.raises(ValueError, match="read-only"):
        windowed.full_mask()[0, 0] = True
    editable = windowed.full_mask().copy()
    editable[0, 0] = True
    assert not windowed.full_mask()[0, 0]


def test_an_image_of_many_tiles_is_noted_before_it_is_localized(capsys) -> None:
    """62,500 tiles of 32 pixels in a 6000x6000 picture took most of an hour without a sign of life."""
    from neuroloc.cli import MANY_TILES, _note_many_tiles

    _note_many_tiles(Image.new("RGB", (6000, 6000)), TileRule(32))
    assert "note: an image of 6000x6000 pixels takes 62,500 tiles of 32 pixels" in capsys.readouterr().err
    small = Image.new("RGB", (1000, 1000))
    assert len(tile_boxes(1000, 1000, TileRule(32))) < MANY_TILES
    _note_many_tiles(small, TileRule(32))
    assert capsys.readouterr().err == ""


def _single_logit_model(bias: float):
    import torch
    from torch import nn

    from neuroloc.classes import named_classes
    from neuroloc.models import LoadedModel, ModelSpec, Preprocessing

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1)).eval()
    with torch.no_grad():
        net[-1].weight.abs_()  # the logit rises with the features, so every tile has votes
        net[-1].bias.fill_(bias)
    spec = ModelSpec(name="defects", description="test net", input_size=64, preprocessing=Preprocessing(),
                     default_layer="2", weights_source="none", locate_weights=lambda: None)
    return LoadedModel("defects", net, spec, "none", classes=named_classes(["defect"]))


def test_a_single_logit_models_tile_counts_only_when_its_sigmoid_reaches_one_half(monkeypatch):
    """Its one output is every tile's top-1, so without the 0.5 rule every tile counted as the class. The tiles
    kept for joining hold no map: thousands of them held gigabytes."""
    import neuroloc.tiles as tiles
    from neuroloc.config import preset_for
    from neuroloc.tiles import localize_tiled

    kept: list = []
    real_join = tiles._join
    monkeypatch.setattr(tiles, "_join", lambda found, size: kept.extend(found) or real_join(found, size))

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    config = preset_for("default").with_options(objectness=0.0)
    assert localize_tiled(_single_logit_model(-8.0), picture, config, [0], TileRule(100)) == []
    found = localize_tiled(_single_logit_model(8.0), picture, config, [0], TileRule(100))
    assert found and all(r.probability >= 0.5 for r in found)
    assert kept and all(r.density is None and r.maps is None and r.blobs is None for _, r in kept)
