"""Find the layers a weight quantizer works on and view their weights as `[out, in_flat]` matrices.

Quantizable kinds: `nn.Linear` ("linear"), Hugging Face `Conv1D` ("conv1d_hf", weight stored `[in, out]`),
`nn.Conv2d` ("conv2d", flattened `[out, in/groups·kh·kw]` in `weight.flatten(1)` order).
Embedding tables (`nn.Embedding`, "embedding") are listed separately: they are kept in float unless a
config asks for them.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

QUANTIZABLE_KINDS = ("linear", "conv1d_hf", "conv2d")


def layer_kind(module: nn.Module) -> str | None:
    """ "linear" | "conv1d_hf" | "conv2d" | "embedding", or None for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return "conv1d_hf"
    return None


def find_layers(model: nn.Module, kinds: tuple[str, ...] = QUANTIZABLE_KINDS) -> dict[str, nn.Module]:
    """Modules of the given kinds by qualified name, in registration order (tied modules listed once)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if layer_kind(module) in kinds:
            found[name] = module
    return found


def matches_any(name: str, patterns: list[str]) -> bool:
    """True when `name` equals or fnmatch-matches one of `patterns`."""
    return any(name == pattern or fnmatchcase(name, pattern) for pattern in patterns)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def get_weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a detached `[out, in_flat]` matrix (a view where the layout allows it)."""
    kind = layer_kind(module)
    weight = module.weight.detach()
    if kind == "conv1d_hf":
        return weight.t()
    if kind == "conv2d":
        return weight.flatten(1)
    return weight


def matrix_to_weight(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of `get_weight_matrix`: an `[out, in_flat]` matrix in the module's own weight layout."""
    if layer_kind(module) == "conv1d_hf":
        return matrix.t()
    return matrix.reshape(module.weight.shape)


@torch.no_grad()
def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Overwrite the weight in place from an `[out, in_flat]` matrix (dtype and device of the module)."""
    module.weight.copy_(matrix_to_weight(module, matrix).to(module.weight.dtype))


def _hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if callable(getattr(module, "get_output_embeddings", None))
    ]


def find_output_head(model: nn.Module) -> str | None:
    """Name of the output head: the Hugging Face output embeddings when the model has them, None for a
    Hugging Face model without any (an encoder), else the last Linear registered (a classifier's fc)."""
    hf_models = _hf_models(model)
    for prefix, hf_model in hf_models:
        head = hf_model.get_output_embeddings()
        if isinstance(head, nn.Module):
            for name, module in model.named_modules():
                if module is head:
                    return name
            return prefix
    if hf_models:
        return None
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def tied_weight_owner(model: nn.Module, name: str) -> str | None:
    """Name of an earlier module that shares `name`'s weight Parameter (tied embeddings), else None."""
    target = dict(model.named_modules())[name].weight
    for other, module in model.named_modules(remove_duplicate=False):
        if other != name and getattr(module, "weight", None) is target:
            return other
    return None
