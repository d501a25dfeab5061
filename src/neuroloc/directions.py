"""Feature directions: where a layer's features vary most across many images, as an objectness map.

Deep Descriptor Transforming (Wei et al. 2017) found that over the positions of many images, the first
principal direction of a CNN layer's features separates objects from background. neuroloc fits that
direction once per image set, without labels, and adds each position's projection on it to the map it
cuts (``LocalizeConfig.objectness``): it reaches parts of the object that neither the class's votes nor
their feature prototype reach. The fit needs many images (at least :data:`MIN_FIT_IMAGES`); the sign of
the direction is chosen so that the projection agrees with the DAM votes of each image's top-1 class.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from PIL import Image

from neuroloc.device import exact_float32
from neuroloc.evidence import NonFiniteEvidence, dam_density, resize_maps, scale_to_max_one
from neuroloc.jsonl import new_file_mode
from neuroloc.options import MAX_FIT_IMAGES, MIN_FIT_IMAGES

if TYPE_CHECKING:
    from neuroloc.config import LocalizeConfig
    from neuroloc.imageio import DarkImages
    from neuroloc.models import LoadedModel
    from neuroloc.pipeline import PendingEvidence
    from neuroloc.tiles import TileRule

Key = TypeVar("Key")
T = TypeVar("T")


class DirectionsError(ValueError):
    """Feature directions that cannot be fitted, read or used with this model."""


@dataclass(frozen=True)
class FeatureDirections:
    """Per layer: the mean feature vector (C,) and the unit first principal direction (C,) over the
    positions of ``images`` images of ``model``, fed to it at ``input_size`` (None: not recorded, files of
    older versions)."""

    model: str
    means: Mapping[str, torch.Tensor]
    directions: Mapping[str, torch.Tensor]
    images: int
    input_size: int | None = None
    fitted_over: str | None = None  # for a fit made by --directions auto: a digest of what it was fitted over
    weights: str | None = None  # the file name of the model's weights (None: not recorded, files of older versions)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.directions)

    @property
    def fingerprint(self) -> str:
        """A short hash of the fit, what a resumed evaluation compares: for a fit made by ``--directions auto``,
        of what it was fitted over (the same images, layers and model fitted with another thread count give
        vectors that differ in their last bits, and the same boxes up to rounding); else of the vectors."""
        if self.fitted_over is not None:
            return hashlib.sha256(f"auto {self.fitted_over}".encode()).hexdigest()[:16]
        digest = hashlib.sha256(self.model.encode())
        for name in self.layers:
            digest.update(name.encode())
            digest.update(self.means[name].float().numpy().tobytes())
            digest.update(self.directions[name].float().numpy().tobytes())
        return digest.hexdigest()[:16]

    def layers_problem(self, layers: Sequence[str]) -> str | None:
        """Why these directions cannot make the objectness map of settings that fuse ``layers`` (in any order),
        or None."""
        if set(self.layers) == set(layers):
            return None
        return f"fitted for layers {', '.join(self.layers)}; these settings fuse {', '.join(layers)}"

    def size_warning(self, fed: int) -> str | None:
        """The one sentence every entry point gives when these directions were fitted at another input size
        than the ``fed`` one (None when the sizes agree or the file did not record its size)."""
        if self.input_size in (None, fed):
            return None
        return (f"fitted at input size {self.input_size}, fed {fed} here: the objectness map may be worse "
                f"(`neuroloc calibrate --input-size {fed}` fits it at this size)")

    def use_warning(self, model: LoadedModel) -> str | None:
        """What every entry point says when these directions were fitted at another input size than ``model``
        is fed, or with weights of another file name (a fine-tuned model's features lie elsewhere; the same
        weights under another name are told too, as only the name is recorded): None when neither, or when the
        file did not record it."""
        said = [self.size_warning(model.input_size)]
        used = weights_name(model)
        if self.weights is not None and self.weights != used:
            said.append(f"fitted with weights named {self.weights}, used with {used} here: if these are other "
                        f"weights (a fine-tuned model), the objectness map may be worse (`neuroloc calibrate` with them "
                        f"fits it for them)")
        return "; and ".join(s for s in said if s) or None


class DirectionFit:
    """Running sums over positions, per layer, from which the mean and the first principal direction follow."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.total: dict[str, torch.Tensor] = {}
        self.outer: dict[str, torch.Tensor] = {}
        self.agreement: dict[str, torch.Tensor] = {}  # sum of features x (votes - the image's mean vote)
        self.images = 0

    def add(self, activations: Mapping[str, torch.Tensor], votes: Mapping[str, torch.Tensor]) -> None:
        """A batch: each layer's activations (N, C, h, w) and its DAM votes (N, h, w). Images with a
        non-finite value in any layer are left out."""
        finite = None
        for name, activation in activations.items():
            ok = torch.isfinite(activation.detach()).flatten(1).all(dim=1) & torch.isfinite(votes[name].detach()).flatten(1).all(dim=1)
            finite = ok if finite is None else finite & ok
        if finite is None or not bool(finite.any()):
            return
        keep = finite.cpu()
        for name, activation in activations.items():
            features = activation.detach().cpu()[keep].double().flatten(2)  # (N, C, P); the sums stay on the CPU
            vote = votes[name].detach().cpu()[keep].double().flatten(1)
            vote = vote / vote.amax(dim=1, keepdim=True).clamp(min=1e-12)
            centred_vote = vote - vote.mean(dim=1, keepdim=True)
            flat = features.transpose(1, 2).reshape(-1, features.shape[1])
            self.count[name] = self.count.get(name, 0) + flat.shape[0]
            self.total[name] = self.total.get(name, 0) + flat.sum(dim=0)
            self.outer[name] = self.outer.get(name, 0) + flat.T @ flat
            self.agreement[name] = self.agreement.get(name, 0) + (features * centred_vote[:, None]).sum(dim=(0, 2))
        self.images += int(keep.sum())

    def result(self, model: str, input_size: int | None = None) -> FeatureDirections:
        if self.images < MIN_FIT_IMAGES:
            raise DirectionsError(f"feature directions need at least {MIN_FIT_IMAGES} images; got {self.images}")
        means, directions = {}, {}
        for name, n in self.count.items():
            mean = self.total[name] / n
            covariance = (self.outer[name] - n * torch.outer(mean, mean)) / max(n - 1, 1)
            direction = torch.linalg.eigh(covariance).eigenvectors[:, -1]
            if float(direction @ self.agreement[name]) < 0:  # the side where the class's votes are
                direction = -direction
            means[name], directions[name] = mean.float(), direction.float()
        return FeatureDirections(model, means, directions, self.images, input_size)


def objectness_map(activations: Mapping[str, torch.Tensor], directions: FeatureDirections, size: int) -> torch.Tensor:
    """Each position's projection on its layer's direction, resized to ``size``, summed over the layers,
    negative parts dropped, scaled to a maximum of 1: (N, size, size)."""
    missing = [name for name in directions.layers if name not in activations]
    if missing:
        raise DirectionsError(
            f"feature directions fitted for layers {', '.join(directions.layers)}; these settings fuse "
            f"{', '.join(activations)}: fit them for these layers (neuroloc calibrate) or leave them out"
        )
    total = None
    for name in directions.layers:
        activation = activations[name].detach().float()
        if activation.shape[1] != directions.means[name].numel():
            raise DirectionsError(
                f"feature directions fitted for {directions.means[name].numel()} channels in layer {name}, which has "
                f"{activation.shape[1]} in this model: they were fitted for another network named {directions.model}"
            )
        mean = directions.means[name].to(activation.device)
        direction = directions.directions[name].to(activation.device)
        projection = torch.einsum("nchw,c->nhw", activation - mean[None, :, None, None], direction)
        up = resize_maps(projection, size)
        total = up if total is None else total + up
    if total is None:
        raise DirectionsError("feature directions for no layer")
    return scale_to_max_one(total.clamp(min=0)).cpu()


def fit_sample(items: Sequence, limit: int = MAX_FIT_IMAGES) -> list:
    """At most ``limit`` of ``items``, evenly spaced (all of them when there are fewer)."""
    if len(items) <= limit:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, limit).round()]


@exact_float32()
def fit_directions(
    model: LoadedModel, images: Iterable[Image.Image], layers: Sequence[str], batch_size: int = 8
) -> FeatureDirections:
    """Fit the directions of ``layers`` over ``images`` (no labels: each image's votes are for its top-1 class)."""
    from neuroloc.hooks import gradients_on

    fit = DirectionFit()
    with gradients_on(model.module):
        for batch in batched(images, batch_size):
            _fit_pass(model, batch, layers, fit)
    return replace(fit.result(model.name, model.input_size), weights=weights_name(model))


def shares_fit_pass(config: LocalizeConfig) -> bool:
    """Whether localizing an image's top-1 class with ``config`` takes the same forward and backward pass as
    fitting the objectness map's directions over it (density mode with the map, the logit's plain gradient), so
    that ``--directions auto`` can keep the fit images' evidence rather than pass them through the network
    again."""
    return config.uses_objectness and config.score == "logit" and config.class_gradient == "plain"


@exact_float32()
def fit_directions_keeping_evidence(
    model: LoadedModel, images: Iterable[tuple[Key, Image.Image]], config: LocalizeConfig, batch_size: int = 8
) -> tuple[FeatureDirections, dict[Key, PendingEvidence]]:
    """:func:`fit_directions` over the density layers of ``config`` (for which :func:`shares_fit_pass`), through
    the pass that localizing each image's top-1 class takes; that pass's evidence is kept for each image, by its
    key (about 0.5 MB an image for the default model), so that localizing it only draws the region map
    (:meth:`PendingEvidence.finish`). A batch with a non-finite score is fitted without keeping its evidence."""
    from neuroloc.hooks import gradients_on
    from neuroloc.pipeline import evidence_layers, gather_pending_evidence, image_to_input

    if not shares_fit_pass(config):
        raise ValueError("these settings localize through another pass than the fit's: fit_directions alone")
    layers = evidence_layers(model, config)[1]
    fit = DirectionFit()
    kept: dict[Key, PendingEvidence] = {}
    with gradients_on(model.module):
        for batch in batched(images, batch_size):
            keys, pictures = zip(*batch)
            try:
                pending = gather_pending_evidence(model, image_to_input(pictures, model), [None] * len(pictures), config,
                                                  neuron_maps=False)
            except NonFiniteEvidence:
                _fit_pass(model, pictures, layers, fit)  # the fit leaves such images out; localizing them fails alone
                continue
            fit.add(pending.features, pending.layer_votes)
            kept.update(zip(keys, pending.rows()))
    return replace(fit.result(model.name, model.input_size), weights=weights_name(model)), kept


def _fit_pass(model: LoadedModel, pictures: Sequence[Image.Image], layers: Sequence[str], fit: DirectionFit) -> None:
    """Add a batch to ``fit``: its activations at ``layers`` and the DAM votes of each image's top-1 class."""
    from neuroloc.hooks import record_layers, recorded_activations
    from neuroloc.pipeline import check_class_count, image_to_input
    from neuroloc.rescore import class_score

    with record_layers(model.module, layers, graph_root=True) as recorders:
        logits = model.module(image_to_input(pictures, model))
    check_class_count(model, logits)
    activations = recorded_activations(recorders)
    score = class_score(logits, logits.argmax(dim=1), "logit").sum()
    gradients = dict(zip(activations, torch.autograd.grad(score, list(activations.values()))))
    fit.add(activations, {n: dam_density(activations[n].detach(), gradients[n]) for n in layers})


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def weights_name(model: LoadedModel) -> str:
    """The file name of ``model``'s weights, as directions record it."""
    return Path(str(model.weights)).name


def save_directions(directions: FeatureDirections, path: str | Path) -> Path:
    """Write ``directions`` as safetensors (``mean/LAYER``, ``direction/LAYER``), model and count in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"mean/{n}": directions.means[n].contiguous() for n in directions.layers}
    tensors.update({f"direction/{n}": directions.directions[n].contiguous() for n in directions.layers})
    metadata = {"model": directions.model, "images": str(directions.images), "layers": json.dumps(directions.layers)}
    if directions.input_size is not None:
        metadata["input_size"] = str(directions.input_size)
    if directions.weights is not None:
        metadata["weights"] = directions.weights
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.chmod(partial, new_file_mode())  # safetensors writes 0600; a file meant for colleagues is as readable as any
    partial.replace(path)
    return path


def is_directions_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file of feature directions (:func:`save_directions`), which a new fit may
    replace."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "layers" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - safetensors raises several types for a file that is not its own
        return False


def load_directions(path: str | Path, model: str | None = None) -> FeatureDirections:
    """Read a file written by :func:`save_directions`; with ``model``, refuse one fitted for another model.

    Raises:
        DirectionsError: the file is missing, not such a file, or fitted for another model.
    """
    from safetensors import safe_open

    if Path(path).is_dir():  # safetensors says "No such device (os error 19)"
        raise DirectionsError(f"{path}: a folder; give the file `neuroloc calibrate` wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            layers = json.loads(metadata["layers"])
            means = {n: f.get_tensor(f"mean/{n}") for n in layers}
            directions = {n: f.get_tensor(f"direction/{n}") for n in layers}
            images = int(metadata["images"])
            input_size = int(metadata["input_size"]) if "input_size" in metadata else None
    except FileNotFoundError:
        raise DirectionsError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise DirectionsError(f"{path}: not a feature-directions file ({type(exc).__name__}: {exc})") from None
    if model is not None and metadata.get("model") != model:
        raise DirectionsError(f"{path}: fitted for model {metadata.get('model')!r}, not {model!r}")
    return FeatureDirections(metadata["model"], means, directions, images, input_size, weights=metadata.get("weights"))


def directions_for(
    choice: str, model: LoadedModel, layers: Sequence[str], paths: Sequence[Path], intensity: str = "range",
    tiles: TileRule | None = None,
) -> FeatureDirections | None:
    """What ``--directions`` asks for: ``none``, ``auto`` (fitted over ``paths``, read as ``intensity``
    says, None when there are too few; over their tiles for a run with ``tiles``, see
    :func:`neuroloc.tiles.fit_tile_directions`), or a file written by :func:`save_directions` for this model.

    Raises:
        DirectionsError: an unreadable file, or one fitted for another model or other layers.
    """
    if choice == "none":
        return None
    if choice != "auto":
        directions = load_directions(choice, model.name)
        if problem := directions.layers_problem(layers):
            raise DirectionsError(f"{choice}: {problem}")
        return directions
    return fit_auto(model, layers, paths, intensity, tiles)[0]


def fit_auto(
    model: LoadedModel, layers: Sequence[str], paths: Sequence[Path], intensity: str = "range",
    tiles: TileRule | None = None, keep_for: LocalizeConfig | None = None, batch_size: int = 8,
) -> tuple[FeatureDirections | None, dict[Path, PendingEvidence]]:
    """``--directions auto``: the directions of ``layers`` fitted over (at most :data:`MAX_FIT_IMAGES` of)
    ``paths``, ``batch_size`` images at a time, None when too few can be read. With ``keep_for``, settings for which
    :func:`shares_fit_pass` and whose density layers are ``layers``, the fit runs through the pass that localizing
    with them takes, and keeps each fitted image's evidence by its path (none for a tiled fit)."""
    from neuroloc.pipeline import evidence_layers

    fitted: FeatureDirections | None
    kept: dict[Path, PendingEvidence] = {}
    if tiles is not None:
        from neuroloc.tiles import fit_tile_directions

        fitted, fitted_paths = fit_tile_directions(model, layers, paths, tiles, intensity), paths
    elif len(paths) < MIN_FIT_IMAGES:
        return None, {}
    else:
        fitted_paths = fit_sample(list(paths))
        try:
            if keep_for is not None and shares_fit_pass(keep_for) and set(evidence_layers(model, keep_for)[1]) == set(layers):
                pairs = ((path, picture) for path in fitted_paths for picture in readable_images([path], intensity=intensity))
                fitted, kept = fit_directions_keeping_evidence(model, pairs, keep_for, batch_size)
            else:
                fitted = fit_directions(model, readable_images(fitted_paths, intensity=intensity), layers, batch_size)
        except DirectionsError:  # fewer than MIN_FIT_IMAGES of them could be read
            return None, {}
    if fitted is None:
        return None, {}
    digest = hashlib.sha256(json.dumps([model.name, model.input_size, list(layers), intensity, repr(tiles)]).encode())
    for path in fitted_paths:
        digest.update(os.fsencode(path) + b"\0")  # fsencode: a name that is not UTF-8 too
    return replace(fitted, fitted_over=digest.hexdigest()), kept


def readable_images(
    paths: Iterable[Path], done: Callable[[int], object] | None = None, intensity: str = "range",
    dark: DarkImages | None = None, unreadable: list[str] | None = None,
) -> Iterator[Image.Image]:
    """The images of ``paths`` that can be read, read as ``intensity`` says
    (:data:`neuroloc.imageio.INTENSITIES`); ``done(1)`` after each path; those that came out dark counted in
    ``dark``; the errors of the others appended to ``unreadable`` (a localize run reports them in its lines)."""
    from neuroloc.imageio import ImageError, load_image

    for path in paths:
        try:
            picture = load_image(path, intensity=intensity)
        except ImageError as exc:
            if unreadable is not None:
                unreadable.append(str(exc))
        else:
            if dark is not None:
                dark.note(path, picture)
            yield picture
        if done is not None:
            done(1)
