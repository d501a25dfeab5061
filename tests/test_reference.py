"""The batched pipeline against a plain reference: a fresh graph per neuron, one re-scoring forward per region.

The pipeline reuses one forward pass for DAM and every guided backprop, batches images, and re-scores
all regions of an image in one batch. Here Algorithm 1 is redone the slow, obvious way, one image and
one neuron at a time, from the library's small steps; the boxes must be the same on real photos.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from neuroloc.blobs import clean_masks, mask_box, scale_box, threshold_maps
from neuroloc.config import PRESETS, LocalizeConfig
from neuroloc.dam import dam_scores, top_neurons
from neuroloc.hooks import guided_relus, record_layer
from neuroloc.imageio import load_image
from neuroloc.pipeline import image_to_input, localize_batch
from neuroloc.rescore import class_score, region_inputs
from neuroloc.select import choose_neurons


def _reference_box(model, image, label: int, config: LocalizeConfig) -> tuple[float, ...]:
    net, layer = model.module, model.spec.resolve_layer(config.layer)
    x = image_to_input([image], model)

    def forward():
        image_in = x.clone().requires_grad_(True)
        with record_layer(net, layer) as recorder, guided_relus(net, recorder):
            logits = net(image_in)
        return image_in, recorder.activation, logits

    _, activation, logits = forward()
    (effect,) = torch.autograd.grad(class_score(logits, torch.tensor([label]), config.score).sum(), activation)
    ranked = top_neurons(dam_scores(activation.detach(), effect), config.kmax, config.one_per_channel)
    maps = []
    for j in range(config.kmax):  # a new forward pass and graph for every neuron
        image_in, activation, _ = forward()
        neuron = activation[0, ranked.channel[0, j], ranked.y[0, j], ranked.x[0, j]]
        sign = -1.0 if float(neuron.detach()) < 0 else 1.0  # a neuron that counts by being negative is driven downwards
        (gradient,) = torch.autograd.grad(sign * neuron, image_in)
        maps.append(gradient[0].mean(dim=0).numpy())
    blobs = clean_masks(threshold_maps(np.stack(maps), config.percentile, config.percentile_of), config.morphology)
    blobs = torch.from_numpy(blobs)
    region_scores = None
    if config.rescoring != "none":
        scores = []
        for blob in blobs:  # one forward per region
            if not blob.any():
                scores.append(float("-inf"))
                continue
            with torch.no_grad():
                region_logits = net(region_inputs(x[0], blob[None], config.rescoring))
            scores.append(float(class_score(region_logits, torch.tensor([label]), config.score)))
        region_scores = torch.tensor(scores)
    kept = choose_neurons(ranked.score[0], region_scores, blobs, config)
    box = mask_box(blobs[kept].any(dim=0).numpy())
    size = model.input_size
    return scale_box(box or (0, 0, size - 1, size - 1), (size, size), image.size)


@pytest.mark.parametrize("preset_name", ["paper", "fast"])
def test_batched_pipeline_gives_the_reference_boxes_on_real_photos(lite0, fullres_dir: Path, preset_name: str) -> None:
    with open(fullres_dir / "boxes.csv", newline="") as f:
        labels = {row["image"]: int(row["label"]) for row in csv.DictReader(f)}
    names = sorted(labels)[:3]
    images = [load_image(fullres_dir / "images" / name) for name in names]
    config = PRESETS[preset_name]
    batched = localize_batch(lite0, images, config, [labels[n] for n in names])  # the three images at once
    for name, image, result in zip(names, images, batched):
        expected = _reference_box(lite0, image, labels[name], config)
        assert result.box == pytest.approx(expected, abs=1e-6), name
