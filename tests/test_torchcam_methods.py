"""The CAM-family baselines that come from the peer library torch-cam (optional: ``pip install --no-deps torchcam``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from neuroloc.evaluation.methods import build_method, channels_last_on_cpu
from neuroloc.models import load_model
from neuroloc.pipeline import image_to_input

torchcam_methods = pytest.importorskip("torchcam.methods", reason="torch-cam is not installed (pip install --no-deps torchcam)")


@pytest.fixture(scope="module")
def tiny():
    return load_model("backbone_factories:tiny_net_128")


def _picture(size: tuple[int, int] = (160, 120)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _all_contiguous(module: torch.nn.Module) -> bool:
    return all(p.is_contiguous() for p in module.parameters())


@pytest.mark.parametrize("name", ["gradcampp", "layercam", "scorecam", "tc_gradcam"])
def test_torchcam_methods_give_a_box_in_image_pixels_and_a_map(tiny, name):
    picture = _picture()
    (output,) = build_method(name).run(tiny, [picture], [3])
    xmin, ymin, xmax, ymax = output.box
    assert 0 <= xmin < xmax <= picture.width and 0 <= ymin < ymax <= picture.height
    assert output.saliency.shape == (tiny.input_size, tiny.input_size)
    assert np.isfinite(output.saliency).all()
    assert _all_contiguous(tiny.module)


def test_scorecam_in_nhwc_gives_torchcams_own_map(tiny):
    picture = _picture()
    x = image_to_input([picture], tiny).clone().requires_grad_(True)
    with torchcam_methods.ScoreCAM(tiny.module, target_layer=tiny.spec.cam_layer, input_shape=(3, 128, 128)) as extractor:
        (cam,) = extractor(class_idx=3, scores=tiny.module(x))
    expected = torch.nn.functional.interpolate(cam[None].float(), size=(128, 128), mode="bilinear")[0, 0].numpy()
    (output,) = build_method("scorecam").run(tiny, [picture], [3])
    np.testing.assert_allclose(output.saliency, expected, atol=1e-5)


def test_channels_last_on_cpu_restores_the_weights_even_after_an_error(tiny):
    conv = tiny.module.stem[0]
    with pytest.raises(RuntimeError, match="inside"):
        with channels_last_on_cpu(tiny.module, torch.device("cpu")):
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
            raise RuntimeError("inside")
    assert _all_contiguous(tiny.module)
    with channels_last_on_cpu(tiny.module, torch.device("cuda")):  # only the CPU kernels were measured
        assert conv.weight.is_contiguous()
