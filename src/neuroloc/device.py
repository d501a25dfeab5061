"""Which torch device to run on: ``--device auto|cpu|cuda|cuda:N|mps`` for localize, evaluate and bench.

``auto`` is the first CUDA GPU when torch sees one, else the CPU (MPS is used only when asked for).
The model is moved there with :meth:`neuroloc.models.LoadedModel.to`; the pipeline sends its inputs
to the model's device and brings maps back to the CPU for the NumPy steps (blobs, regions, boxes).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module for its option; torch is imported when a value is resolved
    import torch

DEVICE_METAVAR = "auto|cpu|cuda[:N]|mps"
DEVICE_HELP = "Where the network runs: auto = the first CUDA GPU if torch sees one, else the CPU."


class DeviceError(ValueError):
    """A device name that is unknown, or names a device torch cannot use here."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``name`` stands for, checked to be usable now.

    Raises:
        DeviceError: a one-line reason: unknown name, no CUDA (or MPS) in this torch, no such GPU index.
    """
    import torch

    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device; use {DEVICE_METAVAR}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU found"
            raise DeviceError(f"CUDA is not available to torch {torch.__version__} ({build})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"no CUDA device {device.index}; torch sees {count} (0 to {count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"MPS (Apple GPU) is not available to torch {torch.__version__}")
        return device
    raise DeviceError(f"device type {device.type!r} is not supported; use {DEVICE_METAVAR}")


class _Float32Blocks:
    """How many threads are inside :func:`exact_float32` blocks, and the TF32 settings from before the first:
    the flags are process-wide, so only the last block to end may put them back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: tuple[Any, Any] = (False, False)


_FLOAT32_BLOCKS = _Float32Blocks()


@contextmanager
def exact_float32() -> Iterator[None]:
    """Inside the block (or the decorated function), CUDA runs convolutions and matrix products in full
    float32, not TF32; the previous settings come back on exit.

    cuDNN uses TF32 for float32 convolutions by default (10-bit mantissas). On an H200 that moved the top
    neuron's DAM score by about 1 % and, through the discrete choices after it (which neurons, which blobs,
    Otsu's cut), 15 of 20 paper-preset boxes by up to 158 pixels; with TF32 off, CUDA gave the CPU's boxes
    to the pixel (docs/speed.md). No effect on the CPU.
    """
    import torch

    blocks = _FLOAT32_BLOCKS
    with blocks.lock:
        if blocks.depth == 0:
            blocks.saved = _tf32_settings(torch)
            _set_tf32_settings(torch, ("ieee", "ieee") if _precision_api(torch) else (False, False))
        blocks.depth += 1
    try:
        yield
    finally:
        with blocks.lock:
            blocks.depth -= 1
            if blocks.depth == 0:
                _set_tf32_settings(torch, blocks.saved)


def _precision_api(torch: Any) -> bool:
    """Whether torch has the per-backend ``fp32_precision`` settings (2.9 and later), which replace
    ``allow_tf32``: reading the old flags after a user set the new ones raises, so only the new ones are used."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(conv, "fp32_precision")


def _tf32_settings(torch: Any) -> tuple[Any, Any]:
    """cuDNN convolutions' and CUDA matrix products' float32 settings, in the API torch has."""
    if _precision_api(torch):
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def _set_tf32_settings(torch: Any, settings: tuple[Any, Any]) -> None:
    if _precision_api(torch):
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = settings
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = settings


def click_device(_ctx: Any, _param: Any, value: str) -> torch.device:
    """Click callback for ``--device``: the resolved device, or a one-line error naming the option.

    Raises:
        click.ClickException: ``--device NAME: reason`` (exit status 1).
    """
    import click

    try:
        return resolve_device(value)
    except DeviceError as exc:
        raise click.ClickException(f"--device {value}: {exc}") from None


def device_option(help_suffix: str = "") -> Any:
    """The ``--device`` option shared by localize, evaluate and bench (its value is a ``torch.device``)."""
    import click

    return click.option(
        "--device", default="auto", show_default=True, metavar=DEVICE_METAVAR, callback=click_device,
        help=DEVICE_HELP + help_suffix,
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, MPS), so that a clock read afterwards sees it done."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
