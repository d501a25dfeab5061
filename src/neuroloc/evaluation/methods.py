"""Localization methods compared by the harness, each a small class registered by name.

Every method sees the same model, the same preprocessing (the whole image resized to the input size)
and the same target class, and returns a box in the original image's pixels, plus a saliency map at
input size when it has one (for MaxBoxAccV2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from neuroloc.blobs import peak_pixel, scale_box, scale_point
from neuroloc.config import PRESETS, LocalizeConfig
from neuroloc.device import exact_float32
from neuroloc.directions import FeatureDirections
from neuroloc.evaluation.metrics import boxes_from_map
from neuroloc.evidence import channel_weighted_map
from neuroloc.hooks import guided_relus, record_layer
from neuroloc.models.registry import LoadedModel
from neuroloc.pipeline import image_to_input, localize_batch
from neuroloc.rescore import class_score
from neuroloc.sources import path_key


@dataclass(frozen=True)
class MethodOutput:
    box: tuple[float, float, float, float]
    top1: int
    saliency: np.ndarray | None = None
    probability: float | None = None  # of the target class
    confidence: float | None = None  # localization confidence, for methods that give one
    point: tuple[float, float] | None = None  # the method's own point in image pixels (else the map's peak or box centre)

    def pointing_point(self, image_size: tuple[int, int]) -> tuple[float, float]:
        """The single point the pointing game scores: the method's own, else its map's maximum, else the
        centre of its box (a centred box's is the image centre, the game's centre baseline)."""
        if self.point is not None:
            return self.point
        if self.saliency is not None:
            return scale_point(peak_pixel(self.saliency), self.saliency.shape[::-1], image_size)
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


class Method:
    """Base class: ``run`` localizes ``labels`` in ``images``."""

    name: ClassVar[str]
    gives_map: ClassVar[bool] = False

    def describe(self) -> dict:
        """What identifies this method's results (a resumed run with other settings starts afresh)."""
        return {"method": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def model_settings(self, model: LoadedModel) -> dict:
        """What of ``model`` beyond its name and input size this method's results depend on."""
        return {}

    def unavailable(self, model: LoadedModel) -> str | None:
        """Why this method cannot run on ``model`` (one sentence), or None when it can."""
        return None

    def run(self, model: LoadedModel, images: Sequence[Image.Image], labels: Sequence[int]) -> list[MethodOutput]:
        raise NotImplementedError

    def run_files(
        self, model: LoadedModel, images: Sequence[Image.Image], labels: Sequence[int], paths: Sequence[Path]
    ) -> list[MethodOutput | None]:
        """:meth:`run`, for a method that also needs the images' files (None: nothing for that image)."""
        return list(self.run(model, images, labels))


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _top1(model: LoadedModel, inputs: torch.Tensor) -> list[int]:
    from neuroloc.device import exact_float32

    with torch.no_grad(), exact_float32():  # the class the harness picked, also on CUDA near a tie
        return model.module(inputs).argmax(dim=1).tolist()


def map_to_box(saliency: np.ndarray, threshold: float, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Box around the largest component of ``saliency >= threshold * max``; whole image if the map is flat."""
    size = saliency.shape[::-1]
    boxes = boxes_from_map(saliency, threshold)
    return scale_box(boxes[0] if boxes else (0, 0, size[0] - 1, size[1] - 1), size, image_size)


@register_method
class DamMethod(Method):
    """neuroloc's method with any configuration."""

    name = "dam"

    def __init__(self, config: LocalizeConfig | None = None) -> None:
        self.config = config or PRESETS["default"]
        # directions of its own, fitted for its density layers where they differ from those of the model's
        self.directions: FeatureDirections | None = None

    def describe(self) -> dict:
        return {"method": self.name, **self.config.to_dict()}

    def model_settings(self, model: LoadedModel) -> dict:
        directions = self.directions or model.directions
        if directions is None or not self.config.uses_objectness:
            return {}
        return {"directions": directions.fingerprint}

    def run(self, model, images, labels):
        outputs = []
        if self.directions is not None:
            model = model.with_directions(self.directions)
        for r in localize_batch(model, images, self.config, list(labels)):
            if r.top1 is None:  # localize_batch sets it for every image
                raise RuntimeError(f"no top-1 class for the image localized as {r.label}")
            confidence = r.confidence.value if r.confidence else None
            outputs.append(MethodOutput(r.box, r.top1, r.density, r.probability, confidence, r.point))
        return outputs


@register_method
class TilesMethod(Method):
    """neuroloc tile by tile (``localize --tile``, :mod:`neuroloc.tiles`): the most probable object's box;
    the whole image (and its centre as the point) when no tile's top-1 class is the one given.

    ``directions``: the objectness map's feature directions for the tiles (the evaluate command fits them
    over tiles); None without the map.
    """

    name = "tiles"

    def __init__(self, size: int, config: LocalizeConfig | None = None) -> None:
        self.size = size
        self.config = config or PRESETS["default"]
        self.directions: FeatureDirections | None = None

    def describe(self) -> dict:
        return {"method": self.name, "size": self.size, **self.config.to_dict()}

    def model_settings(self, model: LoadedModel) -> dict:
        if self.directions is None or not self.config.uses_objectness:
            return {}
        return {"directions": self.directions.fingerprint}

    def run(self, model, images, labels):
        from neuroloc.tiles import TileRule, localize_tiled

        tiled = model.with_directions(self.directions)
        top1 = _top1(model, image_to_input(images, model))
        outputs = []
        for image, label, first in zip(images, labels, top1):
            found = localize_tiled(tiled, image, self.config, [label], TileRule(self.size))
            if not found:
                outputs.append(MethodOutput((0.0, 0.0, float(image.width), float(image.height)), first))
                continue
            best = found[0]
            confidence = best.confidence.value if best.confidence else None
            outputs.append(MethodOutput(best.box, first, None, best.probability, confidence, best.point))
        return outputs


def centred_box(width: int, height: int, area: float) -> tuple[float, float, float, float]:
    """The box centred in a ``width`` x ``height`` image, of the image's shape, covering ``area`` of it."""
    side = float(np.sqrt(area))
    return ((1 - side) / 2 * width, (1 - side) / 2 * height, (1 + side) / 2 * width, (1 + side) / 2 * height)


@register_method
class CenterMethod(Method):
    """A centred box covering ``area`` of the image (the strong ILSVRC baseline)."""

    name = "center"

    def __init__(self, area: float = 0.5) -> None:
        self.area = area

    def run(self, model, images, labels):
        top1 = _top1(model, image_to_input(images, model))
        return [MethodOutput(centred_box(im.width, im.height, self.area), t) for im, t in zip(images, top1)]


@register_method
class FullMethod(CenterMethod):
    name = "full"

    def __init__(self) -> None:
        super().__init__(area=1.0)


class _GradientMapMethod(Method):
    """Shared by Grad-CAM and CAM: a map from the activations A of the last conv layer and weights per channel."""

    gives_map = True
    threshold: ClassVar[float]

    def channel_weights(self, model: LoadedModel, activation: torch.Tensor, score: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @exact_float32()
    def run(self, model, images, labels):
        inputs = image_to_input(images, model)
        # the graph starts at the layer, as neuroloc's own passes do: the layers below need none (same boxes)
        with record_layer(model.module, model.spec.cam_layer, graph_root=True) as rec:
            logits = model.module(inputs)
        if rec.activation is None:
            raise ValueError(f"layer {model.spec.cam_layer!r} did not run in the forward pass")
        target = torch.tensor([int(label) for label in labels], dtype=torch.long, device=logits.device)
        weights = self.channel_weights(model, rec.activation, class_score(logits, target).sum(), target)
        cam = channel_weighted_map(rec.activation, weights, model.input_size)
        top1 = logits.argmax(dim=1).tolist()
        return [MethodOutput(map_to_box(c, self.threshold, im.size), t, c) for c, im, t in zip(cam, images, top1)]


@register_method
class GradCamMethod(_GradientMapMethod):
    """Grad-CAM (Selvaraju et al. 2017); box around the largest component at 15% of the map maximum."""

    name = "gradcam"
    threshold = 0.15

    def channel_weights(self, model, activation, score, labels):
        (grad,) = torch.autograd.grad(score, activation)
        return grad.mean(dim=(2, 3))


@register_method
class CamMethod(_GradientMapMethod):
    """CAM (Zhou et al. 2016) for networks ending in global average pooling + linear; 20% threshold."""

    name = "cam"
    threshold = 0.20

    def unavailable(self, model):
        needs = "cam needs a model that ends in global average pooling and one linear layer"
        fc = model.spec.classifier(model.module) if model.spec.classifier is not None else None
        if fc is None:
            return f"{needs}; {model.name} has no such head (gradcam weighs the same layer by gradients instead)"
        with torch.no_grad(), record_layer(model.module, model.spec.cam_layer) as rec:
            model.module(image_to_input([Image.new("RGB", (model.input_size, model.input_size))], model))
        channels = rec.activation.shape[1] if rec.activation is not None and rec.activation.ndim == 4 else None
        if channels != fc.in_features:
            return (f"{needs}; {model.name}'s last linear layer takes {fc.in_features} features, its CAM layer "
                    f"{model.spec.cam_layer!r} gives {channels} channels")
        return None

    def channel_weights(self, model, activation, score, labels):
        fc = model.spec.classifier(model.module)
        return fc.weight.detach()[labels]


class _PixelSaliencyMethod(Method):
    """Gradient of the class score w.r.t. the pixels (plain or guided); box at ``threshold`` of a blurred map."""

    gives_map = True
    guided: ClassVar[bool]
    threshold = 0.2

    @exact_float32()
    def run(self, model, images, labels):
        from scipy import ndimage

        inputs = image_to_input(images, model).requires_grad_(True)
        if self.guided:
            with guided_relus(model.module, above_layer=True):
                logits = model.module(inputs)
        else:
            logits = model.module(inputs)
        target = torch.tensor([int(label) for label in labels], dtype=torch.long, device=logits.device)
        (grad,) = torch.autograd.grad(class_score(logits, target).sum(), inputs)
        maps = grad.abs().amax(dim=1).cpu().numpy()
        maps = ndimage.gaussian_filter(maps, sigma=(0, 8, 8))
        top1 = logits.argmax(dim=1).tolist()
        return [MethodOutput(map_to_box(m, self.threshold, im.size), t, m) for m, im, t in zip(maps, images, top1)]


@register_method
class GradientMethod(_PixelSaliencyMethod):
    name = "gradient"
    guided = False


@register_method
class GuidedMethod(_PixelSaliencyMethod):
    name = "guided"
    guided = True


@contextmanager
def channels_last_on_cpu(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``module`` with NHWC weights on a CPU, then put contiguous weights back.

    Score-CAM runs the network once per channel of the CAM layer; oneDNN's NHWC kernels did those
    forward passes in ~0.7x the time on this project's CPU, with the same maps.
    """
    if device.type != "cpu" or not all(p.is_contiguous() for p in module.parameters()):
        yield
        return
    # Module.to takes memory_format (documented), but torch's type overloads leave it out
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


class _TorchCamMethod(Method):
    """A CAM-family method from the peer library torch-cam (optional extra ``neuroloc[cam]``)."""

    gives_map = True
    torchcam_class: ClassVar[str]
    threshold = 0.15

    def extractor_class(self) -> type:
        from torchcam import methods as torchcam_methods

        return getattr(torchcam_methods, self.torchcam_class)

    def extractor_options(self, device: torch.device) -> dict:
        return {}

    def weight_layout(self, model: LoadedModel) -> AbstractContextManager:
        return nullcontext()

    @exact_float32()
    def run(self, model, images, labels):
        try:
            extractor_cls = self.extractor_class()
        except ImportError as exc:
            raise RuntimeError(f"method {self.name!r} needs torch-cam: pip install --no-deps torchcam") from exc
        inputs = image_to_input(images, model)
        size = model.input_size
        maps, top1 = [], []
        with self.weight_layout(model):
            for i in range(len(images)):  # torch-cam's extractors keep per-call state; one image at a time
                with extractor_cls(model.module, target_layer=model.spec.cam_layer, input_shape=(3, size, size),
                                   **self.extractor_options(model.device)) as extractor:
                    x = inputs[i : i + 1].clone().requires_grad_(True)
                    logits = model.module(x)
                    (cam,) = extractor(class_idx=int(labels[i]), scores=logits)
                maps.append(F.interpolate(cam[None].float().detach(), size=(size, size), mode="bilinear")[0, 0].cpu().numpy())
                top1.append(int(logits.argmax()))
        return [MethodOutput(map_to_box(m, self.threshold, im.size), t, m) for m, im, t in zip(maps, images, top1)]


def _torchcam(name: str, cls_name: str) -> None:
    register_method(type(f"TorchCam{cls_name}", (_TorchCamMethod,), {"name": name, "torchcam_class": cls_name}))


for _name, _cls in (("gradcampp", "GradCAMpp"), ("layercam", "LayerCAM"), ("tc_gradcam", "GradCAM")):
    _torchcam(_name, _cls)


@register_method
class ScoreCamMethod(_TorchCamMethod):
    """torch-cam's Score-CAM, with the forward passes that it repeats for blank masks done once."""

    name = "scorecam"
    torchcam_class = "ScoreCAM"

    def extractor_class(self) -> type:
        from neuroloc.evaluation.scorecam import BlankOnceScoreCAM

        return BlankOnceScoreCAM

    def extractor_options(self, device: torch.device) -> dict:
        # torch-cam's 32 masked inputs at a time suit a GPU. On a CPU, the kernel spent about as long mapping
        # the large fresh buffers of such batches as the network spent computing; in fours it did not.
        return {"batch_size": 32 if device.type == "cuda" else 4}

    def weight_layout(self, model: LoadedModel) -> AbstractContextManager:
        return channels_last_on_cpu(model.module, model.device)  # one forward pass per non-blank channel


@register_method
class RecordedBoxes(Method):
    """The boxes of a JSON Lines file in ``neuroloc localize``'s schema (from ``localize``, its Ray engine, or
    another tool written to the schema), scored as they are: no network runs.

    An image's line is found by its path, else by its file name when only one line has it. Of its predictions
    the one for the class being scored is taken, else the first; boxes are rescaled when the line's
    width/height differ from the image's. The top-1 class (classification and top-1 localization) is the
    evaluated model's, from one forward pass, since a line made for a given class does not hold it.
    """

    name = "file"

    def __init__(self, path: str | Path) -> None:
        from neuroloc.jsonl import read_records

        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"file:{path}: a folder; give the JSON Lines file localize wrote")
        if not self.path.is_file():
            raise ValueError(f"file:{path}: no such file")
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]  # other contents: other results
        records = [r for r in read_records(self.path) if not r.get("error") and r.get("predictions")]
        if not records:
            raise ValueError(f"file:{path}: no line with a prediction")
        self._by_path = {_path_key(r["image"], self.path.parent): r for r in records}
        by_name: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_name.setdefault(Path(record["image"]).name, []).append(record)
        self._by_name = {name: found[0] for name, found in by_name.items() if len(found) == 1}

    def describe(self) -> dict:
        return {"method": self.name, "path": str(self.path), "digest": self.digest}

    def run(self, model, images, labels):
        raise TypeError("the file method needs the images' paths: call run_files")

    def run_files(self, model, images, labels, paths):
        top1 = _top1(model, image_to_input(images, model))
        outputs: list[MethodOutput | None] = []
        for image, label, path, predicted in zip(images, labels, paths, top1):
            record = self._by_path.get(_path_key(path)) or self._by_name.get(Path(path).name)
            if record is None:
                outputs.append(None)
                continue
            predictions = record["predictions"]
            chosen = next((p for p in predictions if p.get("label") == label), predictions[0])
            sx = image.width / (record.get("width") or image.width)  # continuous coordinates, scaled as they are
            sy = image.height / (record.get("height") or image.height)
            x0, y0, x1, y1 = chosen["box"]
            point = chosen.get("point")
            outputs.append(MethodOutput(
                (x0 * sx, y0 * sy, x1 * sx, y1 * sy), predicted, probability=chosen.get("score"),
                confidence=chosen.get("confidence"), point=None if point is None else (point[0] * sx, point[1] * sy),
            ))
        return outputs


def _path_key(path: str | Path, base: Path | None = None) -> str:
    """A path as one string whatever its spelling; a relative one read from ``base`` (else the working folder)."""
    path = Path(path)
    if base is not None and not path.is_absolute() and not path.exists():
        path = base / path
    return path_key(path)


def build_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}")
    return METHODS[name](**options)

