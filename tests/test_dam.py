"""DAM ranking (activation x d(score)/d(activation)) and the batched guided backprop of the chosen neurons."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroloc.backprop import neuron_gradients, saliency_maps
from neuroloc.dam import dam_scores, one_hot_neurons, top_neurons
from neuroloc.hooks import guided_relus, record_layer


def _small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),  # "2": the recorded layer
        nn.ReLU(),
        nn.Conv2d(5, 3, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 6),
    ).double().eval()


def _finite_difference_dam(net: nn.Sequential, image: torch.Tensor, labels: list[int], eps: float = 1e-6):
    """activation * d(score)/d(activation), one neuron at a time, by central differences above layer 2."""
    lower, upper = net[:3], net[3:]
    with torch.no_grad():
        activation = lower(image)
        out = torch.zeros_like(activation)
        for n, label in enumerate(labels):
            for c in range(activation.shape[1]):
                for y in range(activation.shape[2]):
                    for x in range(activation.shape[3]):
                        plus, minus = activation.clone(), activation.clone()
                        plus[n, c, y, x] += eps
                        minus[n, c, y, x] -= eps
                        slope = (upper(plus)[n, label] - upper(minus)[n, label]) / (2 * eps)
                        out[n, c, y, x] = activation[n, c, y, x] * slope
    return out


def _dam_like_pipeline(net: nn.Module, image: torch.Tensor, labels: list[int], layer: str = "2"):
    image = image.detach().requires_grad_(True)
    with record_layer(net, layer) as recorder, guided_relus(net, recorder):
        logits = net(image)
    activation = recorder.activation
    score = logits.gather(1, torch.tensor(labels).view(-1, 1)).sum()
    (effect,) = torch.autograd.grad(score, activation, retain_graph=True)
    return image, activation, effect


def test_dam_scores_equal_a_slow_finite_difference_loop():
    net = _small_net()
    image = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = [4, 1]
    _, activation, effect = _dam_like_pipeline(net, image, labels)
    fast = dam_scores(activation.detach(), effect)
    slow = _finite_difference_dam(net, image, labels)
    assert fast.shape == (2, 5, 5, 6)
    assert slow.abs().max() > 1e-3  # not a comparison of zeros
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)


def test_dam_scores_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        dam_scores(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))


def _all_neurons_sorted(scores: torch.Tensor, n: int) -> list[tuple[float, int, int, int]]:
    _, c, h, w = scores.shape
    entries = [(float(scores[n, ch, y, x]), ch, y, x) for ch in range(c) for y in range(h) for x in range(w)]
    return sorted(entries, key=lambda e: -e[0])


def _ranked_list(ranked, n: int) -> list[tuple[float, int, int, int]]:
    return [
        (float(ranked.score[n, j]), int(ranked.channel[n, j]), int(ranked.y[n, j]), int(ranked.x[n, j]))
        for j in range(ranked.kmax)
        if bool(ranked.valid[n, j])
    ]


def test_top_neurons_equal_a_full_sort():
    scores = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ranked = top_neurons(scores, kmax=9)
    assert ranked.kmax == 9 and bool(ranked.valid.all())
    for n in range(3):
        assert _ranked_list(ranked, n) == _all_neurons_sorted(scores, n)[:9]


def test_top_neurons_one_per_channel():
    scores = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    scores[:, 2] += 10.0  # channel 2 holds all the best neurons: without the rule it would take every place
    kmax = 4
    plain = top_neurons(scores, kmax)
    assert (plain.channel == 2).all()
    ranked = top_neurons(scores, kmax, one_per_channel=True)
    for n in range(2):
        chosen = _ranked_list(ranked, n)
        channels = [c for _, c, _, _ in chosen]
        assert len(set(channels)) == len(channels) == kmax
        # the channels are the kmax with the best maxima, each at its best position, in order
        best = []
        for c in range(6):
            flat = int(scores[n, c].flatten().argmax())
            best.append((float(scores[n, c].flatten()[flat]), c, flat // 5, flat % 5))
        assert chosen == sorted(best, key=lambda e: -e[0])[:kmax]


def test_top_neurons_pads_when_kmax_exceeds_the_neurons():
    scores = torch.tensor([[[[1.0]], [[3.0]]]])  # (1, 2, 1, 1): two neurons
    ranked = top_neurons(scores, kmax=5)
    assert ranked.kmax == 5
    assert ranked.valid.tolist() == [[True, True, False, False, False]]
    assert ranked.channel[0, :2].tolist() == [1, 0]
    assert ranked.score[0, 2:].tolist() == [float("-inf")] * 3
    per_channel = top_neurons(torch.randn(2, 3, 4, 4), kmax=5, one_per_channel=True)
    assert per_channel.valid.tolist() == [[True] * 3 + [False] * 2] * 2
    with pytest.raises(ValueError):
        top_neurons(scores, kmax=0)


def test_one_hot_neurons_one_seed_per_neuron_and_image():
    scores = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    ranked = top_neurons(scores, kmax=3)
    like = torch.zeros(3, 4, 5, 6, dtype=torch.float64)
    seeds = one_hot_neurons(ranked, like)
    assert seeds.shape == (3, 3, 4, 5, 6) and seeds.dtype == torch.float64
    for j in range(3):
        for n in range(3):
            expected = torch.zeros(4, 5, 6, dtype=torch.float64)
            expected[ranked.channel[n, j], ranked.y[n, j], ranked.x[n, j]] = 1.0
            assert torch.equal(seeds[j, n], expected)
    padded = top_neurons(torch.randn(2, 1, 1, 2), kmax=3)
    seeds = one_hot_neurons(padded, torch.zeros(2, 1, 1, 2))
    assert seeds.flatten(1).sum(1).tolist() == [2.0, 2.0, 0.0]  # the padded neuron gets no seed
    # a neuron that counts by being negative (negative activation x negative gradient) is seeded with -1
    activation = torch.tensor([[[[2.0, -3.0]]]])
    ranked = top_neurons(dam_scores(activation, torch.tensor([[[[1.0, -1.0]]]])), kmax=2)
    assert ranked.x[0].tolist() == [1, 0]  # -3 x -1 = 3 ranks above 2 x 1
    assert one_hot_neurons(ranked, activation)[:, 0, 0, 0].tolist() == [[0.0, -1.0], [1.0, 0.0]]


class _DepthwiseNet(nn.Module):
    """Conv, BatchNorm, ReLU6, depthwise conv, ReLU6 ... like an EfficientNet block, in float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.act0 = nn.ReLU6()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.project = nn.Conv2d(8, 6, 1)  # the recorded layer
        self.act2 = nn.ReLU6()
        self.fc = nn.Linear(6, 5)
        for bn in (self.bn0, self.bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.depthwise(self.act0(self.bn0(self.stem(x))))))
        return self.fc(self.act2(self.project(x)).mean(dim=(2, 3)))


def _check_batched_equals_loop(net: nn.Module, image: torch.Tensor, layer: str, kmax: int) -> None:
    labels = [1, 3][: image.shape[0]]
    image, activation, effect = _dam_like_pipeline(net, image, labels, layer)
    ranked = top_neurons(dam_scores(activation.detach(), effect), kmax)
    seeds = one_hot_neurons(ranked, activation)
    batched = neuron_gradients(activation, image, seeds)
    assert batched.shape == (kmax, *image.shape)
    loop = torch.stack(
        [torch.autograd.grad(activation, image, grad_outputs=seeds[j], retain_graph=True)[0] for j in range(kmax)]
    )
    assert loop.abs().max() > 0
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)
    # images do not mix (eval-mode BatchNorm): the seeds of image 0 alone give image 0's maps and nothing else
    if image.shape[0] == 2:
        only_first = seeds.clone()
        only_first[:, 1] = 0
        alone = neuron_gradients(activation, image, only_first)
        assert torch.count_nonzero(alone[:, 1]) == 0
        torch.testing.assert_close(alone[:, 0], batched[:, 0], rtol=1e-10, atol=1e-12)

    # and the guided rule is in effect: the plain gradient of the same neurons is different
    plain_image = image.detach().requires_grad_(True)
    with record_layer(net, layer) as recorder:
        net(plain_image)
    plain = neuron_gradients(recorder.activation, plain_image, seeds)
    assert not torch.allclose(plain, batched)


def test_batched_neuron_gradients_equal_a_loop_small_net():
    image = torch.randn(2, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _check_batched_equals_loop(_DepthwiseNet(), image, "project", kmax=5)


def test_batched_neuron_gradients_equal_a_loop_efficientnet_lite():
    from neuroloc.models import get_spec

    spec = get_spec("efficientnet_lite0")
    torch.manual_seed(7)
    net = spec.build().double().eval()
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    _check_batched_equals_loop(net, image, spec.resolve_layer(None), kmax=4)


def test_saliency_map_reductions():
    grads = torch.tensor([[[[1.0]], [[-2.0]], [[2.0]]]])  # (1, 3, 1, 1)
    assert saliency_maps(grads, "mean").item() == pytest.approx(1.0 / 3)
    assert saliency_maps(grads, "abs_max").item() == 2.0
    assert saliency_maps(grads, "l2").item() == 3.0
    with pytest.raises(ValueError):
        saliency_maps(grads, "max")  # type: ignore[arg-type]
