"""Classifiers trained on their own classes: fine-tuned heads, factory models with C outputs (one logit
included), class-name files, and those names through localize, evaluate, the viewer, COCO and the export
formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from neuroloc.classes import ClassLookupError, classes_for, imagenet_classes, read_class_names, recorded_class, resolve_class
from neuroloc.cli import main
from neuroloc.coco import coco_document
from neuroloc.config import PRESETS
from neuroloc.export import ExportError, build_export, select
from neuroloc.models import ModelError, get_spec, load_model
from neuroloc.pipeline import localize_batch

FIVE = "backbone_factories:five_classes"


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def names_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\ufeffhealthy cell\nmitotic cell\n apoptotic cell \ndebris\nempty well\n\n\n", encoding="utf-8")
    return path


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "plate.png"
    Image.radial_gradient("L").convert("RGB").resize((96, 80)).save(path)
    return path


# --- class lists ---------------------------------------------------------------------------------------------------


def test_own_class_names_with_commas_or_digits_are_whole_names(tmp_path: Path) -> None:
    """ImageNet's commas separate synonyms; an own class's name is one name. A name like "20" is that class."""
    names = tmp_path / "names.txt"
    names.write_text("defect, minor\ndefect, major\nok\n20\n10\n", encoding="utf-8")
    classes = read_class_names(names)
    assert resolve_class("defect, minor", classes).index == 0 and resolve_class("Defect, Major", classes).index == 1
    with pytest.raises(ClassLookupError, match=r"ambiguous: 0 \(defect, minor\); 1 \(defect, major\)"):
        resolve_class("defect", classes)
    assert [c.short_name for c in classes[:2]] == ["defect, minor", "defect, major"]  # notes and lists name them whole
    from types import SimpleNamespace

    from neuroloc.viewer.index import _short
    from neuroloc.viz import caption

    for name, synset, short in (("defect, major", None, "defect, major"), ("tabby, tabby cat", "n02123045", "tabby")):
        shown = SimpleNamespace(name=name, synset=synset, probability=0.9, confidence=None)
        assert caption(shown) == f"{short} 90.0%" and _short({"name": name, "synset": synset}) == short  # type: ignore[arg-type]
    assert resolve_class("20", classes).index == 3 and resolve_class("10", classes).index == 4  # names, not indices
    assert resolve_class("2", classes).index == 2 and resolve_class(4, classes).index == 4  # not a name, or an int
    from neuroloc.classes import inexact_name

    assert inexact_name("minor", resolve_class("minor", classes)) and not inexact_name("Defect, Minor", classes[0])
    names.write_text("ok\nnot ok\n", encoding="utf-16")
    with pytest.raises(ClassLookupError, match="not UTF-8 text .*save the class names as UTF-8"):
        read_class_names(names)


def test_class_names_file_is_read_in_output_order(names_file: Path) -> None:
    classes = read_class_names(names_file)
    assert [c.name for c in classes] == ["healthy cell", "mitotic cell", "apoptotic cell", "debris", "empty well"]
    assert [c.index for c in classes] == [0, 1, 2, 3, 4] and all(c.synset is None for c in classes)
    assert resolve_class("debris", classes).index == 3
    assert resolve_class("Mitotic", classes).index == 1  # a unique prefix, any case
    assert resolve_class(4, classes).name == "empty well"
    with pytest.raises(ClassLookupError, match="ambiguous"):
        resolve_class("healthy", (*classes, classes[0].__class__(5, None, "healthy tissue")))
    with pytest.raises(ClassLookupError, match="unknown class 'tabby'"):
        resolve_class("tabby", classes)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "no class names"), ("a\n\nb\n", "line 2 is blank"), ("cat\nCat\n", "line 2 repeats"),
     ("x" * 201 + "\n", "longer than 200")],
)
def test_bad_class_names_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "names.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ClassLookupError, match=message):
        read_class_names(path)
    with pytest.raises(ClassLookupError, match="no such class-names file"):
        read_class_names(tmp_path / "missing.txt")


def test_class_names_are_split_at_line_ends_only(tmp_path: Path) -> None:
    path = tmp_path / "names.txt"
    path.write_bytes("a\vb\nc\u2028d\r\ne\x85f\rg\n".encode())
    assert [c.name for c in read_class_names(path)] == ["a\vb", "c\u2028d", "e\x85f", "g"]


def test_classes_for_a_model_follow_its_number_of_outputs(names_file: Path) -> None:
    assert classes_for(1000) is imagenet_classes()
    assert [c.name for c in classes_for(3)] == ["class_0", "class_1", "class_2"]
    assert len(classes_for(5, read_class_names(names_file))) == 5
    with pytest.raises(ClassLookupError, match="5 class names for a model with 4 outputs"):
        classes_for(4, read_class_names(names_file))


def test_recorded_class_tells_imagenet_predictions_from_a_models_own() -> None:
    assert recorded_class({"label": 281, "synset": "n02123045", "name": "tabby, tabby cat"}).short_name == "tabby"
    assert recorded_class({"label": 281}).synset == "n02123045"  # hand-written lines without names: ImageNet
    own = recorded_class({"label": 1203, "synset": None, "name": "spiral galaxy"})
    assert (own.index, own.synset, own.name) == (1203, None, "spiral galaxy")
    with pytest.raises(ClassLookupError, match="not an ImageNet-1k class index"):
        recorded_class({"label": 1203, "synset": "n0", "name": "x"})
    with pytest.raises(ClassLookupError, match="not a class index"):
        recorded_class({"label": -1, "synset": None, "name": "x"})


# --- models --------------------------------------------------------------------------------------------------------


def _fine_tuned(name: str, outputs: int, path: Path) -> Path:
    """A state_dict of ``name`` with random weights and a final layer of ``outputs`` classes."""
    torch.manual_seed(0)
    state = get_spec(name).build().state_dict()
    head = "_fc" if name.startswith("efficientnet") else "classifier.1"
    state[f"{head}.weight"] = torch.randn(outputs, *state[f"{head}.weight"].shape[1:]) * 0.01
    state[f"{head}.bias"] = torch.zeros(outputs)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["efficientnet_lite0", "squeezenet1_1"])
def test_fine_tuned_weights_get_a_head_of_their_size(tmp_path: Path, name: str) -> None:
    weights = _fine_tuned(name, 3, tmp_path / "tuned.pth")
    model = load_model(name, weights, class_names=["ant", "bee", "wasp"])
    size = model.input_size
    assert tuple(model.module(torch.zeros(1, 3, size, size)).shape) == (1, 3)
    assert [c.name for c in model.classes] == ["ant", "bee", "wasp"]
    if model.spec.classifier is not None:  # CAM reads the rebuilt layer
        assert model.spec.classifier(model.module).out_features == 3
    result = localize_batch(model, [Image.new("RGB", (70, 50), (90, 160, 30))], PRESETS["default"], [2])[0]
    assert (result.label, result.name, result.synset) == (2, "wasp", None)
    with pytest.raises(ValueError, match="class index 3 is out of range"):
        localize_batch(model, [Image.new("RGB", (70, 50))], PRESETS["default"], [3])
    assert [c.name for c in load_model(name, weights).classes] == ["class_0", "class_1", "class_2"]


def test_weights_whose_final_layer_differs_in_more_than_its_outputs_are_refused(tmp_path: Path) -> None:
    state = get_spec("efficientnet_lite0").build().state_dict()
    state["_fc.weight"] = torch.zeros(3, 100)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match=r"only the number of outputs may differ"):
        load_model("efficientnet_lite0", tmp_path / "bad.pth")


def test_a_factory_model_with_its_own_classes(names_file: Path) -> None:
    model = load_model(FIVE)
    assert [c.name for c in model.classes] == [f"class_{i}" for i in range(5)]
    named = load_model(FIVE, class_names=names_file)
    assert named.classes[3].name == "debris" and named.spec.classifier(named.module).out_features == 5
    with pytest.raises(ModelError, match="labels.txt: 5 class names for a model with 1000 outputs"):
        load_model("backbone_factories:tiny_net_128", class_names=names_file)
    with pytest.raises(ModelError, match="different from each other"):
        named.with_class_names(["a", "b", "c", "d", "A"])


# --- command line --------------------------------------------------------------------------------------------------


def test_cli_localizes_a_named_class_of_the_models_own(tmp_path: Path, names_file: Path, picture: Path) -> None:
    out, coco = tmp_path / "out.jsonl", tmp_path / "coco.json"
    result = run("localize", picture, "--model", FIVE, "--class-names", names_file, "--class", "debris",
                 "-o", out, "--coco", coco, "--masks", tmp_path / "m")
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(out.read_text())["predictions"]
    assert (prediction["label"], prediction["name"], prediction["synset"]) == (3, "debris", None)
    (category,) = json.loads(coco.read_text())["categories"]
    assert category == {"id": 3, "name": "debris", "supercategory": "object"}

    several = run("localize", picture, "--model", FIVE, "--class-names", names_file,
                  "--classes", "empty well,mitotic", "-o", tmp_path / "two.jsonl")
    assert several.exit_code == 0, several.output
    found = json.loads((tmp_path / "two.jsonl").read_text())["predictions"]
    assert [p["name"] for p in found] == ["empty well", "mitotic cell"]


@pytest.mark.parametrize(
    ("extra", "code", "fragment"),
    [
        (["--class", "tabby"], 2, "unknown class 'tabby'"),
        (["--classes", "debris,tabby"], 2, "unknown class 'tabby'"),
        (["--class", "7"], 2, "class index 7 out of range 0..4"),
    ],
)
def test_cli_refuses_classes_the_model_does_not_have(
    tmp_path: Path, names_file: Path, picture: Path, extra: list[str], code: int, fragment: str
) -> None:
    result = run("localize", picture, "--model", FIVE, "--class-names", names_file, *extra, "-o", tmp_path / "o.jsonl")
    assert result.exit_code == code and fragment in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_refuses_a_names_file_that_does_not_fit_the_model(tmp_path: Path, names_file: Path, picture: Path) -> None:
    result = run("localize", picture, "--class-names", names_file, "-o", tmp_path / "o.jsonl")
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        f"Error: {names_file}: 5 class names for a model with 1000 outputs"]
    missing = run("localize", picture, "--model", FIVE, "--class-names", tmp_path / "nope.txt", "-o", tmp_path / "o.jsonl")
    assert missing.exit_code == 1 and "no such class-names file" in missing.output


# --- export --------------------------------------------------------------------------------------------------------


def _records() -> list[dict[str, Any]]:
    def prediction(label: int, name: str) -> dict[str, Any]:
        return {"label": label, "synset": None, "name": name, "score": 0.9, "confidence": 0.5, "box": [1, 2, 30, 40]}

    return [
        {"image": "a.png", "width": 64, "height": 48, "model": "mine", "error": None,
         "predictions": [prediction(1203, "spiral galaxy"), prediction(7, "star")]},
        {"image": "b.png", "width": 64, "height": 48, "model": "mine", "error": None,
         "predictions": [prediction(7, "star")]},
    ]


def test_export_names_a_models_own_classes_in_every_format(tmp_path: Path) -> None:
    selection = select(_records())
    assert [(c.index, c.label, c.name) for c in selection.classes] == [(0, 7, "star"), (1, 1203, "spiral galaxy")]
    yolo = build_export(selection, "yolo", tmp_path)
    assert yolo.files["classes.txt"] == "star\nspiral galaxy\n"
    assert '1: "spiral galaxy"' in yolo.files["dataset.yaml"] and yolo.files["labels/a.txt"].startswith("1 ")
    categories = json.loads(build_export(selection, "coco", tmp_path).files["annotations.json"])["categories"]
    assert categories == [{"id": 1, "name": "star", "class_index": 7, "supercategory": "object"},
                          {"id": 2, "name": "spiral galaxy", "class_index": 1203, "supercategory": "object"}]
    assert "<name>spiral galaxy</name>" in build_export(selection, "voc", tmp_path).files["Annotations/a.xml"]
    tasks = json.loads(build_export(selection, "labelstudio", tmp_path).files["tasks.json"])
    assert tasks[0]["predictions"][0]["result"][0]["value"]["rectanglelabels"] == ["spiral galaxy"]
    assert [c["name"] for c in coco_document(_records())["categories"]] == ["star", "spiral galaxy"]


def test_export_refuses_one_class_index_under_two_names() -> None:
    records = _records()
    records[1]["predictions"][0]["name"] = "planet"
    with pytest.raises(ExportError, match="class 7 is named both 'star' and 'planet'"):
        select(records)


def test_localizer_takes_a_target_among_the_models_own_classes(names_file: Path) -> None:
    from neuroloc import Localizer

    localizer = Localizer(model=load_model(FIVE, class_names=names_file))
    result = localizer.localize(Image.new("RGB", (64, 64), (20, 200, 90)), target="empty well")
    assert (result.label, result.name) == (4, "empty well")
    with pytest.raises(ClassLookupError):
        localizer.localize(Image.new("RGB", (64, 64)), target="tabby")


def test_evaluate_reads_a_dataset_that_names_the_models_own_classes(tmp_path: Path, names_file: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = ["image,synset,label,xmin,ymin,xmax,ymax"]
    for i, (name, box) in enumerate([("debris", (10, 12, 50, 40)), ("mitotic cell", (0, 0, 30, 30))]):
        Image.radial_gradient("L").convert("RGB").resize((64, 48)).save(data / "images" / f"w{i}.png")
        rows.append(f"w{i}.png,{name},,{box[0]},{box[1]},{box[2]},{box[3]}")
    (data / "boxes.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    result = run("evaluate", data, "--model", FIVE, "--class-names", names_file, "--method", "dam",
                 "--method", "center", "--output", out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "dam" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["predictions"][0]["label"], r["predictions"][0]["name"]) for r in lines] == [(3, "debris"), (1, "mitotic cell")]
    assert "debris" in (out / "per_class.csv").read_text()

    unnamed = run("evaluate", data, "--model", FIVE, "--method", "center", "--output", tmp_path / "e2")
    assert unnamed.exit_code == 1 and "unknown class 'debris'" in unnamed.output


def test_factory_weights_fine_tuned_on_other_classes_rebuild_its_head(tmp_path: Path) -> None:
    state = load_model("backbone_factories:tiny_net_128").module.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(4, state["fc.weight"].shape[1]), torch.arange(4.0)
    torch.save(state, tmp_path / "tuned.pth")
    model = load_model("backbone_factories:tiny_net_128", weights=tmp_path / "tuned.pth", class_names=list("abcd"))
    assert torch.equal(model.module.fc.bias, torch.arange(4.0)) and [c.name for c in model.classes] == list("abcd")
    assert model.spec.classifier(model.module) is model.module.fc


def test_viewer_looks_classes_up_among_the_models_own(tmp_path: Path, names_file: Path, picture: Path) -> None:
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from neuroloc.viewer.app import create_app

    results = tmp_path / "out.jsonl"
    made = run("localize", picture, "--model", FIVE, "--class-names", names_file, "-o", results)
    assert made.exit_code == 0, made.output
    client = TestClient(create_app(results, model=FIVE, class_names=names_file, cache_dir=tmp_path / "cache"))
    found = client.get("/api/classes", params={"q": "cell"}).json()
    assert [c["name"] for c in found["classes"]] == ["healthy cell", "mitotic cell", "apoptotic cell"]
    explained = client.get("/api/items/1/explain", params={"cls": "debris"}).json()
    assert (explained["result"]["label"], explained["result"]["name"]) == (3, "debris")
    assert {c["name"] for c in explained["result"]["top5"]} <= {c.name for c in read_class_names(names_file)}
    unknown = client.get("/api/items/1/explain", params={"cls": "tabby"})
    assert unknown.status_code == 400 and "tabby" in unknown.json()["error"]


def test_a_head_of_a_few_real_classes_gives_the_full_models_boxes(tmp_path: Path, lite0, fullres_dir: Path) -> None:
    """Real weights: Lite0 with its head cut down to three of its own rows stands for a model fine-tuned on three
    classes. With the class given, the votes come from that class's logit alone and the rest of the map is
    class-agnostic, so the boxes must equal the 1000-class model's: nothing in the pipeline may lean on
    ImageNet's class count or tables."""
    rows = [109, 920, 47]  # brain coral, traffic light, African chameleon (the first three full-resolution images)
    state = {k: v.clone() for k, v in lite0.module.state_dict().items()}
    state["_fc.weight"], state["_fc.bias"] = state["_fc.weight"][rows], state["_fc.bias"][rows]
    torch.save(state, tmp_path / "three.pth")
    three = load_model("efficientnet_lite0", tmp_path / "three.pth", class_names=["coral", "light", "chameleon"])
    images = [Image.open(p).convert("RGB") for p in sorted((fullres_dir / "images").iterdir())[:3]]
    full = localize_batch(lite0, images, PRESETS["default"], rows)
    mine = localize_batch(three, images, PRESETS["default"], [0, 1, 2])
    assert [m.name for m in mine] == ["coral", "light", "chameleon"]
    for m, f in zip(mine, full):
        assert m.box == pytest.approx(f.box, abs=1e-3)
    assert all(m.probability > f.probability for m, f in zip(mine, full))  # a softmax over three classes


def test_classes_command_lists_and_searches_a_names_file(names_file: Path) -> None:
    listed = run("classes", "cell", "--class-names", names_file)
    assert listed.exit_code == 0 and listed.output.splitlines() == [
        "   0  healthy cell", "   1  mitotic cell", "   2  apoptotic cell"]
    assert run("classes", "tabby", "--class-names", names_file).exit_code == 1
    assert "281  n02123045  tabby" in run("classes", "tabby").output


def test_a_model_wrapped_by_hand_with_the_wrong_class_count_is_refused() -> None:
    from dataclasses import replace

    from neuroloc.classes import named_classes

    five = load_model(FIVE)
    wrong = replace(five, classes=imagenet_classes())  # as a LoadedModel built by hand without classes= gets
    with pytest.raises(ValueError, match=r"logits of shape \(1, 5\) but has 1000 class names"):
        localize_batch(wrong, [Image.new("RGB", (40, 40))], PRESETS["default"])
    right = replace(five, classes=named_classes(list("abcde")))
    assert localize_batch(right, [Image.new("RGB", (40, 40))], PRESETS["default"], [4])[0].name == "e"


def test_a_single_logit_binary_classifier_reports_its_sigmoid(tmp_path: Path, picture: Path) -> None:
    from neuroloc.pipeline import image_to_input
    from neuroloc.rescore import class_probabilities, class_score

    assert torch.allclose(class_probabilities(torch.tensor([[1.0, 2.0]])), torch.tensor([[1.0, 2.0]]).softmax(dim=1))
    assert float(class_probabilities(torch.tensor([[0.4]]))[0, 0]) == pytest.approx(float(torch.sigmoid(torch.tensor(0.4))))
    assert float(class_score(torch.tensor([[0.0]]), torch.tensor([0]), "probability")) == pytest.approx(0.5)

    model = load_model("backbone_factories:one_logit", class_names=["defect"])
    image = Image.open(picture).convert("RGB")
    with torch.no_grad():
        expected = float(torch.sigmoid(model.module(image_to_input([image], model))[0, 0]))
    for preset in ("default", "paper"):
        result = localize_batch(model, [image], PRESETS[preset])[0]
        assert result.name == "defect" and result.probability == pytest.approx(expected, abs=1e-6), preset
    names = tmp_path / "n.txt"
    names.write_text("defect\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    ran = run("localize", picture, "--model", "backbone_factories:one_logit", "--class-names", names, "-o", out)
    assert ran.exit_code == 0, ran.output
    assert json.loads(out.read_text())["predictions"][0]["score"] == pytest.approx(expected, abs=1e-5)


def test_voc_annotations_may_name_the_models_own_classes(tmp_path: Path, names_file: Path) -> None:
    from neuroloc.evaluation.dataset import DatasetError, load_dataset

    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>{x}</xmax><ymax>9</ymax>"
                      "</bndbox></object>" for n, x in (("debris", 5), ("healthy cell", 7), ("debris", 8)))
    (tmp_path / "Annotations" / "w.xml").write_text(f"<annotation><filename>w.png</filename>{objects}</annotation>")
    sample, healthy = load_dataset(tmp_path, read_class_names(names_file))
    assert sample.label == 3 and sample.boxes == ((0.0, 1.0, 5.0, 9.0), (0.0, 1.0, 8.0, 9.0))  # VOC: from 1, inclusive
    assert healthy.image == sample.image and healthy.boxes == ((0.0, 1.0, 7.0, 9.0),)
    with pytest.raises(DatasetError, match="w.xml: unknown class 'debris'"):
        load_dataset(tmp_path)  # ImageNet's names by default


def test_bench_random_weights_count_a_models_own_outputs() -> None:
    from neuroloc.bench import random_weights_model

    assert [c.name for c in random_weights_model(FIVE).classes] == [f"class_{i}" for i in range(5)]
    imagenet = random_weights_model("squeezenet1_1")
    assert imagenet.classes is imagenet_classes()
    assert localize_batch(imagenet, [Image.new("RGB", (50, 40))], PRESETS["default"], [281])[0].name.startswith("tabby")
