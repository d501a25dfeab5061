"""The guided-backpropagation rule at ReLU/ReLU6 and the hygiene of the hook context managers.

At each ReLU the backward signal must be R * (R > 0) * (f > 0) (f: the ReLU's forward input, R: the
gradient arriving from above); at ReLU6 the forward mask is 0 < f < 6. The expected numbers below are
worked out by hand in the comments, in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuroloc.hooks import find_layer, guided_relus, record_layer, record_layers, recorded_activations


def _linear(weight: list[list[float]], bias: list[float] | None = None) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return layer


def _conv1x1(weight: list[list[float]]) -> nn.Conv2d:
    w = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(w.view(*w.shape, 1, 1))
    return layer


def _input_gradient(net: nn.Module, x: list[float], guided: bool) -> torch.Tensor:
    image = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    if guided:
        with guided_relus(net):
            out = net(image)
    else:
        out = net(image)
    (grad,) = torch.autograd.grad(out.sum(), image)
    return grad[0]


def _hand_net(inplace: bool = False) -> nn.Module:
    # f = W1 x + b1 with x = (1, 2):  f = (1-2+0.5, 2+2-1, -1+2+0) = (-0.5, 3, 1)
    # y = W2 relu(f) = 2*0 - 3*3 + 1*1 = -8;  R = dy/d relu(f) = (2, -3, 1)
    return nn.Sequential(
        _linear([[1, -1], [2, 1], [-1, 1]], [0.5, -1, 0]),
        nn.ReLU(inplace=inplace),
        _linear([[2, -3, 1]], [0.0]),
    )


# guided:  R*(R>0)*(f>0) = (2*1*0, -3*0*1, 1*1*1) = (0, 0, 1);  dx = W1^T (0,0,1) = (-1, 1)
# plain:   R*(f>0)       = (0, -3, 1);                           dx = W1^T (0,-3,1) = (1*0+2*-3-1*1, -1*0+1*-3+1*1) = (-7, -2)
HAND_GUIDED = [-1.0, 1.0]
HAND_PLAIN = [-7.0, -2.0]


def test_guided_relu_matches_hand_computed_values():
    net = _hand_net()
    guided = _input_gradient(net, [1, 2], guided=True)
    plain = _input_gradient(net, [1, 2], guided=False)
    assert torch.equal(guided, torch.tensor(HAND_GUIDED, dtype=torch.float64))
    assert torch.equal(plain, torch.tensor(HAND_PLAIN, dtype=torch.float64))
    assert not torch.equal(guided, plain)


def test_guided_relu_at_the_relu_itself():
    """The signal leaving the ReLU (its input gradient) is R*(R>0)*(f>0) = (0, 0, 1)."""
    net = _hand_net()
    captured = {}

    def capture(_module, _inputs, output):
        output.register_hook(lambda g: captured.__setitem__("g", g))

    net[0].register_forward_hook(capture)
    _input_gradient(net, [1, 2], guided=True)
    assert torch.equal(captured["g"][0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_guided_inplace_relu():
    net = _hand_net(inplace=True)
    assert torch.equal(_input_gradient(net, [1, 2], guided=True), torch.tensor(HAND_GUIDED, dtype=torch.float64))
    assert torch.equal(_input_gradient(net, [1, 2], guided=False), torch.tensor(HAND_PLAIN, dtype=torch.float64))


def test_guided_relu6_keeps_only_the_linear_part():
    # f = 2x with x = (-1, 1, 4, 2): f = (-2, 2, 8, 4); relu6(f) = (0, 2, 6, 4); y = (1, 1, 1, -1) . relu6(f)
    # R = (1, 1, 1, -1); forward mask 0<f<6 = (0, 1, 0, 1)
    # guided: R*(R>0)*mask = (0, 1, 0, 0) -> dx = 2*(0, 1, 0, 0) = (0, 2, 0, 0)
    # plain:  R*mask       = (0, 1, 0, -1) -> dx = (0, 2, 0, -2)
    net = nn.Sequential(
        _linear([[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]),
        nn.ReLU6(),
        _linear([[1, 1, 1, -1]]),
    )
    x = [-1, 1, 4, 2]
    assert torch.equal(_input_gradient(net, x, guided=True), torch.tensor([0.0, 2, 0, 0], dtype=torch.float64))
    assert torch.equal(_input_gradient(net, x, guided=False), torch.tensor([0.0, 2, 0, -2], dtype=torch.float64))


class _SharedReLU(nn.Module):
    """One ReLU module applied twice in the same forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = _linear([[1, 1], [2, 2]])
        self.fc2 = _linear([[-1, 1], [-2, 2]])
        self.fc3 = _linear([[-1, 2]])
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_relu_module_used_twice_is_guided_at_both_uses():
    # x = (1, 1): f1 = (2, 4), r1 = (2, 4); f2 = (-2+4, -4+8) = (2, 4), r2 = (2, 4); R2 = (-1, 2)
    # guided at 2nd use: (0, 2); R1 = W2^T (0, 2) = (-4, 4); guided at 1st use: (0, 4); dx = W1^T (0, 4) = (8, 8)
    # (only the 2nd use guided: dx = (4, 4); only the 1st: (6, 6); none: (3, 3))
    net = _SharedReLU()
    assert torch.equal(_input_gradient(net, [1, 1], guided=True), torch.tensor([8.0, 8.0], dtype=torch.float64))
    assert torch.equal(_input_gradient(net, [1, 1], guided=False), torch.tensor([3.0, 3.0], dtype=torch.float64))


class _Recorded(nn.Module):
    """1x1 convs on (1, C, 1, 1) tensors: conv1 -> relu_a -> conv2 (recorded) -> relu_b -> conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv1x1([[1, 1], [3, -1], [-1, 0]])
        self.relu_a = nn.ReLU()
        self.conv2 = _conv1x1([[1, -1, 2], [1, 1, 1]])
        self.relu_b = nn.ReLU()
        self.conv3 = _conv1x1([[-1, 2]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.relu_b(self.conv2(self.relu_a(self.conv1(x))))).flatten(1)


# x = (1, 2): f1 = (3, 1, -1), r1 = (3, 1, 0); a = conv2 = (3-1+0, 3+1+0) = (2, 4); score = -1*2 + 2*4 = 6
# class gradient at a: plain W3*(a>0) = (-1, 2); guided (-1*0, 2) = (0, 2)
# neuron a[0] to the input: W2^T (1, 0) = (1, -1, 2); guided at relu_a with f1 = (3, 1, -1): (1, 0, 0)
#   -> dx = W1^T (1, 0, 0) = (1, 1)   (plain would be (1, -1, 0) -> (1 - 3, 1 + 1) = (-2, 2))
@pytest.mark.parametrize("above_layer, expected_effect", [(False, [-1.0, 2.0]), (True, [0.0, 2.0])])
def test_only_relus_below_the_recorded_layer_are_guided(above_layer, expected_effect):
    net = _Recorded()
    image = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_(True)
    with record_layer(net, "conv2") as recorder, guided_relus(net, recorder, above_layer=above_layer):
        score = net(image)
    activation = recorder.activation
    assert torch.equal(activation.flatten(), torch.tensor([2.0, 4.0], dtype=torch.float64))
    (effect,) = torch.autograd.grad(score.sum(), activation, retain_graph=True)
    assert torch.equal(effect.flatten(), torch.tensor(expected_effect, dtype=torch.float64))
    (neuron_grad,) = torch.autograd.grad(activation[0, 0, 0, 0], image)
    assert torch.equal(neuron_grad.flatten(), torch.tensor([1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("above_layer, expected_effect", [(False, [-1.0, 2.0]), (True, [0.0, 2.0])])
def test_recorded_relu_itself_is_not_guided_for_the_class_gradient(above_layer, expected_effect):
    """VGG's layer aliases name ReLU modules: the plain class gradient at their output must not be clamped."""
    # the recorded output is relu_b(a) = (2, 4); d score / d relu_b(a) = W3 = (-1, 2)
    # neuron relu_b(a)[1] to the input: (a>0) -> W2^T (0, 1) = (1, 1, 1); guided at relu_a: (1, 1, 0) -> W1^T = (4, 0)
    net = _Recorded()
    image = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_(True)
    with record_layer(net, "relu_b") as recorder, guided_relus(net, recorder, above_layer=above_layer):
        score = net(image)
    (effect,) = torch.autograd.grad(score.sum(), recorder.activation, retain_graph=True)
    assert torch.equal(effect.flatten(), torch.tensor(expected_effect, dtype=torch.float64))
    (neuron_grad,) = torch.autograd.grad(recorder.activation[0, 1, 0, 0], image)
    assert torch.equal(neuron_grad.flatten(), torch.tensor([4.0, 0.0], dtype=torch.float64))


def test_without_recorder_every_relu_is_guided():
    net = _Recorded()
    image = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_(True)
    with record_layer(net, "conv2") as recorder, guided_relus(net):
        score = net(image)
    (effect,) = torch.autograd.grad(score.sum(), recorder.activation)
    assert torch.equal(effect.flatten(), torch.tensor([0.0, 2.0], dtype=torch.float64))


def _hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in net.modules())


def test_hooks_are_removed_after_the_block():
    net = _Recorded()
    before = _hook_count(net)
    with record_layer(net, "conv2") as recorder, guided_relus(net, recorder):
        assert _hook_count(net) == before + 3  # the recorder + two ReLUs
        net(torch.ones(1, 2, 1, 1, dtype=torch.float64))
    assert _hook_count(net) == before


def test_hooks_are_removed_when_the_body_raises():
    net = _Recorded()
    before = _hook_count(net)
    with pytest.raises(RuntimeError, match="boom"), record_layer(net, "conv2") as recorder, guided_relus(net, recorder):
        assert _hook_count(net) == before + 3
        raise RuntimeError("boom")
    assert _hook_count(net) == before
    # ... and when the forward pass itself fails inside a hook (the layer does not output 4-D tensors)
    mlp = _hand_net()
    with pytest.raises(ValueError, match=r"N, C, H, W\) tensor, got shape \(1, 3\)"), record_layer(mlp, "0"), guided_relus(mlp):
        mlp(torch.ones(1, 2, dtype=torch.float64))
    assert _hook_count(mlp) == 0


def test_record_layer_refuses_a_layer_that_runs_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    net = Twice()
    with pytest.raises(ValueError, match="more than once"), record_layer(net, "conv"):
        net(torch.ones(1, 2, 3, 3))
    assert _hook_count(net) == 0


def test_record_layers_records_each_name_once_and_removes_every_hook():
    net = _frozen_net()
    x = torch.randn(1, 3, 8, 8)
    with record_layers(net, ["2", "0", "2"]) as recorders:
        assert list(recorders) == ["2", "0"] and _hook_count(net) == 2
        net(x)
    activations = recorded_activations(recorders)
    assert _hook_count(net) == 0
    assert torch.equal(activations["0"], net[0](x))  # the conv's own output: the in-place ReLU acted on a copy
    assert activations["2"].shape == (1, 5, 4, 4)
    with pytest.raises(RuntimeError, match="boom"), record_layers(net, ["0", "2"]):
        raise RuntimeError("boom")
    assert _hook_count(net) == 0


def test_recorded_activations_names_a_layer_the_forward_pass_missed():
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    net = Skips()
    with record_layers(net, ["used", "unused"]) as recorders:
        net(torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError, match="'unused' did not run"):
        recorded_activations(recorders)


def test_find_layer_suggests_close_names():
    net = _Recorded()
    assert find_layer(net, "conv2") is net.conv2
    with pytest.raises(ValueError, match="conv2"):
        find_layer(net, "conv_2")
    with pytest.raises(ValueError):
        find_layer(net, "")  # the root module is not a layer


def _frozen_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 5, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 8, 8))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def test_graph_root_gives_the_same_gradient_without_a_graph_below_the_layer():
    net, x = _frozen_net(), torch.randn(2, 3, 8, 8)
    with record_layer(net, "2") as plain:  # the input requires grad: the whole graph is built
        (expected,) = torch.autograd.grad(net(x.clone().requires_grad_(True))[:, 1].sum(), plain.activation)
    with record_layer(net, "2", graph_root=True) as rooted:
        out = net(x)  # the next ReLU is in place: it must act on a copy, not on the recorded leaf
        assert rooted.activation.is_leaf and rooted.activation.requires_grad
        (got,) = torch.autograd.grad(out[:, 1].sum(), rooted.activation)
    # Both record the conv's own output, not what the in-place ReLU after it made of it, and its gradient.
    assert torch.equal(rooted.activation, plain.activation)
    assert torch.allclose(got, expected)
    assert (plain.activation < 0).any()  # so the ReLU would have changed it
    assert torch.equal(out, net(x))  # same forward values


def test_graph_root_leaves_a_graph_that_already_exists_alone():
    net, x = _frozen_net(), torch.randn(1, 3, 8, 8, requires_grad=True)
    with record_layer(net, "2", graph_root=True) as rooted:
        net(x)
    assert not rooted.activation.is_leaf
    with torch.no_grad(), record_layer(net, "2", graph_root=True) as rooted:
        net(x)
    assert not rooted.activation.requires_grad


def test_the_unguided_warning_names_activations_that_guided_backprop_leaves_alone() -> None:
    from neuroloc.hooks import unguided_warning

    relus = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU6())
    mixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Hardswish(), nn.SiLU())
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU())
    assert unguided_warning(relus, "neurons") is None
    assert "Hardswish, SiLU activations beside its ReLUs" in (unguided_warning(mixed, "neurons") or "")
    assert "no nn.ReLU or nn.ReLU6 modules" in (unguided_warning(plain, "neurons") or "")
    assert unguided_warning(mixed, "density") is None  # density mode backpropagates no neuron
