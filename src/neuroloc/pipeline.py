"""Algorithm 1 of the paper, one screen: forward, DAM, guided backprop, blobs, re-scoring, union, box."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from neuroloc.backprop import neuron_gradients, saliency_maps
from neuroloc.blobs import clean_masks, mask_box, scale_box, threshold_maps
from neuroloc.classes import ImageNetClass, imagenet_classes, resolve_class
from neuroloc.config import LocalizeConfig
from neuroloc.dam import dam_scores, one_hot_neurons, top_neurons
from neuroloc.hooks import guided_relus, record_layer
from neuroloc.models.registry import LoadedModel
from neuroloc.rescore import class_score, rescore_regions
from neuroloc.result import Localization, Neuron
from neuroloc.select import choose_neurons


def image_to_input(images: Sequence[Image.Image], model: LoadedModel) -> torch.Tensor:
    """Resize each whole image to the model's input size (no crop) and normalise: (N, 3, S, S)."""
    size = model.input_size
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    rgb01 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return model.preprocessing.normalize(rgb01)


@dataclass(frozen=True)
class _Evidence:
    """What steps 1-4 found for a batch, before regions are re-scored."""

    labels: torch.Tensor  # (N,)
    probabilities: torch.Tensor  # (N,)
    neurons: object  # RankedNeurons
    maps: np.ndarray  # (kmax, N, S, S)
    blobs: np.ndarray  # (kmax, N, S, S) bool


def gather_evidence(
    model: LoadedModel, inputs: torch.Tensor, labels: Sequence[int | None], config: LocalizeConfig
) -> _Evidence:
    """Steps 1-4 for a batch of inputs."""
    net = model.module
    image = inputs.detach().requires_grad_(True)
    layer = model.spec.resolve_layer(config.layer)
    with record_layer(net, layer) as recorder, guided_relus(net, recorder, config.class_gradient == "guided"):
        logits = net(image)  # 1. forward, keeping the layer's activations
    if recorder.activation is None:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    activation = recorder.activation
    top1 = logits.argmax(dim=1)
    label = torch.tensor([top1[i] if lab is None else lab for i, lab in enumerate(labels)], device=logits.device)
    (effect,) = torch.autograd.grad(class_score(logits, label, config.score).sum(), activation, retain_graph=True)
    ranked = top_neurons(dam_scores(activation.detach(), effect), config.kmax, config.one_per_channel)  # 2. DAM
    gradients = neuron_gradients(activation, image, one_hot_neurons(ranked, activation))  # 3. guided backprop
    maps = saliency_maps(gradients, config.channel_reduce).numpy()
    if config.map_blur > 0:
        maps = ndimage.gaussian_filter(maps, sigma=(0, 0, config.map_blur, config.map_blur))
    flat = maps.reshape(-1, *maps.shape[2:])
    blobs = clean_masks(threshold_maps(flat, config.percentile, config.percentile_of), config.morphology)  # 4.
    blobs &= ranked.valid.T.reshape(-1, 1, 1).numpy()
    probabilities = logits.detach().softmax(dim=1).gather(1, label.view(-1, 1)).squeeze(1)
    return _Evidence(label, probabilities, ranked, maps, blobs.reshape(maps.shape))


def localize_batch(
    model: LoadedModel,
    images: Sequence[Image.Image],
    config: LocalizeConfig,
    labels: Sequence[int | None] | None = None,
    keep_maps: bool = False,
) -> list[Localization]:
    """Localize one class in each image (its given label, or the top-1 prediction)."""
    labels = list(labels) if labels is not None else [None] * len(images)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    inputs = image_to_input(images, model)
    evidence = gather_evidence(model, inputs, labels, config)
    results = []
    for i, image in enumerate(images):
        blobs = torch.from_numpy(evidence.blobs[:, i])
        label = int(evidence.labels[i])
        region_scores = None
        if config.rescoring != "none":  # 5. re-score each region through the network
            region_scores = rescore_regions(model.module, inputs[i], blobs, label, config.rescoring, config.score)
        dam = evidence.neurons.score[i]
        kept = choose_neurons(dam, region_scores, blobs, config)
        union = blobs[kept].any(dim=0).numpy()  # 6. union of the best k, and its box
        results.append(
            _make_result(image, union, kept, evidence, i, region_scores, config, model, keep_maps)
        )
    return results


def _make_result(
    image: Image.Image,
    union: np.ndarray,
    kept: torch.Tensor,
    evidence: _Evidence,
    i: int,
    region_scores: torch.Tensor | None,
    config: LocalizeConfig,
    model: LoadedModel,
    keep_maps: bool,
) -> Localization:
    size = model.input_size
    box = mask_box(union)
    empty = box is None
    pixel_box = scale_box(box or (0, 0, size - 1, size - 1), (size, size), image.size)
    ranked = evidence.neurons
    blob_fraction = evidence.blobs[:, i].mean(axis=(1, 2))
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
    cls: ImageNetClass = imagenet_classes()[int(evidence.labels[i])]
    mask_image = Image.fromarray(union.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
    return Localization(
        box=pixel_box,
        label=cls.index,
        synset=cls.synset,
        name=cls.name,
        probability=float(evidence.probabilities[i]),
        neurons=neurons,
        mask=np.asarray(mask_image) > 127,
        image_size=image.size,
        layer=model.spec.resolve_layer(config.layer),
        empty=empty,
        maps=evidence.maps[:, i].copy() if keep_maps else None,
        blobs=evidence.blobs[:, i].copy() if keep_maps else None,
    )


class Localizer:
    """A model and a configuration, ready to localize images.

    Example:
        >>> from neuroloc import Localizer
        >>> loc = Localizer()                       # embedded EfficientNet-Lite0, default settings
        >>> result = loc.localize("cat.jpg", target="tabby")
        >>> result.box
    """

    def __init__(self, model: LoadedModel | str = "efficientnet_lite0", config: LocalizeConfig | None = None) -> None:
        from neuroloc.models import load_model

        self.model = load_model(model) if isinstance(model, str) else model
        self.config = config or LocalizeConfig()
        self.model.spec.resolve_layer(self.config.layer)

    def localize(self, image: Image.Image | str, target: str | int | None = None, keep_maps: bool = False) -> Localization:
        """Localize ``target`` (index, WordNet id or name; None = top-1 prediction) in one image."""
        from neuroloc.imageio import load_image

        picture = load_image(image) if isinstance(image, str) else image
        label = None if target is None else resolve_class(target).index
        return localize_batch(self.model, [picture], self.config, [label], keep_maps=keep_maps)[0]

    def localize_many(
        self, images: Sequence[Image.Image], targets: Sequence[int | None] | None = None, keep_maps: bool = False
    ) -> list[Localization]:
        return localize_batch(self.model, images, self.config, targets, keep_maps=keep_maps)
