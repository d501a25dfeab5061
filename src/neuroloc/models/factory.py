"""Any classifier: ``--model package.module:factory``.

``factory`` is imported from ``package.module`` (the current folder is searched too, after the
installed packages) and called with no arguments. It returns a READY model, its weights loaded:

* an ``nn.Module`` that maps (N, 3, 224, 224) inputs normalised with the usual ImageNet mean and
  std (torchvision's convention) to (N, C) logits: ImageNet's 1000 classes, or the model's own C
  classes (named with ``--class-names FILE``, else ``class_0`` ...); or
* a tuple ``(module, Preprocessing)`` for another normalisation (see
  :class:`neuroloc.models.Preprocessing`: mean/std on RGB in [0, 1], ``bgr``, ``scale``); or
* a tuple ``(module, Preprocessing, input_size)`` for another square input size.

``--weights PATH`` is optional; when given, that state_dict is loaded (strictly) into the returned
module, after its final layer is rebuilt to the state_dict's number of outputs (so
``torchvision.models:resnet50`` takes a ResNet-50 fine-tuned on your own classes). The module is put
in eval mode and its parameters are frozen.

Guided backpropagation acts on ``nn.ReLU`` / ``nn.ReLU6`` modules only: a model that calls
``F.relu`` (or another activation) in its ``forward`` still localizes with the default density mode
(DAM votes, no guided pass), but its guided maps (``--preset paper``) are plain gradients there.

Without ``--layer``, the layer is chosen automatically (:func:`auto_layer`): the deepest conv-like
module whose output is still at least 7x7 at the input size, found with one forward pass of a blank
input through hooks that are removed afterwards.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroloc.classes import classes_for
from neuroloc.imageio import first_line
from neuroloc.models.registry import (
    LoadedModel,
    ModelError,
    ModelSpec,
    Preprocessing,
    fit_head,
    head_layer,
    input_dtype,
    load_weights_file,
    state_dict_mismatch,
)

MIN_SIDE = 7  # the automatic layer is the deepest whose output is at least MIN_SIDE x MIN_SIDE
DEFAULT_INPUT_SIZE = 224

# Outputs of these modules are not "conv-like": they pool, pad, drop or reshape conv features.
_NOT_CONV_LIKE: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.Identity,
    nn.Flatten,
    nn.Upsample,
)


def parse_factory_name(name: str) -> tuple[str, str]:
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ModelError(f"--model {name!r}: expected package.module:factory")
    return module_name, attribute


def import_factory(name: str) -> Callable[[], Any]:
    """The callable ``factory`` of ``package.module:factory``.

    Raises:
        ModelError: when the module cannot be imported or has no such callable.
    """
    module_name, attribute = parse_factory_name(name)
    try:
        module = _import(module_name)
    except Exception as exc:  # ImportError, or anything the user's module raises while importing
        said = " ".join(str(exc).split())  # one line, whatever the user's module raised
        if module_name.endswith(".py"):  # a file's path given: its module's name
            stem = module_name[:-3].replace("\\", "/")
            if stem.startswith(("/", ".")) or ":" in stem:  # not a name under the current folder: its own folder's
                said += (f" (--model takes a module's name, not a file's path: from the file's folder, "
                         f"--model {stem.rsplit('/', 1)[-1]}:{attribute})")
            else:
                said += f" (name the module, not its file: --model {stem.replace('/', '.')}:{attribute})"
        raise ModelError(f"cannot import {module_name!r} for --model {name}: {type(exc).__name__}: {said}") from exc
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"module {module_name!r} has no attribute {attribute!r} (from --model {name})")
    if not callable(factory):
        raise ModelError(f"{name} is not callable")
    return factory


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        missing_top = exc.name is not None and module_name.split(".")[0] == exc.name.split(".")[0]
        if not missing_top or cwd in sys.path:
            raise
        sys.path.append(cwd)  # like `python -m`: modules in the current folder, after installed ones
        return importlib.import_module(module_name)


# The objectness map of feature directions helped EfficientNet-Lite0 only; on the other four backbones measured
# it traded tight boxes for little or no GT-known (docs/backbones.md), so an unmeasured model starts without it.
FACTORY_DEFAULT_OPTIONS = {"objectness": 0.0}


def factory_spec(name: str) -> ModelSpec:
    """A provisional spec (checks that the factory exists; layers are chosen when the model is built)."""
    factory = import_factory(name)
    return ModelSpec(
        name=name,
        description=f"user model from {name}",
        input_size=DEFAULT_INPUT_SIZE,
        preprocessing=Preprocessing(),
        default_layer="",
        weights_source=f"returned ready by {name}()",
        locate_weights=lambda: None,
        build=lambda: _unpack(name, factory())[0],
        default_options=dict(FACTORY_DEFAULT_OPTIONS),
    )


def _unpack(name: str, made: Any) -> tuple[nn.Module, Preprocessing, int]:
    preprocessing, size = Preprocessing(), DEFAULT_INPUT_SIZE
    if isinstance(made, tuple):
        if not 2 <= len(made) <= 3:
            raise ModelError(f"{name}() returned a tuple of {len(made)}; expected (module, Preprocessing[, input_size])")
        module, preprocessing = made[0], made[1]
        if len(made) == 3:
            size = made[2]
    else:
        module = made
    if not isinstance(module, nn.Module):
        raise ModelError(f"{name}() returned {type(module).__name__}, expected a torch.nn.Module")
    if not isinstance(preprocessing, Preprocessing):
        raise ModelError(f"{name}() returned {type(preprocessing).__name__} as preprocessing, expected neuroloc.models.Preprocessing")
    if not isinstance(size, int) or size < 16:
        raise ModelError(f"{name}() returned input size {size!r}, expected an int >= 16")
    return module, preprocessing, size


def load_factory_model(name: str, weights: str | Path | None = None) -> LoadedModel:
    """Call the factory, load ``weights`` into its module if given, probe it, choose its layers."""
    spec = factory_spec(name)
    factory = import_factory(name)
    try:
        made = factory()
    except ModelError:
        raise
    except Exception as exc:  # whatever the user's factory raises
        raise ModelError(f"{name}() failed: {type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    module, preprocessing, size = _unpack(name, made)
    if weights is not None:
        state = load_weights_file(Path(weights))
        fit_head(module, state, size)  # a state_dict fine-tuned on other classes than the factory's head
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"weights in {weights} do not fit {name}: {state_dict_mismatch(module, state)}") from exc
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    layers, outputs = probe_layers(module, size)
    layers = below_a_conv_head(layers, *head_layer(module, size), outputs)
    default = choose_layer(layers)
    if default is None:
        raise ModelError(f"{name}: no conv-like layer with an output of at least {MIN_SIDE}x{MIN_SIDE} at {size}x{size}; "
                         "pass --layer NAME")
    cam = choose_layer(layers, min_side=1) or default
    classifier = _final_linear(module, outputs)
    spec = replace(
        spec,
        input_size=size,
        preprocessing=preprocessing,
        default_layer=default,
        density_layers=(default,),
        cam_layer=cam,
        classifier=_always(classifier) if classifier is not None else None,
        build=lambda: module,
    )
    return LoadedModel(name=name, module=module, spec=spec, weights=str(weights) if weights else f"{name}()",
                       classes=classes_for(outputs))


@dataclass(frozen=True)
class LayerOutput:
    """What one module produced in the probe pass."""

    name: str
    order: int  # when its forward finished (containers finish after their children)
    calls: int
    shape: tuple[int, ...] | None  # of a tensor output
    conv_like: bool
    leaf: bool
    output_id: int


def probe_layers(module: nn.Module, size: int = DEFAULT_INPUT_SIZE) -> tuple[list[LayerOutput], int]:
    """Run a blank (N=1, 3, size, size) input through ``module``; note every submodule's output, and
    count the classes (the logits' second dimension).

    A container counts as conv-like when the last leaf module that ran inside it is (so a VGG
    ``features`` that ends in max pooling is not). Every hook is removed again, also on errors.

    Raises:
        ModelError: when the forward pass fails or does not give (1, C) logits.
    """
    seen: dict[str, dict[str, Any]] = {}
    last_leaf: list[nn.Module | None] = [None]
    keep: list[torch.Tensor] = []  # outputs stay alive so their ids stay unique during the pass

    def make_hook(name: str, leaf: bool) -> Callable[..., None]:
        def hook(mod: nn.Module, _inputs: tuple, output: Any) -> None:
            if leaf:
                last_leaf[0] = mod
            entry = seen.setdefault(name, {"calls": 0})
            entry["calls"] += 1
            entry["order"] = len(keep)
            entry["leaf"] = leaf
            kind = mod if leaf else last_leaf[0]
            entry["conv_like"] = kind is not None and not isinstance(kind, _NOT_CONV_LIKE)
            entry["shape"] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            entry["output_id"] = id(output)
            keep.append(output)

        return hook

    handles = []
    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_hook(make_hook(name, next(sub.children(), None) is None)))
        with torch.no_grad():
            logits = module(torch.zeros(1, 3, size, size, dtype=input_dtype(module)))
    except Exception as exc:  # the user's forward can raise anything
        raise ModelError(f"a blank {size}x{size} RGB input (1, 3, {size}, {size}) does not run through the model: "
                         f"{type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"the model must return (N, classes) logits; a blank input gave {shape}")
    layers = [LayerOutput(name=n, **e) for n, e in sorted(seen.items(), key=lambda item: item[1]["order"])]
    return layers, int(logits.shape[1])


def choose_layer(layers: list[LayerOutput], min_side: int = MIN_SIDE) -> str | None:
    """The deepest conv-like layer, run once per pass, whose (N, C, H, W) output has H, W >= ``min_side``.

    Modules that return the very same tensor (a container and its last child, a conv and its in-place
    ReLU) are one choice; the latest leaf among them is named, else the innermost container.
    """
    usable = [
        layer for layer in layers
        if layer.calls == 1 and layer.shape is not None and len(layer.shape) == 4
        and min(layer.shape[2:]) >= min_side and layer.conv_like
    ]
    if not usable:
        return None
    deepest = max(usable, key=lambda layer: layer.order)
    same = [layer for layer in usable if layer.output_id == deepest.output_id]
    leaves = [layer for layer in same if layer.leaf]
    if leaves:
        return max(leaves, key=lambda layer: layer.order).name
    return min(same, key=lambda layer: layer.order).name


def below_a_conv_head(layers: list[LayerOutput], head_name: str, head: nn.Module, outputs: int) -> list[LayerOutput]:
    """``layers`` without a convolutional head (a 1x1 conv giving one map per class, pooled into the logits, as in
    SqueezeNet) and what runs after it: its maps are the class scores, not features for DAM or CAM to weigh."""
    if not isinstance(head, nn.Conv2d) or head.out_channels != outputs:
        return layers
    ran = next((layer.order for layer in layers if layer.name == head_name), None)
    return layers if ran is None else [layer for layer in layers if layer.order < ran]


def _always(layer: nn.Linear) -> Callable[[nn.Module], nn.Linear]:
    """A ``ModelSpec.classifier`` for a model built once: its final layer, found when it was loaded."""
    return lambda _net: layer


def _final_linear(module: nn.Module, outputs: int) -> nn.Linear | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears and linears[-1].out_features == outputs else None


@dataclass(frozen=True)
class LayerChoice:
    """One output a ``--layer`` can name: the modules that give this very tensor, and its (C, H, W)."""

    names: tuple[str, ...]  # in the order they ran: a conv and its in-place ReLU give one tensor
    shape: tuple[int, int, int]


def layer_choices(module: nn.Module, size: int, depth: int | None = None) -> list[LayerChoice]:
    """The conv-like layers of ``module`` run once per pass with an (N, C, H, W) output, in forward order,
    from one blank pass (:func:`probe_layers`); only names of at most ``depth`` dotted parts when given."""
    layers, _ = probe_layers(module, size)
    groups: dict[int, tuple[list[str], tuple[int, int, int]]] = {}
    for layer in layers:
        if layer.calls == 1 and layer.conv_like and layer.shape is not None and len(layer.shape) == 4 \
                and (depth is None or layer.name.count(".") < depth):
            _, channels, height, width = layer.shape
            groups.setdefault(layer.output_id, ([], (channels, height, width)))[0].append(layer.name)
    return [LayerChoice(tuple(names), shape) for names, shape in groups.values()]
