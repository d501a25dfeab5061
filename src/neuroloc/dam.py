"""Step 2 of Algorithm 1: rank the neurons of one layer by the DAM heuristic, activation x d(score)/d(activation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankedNeurons:
    """The top neurons of each image: index tensors of shape (N, kmax); ``score`` is the DAM score.

    Fewer than kmax neurons may exist (tiny layers, one-per-channel with few channels): then ``valid`` is False there.
    """

    channel: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor

    @property
    def kmax(self) -> int:
        return self.channel.shape[1]

    def cpu(self) -> RankedNeurons:
        """The same neurons with every tensor on the CPU (the tensors themselves when they are there already)."""
        return RankedNeurons(self.channel.cpu(), self.y.cpu(), self.x.cpu(), self.score.cpu(), self.valid.cpu())


def dam_scores(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Equation 3: RankScore = Activations * Effect, element-wise, (N, C, H, W)."""
    if activation.shape != gradient.shape:
        raise ValueError(f"activation {tuple(activation.shape)} and gradient {tuple(gradient.shape)} differ in shape")
    return activation * gradient


def top_neurons(scores: torch.Tensor, kmax: int, one_per_channel: bool = False) -> RankedNeurons:
    """The ``kmax`` highest-scoring neurons of each image in ``scores`` (N, C, H, W).

    ``one_per_channel`` keeps at most one neuron per channel (its best position), as the authors' code
    did, so that several neurons do not all come from one feature map.
    """
    if kmax < 1:
        raise ValueError(f"kmax must be >= 1, got {kmax}")
    _n, c, h, w = scores.shape
    if one_per_channel:
        best_per_channel, position = scores.flatten(2).max(dim=2)  # (N, C)
        k = min(kmax, c)
        score, channel = best_per_channel.topk(k, dim=1)
        flat = position.gather(1, channel)
    else:
        k = min(kmax, c * h * w)
        score, index = scores.flatten(1).topk(k, dim=1)
        channel, flat = index // (h * w), index % (h * w)
    ranked = RankedNeurons(channel=channel, y=flat // w, x=flat % w, score=score, valid=torch.isfinite(score))
    return _pad(ranked, kmax) if k < kmax else ranked


def _pad(ranked: RankedNeurons, kmax: int) -> RankedNeurons:
    missing = kmax - ranked.kmax

    def grow(t: torch.Tensor, value: float | bool | int) -> torch.Tensor:
        return torch.cat([t, t.new_full((t.shape[0], missing), value)], dim=1)

    return RankedNeurons(
        channel=grow(ranked.channel, 0),
        y=grow(ranked.y, 0),
        x=grow(ranked.x, 0),
        score=grow(ranked.score, float("-inf")),
        valid=grow(ranked.valid, False),
    )


def one_hot_neurons(ranked: RankedNeurons, activation: torch.Tensor) -> torch.Tensor:
    """(kmax, N, C, H, W) one-hot seeds, one per chosen neuron, to backpropagate from the layer.

    Each seed carries the sign of its neuron's activation. After a ReLU (the paper's VGG) every activation is
    positive and the seed is +1; a layer without one (EfficientNet's block outputs) has neurons that count for
    the class by being negative (a negative activation times a negative gradient), and what drives such a neuron
    is what makes it more negative, so its seed is -1.
    """
    n = activation.shape[0]
    seeds = activation.new_zeros((ranked.kmax, *activation.shape))
    neuron = torch.arange(ranked.kmax, device=activation.device).unsqueeze(1).expand(-1, n)
    image = torch.arange(n, device=activation.device).unsqueeze(0).expand(ranked.kmax, -1)
    where = (image, ranked.channel.T, ranked.y.T, ranked.x.T)
    sign = 1 - 2 * (activation.detach()[where] < 0).to(activation.dtype)  # -1 or +1, on the activation's device
    seed_at = (neuron, *where)
    seeds[seed_at] = sign * ranked.valid.T.to(activation.dtype)
    return seeds
