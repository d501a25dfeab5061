"""ResNet 18/34/50/101/152 in torchvision's state_dict layout (He et al. 2016, torchvision's "v1.5": the
stride of a bottleneck sits on its 3x3 conv).

Weights are torchvision's release files (``resnet50-0676ba61.pth`` ...), from ``--weights PATH``, the torch
hub cache, or downloaded with the hash check torchvision uses. A ResNet fine-tuned on other classes loads
with ``--weights`` too: its final layer is built to the file's number of outputs (``registry.fit_head``).
These files cannot be fetched on the build machine, so the default settings are those measured for the same
architecture with Keras's ImageNet weights (``resnet50_keras``, docs/backbones.md), not on these weights.

Module names follow torchvision (``layer3.5.conv2``): ``layer3`` is the 14x14 stage at 224x224 input and
``layer4`` the 7x7 one. As in torchvision, each block has one ``relu`` module that it calls after each conv
and after the addition; guided backpropagation hooks every call.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroloc.models.download import torchvision_release
from neuroloc.models.registry import ModelSpec, Preprocessing, linear_layer, register_model

# File names of torchvision's IMAGENET1K_V1 release; the 8 hex digits are the start of the file's SHA-256.
_TORCHVISION_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu(h + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    layer1: nn.Sequential  # the four stages, set in a loop
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self, block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for index, (blocks, width) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
            stride = 1 if index == 1 else 2
            out_ch = width * block.expansion
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
            layers = [block(in_ch, width, stride, downsample)]
            layers += [block(out_ch, width, 1, None) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            in_ch = out_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_ARCHITECTURES: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _register(name: str) -> None:
    block, depths = _ARCHITECTURES[name]
    file_name = _TORCHVISION_FILES[name]

    @register_model(
        ModelSpec(
            name=name,
            description=f"ResNet-{name.removeprefix('resnet')}, torchvision ImageNet weights",
            input_size=224,
            preprocessing=Preprocessing(),
            default_layer="layer3",
            density_layers=("layer4",),
            # As measured for resnet50_keras (same architecture, Keras weights); not measured on these weights.
            default_options={"cut": "fraction", "level": 0.3, "similarity": 0.0, "objectness": 0.0,
                             "large": {"mass_power": 2.0}},
            cam_layer="layer4",
            classifier=linear_layer("fc"),
            layer_aliases={"stage2": "layer1", "stage3": "layer2", "stage4": "layer3", "stage5": "layer4"},
            **torchvision_release(file_name),
        )
    )
    def build() -> nn.Module:
        return ResNet(block, depths)


for _name in _TORCHVISION_FILES:
    _register(_name)
