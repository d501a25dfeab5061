"""Hook context managers. Every hook is removed on exit, also when the body raises."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


# activation modules that guided backpropagation does not guide: their gradient passes as it is
OTHER_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Hardswish, nn.SiLU, nn.GELU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.PReLU, nn.Softplus,
    nn.Hardtanh, nn.Tanh,
)


def unguided_warning(model: nn.Module, mode: str) -> str | None:
    """A sentence when ``mode`` ("neurons" backpropagates each neuron with guidance at ReLU modules) meets a model
    without ReLU modules, where guided backpropagation silently becomes the plain gradient, or with other
    activation modules beside them, where it is guided only in part; else None."""
    if mode != "neurons":
        return None
    relus = sum(isinstance(m, RELU_TYPES) for m in model.modules())
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, OTHER_ACTIVATIONS)
                     and not isinstance(m, RELU_TYPES)})
    if not relus:
        return ("the model has no nn.ReLU or nn.ReLU6 modules (does it call F.relu?), so neurons mode backpropagates "
                "the plain gradient, not guided backpropagation; the default density mode does not need them")
    if others:
        return (f"the model has {', '.join(others)} activations beside its ReLUs: guided backpropagation guides only "
                "at the ReLU / ReLU6 modules, so neurons mode's maps are guided in part; the default density mode "
                "does not need them")
    return None

# Hooks live on the model, so two threads localizing with one model would fire each other's hooks. Each model
# gets one reentrant lock, held while neuroloc's hooks are on it: calls on a shared model take turns.
_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


@contextmanager
def hooks_turn(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s lock (one per module, reentrant) for the block: neuroloc's hooked passes on one model
    run one thread at a time. Other code running the same module meanwhile still fires the hooks."""
    with _LOCKS_LOCK:
        lock = _MODEL_LOCKS.setdefault(model, threading.RLock())
    with lock:
        yield


@contextmanager
def gradients_on(model: nn.Module) -> Iterator[None]:
    """Gradients can be taken inside the block, also when the caller runs in ``torch.no_grad()`` or
    ``torch.inference_mode()`` (a common way to wrap inference): neuroloc needs them for DAM.

    Raises:
        ValueError: for a model with batch norm or dropout in training mode: a pass would change its running
            statistics, or make every box random.
    """
    training = next((name or type(model).__name__ for name, m in model.named_modules()
                     if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))),
                    None)
    if training is not None:
        raise ValueError(f"the model is in training mode ({training}): batch norm would change its statistics and "
                         "dropout would make the boxes random; call .eval() on it first")
    if any(p.is_inference() for p in model.parameters()) or any(b.is_inference() for b in model.buffers()):
        raise ValueError("the model's weights were made inside torch.inference_mode(), where tensors cannot take part "
                         "in gradients, which neuroloc needs: build or load the model outside it (calls may run inside)")
    with torch.inference_mode(False), torch.enable_grad():
        yield


class LayerNotFound(ValueError):
    """A layer name the model does not have."""


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``named_modules``), or a :class:`LayerNotFound` listing close names."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    import difflib

    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    raise LayerNotFound(f"layer {name!r} not found in the model" + (f"; close: {', '.join(close)}" if close else ""))


@dataclass
class LayerRecorder:
    """Holds the output of the watched layer from the latest forward pass."""

    activation: torch.Tensor | None = None
    reached: bool = False


@contextmanager
def record_layer(model: nn.Module, layer: str, graph_root: bool = False) -> Iterator[LayerRecorder]:
    """Record the output of ``layer`` during forward passes inside the block.

    A layer called more than once per forward is refused: its neurons would be ambiguous.

    ``graph_root``: when nothing below the layer requires gradients (frozen weights, an input without
    ``requires_grad``), start autograd's graph at the layer's output, so gradients can still be taken
    with respect to it while the layers below run without building a graph (measured 11-31 % faster
    for the default preset: docs/speed.md). The layer's output then continues as a copy (the recorded
    tensor is a leaf, which in-place operations further up must not modify). Without it the output also
    continues as a copy, so that an in-place activation right after the layer (``nn.ReLU(inplace=True)``)
    does not overwrite what was recorded: either way the recorded features are the layer's own output.
    """
    module = find_layer(model, layer)
    recorder = LayerRecorder()

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {layer!r} must output a (N, C, H, W) tensor, got {got}")
        if recorder.reached:
            raise ValueError(f"layer {layer!r} runs more than once per forward pass; choose another layer")
        recorder.reached = True
        if graph_root and not output.requires_grad and torch.is_grad_enabled():
            recorder.activation = output.detach().requires_grad_(True)
            return recorder.activation.clone()
        recorder.activation = output
        return output.clone()

    with hooks_turn(model):
        handle = module.register_forward_hook(hook)
        try:
            yield recorder
        finally:
            handle.remove()


@contextmanager
def record_layers(model: nn.Module, layers: Sequence[str], graph_root: bool = False) -> Iterator[dict[str, LayerRecorder]]:
    """:func:`record_layer` for each of ``layers`` (a name given twice is recorded once), all removed on exit."""
    with ExitStack() as hooks:
        yield {name: hooks.enter_context(record_layer(model, name, graph_root)) for name in dict.fromkeys(layers)}


def recorded_activations(recorders: dict[str, LayerRecorder]) -> dict[str, torch.Tensor]:
    """The recorded outputs by layer name, or a ValueError naming a layer the forward pass did not reach."""
    activations = {}
    for name, recorder in recorders.items():
        if recorder.activation is None:
            raise ValueError(f"layer {name!r} did not run in the forward pass")
        activations[name] = recorder.activation
    return activations


def _clamp_negative(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


class GuidedAbove:
    """Whether the ReLUs that ran after the first recorded layer guide a backward pass (see :func:`guided_relus`)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    @contextmanager
    def everywhere(self) -> Iterator[None]:
        """Guide every ReLU while the body runs: for a neuron's guided backpropagation, which may cross a recorded
        layer below its own, while a class gradient to that lower layer stays plain."""
        earlier, self.on = self.on, True
        try:
            yield
        finally:
            self.on = earlier


@contextmanager
def guided_relus(
    model: nn.Module, recorders: LayerRecorder | Sequence[LayerRecorder] = (), above_layer: bool = False
) -> Iterator[GuidedAbove]:
    """Guided backpropagation (Springenberg et al., the paper's equation 5) at every ReLU/ReLU6 module.

    Each ReLU output gets a tensor hook that drops negative incoming gradients; autograd's own ReLU
    backward then keeps only positions where the forward input was positive, so the signal leaving the
    ReLU is ``R * (R > 0) * (f > 0)``. For ReLU6 autograd's backward also drops the positions at or above 6,
    where ReLU6 is flat (``R * (R > 0) * (0 < f < 6)``): a deliberate choice, guided backpropagation over the
    function the network computes (docs/method.md). Tensor hooks are registered per call, so modules used
    several times and in-place ReLUs (whose output tensor is hooked right after the op) are handled.

    With ``recorders`` given, only ReLUs that run before the first of the recorded layers are always guided: the
    class gradient to any recorded layer stays the plain gradient, unless ``above_layer`` is true. The context
    gives the switch of the ReLUs after it (:class:`GuidedAbove`), read when the backward pass runs.
    """
    watched = [recorders] if isinstance(recorders, LayerRecorder) else list(recorders)
    above = GuidedAbove(above_layer)

    def guide_if_on(grad: torch.Tensor) -> torch.Tensor | None:
        return _clamp_negative(grad) if above.on else None

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(guide_if_on if any(r.reached for r in watched) else _clamp_negative)

    with hooks_turn(model):
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, RELU_TYPES)]
        try:
            yield above
        finally:
            for handle in handles:
                handle.remove()
