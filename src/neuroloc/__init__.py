"""neuroloc: find objects in images with nothing but a pretrained image classifier.

The public API is imported lazily so that ``neuroloc --help`` does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Localizer": "neuroloc.pipeline",
    "localize_batch": "neuroloc.pipeline",
    "LocalizeConfig": "neuroloc.config",
    "PRESETS": "neuroloc.config",
    "Localization": "neuroloc.result",
    "Neuron": "neuroloc.result",
    "load_model": "neuroloc.models",
    "load_image": "neuroloc.imageio",
    "DimImageWarning": "neuroloc.imageio",
    "resolve_class": "neuroloc.classes",
}

__all__ = [*_EXPORTS.keys(), "__version__"]  # noqa: PLE0604 (the keys are the lazily imported names)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neuroloc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])  # the lazy names too, for tab completion
