"""Step 5 of Algorithm 1: score the region of each neuron by passing it through the network again."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

RescoreMode = Literal["mask", "crop", "none"]
ScoreKind = Literal["logit", "probability"]


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The class probabilities of ``logits`` (N, classes): their softmax, or for a binary classifier with a
    single logit (N, 1) its sigmoid (a softmax over one class would always be 1)."""
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)


def class_score(logits: torch.Tensor, label: torch.Tensor, kind: ScoreKind = "logit") -> torch.Tensor:
    """The score of ``label`` (N,) in ``logits`` (N, classes): the raw logit or the class probability
    (:func:`class_probabilities`)."""
    if kind not in ("logit", "probability"):
        raise ValueError(f"score must be 'logit' or 'probability', got {kind!r}")
    picked = logits if kind == "logit" else class_probabilities(logits)
    return picked.gather(1, label.view(-1, 1)).squeeze(1)


def region_inputs(image: torch.Tensor, masks: torch.Tensor, mode: RescoreMode) -> torch.Tensor:
    """The network inputs that show only each region: (K, 3, H, W) from ``image`` (3, H, W), ``masks`` (K, H, W).

    ``mask`` sets everything outside the blob to the dataset mean (zero after normalisation), as the
    authors' code did; ``crop`` cuts out the blob's bounding box and resizes it to the full input.
    """
    if mode == "mask":
        return image.unsqueeze(0) * masks.unsqueeze(1).to(image.dtype)
    if mode == "crop":
        h, w = image.shape[-2:]
        crops = []
        for mask in masks:
            rows, cols = torch.nonzero(mask.any(dim=1)), torch.nonzero(mask.any(dim=0))
            if rows.numel() == 0:
                crops.append(torch.zeros_like(image))
                continue
            patch = image[:, int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
            crops.append(F.interpolate(patch.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False)[0])
        return torch.stack(crops)
    raise ValueError(f"unknown re-scoring mode {mode!r}; use mask, crop or none")


@torch.no_grad()
def rescore_regions(
    model: nn.Module,
    image: torch.Tensor,
    masks: torch.Tensor,
    label: int,
    mode: RescoreMode = "mask",
    kind: ScoreKind = "logit",
) -> torch.Tensor:
    """Class score of every region in one batched forward pass: (K,), on ``image``'s device. Empty regions score -inf."""
    from neuroloc.hooks import hooks_turn

    masks = masks.to(image.device)
    with hooks_turn(model):  # another thread's recording hooks on a shared model must not fire on this pass
        logits = model(region_inputs(image, masks, mode))
    scores = class_score(logits, torch.full((masks.shape[0],), label, device=logits.device), kind)
    empty = ~masks.flatten(1).any(dim=1)
    return scores.masked_fill(empty, float("-inf"))
