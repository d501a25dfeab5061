"""Backbones. A new one is one module that calls :func:`register_model`, plus its import in the registry."""

from neuroloc.models.registry import (
    LoadedModel,
    ModelError,
    ModelSpec,
    Preprocessing,
    available_models,
    get_spec,
    load_model,
    model_default_options,
    register_model,
)

__all__ = [
    "LoadedModel",
    "ModelError",
    "ModelSpec",
    "Preprocessing",
    "available_models",
    "get_spec",
    "load_model",
    "model_default_options",
    "register_model",
]
