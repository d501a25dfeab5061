"""Evidence maps built from DAM neurons, and candidate regions cut from them.

The paper keeps k of the kmax best DAM neurons and unites their blobs; its own discussion names the
weak points (a fixed k, neurons that cover only the most discriminative part). Here every neuron
with a positive DAM score votes for its own position with its score, in one or more layers, so how
many neurons count is decided per image by the evidence itself. A map of how much each position's
features resemble those of the most-voted positions can be added (it reaches the parts of the object
the votes miss), and the map is cut at a fixed fraction of its maximum or per image by mass.
(Re-scoring candidate cuts through the network was measured to choose worse cuts: docs/method.md.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from torch.nn import functional as F

from neuroloc.blobs import EIGHT_NEIGHBOURS
from neuroloc.config import LocalizeConfig


def dam_density(activation: torch.Tensor, effect: torch.Tensor) -> torch.Tensor:
    """Sum over channels of the positive DAM scores at each position: (N, C, h, w) -> (N, h, w)."""
    return (activation * effect).clamp(min=0).sum(dim=1)


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, h, w) maps to (N, size, size)."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def scale_to_max_one(maps: torch.Tensor) -> torch.Tensor:
    """Each of the (N, h, w) maps divided by its own maximum (all-zero maps stay zero)."""
    return maps / maps.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)


def fuse_densities(densities: Sequence[torch.Tensor], size: int) -> np.ndarray:
    """Resize each layer's density to ``size`` (bilinear), scale each to max 1, average: (N, size, size) in [0, 1]."""
    fused = None
    for density in densities:
        up = scale_to_max_one(resize_maps(density, size))
        fused = up if fused is None else fused + up
    assert fused is not None, "at least one layer is needed"
    return scale_to_max_one(fused).detach().float().cpu().numpy()


PROTOTYPE_SHARE = 0.3  # positions with at least this share of the layer's strongest vote form the prototype


def prototype_similarity(activation: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each position's feature vector to the vote-weighted mean feature vector of
    the positions whose DAM votes reach ``PROTOTYPE_SHARE`` of the maximum: (N, C, h, w), (N, h, w) -> (N, h, w).

    The votes mark the parts that decide the class (a head, a wheel); the rest of the object tends to
    have features like theirs while the background does not, so the similarity reaches the object's
    extent where the votes stop (docs/method.md).
    """
    features = activation.detach().flatten(2)  # (N, C, P)
    votes = density.detach().flatten(1)
    weights = torch.where(votes >= PROTOTYPE_SHARE * votes.amax(dim=1, keepdim=True), votes, torch.zeros_like(votes))
    prototype = (features * weights[:, None]).sum(dim=2) / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
    dot = (features * prototype[:, :, None]).sum(dim=1)
    norms = features.norm(dim=1).clamp(min=1e-9) * prototype.norm(dim=1, keepdim=True).clamp(min=1e-9)
    return (dot / norms).view(density.shape)


def add_similarity(votes: np.ndarray, similarities: Sequence[torch.Tensor], weight: float) -> np.ndarray:
    """``votes`` (N, S, S, max 1) plus ``weight`` x the layers' similarity maps (resized to S, summed,
    negative parts dropped, max 1), scaled back to max 1."""
    size = votes.shape[-1]
    total = sum(resize_maps(s.float(), size) for s in similarities)
    assert isinstance(total, torch.Tensor), "at least one layer is needed"
    return add_weighted_map(votes, scale_to_max_one(total.clamp(min=0)).cpu(), weight)


def add_weighted_map(density: np.ndarray, extra: torch.Tensor, weight: float) -> np.ndarray:
    """``density`` (N, S, S, max 1) plus ``weight`` x ``extra`` (N, S, S, on the CPU), scaled back to max 1."""
    return scale_to_max_one(torch.from_numpy(density) + weight * extra).numpy()


def channel_weighted_map(activation: torch.Tensor, weights: torch.Tensor, size: int) -> np.ndarray:
    """CAM / Grad-CAM: ReLU of the channel sum of ``activation`` (N, C, h, w) weighted per image and
    channel by ``weights`` (N, C), resized (bilinear) to (N, size, size), not normalised."""
    cam = torch.relu((weights.detach()[:, :, None, None] * activation.detach()).sum(dim=1))
    return resize_maps(cam, size).float().cpu().numpy()  # float: under autocast the map may be bfloat16


def mass_level(density: np.ndarray, share: float, power: float) -> float:
    """The cut level of a non-negative vote map at which the strongest votes hold ``share`` of the total.

    Votes are raised to ``power`` first, so the strongest ones weigh more: a map with one sharp peak
    is cut high, a broad, flat one low (a fixed fraction of the maximum cuts both alike). Returned on
    the map's own scale, in (0, max].
    """
    weights = np.sort(density.ravel())[::-1].astype(np.float64) ** power
    total = weights.sum()
    if total <= 0:
        return 1.0
    index = min(int(np.searchsorted(np.cumsum(weights) / total, share)), weights.size - 1)
    return max(float(weights[index]) ** (1 / power), 1e-6)


class NonFiniteEvidence(ValueError):
    """An evidence map with NaN or infinite values: the model's scores or gradients are not finite."""


def otsu_level(density: np.ndarray) -> float:
    """Otsu's level of a non-negative map: the value that splits its values into the two groups with the
    largest between-group variance (scikit-image, 256 bins). A map with a single value gives that value
    (scikit-image's own rule), so the cut keeps the whole image; so does a map of one value up to its type's
    rounding (a 1x1 layer's), which numpy cannot cut into 256 bins: its minimum, so that every pixel is kept."""
    low, high = float(density.min()), float(density.max())
    resolution = 64 * float(np.finfo(density.dtype).eps) if density.dtype.kind == "f" else 0.0
    if high - low <= resolution * max(abs(high), np.finfo(np.float32).tiny):
        return max(low, 1e-6)
    try:
        return max(float(threshold_otsu(density)), 1e-6)
    except ValueError:  # "too many bins for data range": still within rounding of one value
        return max(low, 1e-6)


def density_level(density: np.ndarray, config: LocalizeConfig) -> float:
    """Where ``density`` mode cuts this vote map (maximum 1): ``config.level``, or the per-image ``mass`` or
    ``otsu`` level.

    Raises:
        NonFiniteEvidence: the map holds NaN or infinite values.
    """
    if not np.isfinite(density).all():
        raise NonFiniteEvidence(
            "the evidence map is not finite (NaN or inf): the model gives NaN or infinite scores or gradients"
        )
    if config.cut == "mass":
        return mass_level(density, config.mass, config.mass_power)
    if config.cut == "otsu":
        return otsu_level(density)
    return config.level


def region_at(density: np.ndarray, level: float, votes: np.ndarray | None = None) -> np.ndarray:
    """The 8-connected component of ``density >= level`` that holds the most ``votes`` (the largest one
    when no votes are given), as bool of the same shape; the whole image if nothing reaches ``level``.

    With the similarity map added, a component can be made of look-alike features only (another
    object on the same canvas); the class's votes decide which component is the object.
    """
    labels, count = ndimage.label(density >= level, structure=EIGHT_NEIGHBOURS)
    if count == 0:
        return np.ones_like(density, dtype=bool)
    if votes is None:
        return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return labels == int(np.argmax(ndimage.sum_labels(votes, labels, np.arange(1, count + 1)))) + 1
