"""A stand-in accelerator for testing device handling without a GPU.

:class:`OnAccelerator` is a tensor subclass that holds real CPU data but reports itself as living on
another device (``meta``: a device every torch build knows and that has no data). It behaves like a CUDA
tensor where device bugs show up:

* ``.numpy()`` / ``np.asarray`` on it fail (as on CUDA); ``.cpu()`` / ``.to("cpu")`` give a plain CPU tensor;
  ``.item()``, ``.tolist()``, ``int()`` and ``float()`` work (as on CUDA);
* an operation that mixes it with a plain CPU tensor of one or more dimensions raises
  :class:`MixedDevices` (CUDA raises "Expected all tensors to be on the same device"); 0-dim CPU
  tensors are allowed, as CUDA allows them, and so are CPU index tensors into an accelerator tensor
  (``x[cpu_indices]``, ``x[cpu_mask] = ...``), while an accelerator index into a CPU tensor is refused;
* a tensor made without ``device=`` is a plain CPU tensor, so using it with the model's tensors fails;
  one made with ``device=<the model's device>`` (``torch.tensor``, ``torch.full``, ``torch.arange``,
  ``.to(device)``, ``new_zeros`` ...) is an accelerator tensor, while :class:`AcceleratorMode` is active.

Every operation runs the same CPU kernel on the held data, so results can be compared with a plain CPU
run. What it cannot show: CUDA's own kernels (numerics, nondeterminism), speed, memory, synchronisation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from neuroloc.models.registry import LoadedModel

ACCELERATOR = torch.device("meta")
CPU = torch.device("cpu")


class MixedDevices(RuntimeError):
    """An operation got tensors on the accelerator and on the CPU (a device bug)."""


def _is_accelerator(device: Any) -> bool:
    if device is None:
        return False
    try:
        return torch.device(device).type == ACCELERATOR.type
    except (RuntimeError, TypeError):
        return False


def wrap(tensor: torch.Tensor) -> OnAccelerator:
    return OnAccelerator(tensor)


def _wrap_all(out: Any) -> Any:
    return tree_map(lambda t: OnAccelerator(t) if type(t) is torch.Tensor else t, out)


_INDEXING = {
    torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


class OnAccelerator(torch.Tensor):
    """CPU data that claims to be on :data:`ACCELERATOR` (see the module's docstring)."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnAccelerator:
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", (type(elem), elem.device)
        made = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=ACCELERATOR, requires_grad=elem.requires_grad,
        )
        made.elem = elem
        return made

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnAccelerator({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        on_accelerator: list[torch.Tensor] = []
        on_cpu: list[torch.Tensor] = []

        def unwrap(x: Any) -> Any:
            if isinstance(x, OnAccelerator):
                on_accelerator.append(x)
                return x.elem
            if isinstance(x, torch.Tensor):
                on_cpu.append(x)
                return x
            if isinstance(x, torch.device) and x.type == ACCELERATOR.type:
                return CPU
            return x

        plain_args, plain_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if any(t.device.type == ACCELERATOR.type for t in on_cpu):
            raise MixedDevices(f"{func}: a real {ACCELERATOR.type} tensor (no data) reached the computation")
        mixed = [t for t in on_cpu if t.dim() > 0]
        if func in _INDEXING and args and isinstance(args[0], OnAccelerator):
            indices = {id(i) for i in args[1] if isinstance(i, torch.Tensor)} if len(args) > 1 else set()
            mixed = [t for t in mixed if id(t) not in indices]  # CUDA takes CPU indices into its tensors
        if on_accelerator and mixed:
            raise MixedDevices(
                f"{func}: expected all tensors on the same device, got accelerator tensors and a CPU tensor "
                f"of shape {tuple(mixed[0].shape)}"
            )
        out = func(*plain_args, **plain_kwargs)
        target = kwargs.get("device")
        if target is not None and not _is_accelerator(target):
            return out  # an explicit move off the accelerator: .cpu(), .to("cpu")
        if on_accelerator or _is_accelerator(target):
            return _wrap_all(out)
        return out


class AcceleratorMode(TorchFunctionMode):
    """Tensors created or moved with ``device=<accelerator>`` become :class:`OnAccelerator` tensors."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and args and isinstance(args[0], OnAccelerator):
            return args[0].elem.tolist()  # allowed on CUDA (it copies to the host); refused for subclasses
        if func is torch.Tensor.to and args and type(args[0]) is torch.Tensor:
            device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            if _is_accelerator(device):
                return OnAccelerator(args[0].to(dtype=dtype, copy=True) if dtype is not None else args[0].clone())
        if _is_accelerator(kwargs.get("device")) and not any(isinstance(a, OnAccelerator) for a in args):
            return _wrap_all(func(*args, **{**kwargs, "device": CPU}))
        return func(*args, **kwargs)


@contextmanager
def accelerator() -> Iterator[None]:
    """Run the block with :class:`AcceleratorMode` on."""
    with AcceleratorMode():
        yield


def on_accelerator(model: LoadedModel) -> LoadedModel:
    """A copy of ``model`` whose weights and buffers are :class:`OnAccelerator` tensors (``model`` is left as it is)."""
    module = copy.deepcopy(model.module)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(wrap(param.detach()), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = wrap(buffer)
    return LoadedModel(model.name, module, model.spec, model.weights)
