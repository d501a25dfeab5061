"""The density mode's steps: DAM votes, their fusion across layers, and the region cut from them."""

from __future__ import annotations

import numpy as np
import torch

from neuroloc.evidence import dam_density, fuse_densities, region_at


def test_dam_density_sums_positive_products_over_channels():
    activation = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # (1, 2, 1, 2)
    effect = torch.tensor([[[[0.5, -1.0]], [[1.0, 2.0]]]])
    # position 0: 0.5 + 3.0; position 1: products -2.0 and -2.0 are negative, so no vote
    assert torch.equal(dam_density(activation, effect), torch.tensor([[[3.5, 0.0]]]))


def test_fusion_scales_each_layer_then_the_sum_to_one():
    fine = torch.zeros(1, 4, 4)
    fine[0, 0, 0] = 10.0  # large scale, top-left
    coarse = torch.zeros(1, 2, 2)
    coarse[0, 1, 1] = 0.1  # tiny scale, bottom-right: counts as much after per-layer scaling
    fused = fuse_densities([fine, coarse], size=8)
    assert fused.shape == (1, 8, 8) and np.isclose(fused.max(), 1.0)
    assert fused[0, 0, 0] > 0.4 and fused[0, 7, 7] > 0.4


def test_region_is_the_largest_component_or_the_whole_image():
    votes = np.zeros((6, 6))
    votes[0, 0] = 1.0  # a single strong pixel
    votes[3:6, 3:6] = 0.5  # a larger region above the level
    region = region_at(votes, 0.3)
    assert region.sum() == 9 and region[3:6, 3:6].all() and not region[0, 0]
    assert region_at(np.zeros((3, 3)), 0.3).all()
