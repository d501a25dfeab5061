"""Small model factories for ``--model backbone_factories:NAME`` in tests/test_backbones.py.

``tiny_net`` at 224x224: stem conv (112) and an in-place ReLU, then ``body`` = five stride-2 convs with
ReLU modules (56, 28, 14, 7, 4); the deepest conv-like output still >= 7x7 is ``body.7`` (the ReLU
after the fourth body conv, 7x7). ``head`` pools, so ``head`` and the whole ``body`` container are not
candidates at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroloc.models import Preprocessing


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        channels = 4
        for out in (4, 8, 8, 8, 8):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.ReLU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.body(self.stem(x))))


def tiny_net() -> nn.Module:
    return TinyNet()


def tiny_net_double() -> nn.Module:
    return TinyNet().double().eval()


def tiny_net_128() -> tuple[nn.Module, Preprocessing, int]:
    """At 128x128 the body gives 32, 16, 8, 4, 2: the automatic layer is ``body.5`` (8x8)."""
    return TinyNet(), Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), 128


class _NotFinite(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * float("nan"))


def not_finite() -> nn.Module:
    """A model whose logits are NaN (a broken checkpoint, an overflow)."""
    return _NotFinite()


def wrong_output() -> nn.Module:
    """Feature maps, not (N, classes) logits."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


def five_classes() -> nn.Module:
    """A classifier of its own 5 classes (not ImageNet's)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


class _HeadFirst(nn.Module):
    """Registers its final layer before its features: the last layer registered is not the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 5)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def head_first() -> nn.Module:
    return _HeadFirst()


def not_a_module() -> str:
    return "a string"


def broken() -> nn.Module:
    raise RuntimeError("factory exploded")


class _Block(nn.Module):
    """A torchvision-style residual block whose one ReLU module runs twice (so it is no usable layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class ReusedReluNet(nn.Module):
    """stem (28x28) -> block (28x28) -> pool -> fc: the automatic layer is the container ``block``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.block = _Block()
        self.fc = nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


def reused_relu() -> nn.Module:
    return ReusedReluNet()


def vgg_like() -> nn.Module:
    """VGG-style: in-place ReLUs, the features block ``0`` ends in max pooling (7x7): the automatic
    layer is ``0.4``, the ReLU (14x14) that shares its tensor with the conv ``0.3`` before it, not the
    pooled container ``0`` or the pool ``0.5``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=8, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        ),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000),
    )


def one_logit() -> nn.Module:
    """A binary classifier with a single logit (defect / no defect), as inspection models often are."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1),
    )


class _FunctionalRelu(nn.Module):
    """Convolutions with F.relu between them: no ReLU modules for guided backpropagation to hook."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in ((3, 8), (8, 8), (8, 8), (8, 8), (8, 8)))
        self.fc = nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = nn.functional.relu(conv(x))
        return self.fc(x.mean(dim=(2, 3)))


def functional_relu() -> nn.Module:
    return _FunctionalRelu()


class Grey(nn.Module):
    """neuroloc feeds RGB: the channels' mean for a network trained on one-channel pictures."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


def one_channel() -> nn.Module:
    """A network whose first conv takes one channel, as a grey microscope model."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=4, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def one_channel_wrapped() -> tuple[nn.Module, Preprocessing]:
    return nn.Sequential(Grey(), one_channel()), Preprocessing(mean=(0.5,), std=(0.25,))


def two_layer_head() -> nn.Module:
    """A head of two linear layers: the last takes 16 features, not the conv layer's 8 channels (no CAM)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=4, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1000))


def conv_head() -> nn.Module:
    """Class scores from a 1x1 conv, then pooled (SqueezeNet's kind of head): no linear layer at all."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 1000, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def one_by_one() -> nn.Module:
    """Its layer "3" (the ReLU after a 56x56-kernel conv) gives a 1x1 map: one value, which Otsu cannot cut."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 56, stride=56), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
