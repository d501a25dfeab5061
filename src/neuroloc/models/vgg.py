"""VGG 11/13/16/19, with and without batch norm, in torchvision's state_dict layout.

The paper's network is VGG16. Its "layer 11" is, in the authors' code (blocks counted from 0 with
ReLU and pooling fused into the convs), the output of ``conv5_2``: 14x14x512 at 224x224 input (the alias
``layer11``, on VGG16 and VGG16-BN only; ``conv5_2`` is the default layer of every VGG).
Layers are addressable by their conventional names (``conv5_2`` = the ReLU output after that conv).
Weights are torchvision's files (``vgg16-397923af.pth`` ...), from ``--weights PATH``, the torch hub
cache, or downloaded with the hash check torchvision uses.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroloc.models.download import torchvision_release
from neuroloc.models.registry import ModelSpec, Preprocessing, register_model

_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# File names of torchvision's release; the 8 hex digits are the start of the file's SHA-256.
_TORCHVISION_FILES = {
    "vgg11": "vgg11-8a719046.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
}


class VGG(nn.Module):
    def __init__(self, config: list[int | str], batch_norm: bool, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(in_ch, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def conv_layer_aliases(config: list[int | str], batch_norm: bool) -> dict[str, str]:
    """``conv{block}_{i}`` -> name of the ReLU module after that conv in ``features``."""
    aliases: dict[str, str] = {}
    index, block, conv = 0, 1, 0
    for v in config:
        if v == "M":
            index += 1
            block, conv = block + 1, 0
            continue
        conv += 1
        index += 2 if batch_norm else 1  # conv (+ bn)
        aliases[f"conv{block}_{conv}"] = f"features.{index}"  # the ReLU
        index += 1
    return aliases


def _register(name: str) -> None:
    arch, batch_norm = name.removesuffix("_bn"), name.endswith("_bn")
    config = _CONFIGS[arch]
    file_name = _TORCHVISION_FILES[name]
    aliases = conv_layer_aliases(config, batch_norm)
    last_conv = list(aliases.values())[-1]
    if arch == "vgg16":  # the paper's network: its "layer 11", as the authors' code counts, is conv5_2
        aliases["layer11"] = aliases["conv5_2"]
    # the last two convs (all of block 5 is 14x14 at 224): conv5_2, conv5_3 for VGG16; VGG11/13 have two in block 5
    last_two = tuple(alias for alias in aliases if alias.startswith("conv5_"))[-2:]

    @register_model(
        ModelSpec(
            name=name,
            description=f"{arch.upper()}{' with batch norm' if batch_norm else ''}, torchvision ImageNet weights",
            input_size=224,
            preprocessing=Preprocessing(),
            default_layer="conv5_2",
            layer_aliases=aliases,
            density_layers=last_two,  # not measured: VGG weights are not reachable here
            default_options={"objectness": 0.0},  # the feature directions' map helped on Lite0 only; not measured here
            cam_layer=last_conv,
            **torchvision_release(file_name),
        )
    )
    def build() -> nn.Module:
        return VGG(config, batch_norm)


for _name in _TORCHVISION_FILES:
    _register(_name)
