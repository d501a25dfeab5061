"""Opt-in ``torch.compile`` (``--compile``): compile only the forwards that run without autograd and hooks.

Measured with ``scripts/compile_options.py`` (docs/speed.md, "CPU options"). Compiling the module as a
whole does not work with the pipeline: the hooked activations come out of the compiled graph as extra
outputs, not as tensors on the path to the class score, so ``torch.autograd.grad(score, activation)``
fails ("appears to not have been used in the graph"); compiling each block works but a forward with
autograd through inductor's CPU kernels is about 2x slower than eager, and the paper preset's per-neuron
backward passes (``retain_graph``) fail on it. So two kinds of forward are compiled, each in a copy of
the module (inductor with freezing: the weights become constants and must not change afterwards):

- every forward with gradients disabled and no hooks registered (the paper's re-scoring, top-1 look-ups);
- in density mode without per-neuron maps no gradient is taken below the lowest evidence layer, so the
  layers below it run in a compiled copy without autograd and the rest eagerly, hooks and all
  (EfficientNet-Lite only, whose stem and ``_blocks`` make the cut simple).

Everything else runs eagerly as before. Boxes were identical on the dev images (docs/speed.md).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neuroloc.config import LocalizeConfig
from neuroloc.models.registry import LoadedModel

_COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"freezing": True}  # inductor: weights as constants (applies to no-grad graphs)


def compile_model(model: LoadedModel, config: LocalizeConfig, keep_maps: bool = False) -> LoadedModel:
    """A copy of ``model`` whose module compiles the hook-free, gradient-free forwards ``config`` allows.

    ``keep_maps``: the per-neuron maps will be asked for (they need gradients down to the pixels, so
    nothing below the evidence layer may skip autograd). The original ``model`` is left as it is.
    Compiling happens on the first call of each input shape (seconds), not here.
    """
    from neuroloc.pipeline import evidence_layers

    device = next(model.module.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"compile_model is measured for the CPU only; the model is on {device}")
    net = copy.deepcopy(model.module)
    whole = net.forward
    compiled_whole = torch.compile(copy.deepcopy(model.module), options=_COMPILE_OPTIONS, dynamic=False)
    below = None
    if config.mode == "density" and not keep_maps:
        below = _lower_part_forward(net, evidence_layers(model, config)[0])

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not _hooked(net):
            return compiled_whole(x)
        if below is not None and torch.is_grad_enabled():
            return below(x)
        return whole(x)

    net.forward = forward
    return dataclasses.replace(model, module=net)


def _hooked(net: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def _lower_part_forward(net: nn.Module, lowest_layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """EfficientNet-Lite's forward with the stem and ``_blocks[:N]`` compiled and run without autograd,
    where ``_blocks.N`` is ``lowest_layer``; None for other models or layers."""
    from neuroloc.models.efficientnet_lite import EfficientNetLite

    match = re.fullmatch(r"_blocks\.(\d+)", lowest_layer)
    if type(net) is not EfficientNetLite or match is None:  # a subclass may have its own forward
        return None
    assert isinstance(net, EfficientNetLite)
    cut = int(match.group(1))
    lower = nn.Sequential(net._conv_stem, net._bn0, net._stem_act, *list(net._blocks)[:cut])
    compiled_lower = torch.compile(copy.deepcopy(lower), options=_COMPILE_OPTIONS, dynamic=False)

    def forward(x: torch.Tensor) -> torch.Tensor:  # EfficientNetLite.forward, split at _blocks.N
        with torch.no_grad():
            h = compiled_lower(x)
        h.requires_grad_(True)  # the pipeline differentiates at _blocks.N and above only
        for block in list(net._blocks)[cut:]:
            h = block(h)
        h = net._head_act(net._bn1(net._conv_head(h)))
        return net._fc(torch.flatten(net._avg_pooling(h), 1))

    return forward
