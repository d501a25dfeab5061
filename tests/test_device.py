"""``--device`` and the device-agnostic pipeline.

No GPU is available where these tests run (CPU-only torch on CI). The CUDA path itself is therefore
not run here; instead the pipeline, the multi-class path and the evaluation methods are run with the
model on a stand-in accelerator (tests/fake_accelerator.py): real CPU data in tensors that report
another device, refuse ``.numpy()``, and refuse to be mixed with CPU tensors, as CUDA tensors do.
Their results must equal the plain CPU run's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from fake_accelerator import ACCELERATOR, MixedDevices, OnAccelerator, accelerator, on_accelerator
from image_cases import real_images
from neuroloc.cli import main
from neuroloc.config import PRESETS
from neuroloc.device import DeviceError, exact_float32, resolve_device
from neuroloc.models import LoadedModel
from neuroloc.multi import ClassRule, MultiOptions, localize_image
from neuroloc.pipeline import Localizer, gather_class_evidence, image_to_input, localize_batch
from neuroloc.result import Localization

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: it is not refused")



@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    """Two real photos when the shared data set is there, else two synthetic pictures."""
    found = real_images(2)
    if found:
        return [Image.open(p).convert("RGB") for p in found]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    base = np.stack([xx * 255 // 400, yy * 255 // 300, (xx + yy) % 256], axis=-1)
    return [Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def fake_lite0(lite0: LoadedModel) -> LoadedModel:
    return on_accelerator(lite0)


# --- resolving --device -----------------------------------------------------------------------------------------


def test_auto_is_cuda_when_torch_sees_it_else_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_cpu_is_always_there(name: Any) -> None:
    assert resolve_device(name) == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(name)
    message = str(caught.value)
    assert f"CUDA is not available to torch {torch.__version__}" in message and "\n" not in message
    if torch.version.cuda is None:
        assert "(a CPU build)" in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [("tpu", "unknown device"), ("gpu", "unknown device"), ("", "unknown device"), ("cuda:x", "unknown device"),
     ("meta", "'meta' is not supported"), ("xla", "'xla' is not supported")],
)
def test_bad_names_are_refused(name: str, expected: str) -> None:
    with pytest.raises(DeviceError, match=expected):
        resolve_device(name)


def test_mps_is_refused_where_there_is_none() -> None:
    if torch.backends.mps.is_available():
        assert resolve_device("mps").type == "mps"
    else:
        with pytest.raises(DeviceError, match="MPS"):
            resolve_device("mps")


def test_loaded_model_reports_and_changes_its_device(lite0: LoadedModel) -> None:
    assert lite0.device == torch.device("cpu")
    assert lite0.to("cpu") is lite0 and lite0.device == torch.device("cpu")
    assert Localizer(lite0, device="cpu").model.device == torch.device("cpu")
    empty = LoadedModel("empty", torch.nn.Identity(), lite0.spec, "none")
    assert empty.device == torch.device("cpu")


# --- the command line -------------------------------------------------------------------------------------------


def cli(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error")]


@NO_CUDA
@pytest.mark.parametrize("command", ["localize", "evaluate", "bench"])
def test_cli_refuses_cuda_in_one_line(command: str, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    args = {"localize": [tmp_path / "x.png"], "evaluate": [tmp_path, "-o", tmp_path / "out"], "bench": [tmp_path]}
    result = cli(command, *args[command], "--device", "cuda")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    (line,) = error_lines(result)
    assert line.startswith("Error: --device cuda: CUDA is not available to torch"), result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["localize", "evaluate", "bench"])
def test_cli_refuses_unknown_devices_in_one_line(command: str, tmp_path: Path) -> None:
    args = {"localize": [tmp_path], "evaluate": [tmp_path, "-o", tmp_path / "out"], "bench": [tmp_path]}
    result = cli(command, *args[command], "--device", "tpu")
    assert result.exit_code != 0
    (line,) = error_lines(result)
    assert line == "Error: --device tpu: unknown device; use auto|cpu|cuda[:N]|mps", result.output


def test_ray_engine_refuses_a_gpu_it_would_not_use(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: without it --device cuda is refused before the engine is considered")
    result = cli("localize", tmp_path, "--engine", "ray", "--device", "cuda")
    assert result.exit_code != 0 and "leave out --device cuda" in result.output and "--gpus-per-worker" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: no flag means cuda")
def test_device_cpu_writes_the_same_lines_as_no_flag(tmp_path: Path) -> None:
    photos = real_images(2)
    if len(photos) < 2:
        pytest.skip("shared images not found (expected <repo>/../shared/data/ilsvrc2012_val_fullres/images)")
    plain, on_cpu = tmp_path / "plain.jsonl", tmp_path / "cpu.jsonl"
    assert cli("localize", *photos, "-o", plain, "--threads", "1").exit_code == 0
    result = cli("localize", *photos, "-o", on_cpu, "--threads", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert plain.read_text() == on_cpu.read_text()
    assert [json.loads(line)["error"] for line in plain.read_text().splitlines()] == [None, None]


# --- the stand-in accelerator catches device bugs ---------------------------------------------------------------


def test_the_stand_in_behaves_like_a_separate_device() -> None:
    with accelerator():
        x = torch.arange(6.0).reshape(2, 3).to(ACCELERATOR)
        assert isinstance(x, OnAccelerator) and x.device == ACCELERATOR
        with pytest.raises((TypeError, RuntimeError)):
            x.numpy()
        with pytest.raises((TypeError, RuntimeError)):
            np.asarray(x)
        with pytest.raises(MixedDevices):
            x + torch.ones(2, 3)  # made without device=: a CPU tensor
        with pytest.raises(MixedDevices):
            x.gather(1, torch.tensor([[0], [1]]))
        made = torch.tensor([[0], [1]], device=x.device)
        assert isinstance(made, OnAccelerator)
        assert x[torch.tensor([1])].cpu().tolist() == [[3.0, 4.0, 5.0]]  # CUDA takes CPU indices
        with pytest.raises(MixedDevices):
            torch.arange(4.0)[made.flatten()]  # but not CUDA indices into a CPU tensor
        assert x.gather(1, made).cpu().tolist() == [[0.0], [4.0]]
        assert type(x.cpu()) is torch.Tensor and type(x.detach().to("cpu")) is torch.Tensor
        assert float(x.sum()) == 15.0 and (x * torch.tensor(2.0)).cpu().sum().item() == 30.0  # 0-dim CPU is fine
        assert isinstance(x.new_zeros(3), OnAccelerator) and isinstance(torch.full((2,), 1, device=x.device), OnAccelerator)


def test_the_stand_in_model_refuses_cpu_inputs(fake_lite0: LoadedModel, pictures: list[Image.Image]) -> None:
    cpu_inputs = image_to_input(pictures, dataclasses.replace(fake_lite0, module=torch.nn.Identity()))
    with accelerator(), pytest.raises(MixedDevices):
        fake_lite0.module(cpu_inputs)


# --- the pipeline on the stand-in gives the CPU's results -------------------------------------------------------


def same(a: Localization, b: Localization) -> None:
    assert a.box == b.box and a.label == b.label and a.top1 == b.top1 and a.empty == b.empty
    assert a.probability == b.probability and a.confidence == b.confidence and a.neurons == b.neurons
    assert np.array_equal(a.mask, b.mask)
    for field in ("maps", "blobs", "density"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), field


def test_inputs_go_to_the_models_device(fake_lite0: LoadedModel, lite0: LoadedModel, pictures: list[Image.Image]) -> None:
    assert fake_lite0.device == ACCELERATOR
    with accelerator():
        inputs = image_to_input(pictures, fake_lite0)
    assert isinstance(inputs, OnAccelerator)
    assert torch.equal(inputs.cpu(), image_to_input(pictures, lite0))


@pytest.mark.parametrize(
    ("preset", "options", "keep_maps"),
    [("default", {}, False), ("default", {}, True), ("paper", {}, False), ("authors", {}, False),
     ("fast", {}, True), ("paper", {"rescoring": "crop", "kmax": 4, "k": 2}, False)],
)
def test_localize_batch_on_the_stand_in_equals_cpu(
    lite0: LoadedModel, fake_lite0: LoadedModel, pictures: list[Image.Image], preset: str, options: dict, keep_maps: bool
) -> None:
    config = PRESETS[preset].with_options(**options)
    labels = [None, 281]
    expected = localize_batch(lite0, pictures, config, labels, keep_maps=keep_maps)
    with accelerator():
        got = localize_batch(fake_lite0, pictures, config, labels, keep_maps=keep_maps)
    for a, b in zip(expected, got, strict=True):
        same(a, b)


@pytest.mark.parametrize(
    ("preset", "options", "keep_maps"),
    [("default", MultiOptions(classes=ClassRule(top=3), objects="multi"), False),
     ("default", MultiOptions(classes=ClassRule(top=2)), True),
     ("fast", MultiOptions(classes=ClassRule(classes=(281, 285))), False)],
)
def test_several_classes_on_the_stand_in_equal_cpu(
    lite0: LoadedModel, fake_lite0: LoadedModel, pictures: list[Image.Image], preset: str, options: MultiOptions,
    keep_maps: bool,
) -> None:
    config = PRESETS[preset]
    expected = localize_image(lite0, pictures[0], config, options, keep_maps=keep_maps)
    with accelerator():
        got = localize_image(fake_lite0, pictures[0], config, options, keep_maps=keep_maps)
    assert len(expected) == len(got) >= 1
    for a, b in zip(expected, got):
        same(a, b)


def test_gather_class_evidence_on_the_stand_in_equals_cpu(
    lite0: LoadedModel, fake_lite0: LoadedModel, pictures: list[Image.Image]
) -> None:
    config = PRESETS["default"]
    choose = ClassRule(top=3).choose
    expected = gather_class_evidence(lite0, image_to_input(pictures[:1], lite0), choose, config)
    with accelerator():
        got = gather_class_evidence(fake_lite0, image_to_input(pictures[:1], fake_lite0), choose, config)
    for name in ("labels", "probabilities", "top1"):
        value = getattr(got, name)
        assert type(value) is torch.Tensor and torch.equal(value, getattr(expected, name)), name
    assert all(type(t) is torch.Tensor for t in dataclasses.astuple(got.neurons))
    assert np.array_equal(got.density, expected.density) and np.array_equal(got.reference, expected.reference)


@pytest.mark.parametrize("name", ["dam", "gradcam", "cam", "gradient", "guided", "center", "full"])
def test_evaluation_methods_on_the_stand_in_equal_cpu(
    lite0: LoadedModel, fake_lite0: LoadedModel, pictures: list[Image.Image], name: str
) -> None:
    from neuroloc.evaluation.methods import build_method

    method = build_method(name)
    expected = method.run(lite0, pictures, [281, 285])
    with accelerator():
        got = method.run(fake_lite0, pictures, [281, 285])
    for a, b in zip(expected, got, strict=True):
        assert a.box == b.box and a.top1 == b.top1 and a.probability == b.probability and a.confidence == b.confidence
        assert (a.saliency is None) == (b.saliency is None)
        assert a.saliency is None or np.array_equal(a.saliency, b.saliency)


def test_bench_passes_run_on_the_stand_in(lite0: LoadedModel, fake_lite0: LoadedModel, tmp_path: Path) -> None:
    from neuroloc.bench import BenchItem, dam_pass, gradcam_pass, top1_label, write_synthetic_images

    (path,) = write_synthetic_images(tmp_path, 1)
    with accelerator():
        label = top1_label(fake_lite0, path)
        assert label == top1_label(lite0, path)
        items = [BenchItem(path, label)]
        clock = dam_pass(fake_lite0, items, PRESETS["paper"].with_options(kmax=2, k=1), 1)
        _decode_seconds, gradcam_seconds = gradcam_pass(fake_lite0, items, 1)
    assert clock.device == ACCELERATOR and clock.seconds["rescoring"] > 0 and gradcam_seconds > 0


# --- bench on a GPU: the wiring of the clocks and the memory probe ----------------------------------------------


def test_bench_clock_waits_for_a_gpu_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroloc.bench as bench

    waited: list[torch.device] = []
    monkeypatch.setattr(bench, "synchronize", waited.append)  # torch.cuda.synchronize cannot run without CUDA
    clock = bench.StageClock(device=torch.device("cuda", 0))
    with clock.stage("forward"):
        waited.append(torch.device("cpu"))  # marks the body
    assert waited == [torch.device("cuda", 0), torch.device("cpu"), torch.device("cuda", 0)]
    assert clock.seconds["forward"] > 0 and clock.entered == {"forward"}


def test_bench_memory_probe_reads_the_gpu_peak_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroloc.bench import MemoryProbe

    assert MemoryProbe.detect(torch.device("cpu")).peak_gpu_mb() is None
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    probe = MemoryProbe.detect(torch.device("cuda"))
    probe.reset()
    assert probe.cuda == torch.device("cuda") and probe.peak_gpu_mb() == 3.0
    assert calls == ["sync", "reset", "sync"]


def test_bench_reports_gpu_memory_only_when_measured(tmp_path: Path) -> None:
    from neuroloc.bench import PresetResult, results_table

    figures = dict(stages={}, ran=(), seconds_per_image=1.0, gradcam_decode=0.0, gradcam_seconds_per_image=1.0,
                   peak_rss_mb=1.0, gradcam_peak_rss_mb=1.0, repeat_seconds=(1.0,), gradcam_repeat_seconds=(1.0,))
    assert "GPU" not in results_table([PresetResult("default", **figures)])
    table = results_table([PresetResult("default", **figures, peak_gpu_mb=12.0, gradcam_peak_gpu_mb=7.0)])
    assert "| peak GPU MB (neuroloc) | 12 |" in table and "| peak GPU MB (Grad-CAM) | 7 |" in table
    out = tmp_path / "bench.json"
    result = cli("bench", "--random-weights", "--images", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["header"]["device"] == "cpu" and document["header"]["gpu"] is None
    assert document["presets"]["default"]["peak_gpu_mb"] is None and "GPU" not in result.stdout


# --- full float32 on CUDA (TF32 off inside neuroloc's passes) -------------------------------------------------------


def _tf32() -> tuple[bool, bool]:
    """Whether cuDNN convolutions and CUDA matrix products may use TF32, read in the API this torch has."""
    from neuroloc.device import _precision_api, _tf32_settings

    conv, matmul = _tf32_settings(torch)
    return (conv != "ieee", matmul != "ieee") if _precision_api(torch) else (conv, matmul)


@pytest.fixture
def tf32_on() -> Any:
    """TF32 allowed globally (as cuDNN's default has it), whatever it was before the test."""
    from neuroloc.device import _precision_api, _set_tf32_settings, _tf32_settings

    before = _tf32_settings(torch)
    _set_tf32_settings(torch, ("tf32", "tf32") if _precision_api(torch) else (True, True))
    yield
    _set_tf32_settings(torch, before)


def test_exact_float32_keeps_the_precision_settings_a_user_chose_with_torchs_new_api() -> None:
    """Reading the old allow_tf32 flags after the new settings were used raises in torch: neuroloc reads and
    restores the new ones, exactly as they were (a 'none' left as 'ieee' would stop a later global 'tf32')."""
    from neuroloc.device import _precision_api

    if not _precision_api(torch):
        pytest.skip("this torch has only the allow_tf32 flags")
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "none"
        with exact_float32():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "none")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_exact_float32_turns_tf32_off_inside_and_restores_it_after(tf32_on: None) -> None:
    with exact_float32():
        assert _tf32() == (False, False)
        with exact_float32():
            assert _tf32() == (False, False)
        assert _tf32() == (False, False)  # the inner block restores what the outer one set
    assert _tf32() == (True, True)
    with pytest.raises(RuntimeError, match="boom"), exact_float32():
        raise RuntimeError("boom")
    assert _tf32() == (True, True)


def test_every_network_pass_runs_without_tf32(
    lite0: LoadedModel, pictures: list[Image.Image], tf32_on: None, tmp_path: Path
) -> None:
    """cuDNN's default TF32 moved paper-preset boxes by up to 158 px on an H200 (docs/speed.md): each entry
    point that runs the network must run it in full float32, whatever the user's global setting."""
    from neuroloc.bench import top1_label
    from neuroloc.config import preset_for
    from neuroloc.directions import fit_directions
    from neuroloc.evaluation.methods import build_method
    from neuroloc.pipeline import evidence_layers

    seen: list[tuple[bool, bool]] = []
    handle = lite0.module.register_forward_hook(lambda *_: seen.append(_tf32()))
    try:
        localize_batch(lite0, pictures[:1], PRESETS["paper"])
        localize_image(lite0, pictures[0], PRESETS["default"], MultiOptions(classes=ClassRule(top=2)))
        gather_class_evidence(lite0, image_to_input(pictures[:1], lite0), lambda p: [int(p.argmax())], PRESETS["default"])
        fit_directions(lite0, pictures * 10, evidence_layers(lite0, preset_for("default"))[1], batch_size=20)
        build_method("gradcam").run(lite0, pictures[:1], [281])
        build_method("gradient").run(lite0, pictures[:1], [281])
        pictures[0].save(tmp_path / "a.png")
        top1_label(lite0, tmp_path / "a.png")
    finally:
        handle.remove()
    assert len(seen) >= 7 and set(seen) == {(False, False)}
    assert _tf32() == (True, True)
