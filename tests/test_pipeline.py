"""End to end with the embedded EfficientNet-Lite0 on 20 real ILSVRC2012 validation photos.

The photos (native resolution, any aspect ratio) and their ground-truth boxes live in the shared data folder
next to the checkout, ``<repo>/../shared/data/ilsvrc2012_val_fullres``; the tests skip when it is absent.
They run the ``default`` preset (the density mode) and the ``paper`` preset (Algorithm 1 as published).
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroloc.config import PRESETS, preset_for
from neuroloc.directions import fit_directions
from neuroloc.imageio import DimImageWarning, load_image
from neuroloc.pipeline import localize_batch

# GT-known localization (true class given, IoU >= 0.5 with any ground-truth box of the image), 2026-11-25:
# default preset 10/20 = 50% (mean IoU 0.535); paper preset 10/20 = 50% (per-image best IoU: 0.57 0.02 0.51 0.76
# 0.68 0.37 0.49 0.49 0.41 0.67 0.22 0.08 0.19 0.45 0.60 0.71 0.54 0.25 0.55 0.63). For reference, the
# "fast" preset (no re-scoring) measured 12/20 and "authors" 7/20 (5/20 before its clean-up was corrected, 2026-11-27). Three images sit within 0.01 of 0.5,
# so the bar is one image below the measurement. Since neurons with negative activations are seeded -1 (2026-11-28)
# the paper preset gives 8/20 here (IoUs 0.57 0.03 0.34 0.76 0.64 0.37 0.49 0.49 0.40 0.61 0.22 0.08 0.18 0.49 0.62
# 0.71 0.53 0.25 0.45 0.63), while on the 1,300 dev images it moved by a few images either way (docs/results.md).
MIN_GT_KNOWN_ACCURACY = {"default": 0.45, "paper": 0.35}


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_iou_helper():
    assert _iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert _iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert _iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


@pytest.fixture(scope="module")
def dataset(fullres_dir: Path) -> list[tuple[Path, int, list[tuple[float, float, float, float]]]]:
    """(image path, label, ground-truth boxes in original pixels) for each image, in file-name order."""
    by_image: dict[str, tuple[int, list]] = {}
    with open(fullres_dir / "boxes.csv", newline="") as f:
        for row in csv.DictReader(f):
            label, boxes = by_image.setdefault(row["image"], (int(row["label"]), []))
            assert label == int(row["label"]), f"{row['image']}: two labels"
            boxes.append(tuple(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")))
    items = [(fullres_dir / "images" / name, label, boxes) for name, (label, boxes) in sorted(by_image.items())]
    assert len(items) == 20 and all(path.is_file() for path, _, _ in items)
    return items


@pytest.mark.parametrize("preset_name", ["default", "paper"])
def test_gt_known_localization_on_real_photos(lite0, dataset, preset_name):
    config = PRESETS[preset_name]
    hits, ious = 0, []
    for path, label, boxes in dataset:
        image = load_image(path)
        (result,) = localize_batch(lite0, [image], config, [label])
        width, height = image.size
        x0, y0, x1, y1 = result.box
        assert result.label == label
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, f"{path.name}: box {result.box} outside the image"
        assert result.mask.shape == (height, width)
        assert result.confidence is not None and 0 <= result.confidence.value <= 1
        assert result.prediction_dict()["confidence"] == round(result.confidence.value, 4)
        px, py = result.point
        assert x0 <= px <= x1 and y0 <= py <= y1, f"{path.name}: point {result.point} outside its box {result.box}"
        assert result.empty or result.mask[min(int(py), height - 1), min(int(px), width - 1)]
        assert result.prediction_dict()["point"] == [round(px, 2), round(py, 2)]
        if config.mode == "neurons":  # in density mode "kept" means: inside the region
            assert len(result.kept_neurons) <= config.k
        best = max(_iou(result.box, box) for box in boxes)
        ious.append(round(best, 3))
        hits += best >= 0.5
    accuracy = hits / len(dataset)
    assert accuracy >= MIN_GT_KNOWN_ACCURACY[preset_name], f"GT-known localization {hits}/{len(dataset)}; IoUs {ious}"


@pytest.mark.parametrize("preset_name", ["default", "paper"])
def test_batch_gives_the_same_boxes_as_single_calls(lite0, dataset, preset_name):
    config = PRESETS[preset_name]
    # three images of different sizes and aspect ratios (portrait, landscape, 2816x2112)
    chosen = [dataset[i] for i in (4, 9, 13)]
    images = [load_image(path) for path, _, _ in chosen]
    labels = [label for _, label, _ in chosen]
    assert len({im.size for im in images}) == 3
    together = localize_batch(lite0, images, config, labels)
    assert len(together) == 3
    for image, label, batched in zip(images, labels, together):
        (single,) = localize_batch(lite0, [image], config, [label])
        assert batched.box == single.box
        assert batched.image_size == single.image_size == image.size
        assert [(n.channel, n.y, n.x, n.kept) for n in batched.neurons] == [
            (n.channel, n.y, n.x, n.kept) for n in single.neurons
        ]
        assert np.array_equal(batched.mask, single.mask)
        assert batched.confidence == pytest.approx(single.confidence)


def test_top1_class_when_no_label_is_given(lite0, dataset):
    path, _label, _ = dataset[0]
    image = load_image(path)
    (result,) = localize_batch(lite0, [image], PRESETS["default"], None)
    (given,) = localize_batch(lite0, [image], PRESETS["default"], [result.label])
    assert result.box == given.box
    assert 0 < result.probability <= 1
    assert result.top1 == result.label  # no class given: the top-1 is the target
    other = (result.label + 1) % 1000
    (forced,) = localize_batch(lite0, [image], PRESETS["default"], [other])
    assert forced.label == other and forced.top1 == result.label  # a given class keeps the real top-1


def test_a_larger_input_size_gives_finer_maps_and_a_box_of_the_same_object(lite0, dataset):
    path, label, boxes = dataset[4]
    image = load_image(path)
    (at_224,) = localize_batch(lite0, [image], PRESETS["default"], [label], keep_maps=True)
    larger = lite0.at_input_size(320)
    assert larger.input_size == 320 and larger.module is lite0.module and lite0.input_size == 224
    (at_320,) = localize_batch(larger, [image], PRESETS["default"], [label], keep_maps=True)
    assert at_224.density.shape == (224, 224) and at_320.density.shape == (320, 320)
    width, height = image.size
    x0, y0, x1, y1 = at_320.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and at_320.mask.shape == (height, width)
    assert _iou(at_224.box, at_320.box) > 0.5, (at_224.box, at_320.box)
    assert max(_iou(at_320.box, box) for box in boxes) >= 0.5


def test_input_size_limits(lite0):
    from neuroloc.models import ModelError

    assert lite0.at_input_size(None) is lite0 and lite0.at_input_size(224) is lite0
    for size in (63, 1025):
        with pytest.raises(ModelError, match="outside 64..1024"):
            lite0.at_input_size(size)


def test_a_sixteen_bit_picture_given_to_the_api_is_read_as_its_file_would_be(lite0, dataset, tmp_path):
    """Pictures handed to the API go through the same conversion as files (a 16-bit picture was clipped)."""
    from PIL import Image

    from neuroloc.pipeline import Localizer

    path, label, _ = dataset[0]
    twelve_bit = np.asarray(load_image(path).convert("L"), dtype=np.uint16) * 16 + 7
    picture = Image.fromarray(twelve_bit)
    assert picture.mode == "I;16"
    saved = tmp_path / "deep.png"
    picture.save(saved)
    for intensity in ("range", "stretch"):
        localizer = Localizer(lite0, intensity=intensity)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from_file = localizer.localize(str(saved), target=label)
            from_picture = localizer.localize(picture, target=label)
        assert from_picture.box == from_file.box and from_picture.probability == pytest.approx(from_file.probability)
        dim = [w for w in caught if issubclass(w.category, DimImageWarning)]
        if intensity == "range":  # 12-bit data come out dark: each call says so, pointing to "stretch"
            assert [str(w.message).split(":")[0] for w in dim] == [str(saved), "the picture"]
            assert all('Localizer(intensity="stretch")' in str(w.message) for w in dim)
            assert all(w.filename == __file__ for w in dim)  # reported at the caller's line
        else:
            assert dim == []
    with pytest.raises(ValueError, match="unknown intensity"):
        Localizer(lite0, intensity="auto")


def test_localize_many_takes_each_image_s_own_target_by_any_name(lite0, dataset):
    """One batch, a target per image given as a name, WordNet id, index or None (top-1): the results of
    localizing each image alone."""
    from neuroloc.pipeline import Localizer

    localizer = Localizer(lite0)
    (a, label_a, _), (b, label_b, _), (c, _, _) = dataset[:3]
    names = [lite0.classes[label_a].name, lite0.classes[label_b].synset, None]
    many = localizer.localize_many([a, b, c], names)
    alone = [localizer.localize(a, label_a), localizer.localize(b, label_b), localizer.localize(c)]
    assert [r.label for r in many] == [label_a, label_b, alone[2].top1]
    for together, single in zip(many, alone):
        assert together.box == pytest.approx(single.box, abs=0.05)
    with pytest.raises(ValueError, match="2 targets for 3 images"):
        localizer.localize_many([a, b, c], [None, None])
    with pytest.raises(ValueError, match="1 targets for 0 images"):  # as the docstring says, for no images too
        localizer.localize_many([], ["tabby"])


def test_localize_many_goes_through_the_network_a_batch_at_a_time(lite0, dataset, monkeypatch):
    """A long list must not become one batch (about 13 MB an image): batches of ``batch_size``, each read in turn,
    with the boxes of one batch."""
    import neuroloc.pipeline as pipeline

    localizer = pipeline.Localizer(lite0)
    images = [image for image, _, _ in dataset[:5]]
    whole = localizer.localize_many(images, batch_size=5)
    sizes, read = [], []
    batch, picture = pipeline.localize_batch, pipeline.Localizer._picture
    monkeypatch.setattr(pipeline, "localize_batch", lambda model, pictures, *a, **k: sizes.append(len(pictures)) or batch(model, pictures, *a, **k))
    monkeypatch.setattr(pipeline.Localizer, "_picture", lambda self, im: read.append(len(sizes)) or picture(self, im))
    chunked = localizer.localize_many(images, [label for _, label, _ in dataset[:5]], batch_size=2)
    assert sizes == [2, 2, 1] and read == [0, 0, 1, 1, 2]  # each batch read only when its turn comes
    one_batch = localizer.localize_many(images, [label for _, label, _ in dataset[:5]], batch_size=5)
    assert np.allclose([r.box for r in chunked], [r.box for r in one_batch], atol=0.05) and len(whole) == 5
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1"):
            localizer.localize_many(images, batch_size=bad)


def test_localizing_under_bfloat16_autocast(lite0, dataset):
    """The maps computed under autocast may be bfloat16, which numpy cannot take."""
    from neuroloc.pipeline import Localizer

    image, label, _ = dataset[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = Localizer(lite0).localize(image, label)
    assert result.label == label and result.box[2] > result.box[0]


def test_a_model_that_masks_other_classes_with_minus_infinity_is_localized(lite0, dataset):
    """-inf logits for the classes a model leaves out are no error; the localized class's score must be finite."""
    from neuroloc.evidence import NonFiniteEvidence
    from neuroloc.pipeline import Localizer

    image, label, _ = dataset[0]
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[[label, 281]] = True
    handle = lite0.module.register_forward_hook(lambda m, i, out: out.masked_fill(~keep, float("-inf")))
    try:
        for preset in ("default", "paper"):
            result = Localizer(lite0, preset=preset, options={"kmax": 3, "k": 2} if preset == "paper" else None).localize(image)
            assert result.label in (label, 281) and result.box[2] > result.box[0], preset
        with pytest.raises(NonFiniteEvidence, match="score for the class localized is not finite"):
            Localizer(lite0).localize(image, 0 if label != 0 else 1)
        from neuroloc.multi import ClassRule, MultiOptions, localize_image

        for maps in (False, True):  # both paths: the classes' own passes, and copies of the image (keep_maps)
            several = localize_image(lite0, load_image(image), preset_for("default"), MultiOptions(classes=ClassRule(top=5)),
                                     keep_maps=maps)
            assert {r.label for r in several} <= {label, 281}  # masked classes (probability 0) are not ranked choices
        named = MultiOptions(classes=ClassRule(classes=(0 if label != 0 else 1,)))  # named: refused, and said why
        with pytest.raises(NonFiniteEvidence, match="score for the class localized is not finite"):
            localize_image(lite0, load_image(image), preset_for("default"), named)
    finally:
        handle.remove()
    handle = lite0.module.register_forward_hook(lambda m, i, out: out.index_fill(1, torch.tensor([281]), float("inf")))
    try:  # +inf anywhere makes every probability NaN: refused, whichever class is localized
        with pytest.raises(NonFiniteEvidence, match=r"not finite: NaN or \+inf"):
            Localizer(lite0).localize(image, 0)
    finally:
        handle.remove()


def test_a_bfloat16_model_in_every_mode(dataset):
    """The guided-backprop maps of a bfloat16 model are bfloat16 too (the paper preset, keep_maps)."""
    from neuroloc.models import load_model
    from neuroloc.pipeline import Localizer

    model = load_model("efficientnet_lite0")
    model.module.to(torch.bfloat16)
    image, label, _ = dataset[0]
    for localizer, keep in ((Localizer(model, preset="paper", options={"kmax": 3, "k": 2}), False),
                            (Localizer(model), True)):
        result = localizer.localize(image, label, keep_maps=keep)
        assert result.label == label and result.box[2] > result.box[0]


# --- the API as people call it ------------------------------------------------------------------------------------


def test_threads_sharing_one_localizer_get_the_boxes_of_calls_one_at_a_time(lite0, dataset):
    """Hooks live on the shared model: without turns, one thread's pass fired the other's hooks (wrong boxes, or
    'runs more than once per forward pass')."""
    from concurrent.futures import ThreadPoolExecutor

    from neuroloc.pipeline import Localizer

    paths = [path for path, _, _ in dataset[:2]]
    # the paper preset also runs unhooked passes (re-scoring), which must wait while another thread's hooks are on
    for localizer in (Localizer(lite0), Localizer(lite0, preset="paper", options={"kmax": 4, "k": 2})):
        expected = [localizer.localize(p).box for p in paths]
        with ThreadPoolExecutor(max_workers=2) as pool:
            boxes = list(pool.map(lambda i, loc=localizer: loc.localize(paths[i % 2]).box, range(8)))
        for i, box in enumerate(boxes):
            assert box == pytest.approx(expected[i % 2], abs=1e-3)


def test_the_api_works_inside_no_grad_and_inference_mode(lite0, dataset):
    import torch

    from neuroloc.pipeline import Localizer

    localizer, path = Localizer(lite0), dataset[0][0]
    expected = localizer.localize(path).box
    with torch.no_grad():
        assert localizer.localize(path).box == pytest.approx(expected, abs=1e-3)
    with torch.inference_mode():
        assert localizer.localize(path).box == pytest.approx(expected, abs=1e-3)
        built_inside = Localizer()  # its weights are loaded as ordinary tensors all the same
        assert built_inside.localize(path).box == pytest.approx(expected, abs=1e-3)
        hand_made = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    assert torch.is_grad_enabled()
    from neuroloc.hooks import gradients_on

    with pytest.raises(ValueError, match=r"made inside torch.inference_mode\(\).*build or load the model outside"), \
            gradients_on(hand_made):
        pass


def test_arrays_scalar_targets_and_an_empty_batch(lite0, dataset):
    from neuroloc.pipeline import Localizer

    localizer, (path, label, _) = Localizer(lite0), dataset[0]
    picture = load_image(path)
    from_array = localizer.localize(np.asarray(picture), label)
    assert from_array.box == pytest.approx(localizer.localize(picture, label).box, abs=1e-3)
    assert [r.label for r in localizer.localize_many([picture, picture], label)] == [label, label]  # one for all
    assert localizer.localize_many([]) == []
    with pytest.raises(TypeError, match="expected a PIL image, a numpy array or a file path, got list"):
        localizer.localize([[1, 2]])
    with pytest.raises(TypeError, match="calibrate takes a sequence of 20 or more images"):
        localizer.calibrate("photos")  # not its 6 letters
    with pytest.raises(TypeError, match="calibrate takes a sequence"):
        localizer.calibrate(np.asarray(picture))  # one picture's rows are not pictures; a (N, H, W, 3) stack is
    with pytest.raises(ValueError, match="localize_tiles needs the class"):
        localizer.localize_tiles(picture, None, tile=128)  # type: ignore[arg-type]
    assert from_array != localizer.localize(picture, label) and len({from_array}) == 1  # by identity, hashable
    floats = localizer.localize(np.asarray(picture) / 255.0, label)  # float RGB in [0, 1], as matplotlib reads
    assert floats.box == pytest.approx(from_array.box, abs=1e-3)
    import torch

    assert localizer.localize(picture, torch.tensor(label)).box == from_array.box  # logits.argmax() as the class
    assert [r.label for r in localizer.localize_many((p for p in [picture]), np.int64(label))] == [label]
    other = 1 if label != 1 else 2
    assert [r.label for r in localizer.localize_many([picture, picture], torch.tensor([label, other]))] == [label, other]
    named = np.array([localizer.model.classes[label].synset, str(other)])  # a numpy array of names, one per image
    assert [r.label for r in localizer.localize_many([picture, picture], named)] == [label, other]
    with pytest.raises(TypeError, match="a sequence of images; for one image, use localize"):
        localizer.localize_many(str(path))  # not its characters one by one
    with pytest.raises(ValueError, match="one integer"):
        localizer.localize(picture, torch.tensor([1, 2]))


def test_options_change_some_settings_and_keep_the_backbone_s_own(lite0, tmp_path):
    import torch

    from neuroloc.config import configure
    from neuroloc.directions import FeatureDirections
    from neuroloc.models import get_spec, load_model
    from neuroloc.pipeline import Localizer

    torch.save(get_spec("resnet18").build().state_dict(), tmp_path / "r18.pth")
    resnet = load_model("resnet18", tmp_path / "r18.pth")
    own = Localizer(resnet).config
    assert own.objectness == 0.0 and own == configure("default", {}, resnet.spec.default_options)
    tuned = Localizer(resnet, options={"similarity": 1.0, "kmax": 3}).config
    assert tuned == own.with_options(similarity=1.0, kmax=3) and tuned.k == 3  # kmax alone lowers k
    assert PRESETS["paper"].with_options(kmax=np.int64(2)).k == 2  # numpy's integers too (a sweep over np.arange)
    assert Localizer(lite0, preset="paper", options={"kmax": 30}).config == PRESETS["paper"].with_options(kmax=30)
    assert PRESETS["default"].with_options(density_layers="_blocks.10, _blocks.14").density_layers == \
        ("_blocks.10", "_blocks.14")  # as the command line takes them; a list becomes a (hashable) tuple too
    assert hash(PRESETS["default"].with_options(density_layers=["_blocks.10"]))
    with pytest.raises(ValueError, match=r"unknown option 'kmaxx'; the options are mode, layer, .*kmax, k, "):
        Localizer(lite0, options={"kmaxx": 3})
    layers = {"_blocks.10": torch.zeros(112), "_blocks.14": torch.zeros(192)}
    fitted = FeatureDirections(lite0.name, layers, layers, 20, input_size=320)
    with pytest.warns(UserWarning, match="fitted at input size 320, fed 224 here"):
        Localizer(lite0, directions=fitted)


def test_a_model_that_returns_a_tuple_or_runs_in_double_precision(dataset):
    import torch

    picture = load_image(dataset[0][0])

    class WithFeatures(torch.nn.Sequential):
        def forward(self, x):
            return super().forward(x), x

    with pytest.raises(ValueError, match="must return \\(N, classes\\) logits, and gave a tuple"):
        localize_batch(_wrapped(WithFeatures(*_small_net(inplace=False)).eval()), [picture], PRESETS["default"])
    with pytest.raises(ValueError, match="must return \\(N, classes\\) logits, and gave a tuple"):
        fit_directions(_wrapped(WithFeatures(*_small_net(inplace=False)).eval()), [picture] * 2, ["2"])
    with pytest.raises(ValueError, match="shape \\(5,\\); it must return \\(N, classes\\) logits"):
        localize_batch(_wrapped(torch.nn.Sequential(*_small_net(inplace=False), torch.nn.Flatten(0))), [picture],
                       PRESETS["default"])
    single = localize_batch(_wrapped(_small_net(inplace=False)), [picture], PRESETS["default"])[0]
    double = localize_batch(_wrapped(_small_net(inplace=False).double()), [picture], PRESETS["default"])[0]
    assert double.label == single.label and double.box == pytest.approx(single.box, abs=2.0)


def _small_net(inplace: bool):
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(inplace), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU6(inplace),
                        nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 5))
    return net.eval()


def _wrapped(net):
    from neuroloc.classes import named_classes
    from neuroloc.models import LoadedModel, ModelSpec, Preprocessing

    spec = ModelSpec(name="small", description="test net", input_size=64, preprocessing=Preprocessing(),
                     default_layer="2", weights_source="none", locate_weights=lambda: None, density_layers=("2", "4"))
    return LoadedModel("small", net, spec, "none", classes=named_classes([f"c{i}" for i in range(5)]))


def test_an_in_place_activation_after_a_recorded_layer_changes_nothing(dataset):
    """The recorded features are the layer's own output whether the ReLU after it is in place or not, and
    whether the weights are frozen (the graph then starts at the layer) or not."""
    picture = load_image(dataset[0][0])
    maps = []
    for inplace in (False, True):
        for frozen in (False, True):
            net = _small_net(inplace)
            for p in net.parameters():
                p.requires_grad_(not frozen)
            for keep in (False, True):
                (result,) = localize_batch(_wrapped(net), [picture], PRESETS["default"], [1], keep_maps=keep)
                maps.append((result.density, result.box))
    for density, box in maps[1:]:
        np.testing.assert_allclose(density, maps[0][0], atol=1e-6)
        assert box == pytest.approx(maps[0][1], abs=1e-3)


def test_the_class_gradient_stays_plain_below_a_higher_ranked_layer(lite0, dataset):
    """Votes do not depend on which recorded layer comes first: the class gradient to a density layer below the
    ranked one (or below the first density layer listed) crosses plain ReLUs, while a neuron's guided
    backpropagation crosses guided ones wherever the recorded layers lie."""
    from neuroloc.pipeline import gather_evidence, image_to_input

    inputs = image_to_input([load_image(dataset[0][0])], lite0)
    default = PRESETS["default"].with_options(similarity=0.0, objectness=0.0)
    reference = gather_evidence(lite0, inputs, [None], default, neuron_maps=False).votes
    for config in (default.with_options(density_layers=("_blocks.14", "_blocks.10")),
                   PRESETS["fast"].with_options(layer="_blocks.14", kmax=2)):
        votes = gather_evidence(lite0, inputs, [None], config, neuron_maps=True).votes
        np.testing.assert_allclose(votes, reference, atol=1e-5, err_msg=str(config.density_layers or config.layer))
    alone = PRESETS["fast"].with_options(layer="_blocks.14", kmax=2, density_layers=("_blocks.14",))
    maps = gather_evidence(lite0, inputs, [None], alone).maps
    crossed = gather_evidence(lite0, inputs, [None], alone.with_options(density_layers=("_blocks.10", "_blocks.14"))).maps
    np.testing.assert_allclose(crossed, maps, atol=1e-6)  # guided below _blocks.14 with a recorded layer in between


def test_a_model_in_training_mode_is_refused_and_left_as_it_was(dataset):
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"training mode \(1\).*call \.eval\(\)"):
        localize_batch(_wrapped(net), [load_image(dataset[0][0])], PRESETS["default"], [1])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert localize_batch(_wrapped(net.eval()), [load_image(dataset[0][0])], PRESETS["default"], [1])[0].box


def test_tf32_flags_come_back_after_blocks_in_several_threads() -> None:
    import threading

    import torch

    from neuroloc.device import _precision_api, _set_tf32_settings, _tf32_settings, exact_float32

    new_api = _precision_api(torch)
    allowed, exact = (("tf32", "tf32"), ("ieee", "ieee")) if new_api else ((True, True), (False, False))
    original = _tf32_settings(torch)
    _set_tf32_settings(torch, allowed)
    inside, release = threading.Barrier(3), threading.Event()

    def block() -> None:
        with exact_float32():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=block) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait()  # both threads are in their blocks
    assert _tf32_settings(torch) == exact
    release.set()
    for thread in threads:
        thread.join()
    assert _tf32_settings(torch) == allowed
    _set_tf32_settings(torch, original)


def test_the_mask_of_a_tiny_image_keeps_its_region() -> None:
    from neuroloc.pipeline import mask_at_image_size

    region = np.zeros((224, 224), dtype=bool)
    region[10:40, 150:200] = True  # away from the centre, where nearest sampling of a 1x1 image looks
    assert mask_at_image_size(region, (1, 1)).tolist() == [[True]]
    narrow = mask_at_image_size(region, (1, 500))
    assert narrow.shape == (500, 1) and narrow.any()
    big = mask_at_image_size(region, (448, 448))  # larger: nearest, the region doubled
    assert big.sum() == 4 * region.sum()


def test_a_localizer_reads_images_up_to_its_max_pixels(dataset, lite0):
    from neuroloc.imageio import ImageError
    from neuroloc.pipeline import Localizer

    path = dataset[0][0]
    with pytest.raises(ImageError, match="over the limit of 1,000; raise the limit .*Localizer\\(max_pixels=N\\)"):
        Localizer(lite0, max_pixels=1000).localize(path)
    assert Localizer(lite0, max_pixels=10**10).localize(path).box
    with pytest.raises(ValueError, match="max_pixels must be a positive whole number"):
        Localizer(lite0, max_pixels=0)


def test_the_package_lists_its_lazily_imported_api() -> None:
    import neuroloc

    assert {"Localizer", "localize_batch", "LocalizeConfig", "__version__"} <= set(dir(neuroloc))
    assert set(neuroloc.__all__) <= set(dir(neuroloc))
    assert neuroloc.Localizer.__name__ == "Localizer"


def test_the_api_refuses_odd_arguments_in_one_line(lite0, dataset):
    import torch

    from neuroloc.imageio import array_to_rgb
    from neuroloc.pipeline import Localizer

    localizer, (path, label, _) = Localizer(lite0), dataset[0]
    for target in (True, 3.0, torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="a class"):
            localizer.localize(path, target)
    assert localizer.localize(path, np.array(label)).label == label  # a 0-d array, as a one-element tensor
    assert [r.label for r in localizer.localize_many([path, path], np.array(label))] == [label, label]
    with pytest.raises(ValueError, match="a class is an index"):
        localizer.localize_many([path], 2.0)
    with pytest.raises(TypeError, match="in the images' order: a list or a tuple, not a set"):
        localizer.localize_many([path], {label})
    with pytest.raises(TypeError, match="model must be a registered model's name or a LoadedModel"):
        Localizer(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a LocalizeConfig"):
        Localizer(lite0, config={"kmax": 3})  # type: ignore[arg-type]
    for bad in ("10", 1.5, 0):
        with pytest.raises(ValueError, match="max_pixels must be a positive whole number"):
            Localizer(lite0, max_pixels=bad)  # type: ignore[arg-type]
    assert localize_batch(lite0, [], PRESETS["default"]) == []
    with pytest.raises(TypeError, match="localize_batch takes PIL images, got a PosixPath"):
        localize_batch(lite0, [path], PRESETS["default"])
    with pytest.raises(ValueError, match="a label is a class index"):
        localize_batch(lite0, [load_image(path)], PRESETS["default"], [3.7])
    with pytest.raises(TypeError, match=r"array of shape \(100,\)"):
        array_to_rgb(np.zeros(100, np.uint8))
