"""The Python examples of the README and the docs run as written, on real photos, so the pages users copy from
cannot rot.

The examples name files a user would have (photo.jpg, a.jpg, slide.tif, tuned.pth, labels.txt, out.jsonl) and
objects of their own (``my_module``, ``pil_image``, ``image``); each test makes them, then runs the block unchanged.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from neuroloc.imageio import load_image
from neuroloc.models.resnet_torchvision import BasicBlock, ResNet

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TABBY = "ILSVRC2012_val_00012551.JPEG"  # a tabby cat (class 281) of the dev set


def python_block(page: Path, heading: str | None = None) -> str:
    """The first ```python block of ``page`` (under its ``## heading`` when one is given)."""
    text = page.read_text(encoding="utf-8")
    if heading is not None:
        text = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", text, re.S)
    assert found, f"no python block in {page.name}" + (f" under '## {heading}'" if heading else "")
    return found.group(1)


def run_block(page: Path, namespace: dict[str, Any], heading: str | None = None) -> dict[str, Any]:
    exec(compile(python_block(page, heading), str(page), "exec"), namespace)
    return namespace


def test_the_python_api_example_runs_as_written(
    tmp_path: Path, fullres_dir: Path, lite0: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tabby = fullres_dir.parent / "ilsvrc2012_val_dev" / "images" / TABBY
    if not tabby.is_file():
        pytest.skip(f"dev image {tabby} not found")
    photos = sorted((fullres_dir / "images").glob("*.JPEG"))
    for name, photo in zip(("photo.jpg", "a.jpg", "b.jpg"), [tabby, *photos]):
        shutil.copy(photo, tmp_path / name)
    (tmp_path / "photos").mkdir()
    for photo in photos:
        shutil.copy(photo, tmp_path / "photos" / f"{photo.stem}.jpg")
    slide = Image.new("RGB", (512, 512), (128, 128, 128))  # the cat in one quarter, other photos in the rest
    for k, photo in enumerate([tabby, *photos[:3]]):
        slide.paste(load_image(photo).resize((256, 256)), (256 * (k % 2), 256 * (k // 2)))
    slide.save(tmp_path / "slide.tif")
    torch.save(lite0.module.state_dict(), tmp_path / "tuned.pth")
    (tmp_path / "labels.txt").write_text("\n".join(f"kind {i}" for i in range(1000)), encoding="utf-8")
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"my_module": ResNet(BasicBlock, (1, 1, 1, 1)), "pil_image": load_image(tabby)}
    monkeypatch.chdir(tmp_path)
    run_block(README, namespace, "Python API")
    assert namespace["result"].label == 281  # target="tabby"
    assert namespace["fitted"].images == len(photos) == 20
    assert namespace["later"].model.directions.fingerprint == namespace["fitted"].fingerprint
    assert len(namespace["results"]) == 1  # localize_batch's, with the untrained my_module: any class, a real box
    assert namespace["objects"] and namespace["mine"].model.classes[0].name == "kind 0"
    box = namespace["results"][0].box
    assert 0 <= box[0] < box[2] <= namespace["pil_image"].width


def test_the_export_and_multi_examples_run_as_written(tmp_path: Path, fullres_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from neuroloc.cli import main

    monkeypatch.chdir(tmp_path)
    photos = sorted((fullres_dir / "images").glob("*.JPEG"))[:2]
    made = CliRunner().invoke(main, ["localize", *map(str, photos), "-o", "out.jsonl", "--threads", "1"])
    assert made.exit_code == 0, made.output
    export = run_block(ROOT / "docs" / "export.md", {})
    assert export["outcome"].selection.counts.images == 2 and any(Path("export/yolo").rglob("*.txt"))
    assert "annotations.json" in "".join(export["files"])
    (tmp_path / "street.jpg").symlink_to(photos[0])  # the file the example names
    multi = run_block(ROOT / "docs" / "multi.md", {})
    assert multi["results"] and set(multi["rle"]) == {"size", "counts"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``neuroloc ...`` command line in the bash blocks of the README and docs/*.md, as (page, arguments)."""
    found = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for start in (j for j, word in enumerate(words) if word == "neuroloc"):
                    end = next((j for j in range(start + 1, len(words)) if words[j] in ("&&", "|", ";")), len(words))
                    found.append((page.name, words[start + 1 : end]))
    return found


def test_every_documented_command_line_uses_options_that_exist() -> None:
    """A renamed or dropped option, or a choice value that is no longer one, fails here before a user meets it."""
    import click

    from neuroloc.cli import main

    commands = documented_commands()
    assert len(commands) > 50
    context = click.Context(main)
    for page, args in commands:
        command = main.get_command(context, args[0]) if args else None  # the subcommands are imported lazily
        assert command is not None, f"{page}: `neuroloc {' '.join(args)}`: no such command"
        options = {name: param for param in command.params if isinstance(param, click.Option)
                   for name in (*param.opts, *param.secondary_opts)}
        for j, word in enumerate(args[1:], start=1):
            if not word.startswith("-") or word == "-":
                continue
            name = word.split("=", 1)[0]
            assert name in options or name in ("-h", "--help"), f"{page}: `neuroloc {' '.join(args)}`: no option {name}"
            param = options.get(name)
            if param is not None and isinstance(param.type, click.Choice) and not param.is_flag and j + 1 < len(args):
                value = word.split("=", 1)[1] if "=" in word else args[j + 1]
                assert value in param.type.choices, f"{page}: `neuroloc {' '.join(args)}`: {name} {value}"


def test_the_factory_example_of_the_backbones_page_runs_from_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/backbones.md's factory, written as my_pkg/nets.py beside a small CellNet and its weights, is found from
    the current folder and localizes with its own preprocessing, input size and three classes."""
    import json
    import sys

    from click.testing import CliRunner

    from neuroloc.cli import main

    page = (ROOT / "docs" / "backbones.md").read_text(encoding="utf-8")
    found = re.search(r"```python\n# my_pkg/nets.py\n(.*?)```", page, re.S)
    assert found, "no factory example in docs/backbones.md"
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(found.group(1), encoding="utf-8")
    (package / "model.py").write_text(
        "from torch import nn\n\n"
        "class CellNet(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),\n"
        "                                      nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())\n"
        "        self.fc = nn.Linear(16, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.features(x).mean((2, 3)))\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # neuroloc adds the current folder; for this test only
    assert str(tmp_path) not in sys.path
    defined: dict[str, Any] = {}
    exec((package / "model.py").read_text(encoding="utf-8"), defined)
    (tmp_path / "runs").mkdir()
    torch.manual_seed(0)
    torch.save(defined["CellNet"](num_classes=3).state_dict(), tmp_path / "runs" / "best.pth")
    Image.new("RGB", (300, 200), (40, 160, 90)).save(tmp_path / "plate.png")
    result = CliRunner().invoke(main, ["localize", "plate.png", "--model", "my_pkg.nets:build", "-o", "out.jsonl"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["error"] is None and record["predictions"][0]["name"] in {"class_0", "class_1", "class_2"}
    for name in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[name]
