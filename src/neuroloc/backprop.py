"""Step 3 of Algorithm 1: guided backpropagation of each chosen neuron to the pixels, in one batched backward."""

from __future__ import annotations

from typing import Literal

import torch

ChannelReduce = Literal["mean", "abs_max", "l2"]


def neuron_gradients(activation: torch.Tensor, image: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """d(neuron)/d(image) for every seed in ``seeds`` (kmax, N, C, h, w): returns (kmax, N, 3, H, W).

    Guided backpropagation is in effect when the forward pass ran inside :func:`neuroloc.hooks.guided_relus`.
    All seeds reuse the graph of the single forward pass. One backward per seed (each covering the
    whole image batch) measured 4-5x faster on CPU than ``is_grads_batched=True``, whose vmap falls
    back to slow paths for depthwise convolutions.
    """
    return torch.stack(
        [torch.autograd.grad(activation, image, grad_outputs=seed, retain_graph=True)[0] for seed in seeds]
    )


def saliency_maps(gradients: torch.Tensor, reduce: ChannelReduce = "mean") -> torch.Tensor:
    """Collapse the colour axis (dim -3) of pixel gradients into one map per neuron.

    ``mean`` is what the authors' code did; ``abs_max`` and ``l2`` ignore the sign of colour gradients.
    """
    if reduce == "mean":
        return gradients.mean(dim=-3)
    if reduce == "abs_max":
        return gradients.abs().amax(dim=-3)
    if reduce == "l2":
        return gradients.pow(2).sum(dim=-3).sqrt()
    raise ValueError(f"unknown channel reduction {reduce!r}; use mean, abs_max or l2")
