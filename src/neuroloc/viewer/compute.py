"""Localizing on demand for the viewer: knobs from a request, the model (loaded once), a result cache.

Each result is computed with ``keep_maps=True`` so its page can show every chosen neuron's map and blob,
the union mask and, in density mode, the DAM vote map. Results are kept in a small LRU cache keyed by
image, class, configuration and model; the model runs one request at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from neuroloc.classes import ClassList, ClassLookupError, resolve_class, short_class_name
from neuroloc.config import PRESETS, LocalizeConfig, configure, preset_for
from neuroloc.masks import REFINE_METHODS, RefinementUnavailable, require_opencv
from neuroloc.viewer import images as pictures

if TYPE_CHECKING:
    from neuroloc.models import LoadedModel
    from neuroloc.result import Localization

KNOBS = ("preset", "mode", "layer", "kmax", "k", "percentile", "rescoring", "level", "similarity", "refine")
MAX_KMAX = 64  # keeps one request's guided backprop bounded
CACHE_ENTRIES = 24


class ComputeError(Exception):
    """A request the model cannot answer; ``status`` is the HTTP status to send."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def parse_knobs(values: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(preset name, overrides) from request parameters; empty values mean "the preset's".

    Raises:
        ComputeError: for an unknown preset or choice, or a malformed number.
    """
    preset_name = str(values.get("preset") or "default")
    if preset_name not in PRESETS:
        raise ComputeError(f"unknown preset {preset_name!r}; choose from {', '.join(sorted(PRESETS))}")
    options: dict[str, Any] = {}
    for name, kind in (("kmax", int), ("k", int), ("percentile", float), ("level", float), ("similarity", float)):
        raw = values.get(name)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            options[name] = kind(str(raw).strip())
        except ValueError:
            raise ComputeError(f"{name} must be a {'whole ' if kind is int else ''}number, got {str(raw)[:40]!r}") from None
    choices = (("mode", ("density", "neurons")), ("rescoring", ("mask", "crop", "none")), ("refine", REFINE_METHODS))
    for name, allowed in choices:
        raw = values.get(name)
        if raw:
            if raw not in allowed:
                raise ComputeError(f"{name} must be one of {', '.join(allowed)}; got {str(raw)[:40]!r}")
            options[name] = raw
    layer = str(values.get("layer") or "").strip()
    if layer:
        if len(layer) > 200:
            raise ComputeError("layer name too long")
        options["layer"] = layer
    density_layers = str(values.get("density_layers") or "").strip()
    if density_layers:
        options["density_layers"] = tuple(filter(None, (s.strip() for s in density_layers.split(","))))
    if options.get("kmax", 0) > MAX_KMAX:
        raise ComputeError(f"kmax must be at most {MAX_KMAX} here")
    return preset_name, options


def build_config(
    preset_name: str, options: dict[str, Any], model_options: dict[str, Any] | None = None
) -> LocalizeConfig:
    """As ``neuroloc localize`` (:func:`neuroloc.config.configure`), with errors as :class:`ComputeError`."""
    try:
        config = configure(preset_name, options, model_options)
    except (ValueError, TypeError) as exc:
        raise ComputeError(str(exc)) from None
    if config.refine != "none":
        try:
            require_opencv()
        except RefinementUnavailable as exc:
            raise ComputeError(str(exc)) from None
    return config


def suggest_knobs(method: Mapping[str, Any] | None, model_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preset and overrides closest to an evaluate method's settings (its method.json), the presets taken
    with the backbone's own settings (``model_options``) as the viewer recomputes with them."""
    if not method or method.get("method") != "dam":
        return {"preset": "default"}
    names = {f.name for f in fields(LocalizeConfig)}
    settings = {k: (tuple(v) if isinstance(v, list) else v) for k, v in method.items() if k in names}

    def differences(name: str) -> dict[str, Any]:
        base = preset_for(name, model_options).to_dict()
        return {k: v for k, v in settings.items() if base.get(k) != v}

    best = min(sorted(PRESETS), key=lambda name: len(differences(name)))
    overrides = {k: v for k, v in differences(best).items() if k in KNOBS or k == "density_layers"}
    if isinstance(overrides.get("density_layers"), tuple):  # (str() of each: a hand-edited file may hold numbers)
        overrides["density_layers"] = ",".join(map(str, overrides["density_layers"]))
    return {"preset": best, **overrides}


def knob_fields(method: Mapping[str, Any] | None, model_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a page's knobs start from for results of ``method``: ``suggested_knobs`` (:func:`suggest_knobs`) and
    ``settings_beyond_knobs`` (:func:`settings_beyond_knobs`)."""
    suggested = suggest_knobs(method, model_options)
    return {"suggested_knobs": suggested, "settings_beyond_knobs": _beyond(method, suggested, model_options)}


def settings_beyond_knobs(method: Mapping[str, Any] | None, model_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings of an evaluate method that :func:`suggest_knobs` cannot carry (``mass``, ``cut`` ...): a
    recomputed box can differ from the recorded one by them, which the page says."""
    return _beyond(method, suggest_knobs(method, model_options), model_options)


def _beyond(
    method: Mapping[str, Any] | None, suggested: dict[str, Any], model_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if not method or method.get("method") != "dam":
        return {}
    try:  # what the page's knobs will ask for
        preset_name, options = parse_knobs(suggested)
    except ComputeError:  # a knob past the viewer's limits (kmax 100; recomputing says so): taken as it was set
        preset_name, options = suggested["preset"], {k: v for k, v in suggested.items() if k != "preset"}
    try:
        config = configure(preset_name, options, model_options)
    except (ValueError, TypeError):
        config = preset_for(preset_name, model_options)
    base = json.loads(json.dumps(config.to_dict(), default=str))
    names = {f.name for f in fields(LocalizeConfig)} - set(KNOBS) - {"density_layers"}
    return {k: v for k, v in method.items() if k in names and base.get(k) != v}


def resolve_target(text: str | None, classes: ClassList) -> int | None:
    """A class index among the model's ``classes`` from an index, WordNet id or name; None (empty or ``top1``)
    means the top-1 class.

    Raises:
        ComputeError: for an unknown or ambiguous class, with the candidates.
    """
    if text is None or not str(text).strip() or str(text).strip().lower() in ("top1", "top-1"):
        return None
    try:
        return resolve_class(str(text)[:200], classes).index
    except ClassLookupError as exc:
        raise ComputeError(str(exc)) from None


@dataclass
class Explained:
    """One cached result, with what its page shows."""

    key: str
    result: dict[str, Any]
    maps: np.ndarray | None
    blobs: np.ndarray | None
    density: np.ndarray | None
    mask: np.ndarray
    rendered: dict[str, bytes] = field(default_factory=dict)

    def picture(self, what: str) -> bytes | None:
        """PNG of ``mask``, ``density``, ``map<j>`` or ``blob<j>`` (None: there is no such picture)."""
        if what in self.rendered:
            return self.rendered[what]
        data: bytes | None = None
        if what == "mask":
            data = pictures.mask_png(self.mask)
        elif what == "density" and self.density is not None:
            data = pictures.density_png(self.density)
        else:
            named = re.fullmatch(r"(map|blob)(0|[1-9][0-9]{0,3})", what)  # one spelling per picture: map7, not map07
            stack, render = {"map": (self.maps, pictures.saliency_png), "blob": (self.blobs, pictures.blob_png)}.get(
                named.group(1) if named else "", (None, None))
            if named and stack is not None and render is not None \
                    and int(named.group(2)) < min(len(stack), len(self.result["neurons"])):
                data = render(stack[int(named.group(2))])
        if data is not None:
            self.rendered[what] = data
        return data


class Explainer:
    """The model and the cache of results."""

    def __init__(self, model: LoadedModel | Callable[[], LoadedModel], entries: int = CACHE_ENTRIES) -> None:
        is_model = hasattr(model, "module")
        self._model: LoadedModel | None = model if is_model else None  # type: ignore[assignment]
        self._load: Callable[[], LoadedModel] | None = None if is_model else model  # type: ignore[assignment]
        self._lock = threading.Lock()  # the cache
        self._run_lock = threading.Lock()  # the model
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[str, Explained] = OrderedDict()
        self._entries = entries
        # in every key: a picture's address is this server's own, so a browser's copy from an earlier server
        # (another model, --weights or --directions, the same address) is never taken for it
        self._session = secrets.token_hex(8)

    @property
    def model(self) -> LoadedModel:
        """The model, loaded on first use.

        Raises:
            ComputeError: (503) when it cannot be loaded.
        """
        with self._load_lock:  # requests arriving together load it once
            if self._model is None:
                from neuroloc.models import ModelError

                try:
                    self._model = self._load()  # type: ignore[misc]
                except (ModelError, OSError, RuntimeError) as exc:
                    raise ComputeError(f"the model cannot be loaded: {' '.join(str(exc).split())}", 503) from None
            return self._model

    def cached(self, key: str) -> Explained | None:
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            return found

    def explain(self, image_id: str, load: Callable[[], Image.Image], label: int | None, config: LocalizeConfig) -> Explained:
        """The result for one image (``image_id`` names it in the cache key), computed if not cached.

        Raises:
            ComputeError: for a bad layer (400) or a failure inside the model (500).
            neuroloc.imageio.ImageError: when the image cannot be read.
        """
        with self._run_lock:  # one model run at a time; a second request for the same key finds it cached
            model = self.model
            key = self._key(image_id, label, config, model.name)
            found = self.cached(key)
            if found is not None:
                with self._lock:  # its pictures are found by its own key, which must stay cached with it
                    self._cache[found.key] = found
                    self._cache.move_to_end(found.key)
                return found
            entry = self._compute(key, model, load(), label, config)
            with self._lock:
                if label is None:  # the top-1 class: the same result as asking for that class by name
                    self._cache[self._key(image_id, entry.result["label"], config, model.name)] = entry
                self._cache[key] = entry
                while len(self._cache) > self._entries:
                    self._cache.popitem(last=False)
            return entry

    def _key(self, image_id: str, label: int | None, config: LocalizeConfig, model_name: str) -> str:
        text = json.dumps([self._session, image_id, label, config.to_dict(), model_name], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _compute(self, key: str, model: LoadedModel, image: Image.Image, label: int | None, config: LocalizeConfig) -> Explained:
        import torch

        from neuroloc.pipeline import image_to_input, localize_batch
        from neuroloc.rescore import class_probabilities

        try:
            result = localize_batch(model, [image], config, [label], keep_maps=True)[0]
            with torch.no_grad():
                probabilities = class_probabilities(model.module(image_to_input([image], model)))[0]
        except (ValueError, KeyError, LookupError, AttributeError) as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ComputeError(f"cannot localize with these settings: {text}") from None
        except RuntimeError as exc:
            raise ComputeError(f"localization failed: {' '.join(str(exc).split())}", 500) from None
        top = torch.topk(probabilities, k=min(5, probabilities.numel()))
        classes = model.classes
        top5 = [
            {"label": int(i), "name": classes[int(i)].short_name if int(i) < len(classes) else str(int(i)),
             "synset": classes[int(i)].synset if int(i) < len(classes) else None, "probability": float(p)}
            for p, i in zip(top.values, top.indices)
        ]
        mask = _small_mask(result.full_mask())
        described = describe(result, config, top5, model.name)
        directions = model.directions if config.uses_objectness else None
        described["directions"] = directions.fingerprint if directions is not None else None
        return Explained(key, described, result.maps, result.blobs, result.density, mask)


def _small_mask(mask: np.ndarray, side: int = 640) -> np.ndarray:
    """The union mask at most ``side`` pixels on a side (the full-size one can be 100 MB)."""
    picture = Image.fromarray(mask.astype(np.uint8) * 255)
    picture.thumbnail((side, side), Image.Resampling.NEAREST)
    return np.asarray(picture) > 127


def describe(result: Localization, config: LocalizeConfig, top5: list[dict[str, Any]], model_name: str) -> dict[str, Any]:
    """The JSON form of a result, for the page."""
    prediction = result.prediction_dict(with_neurons=True)
    confidence = getattr(result, "confidence", None)  # a neuroloc.confidence.Confidence, or None
    return {
        **prediction,
        "confidence": None if confidence is None else round(confidence.value, 4),
        "confidence_parts": None if confidence is None else confidence.to_dict(),
        "short_name": short_class_name(result.name, result.synset),
        "probability": result.probability,
        "width": result.image_size[0],
        "height": result.image_size[1],
        "mode": config.mode,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.to_dict().items()},
        "model": model_name,
        "top5": top5,
        "has_maps": result.maps is not None,
        "has_density": result.density is not None,
    }


def record_for(path: Path, width: int, height: int, explained: Explained) -> dict[str, Any]:
    """A localize-style JSON line for an uploaded image."""
    keys = ("label", "synset", "name", "score", "confidence", "box", "point", "layer", "empty", "confidence_parts", "neurons")
    prediction = {k: explained.result.get(k) for k in keys}
    return {"image": str(path), "width": width, "height": height, "model": explained.result["model"],
            "predictions": [prediction], "error": None}
