"""Algorithm 1 of the paper, one screen: forward, DAM, guided backprop, blobs, re-scoring, union, box."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from neuroloc.backprop import neuron_gradients, saliency_maps
from neuroloc.blobs import clean_masks, mask_box, peak_pixel, scale_box, scale_point, threshold_maps
from neuroloc.classes import ClassInfo, resolve_class
from neuroloc.confidence import Confidence, region_confidence
from neuroloc.config import LocalizeConfig, preset_for
from neuroloc.dam import RankedNeurons, dam_scores, one_hot_neurons, top_neurons
from neuroloc.device import exact_float32
from neuroloc.directions import DirectionsError, FeatureDirections, objectness_map
from neuroloc.evidence import (
    NonFiniteEvidence,
    add_similarity,
    add_weighted_map,
    channel_weighted_map,
    dam_density,
    density_level,
    fuse_densities,
    prototype_similarity,
    region_at,
)
from neuroloc.hooks import gradients_on, guided_relus, record_layers, recorded_activations, unguided_warning
from neuroloc.imageio import DimImageWarning, array_to_rgb, check_intensity, dim_notice, load_image, looks_dim, range_used, to_rgb
from neuroloc.masks import grabcut_region
from neuroloc.models.registry import LoadedModel, input_dtype
from neuroloc.rescore import class_probabilities, class_score, rescore_regions
from neuroloc.result import Localization, Neuron
from neuroloc.select import choose_neurons


def image_to_input(images: Sequence[Image.Image], model: LoadedModel) -> torch.Tensor:
    """Resize each whole image to the model's input size (no crop) and normalise: (N, 3, S, S) on the model's device."""
    size = model.input_size
    arrays = [np.asarray(to_rgb(im).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) for im in images]
    rgb01 = torch.from_numpy(np.stack(arrays)).to(model.device).permute(0, 3, 1, 2) / 255.0
    return model.preprocessing.normalize(rgb01).to(input_dtype(model.module))


@dataclass(frozen=True)
class Evidence:
    """What the network says about a batch: class, neurons, per-neuron maps and blobs, and the regions."""

    labels: torch.Tensor  # (N,) on the CPU, as are probabilities, neurons and top1 (read per image)
    probabilities: torch.Tensor  # (N,)
    neurons: RankedNeurons
    maps: np.ndarray | None  # (kmax, N, S, S) guided-backprop map per neuron
    blobs: np.ndarray | None  # (kmax, N, S, S) bool
    votes: np.ndarray  # (N, S, S) fused DAM votes of the density layers (the confidence reads them in both modes)
    density: np.ndarray | None  # density mode: the map the region is cut from (votes, + similarity); None otherwise
    reference: np.ndarray | None  # (N, S, S) Grad-CAM map of the same pass, the confidence's second opinion
    layer_size: tuple[int, int]  # (h, w) of the layer the neurons come from
    top1: torch.Tensor  # (N,) the classifier's own top-1 class of each image

    def row(self, i: int) -> Evidence:
        """Image ``i``'s evidence alone, a batch of one, copied: it keeps none of the batch's buffers alive."""
        ranked = self.neurons
        one = slice(i, i + 1)

        def own(array: np.ndarray | None, index: tuple[slice, ...]) -> np.ndarray | None:
            return None if array is None else array[index].copy()

        return Evidence(
            self.labels[one].clone(), self.probabilities[one].clone(),
            RankedNeurons(*(t[one].clone() for t in (ranked.channel, ranked.y, ranked.x, ranked.score, ranked.valid))),
            own(self.maps, (slice(None), one)), own(self.blobs, (slice(None), one)), self.votes[one].copy(),
            own(self.density, (one,)), own(self.reference, (one,)), self.layer_size, self.top1[one].clone(),
        )


@dataclass(frozen=True)
class PendingEvidence:
    """A batch's evidence whose region map is still to be drawn: ``--directions auto`` fits the objectness map's
    directions over the very pass that gathered it (:func:`neuroloc.directions.fit_auto`), so the map can only be
    added after the fit."""

    evidence: Evidence  # its density still None
    features: Mapping[str, torch.Tensor]  # the density layers' activations, detached
    layer_votes: Mapping[str, torch.Tensor]  # each density layer's DAM votes (N, h, w)

    def finish(self, config: LocalizeConfig, directions: FeatureDirections | None) -> Evidence:
        """The evidence with its region map (density mode; unchanged in neurons mode)."""
        density = region_map(self.evidence.votes, dict(self.features), dict(self.layer_votes), config, directions)
        return replace(self.evidence, density=density)

    def serves(self, label: int | None) -> bool:
        """Whether this one image's evidence (its top-1 class's) is what localizing ``label`` takes (None: the
        top-1 class)."""
        return label is None or label == int(self.evidence.top1[0])

    def rows(self) -> list[PendingEvidence]:
        """Each image's pending evidence alone, copied out of the batch (kept while the other images are fitted;
        the tensors stay on their device, so the region map is drawn where the image's own pass would draw it)."""
        return [
            PendingEvidence(
                self.evidence.row(i),
                {n: f[i : i + 1].detach().clone() for n, f in self.features.items()},
                {n: v[i : i + 1].detach().clone() for n, v in self.layer_votes.items()},
            )
            for i in range(len(self.evidence.labels))
        ]


def evidence_layers(model: LoadedModel, config: LocalizeConfig) -> tuple[str, tuple[str, ...]]:
    """The layer whose neurons are ranked and reported, and the layers whose DAM votes are fused.

    In ``density`` mode ``--layer`` alone means the votes of that one layer, and neurons are reported
    from the lowest fused layer; in ``neurons`` mode the fused votes only feed the confidence. In ``density`` mode
    the fused layers come in the order the network defines its modules (from the input up, for the registered
    backbones), whatever order they were given in: their votes are averaged alike.
    """
    if config.mode != "density":
        return model.spec.resolve_layer(config.layer), model.spec.resolve_density_layers(config.density_layers)
    fused = in_module_order(model, model.spec.resolve_density_layers(config.density_layers or ((config.layer,) if config.layer else None)))
    return fused[0], fused


def in_module_order(model: LoadedModel, layers: Sequence[str]) -> tuple[str, ...]:
    """``layers`` (module names, aliases resolved) in the order the network defines its modules; names it does
    not have come last, as given."""
    order = {name: i for i, (name, _) in enumerate(model.module.named_modules())}
    return tuple(sorted(layers, key=lambda name: order.get(name, len(order))))


def untimed(_stage: str) -> AbstractContextManager[None]:
    """The default stage timer: no timing. ``neuroloc bench`` passes one that times each stage."""
    return nullcontext()


StageTimer = Callable[[str], AbstractContextManager[None]]


@exact_float32()
def check_class_count(model: LoadedModel, logits: torch.Tensor) -> None:
    """Refuse logits whose number differs from the model's class list, so that no class is misnamed.

    Raises:
        ValueError: naming both numbers (a model wrapped by hand needs ``classes=`` or ``with_class_names``).
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{model.name} must return (N, classes) logits, and gave a {type(logits).__name__}; wrap a "
                         "net that returns several outputs in a module that returns the logits alone")
    if logits.ndim != 2:
        raise ValueError(f"{model.name} gives logits of shape {tuple(logits.shape)}; it must return (N, classes) "
                         "logits, one row per image (a single-logit classifier: (N, 1))")
    if logits.shape[1] != len(model.classes):
        raise ValueError(
            f"{model.name} gives logits of shape {tuple(logits.shape)} but has {len(model.classes)} class names; "
            "give a LoadedModel made by hand its classes (classes=neuroloc.classes.named_classes([...]))"
        )


def gather_evidence(
    model: LoadedModel,
    inputs: torch.Tensor,
    labels: Sequence[int | None],
    config: LocalizeConfig,
    neuron_maps: bool = True,
    stage: StageTimer = untimed,
) -> Evidence:
    """Steps 1-4 for a batch: forward, DAM, guided backprop of the chosen neurons, a blob per neuron.

    The DAM votes of the density layers are fused in both modes (the region in ``density`` mode, the
    confidence in both); in ``density`` mode per-neuron maps are only computed when ``neuron_maps`` is
    set (they are not needed for the box).
    """
    pending = gather_pending_evidence(model, inputs, labels, config, neuron_maps, stage)
    with stage("dam_backward"):
        return pending.finish(config, model.directions)


def gather_pending_evidence(
    model: LoadedModel,
    inputs: torch.Tensor,
    labels: Sequence[int | None],
    config: LocalizeConfig,
    neuron_maps: bool = True,
    stage: StageTimer = untimed,
) -> PendingEvidence:
    """:func:`gather_evidence` without the region map, and with what drawing it takes."""
    net = model.module
    neuron_maps = config.mode == "neurons" or neuron_maps
    with stage("forward"):
        # Without per-neuron maps nothing is differentiated below the evidence layers: no graph there.
        image = inputs.detach().requires_grad_(neuron_maps)
        layer, density_layers = evidence_layers(model, config)
        cam_layer = model.spec.cam_layer
        names = (layer, *density_layers, *([cam_layer] if cam_layer else []))
        with record_layers(net, names, graph_root=True) as recorders, \
                guided_relus(net, list(recorders.values()), config.class_gradient == "guided") as guided_above:
            logits = net(image)  # 1. forward, keeping the layers' activations
        check_class_count(model, logits)
        recorded = recorded_activations(recorders)
        top1 = logits.argmax(dim=1).cpu()
        label = torch.tensor(
            [int(top1[i]) if lab is None else lab for i, lab in enumerate(labels)], dtype=torch.long, device=logits.device
        )
        check_finite_scores(logits, label)
    with stage("dam_backward"):
        score = class_score(logits, label, config.score).sum()
        effects = dict(zip(recorded, torch.autograd.grad(score, list(recorded.values()), retain_graph=neuron_maps)))
        activation, effect = recorded[layer], effects[layer]
        ranked = top_neurons(dam_scores(activation.detach(), effect), config.kmax, config.one_per_channel)  # 2. DAM
        layer_votes = {n: dam_density(recorded[n].detach(), effects[n]) for n in density_layers}
        votes = fuse_densities(list(layer_votes.values()), model.input_size)
        reference = _gradcam(recorded[cam_layer], effects[cam_layer], model.input_size) if cam_layer else None
    maps = blobs = None
    if neuron_maps:
        with stage("guided_backprop"), guided_above.everywhere():  # 3. guided backprop of each chosen neuron
            gradients = neuron_gradients(activation, image, one_hot_neurons(ranked, activation))
            maps = saliency_maps(gradients, config.channel_reduce).float().cpu().numpy()  # float: bf16 models
        with stage("blobs"):  # 4. a blob per neuron
            if config.map_blur > 0:
                maps = ndimage.gaussian_filter(maps, sigma=(0, 0, config.map_blur, config.map_blur))
            flat = maps.reshape(-1, *maps.shape[2:])
            blobs = clean_masks(threshold_maps(flat, config.percentile, config.percentile_of), config.morphology)
            blobs = (blobs & ranked.valid.T.reshape(-1, 1, 1).cpu().numpy()).reshape(maps.shape)
    probabilities = class_probabilities(logits.detach()).gather(1, label.view(-1, 1)).squeeze(1)
    layer_size = (activation.shape[-2], activation.shape[-1])
    evidence = Evidence(label.cpu(), probabilities.cpu(), ranked.cpu(), maps, blobs, votes, None, reference, layer_size, top1)
    return PendingEvidence(evidence, {n: recorded[n].detach() for n in density_layers}, layer_votes)


@exact_float32()
def gather_class_evidence(
    model: LoadedModel,
    inputs: torch.Tensor,
    choose_labels: Callable[[torch.Tensor], Sequence[int]],
    config: LocalizeConfig,
) -> Evidence:
    """Density-mode evidence for several classes of one image (the paper's Algorithm 2).

    One forward pass, then one backward pass per class through the kept graph (``retain_graph``).
    ``choose_labels`` gets the image's class probabilities (classes,) and names the classes; row j of the
    result holds class j, as :func:`gather_evidence` gives it for the image repeated once per class
    (measured 1.8x faster than that batch of copies for 2 classes, 3.7x for 8, on CPU; docs/multi.md).
    """
    if config.mode != "density" or inputs.shape[0] != 1:
        raise ValueError("gather_class_evidence needs density mode and a single image")
    net = model.module
    _, layers = evidence_layers(model, config)
    cam_layer = model.spec.cam_layer
    names = (*layers, *([cam_layer] if cam_layer else []))
    with record_layers(net, names, graph_root=True) as recorders, \
            guided_relus(net, list(recorders.values()), config.class_gradient == "guided"):
        logits = net(inputs.detach())
    check_class_count(model, logits)
    recorded = recorded_activations(recorders)
    probabilities = class_probabilities(logits.detach())[0]
    label = torch.tensor([int(c) for c in choose_labels(probabilities)], dtype=torch.long, device=logits.device)
    if label.numel() == 0:
        raise ValueError("no class was chosen")
    check_finite_scores(logits.expand(label.numel(), -1), label)
    votes: list[list[torch.Tensor]] = [[] for _ in layers]
    first_effects, references = [], []
    for j in range(label.numel()):
        score = class_score(logits, label[j : j + 1], config.score).sum()
        effects = dict(zip(recorded, torch.autograd.grad(score, list(recorded.values()), retain_graph=j + 1 < label.numel())))
        first_effects.append(effects[layers[0]])
        for layer_votes, name in zip(votes, layers):
            layer_votes.append(dam_density(recorded[name].detach(), effects[name]))
        if cam_layer:
            references.append(_gradcam(recorded[cam_layer], effects[cam_layer], model.input_size))
    activation = recorded[layers[0]].detach().expand(label.numel(), -1, -1, -1)
    ranked = top_neurons(dam_scores(activation, torch.cat(first_effects)), config.kmax, config.one_per_channel)
    per_layer = {name: torch.cat(layer_votes) for name, layer_votes in zip(layers, votes)}
    fused_votes = fuse_densities(list(per_layer.values()), model.input_size)
    expanded = {name: recorded[name].expand(label.numel(), -1, -1, -1) for name in layers}
    density = region_map(fused_votes, expanded, per_layer, config, model.directions)
    layer_size = (activation.shape[-2], activation.shape[-1])
    top1 = probabilities.argmax().expand(label.numel()).cpu()
    reference = np.concatenate(references) if references else None
    return Evidence(label.cpu(), probabilities[label].cpu(), ranked.cpu(), None, None, fused_votes, density, reference, layer_size, top1)


def region_map(
    votes: np.ndarray,
    activations: dict[str, torch.Tensor],
    layer_votes: dict[str, torch.Tensor],
    config: LocalizeConfig,
    directions: FeatureDirections | None = None,
) -> np.ndarray | None:
    """The map density mode cuts its region from: the fused votes, plus the feature-similarity map when
    ``config.similarity`` > 0, plus the objectness map of ``directions`` (the model's, when it has them)
    with weight ``config.objectness``; None in neurons mode."""
    if config.mode != "density":
        return None
    density = votes
    if config.similarity > 0:
        similarities = [prototype_similarity(activations[n], layer_votes[n]) for n in layer_votes]
        density = add_similarity(votes, similarities, config.similarity)
    if directions is not None and config.uses_objectness:
        density = add_weighted_map(density, objectness_map(activations, directions, density.shape[-1]), config.objectness)
    return density


def refine_region(
    image: Image.Image, region: np.ndarray, density: np.ndarray, votes: np.ndarray, level: float, size: int
) -> np.ndarray:
    """``config.refine="grabcut"``: the region cut at ``level`` from ``density``, redrawn along the image's
    colour edges (GrabCut at the model's input size, seeded by the map)."""
    picture = np.asarray(to_rgb(image).resize((size, size), Image.Resampling.BILINEAR))
    return grabcut_region(picture, density, region, votes, level)


def region_result(
    image: Image.Image,
    region: np.ndarray,
    evidence: Evidence,
    i: int,
    config: LocalizeConfig,
    model: LoadedModel,
    keep_maps: bool = False,
) -> Localization:
    """The localization of row ``i`` of ``evidence`` for a region mask (S, S) at input size (as density mode makes it)."""
    kept = _neurons_inside(evidence.neurons, i, region, evidence.layer_size)
    confidence = region_confidence(evidence.votes[i], region, config.level, _row(evidence.reference, i))
    return _make_result(image, region, kept, evidence, i, None, confidence, config, model, keep_maps)


@exact_float32()
def localize_batch(
    model: LoadedModel,
    images: Sequence[Image.Image],
    config: LocalizeConfig,
    labels: Sequence[int | None] | None = None,
    keep_maps: bool = False,
    stage: StageTimer = untimed,
) -> list[Localization]:
    """Localize one class in each image (its given label, or the top-1 prediction).

    Raises:
        ValueError: labels that do not match the images or the model's classes; a model in training mode.
    """
    with gradients_on(model.module):
        return _localize_batch(model, images, config, labels, keep_maps, stage)


def check_finite_scores(logits: torch.Tensor, label: torch.Tensor) -> None:
    """Refuse scores that cannot rank neurons: NaN or +inf anywhere (the probabilities are NaN then), or a
    localized class whose score is -inf. Other classes' scores may be -inf: a model may mask the classes it
    leaves out.

    Raises:
        NonFiniteEvidence: naming which.
    """
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise NonFiniteEvidence("the model's class scores are not finite: NaN or +inf")
    if not torch.isfinite(logits.gather(1, label[:, None])).all():
        raise NonFiniteEvidence("the model's score for the class localized is not finite: infinite")


def _localize_batch(
    model: LoadedModel,
    images: Sequence[Image.Image],
    config: LocalizeConfig,
    labels: Sequence[int | None] | None,
    keep_maps: bool,
    stage: StageTimer,
) -> list[Localization]:
    labels = list(labels) if labels is not None else [None] * len(images)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if not images:
        return []
    if not all(isinstance(image, Image.Image) for image in images):
        odd = next(type(image).__name__ for image in images if not isinstance(image, Image.Image))
        raise TypeError(f"localize_batch takes PIL images, got a {odd}; Localizer.localize_many also reads paths and arrays")
    for label in labels:
        if label is not None and (isinstance(label, bool) or not isinstance(label, numbers.Integral)):
            raise ValueError(f"a label is a class index (an int) or None, got {label!r}")
        if label is not None and not 0 <= int(label) < len(model.classes):
            raise ValueError(f"class index {label} is out of range for {model.name}'s {len(model.classes)} classes")
    with stage("resize"):
        inputs = image_to_input(images, model)
    evidence = gather_evidence(model, inputs, labels, config, neuron_maps=keep_maps, stage=stage)
    return localize_from_evidence(model, images, evidence, config, inputs, keep_maps, stage)


@exact_float32()
def localize_from_evidence(
    model: LoadedModel,
    images: Sequence[Image.Image],
    evidence: Evidence,
    config: LocalizeConfig,
    inputs: torch.Tensor | None = None,
    keep_maps: bool = False,
    stage: StageTimer = untimed,
) -> list[Localization]:
    """Steps 5-6 (density mode: the region cut from its map) for each image of a batch whose evidence was
    gathered; ``inputs`` (the batch as fed to the network) are needed by neurons mode's re-scoring alone."""
    results = []
    for i, image in enumerate(images):
        label = int(evidence.labels[i])
        region_scores = None
        if evidence.density is not None:  # density mode: the region is cut from the votes (+ similarity) map
            with stage("blobs"):
                level = density_level(evidence.density[i], config)
                union = region_at(evidence.density[i], level, evidence.votes[i])
            if config.refine != "none":
                with stage("refine"):
                    union = refine_region(image, union, evidence.density[i], evidence.votes[i], level, model.input_size)
            kept = _neurons_inside(evidence.neurons, i, union, evidence.layer_size)
            with stage("confidence"):
                confidence = region_confidence(evidence.votes[i], union, config.level, _row(evidence.reference, i))
        else:
            assert evidence.blobs is not None, "neurons mode keeps the blobs"
            blobs = torch.from_numpy(evidence.blobs[:, i])
            if config.rescoring != "none":
                if inputs is None:
                    raise ValueError("re-scoring regions needs the batch's inputs")
                with stage("rescoring"):  # 5. re-score each region through the network
                    region_scores = rescore_regions(model.module, inputs[i], blobs, label, config.rescoring, config.score).cpu()
            kept = choose_neurons(evidence.neurons.score[i], region_scores, blobs, config)
            union = blobs[kept].any(dim=0).numpy()  # 6. union of the best k, and its box
            with stage("confidence"):
                confidence = region_confidence(evidence.votes[i], union, config.level, _row(evidence.reference, i))
        with stage("box"):
            results.append(_make_result(image, union, kept, evidence, i, region_scores, confidence, config, model, keep_maps))
    return results


def _gradcam(activation: torch.Tensor, effect: torch.Tensor, size: int) -> np.ndarray:
    """Grad-CAM of the same pass, the confidence's second opinion: channels weighted by their mean class gradient."""
    return channel_weighted_map(activation, effect.mean(dim=(2, 3)), size)


def _row(maps: np.ndarray | None, i: int) -> np.ndarray | None:
    return None if maps is None else maps[i]


def _neurons_inside(ranked: RankedNeurons, i: int, region: np.ndarray, layer_size: tuple[int, int]) -> torch.Tensor:
    """Which of image ``i``'s neurons have their centre (in region pixels) inside ``region``."""
    sy, sx = region.shape[0] / layer_size[0], region.shape[1] / layer_size[1]
    ys = ((ranked.y[i].double() + 0.5) * sy).long().clamp(max=region.shape[0] - 1)
    xs = ((ranked.x[i].double() + 0.5) * sx).long().clamp(max=region.shape[1] - 1)
    return torch.from_numpy(region[ys.numpy(), xs.numpy()]) & ranked.valid[i]


def _make_result(
    image: Image.Image,
    union: np.ndarray,
    kept: torch.Tensor,
    evidence: Evidence,
    i: int,
    region_scores: torch.Tensor | None,
    confidence: Confidence,
    config: LocalizeConfig,
    model: LoadedModel,
    keep_maps: bool,
) -> Localization:
    size = model.input_size
    box = mask_box(union)
    empty = box is None
    pixel_box = scale_box(box or (0, 0, size - 1, size - 1), (size, size), image.size)
    ranked = evidence.neurons
    blob_fraction = evidence.blobs[:, i].mean(axis=(1, 2)) if evidence.blobs is not None else np.zeros(ranked.kmax)
    neurons = tuple(
        Neuron(
            channel=int(ranked.channel[i, j]),
            y=int(ranked.y[i, j]),
            x=int(ranked.x[i, j]),
            dam_score=float(ranked.score[i, j]),
            region_score=None if region_scores is None else float(region_scores[j]),
            blob_fraction=float(blob_fraction[j]),
            kept=bool(kept[j]),
        )
        for j in range(ranked.kmax)
        if bool(ranked.valid[i, j])
    )
    cls: ClassInfo = model.classes[int(evidence.labels[i])]
    return Localization(
        box=pixel_box,
        label=cls.index,
        synset=cls.synset,
        name=cls.name,
        probability=float(evidence.probabilities[i]),
        confidence=confidence,
        top1=int(evidence.top1[i]),
        neurons=neurons,
        mask=mask_at_image_size(union, image.size),
        image_size=image.size,
        layer=evidence_layers(model, config)[0],
        empty=empty,
        maps=evidence.maps[:, i].copy() if keep_maps and evidence.maps is not None else None,
        blobs=evidence.blobs[:, i].copy() if keep_maps and evidence.blobs is not None else None,
        density=evidence.density[i].copy() if evidence.density is not None else None,
        point=scale_point(peak_pixel(evidence.votes[i], union), (size, size), image.size),
    )


def _class_query(target: object) -> str | int:
    """A class as :func:`resolve_class` takes it; a one-element tensor or numpy integer (``logits.argmax()``) as
    its index."""
    if isinstance(target, (torch.Tensor, np.ndarray)):
        if target.size != 1 if isinstance(target, np.ndarray) else target.numel() != 1:
            raise ValueError(f"a class given as an array must hold one integer, got shape {tuple(target.shape)}")
        target = target.item()
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (str, int, np.integer)):
        raise ValueError(f"a class is an index, a WordNet id or a name, got {target!r} ({type(target).__name__})")
    return int(target) if isinstance(target, np.integer) else target


def mask_at_image_size(region: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map-sized bool ``region`` as a bool (height, width) mask of an image of ``size`` (width, height).

    Nearest-neighbour where the image is larger; where it is smaller than the map, a pixel is in the mask when
    any of the map cells it covers is, so a tiny image keeps its region (the box is cut from the region, and
    nearest sampling could miss all of it)."""
    picture = Image.fromarray(region.astype(np.uint8) * 255)
    if size[0] < picture.width or size[1] < picture.height:
        return np.asarray(picture.resize(size, Image.Resampling.BOX)) > 0
    return np.asarray(picture.resize(size, Image.Resampling.NEAREST)) > 127


class Localizer:
    """A model and a configuration, ready to localize images.

    Example:
        >>> from neuroloc import Localizer
        >>> loc = Localizer()                       # embedded EfficientNet-Lite0, the default preset
        >>> result = loc.localize("cat.jpg", target="tabby")
        >>> result.box
    """

    def __init__(
        self,
        model: LoadedModel | str = "efficientnet_lite0",
        config: LocalizeConfig | None = None,
        device: str | torch.device | None = None,
        preset: str = "default",
        directions: FeatureDirections | str | Path | None = None,
        intensity: str = "range",
        options: Mapping[str, Any] | None = None,
        max_pixels: int | None = None,
    ) -> None:
        """``device``: ``"cuda"``, ``"cpu"``, ``"auto"`` ... (see :func:`neuroloc.device.resolve_device`);
        None leaves the model where it is (a name is loaded on the CPU). Without a ``config``, the
        ``preset`` (``default``, ``small``, ``large``, ``paper`` ...) with the backbone's own settings;
        ``options`` (``{"refine": "grabcut"}``, ``{"kmax": 30}``: fields of :class:`LocalizeConfig`) change
        some settings and keep the others, as the command line's options do. ``directions``: feature
        directions for the objectness map (or a file of them, from ``neuroloc calibrate``); without them the
        map is left out until :meth:`calibrate` fits some (a warning when they were fitted at another input
        size, or with weights of another file name). ``intensity``: how images with more than 8 bits per sample become 8-bit
        (:data:`neuroloc.imageio.INTENSITIES`; ``"stretch"`` for 12- or 14-bit data in 16-bit files), for file
        paths and images alike. ``max_pixels``: the largest image file read (None: Pillow's limit,
        ``PIL.Image.MAX_IMAGE_PIXELS``, 89 million pixels unless changed), e.g. for large slides with
        :meth:`localize_tiles`."""
        from neuroloc.device import resolve_device
        from neuroloc.models import load_model

        self.intensity = check_intensity(intensity)
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral)
                                       or max_pixels < 1):
            raise ValueError(f"max_pixels must be a positive whole number of pixels, got {max_pixels!r}")
        if not isinstance(model, str) and not (hasattr(model, "module") and hasattr(model, "spec")):  # a LoadedModel
            raise TypeError(f"model must be a registered model's name or a LoadedModel (neuroloc.models.load_model; "
                            f"the README shows one made for a network of your own), got {type(model).__name__}")
        if config is not None and not isinstance(config, LocalizeConfig):
            raise TypeError(f"config must be a LocalizeConfig (options={{...}} changes single settings), got "
                            f"{type(config).__name__}")
        self.max_pixels = max_pixels
        self.model = load_model(model) if isinstance(model, str) else model
        if device is not None:
            self.model.to(resolve_device(device))
        base = config or preset_for(preset, self.model.spec.default_options)
        self.config = base.with_options(**options) if options else base
        if unguided := unguided_warning(self.model.module, self.config.mode):
            warnings.warn(unguided, stacklevel=2)
        if directions is not None and not self.config.uses_objectness:
            advice = "; options={'objectness': 1.0} adds it" if self.config.mode == "density" else ""
            warnings.warn(f"directions have no effect: these settings add no objectness map (objectness "
                          f"{self.config.objectness:g}, mode {self.config.mode}){advice}", stacklevel=2)
        if directions is not None:
            from neuroloc.directions import load_directions

            loaded = load_directions(directions, self.model.name) if isinstance(directions, (str, Path)) else directions
            if self.config.uses_objectness and (problem := loaded.layers_problem(evidence_layers(self.model, self.config)[1])):
                raise DirectionsError(f"{directions if isinstance(directions, (str, Path)) else 'directions'}: {problem}")
            if mismatch := loaded.use_warning(self.model):
                warnings.warn(f"the feature directions were {mismatch}", stacklevel=2)
            self.model = self.model.with_directions(loaded)

    def calibrate(self, images: Sequence[Image.Image | np.ndarray | str | Path]) -> FeatureDirections:
        """Fit the feature directions of the objectness map over ``images`` (20 or more; no labels) and use
        them from now on; save them with :func:`neuroloc.directions.save_directions` to reuse them."""
        from neuroloc.directions import fit_directions

        if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
            raise TypeError("calibrate takes a sequence of 20 or more images, such as sorted(Path('photos').glob('*.jpg'))")
        pictures = (self._picture(im) for im in images)
        fitted = fit_directions(self.model, pictures, evidence_layers(self.model, self.config)[1])
        self.model = self.model.with_directions(fitted)
        return fitted

    def localize(
        self, image: Image.Image | np.ndarray | str | Path, target: str | int | torch.Tensor | None = None,
        keep_maps: bool = False,
    ) -> Localization:
        """Localize ``target`` (index, WordNet id or name, or a one-element integer tensor such as
        ``logits.argmax()``; None = top-1 prediction) in one image."""
        picture = self._picture(image)
        label = None if target is None else resolve_class(_class_query(target), self.model.classes).index
        return localize_batch(self.model, [picture], self.config, [label], keep_maps=keep_maps)[0]

    def localize_many(
        self,
        images: Sequence[Image.Image | np.ndarray | str | Path],
        targets: Sequence[str | int | None] | str | int | None = None,
        keep_maps: bool = False,
        batch_size: int = 8,
    ) -> list[Localization]:
        """Localize each image's own target (index, WordNet id or name; None = its top-1 prediction; no
        ``targets``: every image's top-1; one name or index: that class in every image), ``batch_size`` images
        at a time through the network (each batch read only when its turn comes: memory grows with the batch, about
        13 MB an image on the CPU, not with the list), one result per image.

        Raises:
            ValueError: when ``targets`` and ``images`` differ in length, or ``batch_size`` is below 1.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            raise TypeError("localize_many takes a sequence of images; for one image, use localize")
        images = list(images)
        if isinstance(targets, (torch.Tensor, np.ndarray)) and targets.ndim == 1:  # logits.argmax(1): one per image
            targets = targets.tolist()  # Python ints (or a numpy array's names)
        if isinstance(targets, (str, int, float, np.integer, np.floating, torch.Tensor, np.ndarray)):
            targets = [targets] * len(images)  # one class for every image (a wrong one is refused below)
        if isinstance(targets, (set, frozenset, dict)):
            raise TypeError(f"targets must be in the images' order: a list or a tuple, not a {type(targets).__name__}")
        if targets is not None:
            targets = list(targets)
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(targets)} targets for {len(images)} images")
        if not images:
            return []
        labels = None if targets is None else [
            None if t is None else resolve_class(_class_query(t), self.model.classes).index for t in targets
        ]
        results: list[Localization] = []
        for start in range(0, len(images), batch_size):
            pictures = [self._picture(im) for im in images[start : start + batch_size]]
            batch_labels = None if labels is None else labels[start : start + batch_size]
            results += localize_batch(self.model, pictures, self.config, batch_labels, keep_maps=keep_maps)
        return results

    def localize_tiles(
        self, image: Image.Image | np.ndarray | str | Path, targets: str | int | Sequence[str | int], tile: int,
        overlap: float = 0.25, min_score: float = 0.0,
    ) -> list[Localization]:
        """Small objects in a large image: every object of ``targets`` (one class or several) found tile by
        tile, tiles of ``tile`` pixels (:mod:`neuroloc.tiles`); an empty list when no tile shows them."""
        from neuroloc.tiles import TileRule, localize_tiled

        if targets is None:
            raise ValueError("localize_tiles needs the class (or classes) to look for: a tile's top-1 class is not "
                             "the large image's")
        if isinstance(targets, (torch.Tensor, np.ndarray)) and targets.ndim == 1:  # several classes, as localize_many
            targets = targets.tolist()
        named = [targets] if isinstance(targets, (str, int, float, np.integer, torch.Tensor, np.ndarray)) else list(targets)
        classes = [resolve_class(_class_query(t), self.model.classes).index for t in named]
        return localize_tiled(self.model, self._picture(image), self.config, classes, TileRule(tile, overlap, min_score))

    def _picture(self, image: Image.Image | np.ndarray | str | Path) -> Image.Image:
        """A file read, or an image converted, to 8-bit RGB as this localizer's ``intensity`` says; a
        :class:`DimImageWarning` when high-bit data came out dark. A numpy array: (H, W) of numbers, or (H, W, 3)
        or (H, W, 4) colour, uint8, uint16 or float (:func:`neuroloc.imageio.array_to_rgb`). A PIL image is taken
        as it is; a path is read upright (a camera's EXIF orientation applied), as ``ImageOps.exif_transpose``
        does.

        Raises:
            TypeError: for anything else.
        """
        if isinstance(image, (str, Path)):
            picture, name = load_image(image, self.max_pixels, intensity=self.intensity), str(image)
        elif isinstance(image, np.ndarray):
            picture, name = array_to_rgb(image, self.intensity), "the array"
        elif isinstance(image, Image.Image):
            picture, name = to_rgb(image, self.intensity), "the picture"
        else:
            raise TypeError(f"expected a PIL image, a numpy array or a file path, got {type(image).__name__}")
        if looks_dim(picture):
            notice = dim_notice(1, name, range_used(picture) or 0.0, remedy='Localizer(intensity="stretch")')
            warnings.warn(notice, DimImageWarning, stacklevel=3)
        return picture
