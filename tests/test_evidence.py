"""The density mode's steps: DAM votes, their fusion across layers, and the region cut from them."""

from __future__ import annotations

import numpy as np
import torch

import pytest

from neuroloc.config import PRESETS, LocalizeConfig
from neuroloc.evidence import dam_density, density_level, fuse_densities, mass_level, region_at


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


def test_mass_level_by_hand():
    votes = np.array([[1.0, 0.5], [0.25, 0.0]])
    # power 1: the strongest votes 1.0, 0.5, 0.25 hold 4/7, 6/7, 7/7 of the total
    assert mass_level(votes, 0.5, 1.0) == 1.0
    assert mass_level(votes, 0.8, 1.0) == 0.5
    assert mass_level(votes, 0.9, 1.0) == 0.25
    # power 2: 1, 0.25, 0.0625 hold 0.76, 0.95, 1.0: a higher power cuts higher for the same share
    assert mass_level(votes, 0.9, 2.0) == pytest.approx(0.5)
    assert mass_level(np.zeros((3, 3)), 0.9, 2.5) == 1.0


def test_mass_cut_adapts_to_the_map_and_fraction_cut_does_not():
    peaked = np.zeros((20, 20))
    peaked[9:11, 9:11] = 1.0
    peaked += 0.05
    flat = np.full((20, 20), 0.5)
    flat[0, 0] = 1.0
    mass = PRESETS["default"]
    assert mass.cut == "mass"
    assert density_level(peaked, mass) > density_level(flat, mass) * 1.5
    fraction = LocalizeConfig(mode="density", cut="fraction", level=0.3)
    assert density_level(peaked, fraction) == density_level(flat, fraction) == 0.3


@pytest.mark.parametrize("bad", [{"cut": "median"}, {"mass": 1.0}, {"mass": 0.0}, {"mass_power": 0.0}])
def test_cut_options_are_checked(bad):
    with pytest.raises(ValueError):
        LocalizeConfig(mode="density", **bad)


def test_with_options_level_alone_selects_the_fraction_cut():
    default = PRESETS["default"]
    assert default.with_options(level=0.4).cut == "fraction"
    assert default.with_options(level=0.4, cut="mass").cut == "mass"
    assert PRESETS["paper"].with_options(mass=0.8).cut == "mass"
    assert default.with_options(kmax=5).cut == "mass"
