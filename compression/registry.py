"""Method registry: config class -> `MethodSpec`. Built-in methods load on first use from
`compression/methods/<key>_spec.py`; `register(spec)` adds any other method."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from compression.configs import CONFIG_CLASSES, MethodConfigBase
from compression.methods.spec import CompressFn, MethodSpec
from compression.types import Batches, CompressionResult, ProgressFn

_SPECS: dict[type[MethodConfigBase], MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Make `spec` the method for its config class (and its key); returns it. A spec that writes its own
    ONNX graph must say so on its config class (`ships_own_graph`: pipelines put such a step last)."""
    if spec.write_onnx is not None and not spec.config_class.ships_own_graph:
        raise ValueError(f"{spec.key}: a spec with write_onnx needs ships_own_graph = True on its config class")
    _SPECS[spec.config_class] = spec
    return spec


def unregister(config_class: type[MethodConfigBase]) -> None:
    _SPECS.pop(config_class, None)


def config_class(key: str) -> type[MethodConfigBase]:
    """The config class of method `key`; KeyError when unknown."""
    for cls in _SPECS:
        if cls.model_fields["method"].default == key:
            return cls
    return CONFIG_CLASSES[key]


def known_methods() -> list[str]:
    return sorted(set(CONFIG_CLASSES) | {spec.key for spec in _SPECS.values()})


def parse_config(key: str, config: dict[str, Any] | None) -> MethodConfigBase:
    """Validate `config` for method `key`: KeyError when unknown, pydantic's ValidationError when invalid."""
    return config_class(key).model_validate({**(config or {}), "method": key})


def spec_for(config: MethodConfigBase | type[MethodConfigBase]) -> MethodSpec:
    """The spec of a config (instance or class); KeyError when no method has it."""
    cls = config if isinstance(config, type) else type(config)
    if cls not in _SPECS:
        key = cls.model_fields["method"].default
        if CONFIG_CLASSES.get(key) is not cls:
            raise KeyError(key)
        register(importlib.import_module(f"compression.methods.{key}_spec").SPEC)
    return _SPECS[cls]


def get_spec(key: str) -> MethodSpec:
    return spec_for(config_class(key))


def get_method(key: str) -> CompressFn:
    """The `compress` function of method `key`; KeyError when unknown."""
    return get_spec(key).compress


def compress(
    model: nn.Module,
    calib: Batches | None,
    config: MethodConfigBase,
    *,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Run the method of `config`. Never mutates `model`."""
    return spec_for(config).compress(model, calib, config, progress=progress)
