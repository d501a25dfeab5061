"""``--compile`` (neuroloc.compiled): same localizations as eager, eager where gradients or hooks need it.

Compiling takes seconds on the first call of each shape (inductor caches it on disk for later runs),
so the checks are few and small.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from torch import nn

from neuroloc.cli import main
from neuroloc.compiled import _lower_part_forward, compile_model
from neuroloc.config import PRESETS
from neuroloc.imageio import load_image
from neuroloc.pipeline import localize_batch


@pytest.fixture(scope="module")
def pictures(fullres_dir: Path) -> list:
    paths = sorted((fullres_dir / "images").glob("*.JPEG"))[:2]
    assert len(paths) == 2
    return [load_image(p) for p in paths]


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_compiled_model_gives_the_same_localizations(lite0, pictures: list, preset: str) -> None:
    config = PRESETS[preset]
    images = pictures if preset == "default" else pictures[:1]  # paper: one re-scoring batch is enough
    expected = localize_batch(lite0, images, config)
    compiled = compile_model(lite0, config)
    got = localize_batch(compiled, images, config)
    for want, have in zip(expected, got):
        assert np.allclose(have.box, want.box, atol=0.5)
        assert (have.label, have.empty) == (want.label, want.empty)
        assert [n.channel for n in have.neurons] == [n.channel for n in want.neurons]
    assert compiled.module is not lite0.module and "forward" not in vars(lite0.module)  # the original stays eager


def test_density_layers_given_top_down_are_cut_below_the_lowest(lite0, pictures: list, monkeypatch) -> None:
    """The compiled lower part ends at the lowest density layer, whatever order they were listed in."""
    from neuroloc import compiled as compiled_module

    config = PRESETS["default"].with_options(density_layers=("_blocks.14", "_blocks.10"), objectness=0.0)
    expected = localize_batch(lite0, pictures[:1], config)[0]
    cuts: list[str] = []
    cut_below = compiled_module._lower_part_forward
    monkeypatch.setattr(compiled_module, "_lower_part_forward", lambda net, layer: cuts.append(layer) or cut_below(net, layer))
    have = localize_batch(compile_model(lite0, config), pictures[:1], config)[0]
    assert cuts == ["_blocks.10"]
    assert np.allclose(have.box, expected.box, atol=0.5) and have.label == expected.label


def test_neuron_maps_keep_autograd_down_to_the_pixels(lite0, pictures: list) -> None:
    config = PRESETS["default"]
    want = localize_batch(lite0, pictures[:1], config, keep_maps=True)[0]
    have = localize_batch(compile_model(lite0, config, keep_maps=True), pictures[:1], config, keep_maps=True)[0]
    assert have.maps is not None and np.allclose(have.maps, want.maps, atol=1e-6)
    assert have.box == want.box


def test_only_efficientnet_lite_blocks_are_cut() -> None:
    assert _lower_part_forward(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "_blocks.3") is None


def test_bench_and_localize_take_compile(tmp_path: Path, fullres_dir: Path) -> None:
    photo = sorted((fullres_dir / "images").glob("*.JPEG"))[0]
    bench = CliRunner().invoke(main, ["bench", str(photo.parent), "--images", "1", "--repeats", "1",
                                      "--threads", "1", "--compile"])
    assert bench.exit_code == 0, bench.output
    assert "- --compile:" in bench.output and "ratio neuroloc / Grad-CAM" in bench.output
    boxes = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        result = CliRunner().invoke(main, ["localize", str(photo), "-o", str(out), "--threads", "1", *flag])
        assert result.exit_code == 0, result.output
        boxes[len(flag)] = json.loads(out.read_text().splitlines()[0])["predictions"][0]
    assert np.allclose(boxes[1]["box"], boxes[0]["box"], atol=0.5)
    assert (boxes[1]["label"], boxes[1]["layer"]) == (boxes[0]["label"], boxes[0]["layer"])


def test_compile_with_a_gpu_device_is_refused_before_the_model_loads(tmp_path, monkeypatch) -> None:
    import torch
    from click.testing import CliRunner

    import neuroloc.device
    import neuroloc.models
    from neuroloc.cli import main

    monkeypatch.setattr(neuroloc.device, "resolve_device", lambda _value: torch.device("cuda"))
    loads = []
    monkeypatch.setattr(neuroloc.models, "load_model", lambda *a, **k: loads.append(1))
    picture = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(picture)
    result = CliRunner().invoke(main, ["localize", str(picture), "-o", str(tmp_path / "o.jsonl"), "--compile"])
    assert result.exit_code == 2 and "--compile compiles for the CPU, and this run would use cuda" in result.output
    assert loads == []
