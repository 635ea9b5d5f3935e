"""What a loader returns: the model as a torch module, its inputs, its task and what was learned on the way.

Kept apart from the loaders so each loader (ONNX, torch.export, Hugging Face) imports this, never the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from compression.io.detect import PICKLE_MESSAGE
from compression.io.errors import ModelLoadError
from compression.primitives.layers import find_layers

Format = Literal["onnx", "torch_export", "hf_dir"]
Task = Literal["classifier", "encoder", "causal_lm", "generic"]


@dataclass(frozen=True)
class InputSpec:
    """One model input: `shape` entries are None where the dimension is dynamic."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass
class LoadedModel:
    """A loaded model: `module(**inputs)` returns one tensor (logits, or embeddings for encoders), or, for
    an ONNX graph with several outputs, a tuple of all of them (`compression.types.primary_output` is the first)."""

    format: Format
    module: nn.Module
    input_specs: list[InputSpec]
    task: Task
    tokenizer: Any | None = None
    source_onnx: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def quantizable_layer_names(module: nn.Module) -> list[str]:
    """The layers a weight quantizer works on (`compression.primitives.layers.find_layers`)."""
    return list(find_layers(module))


def describe_module(module: nn.Module, architecture: str, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": architecture,
        "params": sum(p.numel() for p in module.parameters()),
        "quantizable_layers": quantizable_layer_names(module),
        **extra,
    }


def refuse_pickles_only(model_dir: Path) -> None:
    """A HF dir with weights only as .bin / .pt pickles is refused (we read safetensors only)."""
    if not list(model_dir.glob("*.safetensors")):
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
            raise ModelLoadError("pickle_refused", PICKLE_MESSAGE)
        raise ModelLoadError("invalid_model", "the Hugging Face directory holds no *.safetensors weights")
