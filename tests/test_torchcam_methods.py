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


@pytest.mark.parametrize("name", ["gradcampp", "layercam", "scorecam", "tc_gradcam"])
def test_torchcam_methods_on_the_stand_in_accelerator_equal_cpu(tiny, name):
    """Device bugs show without a GPU: Score-CAM's bookkeeping once indexed a CPU tensor with CUDA indices."""
    from fake_accelerator import accelerator, on_accelerator

    pictures = [_picture(), _picture((120, 160))]
    expected = build_method(name).run(tiny, pictures, [3, 5])
    with accelerator():
        got = build_method(name).run(on_accelerator(tiny), pictures, [3, 5])
    for a, b in zip(expected, got, strict=True):
        assert a.box == b.box and a.top1 == b.top1
        np.testing.assert_allclose(a.saliency, b.saliency, atol=1e-6)


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
    with pytest.raises(RuntimeError, match="inside"), channels_last_on_cpu(tiny.module, torch.device("cpu")):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        raise RuntimeError("inside")
    assert _all_contiguous(tiny.module)
    with channels_last_on_cpu(tiny.module, torch.device("cuda")):  # only the CPU kernels were measured
        assert conv.weight.is_contiguous()


def test_one_blank_mask_per_sample_is_scored_and_lends_its_score():
    from neuroloc.evaluation.scorecam import _one_blank_per_sample

    blank = torch.tensor([False, True, True, False, True, False, True])
    samples = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    scored, stand_in = _one_blank_per_sample(blank, samples)
    assert scored.tolist() == [0, 1, 3, 4, 5]
    assert stand_in.tolist() == [0, 1, 1, 3, 4, 5, 4]


def test_blank_masks_share_one_forward_pass_and_the_map_stays_torchcams():
    from neuroloc.evaluation.scorecam import BlankOnceScoreCAM

    model = load_model("backbone_factories:tiny_net_128")
    last_conv = model.module.body[8]
    with torch.no_grad():
        last_conv.bias[:5] = -1e3  # five channels of the CAM layer are zero everywhere after the ReLU,
        last_conv.bias[5:] = 1.0  # the other three vary over the positions
        model.module.fc.weight *= 3000  # so that masks move the class scores, and the softmax weights differ
    x = image_to_input([_picture(), _picture((90, 200))], model)
    with torch.no_grad():
        cam_layer = model.module.body(model.module.stem(x)).flatten(2)
    constant = cam_layer.amax(2) == cam_layer.amin(2)
    expected_passes = sum(int((~c).sum()) + int(c.any()) for c in constant)
    maps = {}
    for cls in (torchcam_methods.ScoreCAM, BlankOnceScoreCAM):
        with cls(model.module, target_layer=model.spec.cam_layer, input_shape=(3, 128, 128), batch_size=3) as extractor:
            x_ = x.clone().requires_grad_(True)
            # unnormalised, so that the blank channels' weights count too (through the softmax's sum)
            maps[cls] = extractor(class_idx=[3, 7], scores=model.module(x_), normalized=False)[0]
            passes = getattr(extractor, "forward_passes", None)
    assert model.spec.cam_layer == "body.9" and constant[:, :5].all() and not constant[:, 5:].any()
    assert passes == expected_passes == 2 * (3 + 1)
    torch.testing.assert_close(maps[BlankOnceScoreCAM], maps[torchcam_methods.ScoreCAM], atol=1e-5, rtol=1e-4)
    assert maps[BlankOnceScoreCAM].amax() > 0
    with torchcam_methods.ScoreCAM(model.module, target_layer=model.spec.cam_layer, input_shape=(3, 128, 128)) as extractor:
        model.module(x.clone().requires_grad_(True))
        (weights,) = extractor._get_weights([3, 7])
    assert (weights.amax(dim=1) - weights.amin(dim=1)).min() > 1e-3  # not uniform, so a wrong weight would show
