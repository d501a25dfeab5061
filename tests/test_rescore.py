"""Re-scoring each blob region through the network (step 5 of Algorithm 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuroloc.rescore import class_score, region_inputs, rescore_regions


def test_class_score_logit_and_probability():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    label = torch.tensor([2, 0])
    assert class_score(logits, label, "logit").tolist() == [3.0, 0.0]
    expected = [math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)), 1 / 3]
    torch.testing.assert_close(class_score(logits, label, "probability"), torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError):
        class_score(logits, label, "softmax")  # type: ignore[arg-type]


def test_mask_mode_zeroes_outside_the_blob():
    image = torch.randn(3, 6, 7, generator=torch.Generator().manual_seed(0)) + 5.0  # no zero by chance
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    masks[1, 5, 6] = True
    out = region_inputs(image, masks, "mask")
    assert out.shape == (2, 3, 6, 7)
    for k in range(2):
        inside = masks[k].expand(3, -1, -1)
        assert torch.equal(out[k][inside], image[inside])
        assert (out[k][~inside] == 0).all()


def test_crop_mode_cuts_the_blob_box_and_resizes_it():
    h, w = 12, 16
    image = torch.zeros(3, h, w)
    image[:, 3:7, 5:13] = 1.0  # the object
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 3:7, 5:13] = True  # exactly the object box
    masks[0, 4, 6] = False  # holes inside the blob do not matter: its bounding box is cropped
    masks[1] = True  # the whole image: the crop is the image itself
    out = region_inputs(image, masks, "crop")  # masks[2] is empty
    assert out.shape == (3, 3, h, w)
    torch.testing.assert_close(out[0], torch.ones(3, h, w))
    torch.testing.assert_close(out[1], image)
    assert (out[2] == 0).all()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="re-scoring mode"):
        region_inputs(torch.zeros(3, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), "blur")  # type: ignore[arg-type]


class _TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["mask", "crop"])
@pytest.mark.parametrize("kind", ["logit", "probability"])
def test_rescore_regions(mode, kind):
    model = _TinyClassifier().double().eval()
    image = torch.randn(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[2, 2:7, 1:8] = True  # masks[1] is empty
    scores = rescore_regions(model, image, masks, label=3, mode=mode, kind=kind)
    assert scores.shape == (3,)
    assert scores[1] == float("-inf")
    with torch.no_grad():
        logits = model(region_inputs(image, masks, mode))
    expected = logits[:, 3] if kind == "logit" else logits.softmax(dim=1)[:, 3]
    torch.testing.assert_close(scores[[0, 2]], expected[[0, 2]])
    assert torch.isfinite(scores[[0, 2]]).all()
    assert not scores.requires_grad
