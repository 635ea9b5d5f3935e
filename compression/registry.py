"""Method key -> compress function. The key is the module name under `compression.methods`."""

from __future__ import annotations

import importlib
from typing import Protocol

from torch import nn

from compression.configs import METHOD_KEYS, MethodConfigBase
from compression.types import Batches, CompressionResult, ProgressFn


class CompressFn(Protocol):
    def __call__(
        self,
        model: nn.Module,
        calib: Batches | None,
        config: MethodConfigBase,
        *,
        progress: ProgressFn | None = None,
    ) -> CompressionResult: ...


def get_method(key: str) -> CompressFn:
    """The `compress` function of method `key`; KeyError when unknown."""
    if key not in METHOD_KEYS:
        raise KeyError(key)
    module = importlib.import_module(f"compression.methods.{key}")
    return module.compress


def compress(
    model: nn.Module,
    calib: Batches | None,
    config: MethodConfigBase,
    *,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Run the method named by `config.method`. Never mutates `model`."""
    return get_method(config.method)(model, calib, config, progress=progress)
