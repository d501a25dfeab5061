"""Evidence maps built from DAM neurons, and candidate regions cut from them.

The paper keeps k of the kmax best DAM neurons and unites their blobs; its own discussion names the
weak points (a fixed k, neurons that cover only the most discriminative part). Here every neuron
with a positive DAM score votes for its own position with its score, in one or more layers, so k is
chosen per image by the evidence itself; the vote map is cut at several levels, and step 5
(re-scoring through the network) picks the level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F


def dam_density(activation: torch.Tensor, effect: torch.Tensor) -> torch.Tensor:
    """Sum over channels of the positive DAM scores at each position: (N, C, h, w) -> (N, h, w)."""
    return (activation * effect).clamp(min=0).sum(dim=1)


def fuse_densities(densities: Sequence[torch.Tensor], size: int) -> np.ndarray:
    """Resize each layer's density to ``size`` (bilinear), scale each to max 1, average: (N, size, size) in [0, 1]."""
    fused = None
    for density in densities:
        up = F.interpolate(density.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        up = up / up.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
        fused = up if fused is None else fused + up
    assert fused is not None, "at least one layer is needed"
    fused = fused / fused.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)
    return fused.detach().float().numpy()


def largest_component_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive pixel indices of the largest 8-connected component, or None."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = ndimage.find_objects(labels)[int(np.argmax(sizes))]
    return cols.start, rows.start, cols.stop - 1, rows.stop - 1


def candidate_regions(density: np.ndarray, levels: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """For each level, the largest component of ``density >= level`` and its box.

    Returns masks (T, S, S) bool and boxes (T, 4) inclusive pixel indices; a level that leaves nothing
    gives the whole image.
    """
    size = density.shape[-1]
    masks, boxes = [], []
    structure = np.ones((3, 3), dtype=bool)
    for level in levels:
        labels, count = ndimage.label(density >= level, structure=structure)
        if count == 0:
            masks.append(np.ones_like(density, dtype=bool))
            boxes.append((0, 0, size - 1, size - 1))
            continue
        biggest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        mask = labels == biggest
        rows, cols = ndimage.find_objects((labels == biggest).astype(np.int32))[0]
        masks.append(mask)
        boxes.append((cols.start, rows.start, cols.stop - 1, rows.stop - 1))
    return np.stack(masks), np.array(boxes)
