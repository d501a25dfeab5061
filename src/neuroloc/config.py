"""The knobs of the method, with presets."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from neuroloc.blobs import PercentileOf, parse_morphology
from neuroloc.masks import REFINE_METHODS

if TYPE_CHECKING:  # types only: these modules import PyTorch, which `neuroloc --help` should not wait for
    from neuroloc.backprop import ChannelReduce
    from neuroloc.rescore import RescoreMode, ScoreKind

Mode = Literal["neurons", "density"]
Cut = Literal["fraction", "mass", "otsu"]
Refine = Literal["none", "grabcut"]


@dataclass(frozen=True)
class LocalizeConfig:
    """Parameters of Algorithm 1. The field defaults are the paper's recipe; the ``default`` preset is
    the measured best (see docs/results.md).

    Attributes:
        mode: ``neurons`` is Algorithm 1 as written (a blob per chosen neuron, the union of the best k).
            ``density`` lets every neuron with a positive DAM score vote for its position, in one or more
            layers, and cuts the vote map at ``level`` (see :mod:`neuroloc.evidence`).
        density_layers: layers whose votes are fused in ``density`` mode (None: ``layer`` if given,
            else the model's default), in any order; the neurons reported are the lowest one's.
        cut: how ``density`` mode cuts the vote map: at ``fraction`` = ``level`` of its maximum (the
            same level for every image), or at the ``mass`` level, chosen per image: the value above
            which the strongest votes hold the share ``mass`` of the vote map's total, with votes raised to
            ``mass_power`` first (a peaked map is cut high, a flat one low; see :func:`neuroloc.evidence.mass_level`),
            or at ``otsu``, Otsu's level of the map, also per image: the value that splits the map's values
            into the two groups with the largest between-group variance (no parameter).
        level: fraction of the vote map's maximum that bounds the region (``cut="fraction"``); also the
            reference cut of the confidence's stability check in both modes.
        mass, mass_power: the share and the power of the ``mass`` cut.
        similarity: weight of the feature-similarity map added to the vote map in ``density`` mode
            (0: votes only): how much each position's features resemble those of the positions with
            the strongest votes (:func:`neuroloc.evidence.prototype_similarity`).
        objectness: weight of the objectness map added in ``density`` mode when the model carries feature
            directions fitted over an image set (:mod:`neuroloc.directions`; 0: without it).
        layer: the conv layer whose neurons DAM ranks (None: the model's default layer).
        kmax: how many neurons DAM keeps (paper: ~10).
        k: how many of them form the union (paper: 5).
        percentile: pixels of a neuron map above this percentile form its blob (paper: 80).
        percentile_of: ``all`` values (paper) or only ``positive`` ones (authors' code).
        morphology: blob clean-up steps or preset (see :func:`neuroloc.blobs.parse_morphology`).
        one_per_channel: at most one neuron per channel (authors' code) or any (paper).
        rescoring: ``mask`` (outside the blob = mean, authors' code), ``crop``, or ``none`` (keep DAM order).
        score: rank regions and compute the class gradient with the ``logit`` or the ``probability``.
        class_gradient: ``plain`` d(score)/d(layer) (paper) or ``guided`` (authors' code).
        channel_reduce: how the colour channels of a pixel gradient become one value.
        map_blur: Gaussian sigma (pixels at input size) applied to each neuron map before thresholding (0: off).
        refine: ``grabcut`` redraws the ``density``-mode region along the image's colour edges, with GrabCut
            seeded by the map (:func:`neuroloc.masks.grabcut_region`; needs OpenCV); the box and the mask
            follow it. ``none`` keeps the region as cut.
    """

    mode: Mode = "neurons"
    layer: str | None = None
    density_layers: tuple[str, ...] | None = None
    level: float = 0.3
    cut: Cut = "fraction"
    mass: float = 0.9
    mass_power: float = 2.5
    similarity: float = 0.0
    objectness: float = 0.0
    kmax: int = 10
    k: int = 5
    percentile: float = 80.0
    percentile_of: PercentileOf = "all"
    morphology: str = "paper"
    one_per_channel: bool = False
    rescoring: RescoreMode = "mask"
    score: ScoreKind = "logit"
    class_gradient: Literal["plain", "guided"] = "plain"
    channel_reduce: ChannelReduce = "mean"
    map_blur: float = 0.0
    refine: Refine = "none"

    def __post_init__(self) -> None:
        if isinstance(self.density_layers, str):  # "L1,L2", as the command line takes them
            object.__setattr__(self, "density_layers", tuple(n.strip() for n in self.density_layers.split(",") if n.strip()))
        elif self.density_layers is not None and not isinstance(self.density_layers, tuple):  # a list: hashable
            object.__setattr__(self, "density_layers", tuple(self.density_layers))
        if self.layer is not None and not self.layer.strip():
            raise ValueError("layer is an empty name; leave it out for the model's default layer")
        if self.kmax < 1:
            raise ValueError(f"kmax must be >= 1, got {self.kmax}")
        if not 1 <= self.k <= self.kmax:
            raise ValueError(f"k must be between 1 and kmax={self.kmax}, got {self.k}")
        if not 0 <= self.percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), got {self.percentile}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if not 0 < self.mass < 1:
            raise ValueError(f"mass must be in (0, 1), got {self.mass}")
        if not 0 < self.mass_power < math.inf:
            raise ValueError(f"mass_power must be > 0 and finite, got {self.mass_power}")
        if not 0 <= self.similarity < math.inf:
            raise ValueError(f"similarity must be >= 0 and finite, got {self.similarity}")
        if not 0 <= self.objectness < math.inf:
            raise ValueError(f"objectness must be >= 0 and finite, got {self.objectness}")
        if self.density_layers is not None and not self.density_layers:
            raise ValueError("density_layers must name at least one layer")
        if not 0 <= self.map_blur < math.inf:
            raise ValueError(f"map_blur must be >= 0 and finite, got {self.map_blur}")
        _check_choice("mode", self.mode, ("neurons", "density"))
        _check_choice("cut", self.cut, ("fraction", "mass", "otsu"))
        _check_choice("percentile_of", self.percentile_of, ("all", "positive"))
        _check_choice("rescoring", self.rescoring, ("mask", "crop", "none"))
        _check_choice("score", self.score, ("logit", "probability"))
        _check_choice("class_gradient", self.class_gradient, ("plain", "guided"))
        _check_choice("channel_reduce", self.channel_reduce, ("mean", "abs_max", "l2"))
        _check_choice("refine", self.refine, REFINE_METHODS)
        if self.refine != "none" and self.mode != "density":
            raise ValueError(f"refine={self.refine!r} redraws the density-mode region: it needs mode='density'")
        parse_morphology(self.morphology)

    @property
    def uses_objectness(self) -> bool:
        """Whether the region map takes the objectness map of feature directions (when there are some)."""
        return self.mode == "density" and self.objectness > 0

    def with_options(self, **options: Any) -> LocalizeConfig:
        """A copy with the given fields changed (None values are ignored).

        A ``level`` without a ``cut`` selects ``cut="fraction"`` and a ``mass`` without one ``cut="mass"``,
        so the number given is the one used (the default preset cuts by Otsu's level, which takes neither);
        a ``kmax`` below ``k`` without a ``k`` lowers ``k`` with it, so ``kmax=3`` alone is valid.
        """
        given = {k: v for k, v in options.items() if v is not None}
        known = [f.name for f in fields(self)]
        if unknown := sorted(set(given) - set(known)):  # Localizer(options=...) or a typo: the options there are
            raise ValueError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; the options "
                             f"are {', '.join(known)}")
        if "cut" not in given and ("level" in given) != ("mass" in given):
            given["cut"] = "fraction" if "level" in given else "mass"
        if isinstance(given.get("kmax"), numbers.Integral) and "k" not in given:  # numpy's integers too
            given["k"] = min(self.k, int(given["kmax"]))
        return replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


PRESETS: dict[str, LocalizeConfig] = {
    # Algorithm 1 as the paper states it.
    "paper": LocalizeConfig(),
    # The authors' public code (see docs/method.md).
    "authors": LocalizeConfig(
        percentile_of="positive", morphology="authors", one_per_channel=True, class_gradient="guided"
    ),
    # No re-scoring: the first k neurons in DAM order.
    "fast": LocalizeConfig(rescoring="none"),
}
# Measured best on the tuning half of the dev set (docs/results.md): DAM votes of all neurons in two
# layers plus twice the map of features like the most-voted ones, plus the objectness map of feature
# directions where they were fitted, cut per image at Otsu's level; re-scoring did not help there, so it
# is off. The mass settings serve the ``large`` hint below.
PRESETS["default"] = LocalizeConfig(
    mode="density", cut="otsu", mass=0.95, mass_power=4.0, similarity=2.0, objectness=1.0, rescoring="none"
)
# Object-size hints for users who know their objects' size: the default's map, cut where the dev set's
# objects of that size were found best (tuning half of each size bin; docs/results.md#object-size-presets).
# A small object (< 10 % of the image) sits in a few cells of the maps, so only their peak is kept;
# a large one (> 50 %) wants more of the map than the default's share.
SIZE_HINTS: dict[str, dict[str, Any]] = {  # measured without the objectness map, so they leave it out
    "small": {"cut": "fraction", "level": 0.75, "objectness": 0.0},
    "large": {"cut": "mass", "mass": 0.97, "objectness": 0.0},
}
PRESETS.update({name: replace(PRESETS["default"], **hint) for name, hint in SIZE_HINTS.items()})


def preset(name: str) -> LocalizeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_for(name: str, model_options: Mapping[str, Any] | None = None) -> LocalizeConfig:
    """Preset ``name``; for ``default``, with the backbone's own settings (``ModelSpec.default_options``),
    and for the size hints ``small`` / ``large``, that default with the hint's cut and whatever the
    backbone's options list under the hint's name.

    The default preset was tuned on EfficientNet-Lite0; backbones whose maps behave differently
    (one 7x7 layer, for instance) carry the settings they measured better with (docs/backbones.md).
    Other presets are the same for every model.
    """
    base = preset(name)
    model_options = model_options or {}
    own = {key: value for key, value in model_options.items() if key not in SIZE_HINTS}
    if name in SIZE_HINTS:
        return replace(preset_for("default", own), **SIZE_HINTS[name], **model_options.get(name, {}))
    return replace(base, **own) if name == "default" else base


def configure(
    preset_name: str, options: Mapping[str, Any], model_options: Mapping[str, Any] | None = None
) -> LocalizeConfig:
    """The preset (``default``: with the backbone's ``model_options``) with ``options`` (None values
    keep the preset's), as the command line and the viewer build it.

    A kmax below the preset's k lowers k with it, so ``kmax=3`` alone is valid; a level alone selects
    the fixed-fraction cut and a mass alone the mass cut (:meth:`LocalizeConfig.with_options`).

    Raises:
        ValueError: for an unknown preset or an invalid combination.
    """
    return preset_for(preset_name, model_options).with_options(**options)


def ignored_options(config: LocalizeConfig, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``options`` given (not None) that ``config`` makes no use of, each with the reason, e.g.
    ``("level", "the otsu cut takes no level")``: a typo or a misunderstanding the user should hear about."""
    given = {key for key, value in options.items() if value is not None}
    if config.mode != "density":
        density_only = ("cut", "level", "mass", "mass_power", "similarity", "objectness", "density_layers")
        return [(key, f"the {config.mode} mode cuts no map") for key in density_only if key in given]
    by_cut = {"level": "fraction", "mass": "mass", "mass_power": "mass"}
    # (percentile, morphology and map blur still shape the neuron maps --explain draws; kmax the neurons listed)
    neurons_only = {"k": "unites no k neurons", "rescoring": "re-scores no neuron regions"}
    ignored = [(key, f"the {config.cut} cut takes no {key.replace('_', ' ')}")
               for key, cut in by_cut.items() if key in given and config.cut != cut]
    ignored += [(key, f"the density mode {what} (the neurons mode does: --preset paper)")
                for key, what in neurons_only.items() if key in given]
    if "layer" in given and config.density_layers:
        ignored.append(("layer", "in density mode --density-layers names the layers (neurons come from the lowest)"))
    return ignored


def box_unchanged_by(config: LocalizeConfig, key: str) -> str | None:
    """Why the option ``key``, set in ``config``, leaves its boxes as they would be without it (None when it may
    change them): what a sweep over its values would only repeat."""
    reasons = dict(ignored_options(config, {key: True}))
    if key in reasons:
        return reasons[key]
    if config.mode == "density" and key in _NEURON_MAP_FIELDS:
        return "the density mode's boxes do not depend on it (it shapes the neurons listed and the maps --explain draws)"
    return None


_NEURON_MAP_FIELDS = ("kmax", "percentile", "percentile_of", "morphology", "one_per_channel", "channel_reduce", "map_blur")

CONFIG_FIELDS = tuple(f.name for f in fields(LocalizeConfig))
