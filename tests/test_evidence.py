"""The density mode's steps: DAM votes, their fusion across layers, and the region cut from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroloc.config import PRESETS, LocalizeConfig
from neuroloc.evidence import add_similarity, dam_density, density_level, fuse_densities, mass_level, otsu_level, prototype_similarity, region_at


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


def test_region_holding_the_most_votes_beats_a_larger_look_alike():
    density = np.zeros((6, 6))
    density[0:2, 0:2] = 0.8  # small component where the class's votes are
    density[3:6, 3:6] = 0.6  # larger component of similar features only
    votes = np.zeros((6, 6))
    votes[0, 0] = 1.0
    assert region_at(density, 0.5).sum() == 9  # without votes: the largest
    chosen = region_at(density, 0.5, votes)
    assert chosen.sum() == 4 and chosen[0:2, 0:2].all()


def test_prototype_similarity_by_hand():
    # 2 channels on a 1x4 row: positions 0-1 look like [1, 0] (the object), 2-3 like [0, 1] (background)
    activation = torch.tensor([[[[1.0, 2.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 3.0]]]])
    votes = torch.tensor([[[1.0, 0.0, 0.0, 0.2]]])  # one strong vote, on the object; 0.2 < PROTOTYPE_SHARE
    similarity = prototype_similarity(activation, votes)
    assert similarity.shape == (1, 1, 4)
    assert torch.allclose(similarity, torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), atol=1e-6)
    # the prototype is the vote-weighted mean of the strong positions: (1 x [1, 0] + 0.5 x [0, 3]) / 1.5,
    # the direction [2, 3]; cosine 2/sqrt(13) with [2, 0] and 3/sqrt(13) with [0, 1]
    got = prototype_similarity(activation, torch.tensor([[[1.0, 0.0, 0.0, 0.5]]]))[0, 0]
    assert got[1] == pytest.approx(2 / 13**0.5, abs=1e-6) and got[2] == pytest.approx(3 / 13**0.5, abs=1e-6)
    # no votes at all: a zero prototype, zero similarity everywhere (not NaN)
    assert torch.equal(prototype_similarity(activation, torch.zeros(1, 1, 4)), torch.zeros(1, 1, 4))


def test_add_similarity_weights_scales_and_drops_negative_parts():
    votes = np.zeros((1, 4, 4))
    votes[0, 0, 0] = 1.0
    layer = torch.full((1, 2, 2), -1.0)
    layer[0, 1, 1] = 0.5  # similar bottom-right, dissimilar (negative) elsewhere
    combined = add_similarity(votes, [layer], weight=2.0)
    assert combined.shape == (1, 4, 4) and np.isclose(combined.max(), 1.0)
    # bottom-right: no vote + 2 x 1 (the similarity scaled to max 1) = 2, the maximum; top-left: the vote 1
    # + 0 (the negative similarity dropped); both over 2
    assert combined[0, 3, 3] == pytest.approx(1.0)
    assert combined[0, 0, 0] == pytest.approx(0.5)
    assert np.allclose(add_similarity(votes, [layer], weight=0.0), votes)


def test_mass_level_by_hand():
    votes = np.array([[1.0, 0.5], [0.25, 0.0]])
    # power 1: the strongest votes 1.0, 0.5, 0.25 hold 4/7, 6/7, 7/7 of the total
    assert mass_level(votes, 0.5, 1.0) == 1.0
    assert mass_level(votes, 0.8, 1.0) == 0.5
    assert mass_level(votes, 0.9, 1.0) == 0.25
    # power 2: 1, 0.25, 0.0625 hold 0.76, 0.95, 1.0: a higher power cuts higher for the same share
    assert mass_level(votes, 0.9, 2.0) == pytest.approx(0.5)
    assert mass_level(np.zeros((3, 3)), 0.9, 2.5) == 1.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_otsu_level_of_a_map_of_one_value_up_to_rounding_keeps_it_whole(dtype):
    flat = np.full((224, 224), 0.5, dtype=dtype)
    flat[0, 0] = np.nextafter(flat[0, 0], dtype(1))  # a 1x1 layer's map: numpy cannot make 256 bins of this range
    flat[1, 1] = np.nextafter(np.nextafter(flat[1, 1], dtype(1)), dtype(1))
    assert (flat >= otsu_level(flat)).all()
    cut = np.full((8, 8), 0.5, dtype=dtype)
    cut[:4] = 0.5 + 1e-3  # a small but real step is still cut
    assert (cut >= otsu_level(cut)).sum() == 32


def test_otsu_level_by_hand():
    two_groups = np.zeros((10, 10))
    two_groups[:3] = 0.9  # 30 values near 0.9, 70 near 0.1: the level falls between the groups
    two_groups[3:] = 0.1
    level = otsu_level(two_groups)
    assert 0.1 < level < 0.9
    assert (two_groups >= level).sum() == 30
    assert otsu_level(np.full((4, 4), 0.7)) == pytest.approx(0.7)  # one value: the whole image stays
    assert otsu_level(np.zeros((4, 4))) == pytest.approx(1e-6)
    assert region_at(np.zeros((4, 4)), otsu_level(np.zeros((4, 4)))).all()


@pytest.mark.parametrize("cut", ["otsu", "mass", "fraction"])
def test_a_map_that_is_not_finite_is_a_clear_error(cut):
    broken = np.ones((4, 4))
    broken[1, 2] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        density_level(broken, PRESETS["default"].with_options(cut=cut))


def test_otsu_cut_follows_the_map_and_is_the_default():
    assert PRESETS["default"].cut == "otsu"
    bright = np.zeros((20, 20))
    bright[5:15, 5:15] = 1.0  # an object of 100 pixels on a dark background
    hazy = bright * 0.5 + 0.4  # the same object in a brighter haze: Otsu's level moves with it
    hazy[5:15, 5:15] = 1.0
    default = PRESETS["default"]
    for picture in (bright, hazy):
        assert region_at(picture, density_level(picture, default)).sum() == 100
    assert density_level(hazy, default) > density_level(bright, default)


def test_mass_cut_adapts_to_the_map_and_fraction_cut_does_not():
    peaked = np.zeros((20, 20))
    peaked[9:11, 9:11] = 1.0
    peaked += 0.05
    flat = np.full((20, 20), 0.5)
    flat[0, 0] = 1.0
    mass = PRESETS["default"].with_options(cut="mass")
    assert density_level(peaked, mass) > density_level(flat, mass) * 1.5
    fraction = LocalizeConfig(mode="density", cut="fraction", level=0.3)
    assert density_level(peaked, fraction) == density_level(flat, fraction) == 0.3


@pytest.mark.parametrize(
    "bad",
    [{"cut": "median"}, {"cut": "Otsu"}, {"mass": 1.0}, {"mass": 0.0}, {"mass_power": 0.0}, {"similarity": -0.5},
     {"similarity": float("inf")}, {"objectness": float("nan")}, {"mass_power": float("inf")}, {"map_blur": float("nan")}],
)
def test_cut_options_are_checked(bad):
    with pytest.raises(ValueError):
        LocalizeConfig(mode="density", **bad)


def test_with_options_level_alone_selects_the_fraction_cut():
    default = PRESETS["default"]
    assert default.with_options(level=0.4).cut == "fraction"
    assert default.with_options(level=0.4, cut="mass").cut == "mass"
    assert PRESETS["paper"].with_options(mass=0.8).cut == "mass"
    assert default.with_options(kmax=5).cut == "otsu"


def test_region_map_is_the_votes_without_similarity_and_none_in_neurons_mode():
    from neuroloc.pipeline import region_map

    votes = np.random.default_rng(0).random((2, 8, 8))
    votes /= votes.reshape(2, -1).max(axis=1)[:, None, None]
    activations = {"a": torch.rand(2, 3, 4, 4)}
    layer_votes = {"a": torch.rand(2, 4, 4)}
    assert region_map(votes, activations, layer_votes, PRESETS["default"].with_options(similarity=0.0)) is votes
    assert region_map(votes, activations, layer_votes, PRESETS["paper"]) is None
    combined = region_map(votes, activations, layer_votes, PRESETS["default"])
    assert combined.shape == votes.shape and np.isclose(combined.max(), 1.0) and not np.allclose(combined, votes)


def test_the_default_preset_takes_a_backbones_own_settings_and_explicit_options_win():
    from neuroloc.cli import build_config
    from neuroloc.config import preset_for
    from neuroloc.evaluation.command import parse_method
    from neuroloc.models import model_default_options

    own = {"cut": "fraction", "level": 0.3, "similarity": 0.0}
    assert preset_for("default") == PRESETS["default"] and preset_for("default", {}) == PRESETS["default"]
    assert preset_for("paper", own) == PRESETS["paper"]  # other presets are the same for every model
    config = preset_for("default", own)
    assert (config.cut, config.level, config.similarity, config.mode) == ("fraction", 0.3, 0.0, "density")
    assert build_config("default", own).similarity == 0.0
    chosen = build_config("default", own, mass=0.9, similarity=1.0)  # given options beat the model's
    assert (chosen.cut, chosen.mass, chosen.similarity) == ("mass", 0.9, 1.0)
    assert model_default_options("efficientnet_lite0") == {} and model_default_options("no_such_model") == {}
    resnet = model_default_options("resnet50_keras")
    assert resnet == {"cut": "fraction", "level": 0.3, "similarity": 0.0, "objectness": 0.0, "large": {"mass_power": 2.0}}
    assert preset_for("default", resnet) == config.with_options(objectness=0.0)  # a hint's own settings stay out
    assert (preset_for("large", resnet).mass_power, preset_for("large", resnet).mass) == (2.0, 0.97)
    assert preset_for("small", resnet).mass_power == PRESETS["default"].mass_power
    assert model_default_options("efficientnet_lite2") == {"objectness": 0.0, "cut": "fraction", "level": 0.4}
    assert model_default_options("squeezenet1_1") == {"similarity": 0.0, "objectness": 0.0, "cut": "mass", "mass": 0.95, "mass_power": 2.5}
    assert model_default_options("efficientnet_lite1") == {"objectness": 0.0}
    assert parse_method("dam", own)[1].config == config
    assert parse_method("dam:paper", own)[1].config == PRESETS["paper"]
    # the size hints start from the backbone's own default and change only the cut
    small, large = preset_for("small", own), preset_for("large", own)
    assert (small.cut, small.level, small.similarity) == ("fraction", 0.75, 0.0)
    assert (large.cut, large.mass, large.level, large.similarity) == ("mass", 0.97, 0.3, 0.0)
    # the hints were measured without the objectness map (docs/method.md), so they leave it out
    assert preset_for("small") == PRESETS["small"] == PRESETS["default"].with_options(cut="fraction", level=0.75, objectness=0.0)
    assert preset_for("large") == PRESETS["large"] == PRESETS["default"].with_options(mass=0.97, objectness=0.0)
    assert build_config("small", own, level=0.6).level == 0.6


def test_a_localizer_for_a_backbone_starts_from_its_own_default():
    from types import SimpleNamespace

    from neuroloc.pipeline import Localizer

    own = {"cut": "fraction", "level": 0.3, "similarity": 0.0}
    fake = SimpleNamespace(spec=SimpleNamespace(default_options=own), module=torch.nn.ReLU())
    assert Localizer(fake).config.similarity == 0.0  # type: ignore[arg-type]
    assert Localizer(fake, config=PRESETS["paper"]).config == PRESETS["paper"]  # type: ignore[arg-type]
    large = Localizer(fake, preset="large").config  # type: ignore[arg-type]
    assert (large.cut, large.mass, large.similarity) == ("mass", 0.97, 0.0)
