"""Hugging Face directories: build the model from config.json (no remote code), weights from safetensors.

Wrappers make every model callable as `module(**inputs) -> Tensor`:
- causal LMs return logits [B, T, vocab];
- sequence classifiers return logits [B, classes];
- encoders return attention-masked MEAN-POOLED embeddings [B, hidden] (what sentence-transformers
  models such as all-MiniLM-L6-v2 use; cosine fidelity is measured on these).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.io.errors import ModelLoadError
from compression.io.loaded import InputSpec, LoadedModel, Task, describe_module, refuse_pickles_only


class CausalLMLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class ClassifierLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class EncoderMeanPooled(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model(**kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


WRAPPERS = (CausalLMLogits, ClassifierLogits, EncoderMeanPooled)


def _task_of(architectures: list[str]) -> Task:
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classifier"
    return "encoder"


def _build(model_dir: Path, task: Task) -> nn.Module:
    import transformers

    auto = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "classifier": transformers.AutoModelForSequenceClassification,
    }.get(task, transformers.AutoModel)
    config = transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    if getattr(config, "modelpress_pruning", None) is not None:  # pruned shapes its config cannot describe
        from compression.primitives.depgraph import load_pruned_pretrained

        return load_pruned_pretrained(model_dir, auto)
    return auto.from_pretrained(
        str(model_dir),
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=True,
        dtype=torch.float32,
    )


def load_tokenizer(model_dir: Path) -> Any | None:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError):
        return None


def load_hf_dir(model_dir: Path) -> LoadedModel:
    """Load a Hugging Face model directory (config.json + *.safetensors + tokenizer files)."""
    import transformers

    refuse_pickles_only(model_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as error:
        raise ModelLoadError("invalid_model", f"unreadable config.json: {error}") from error
    architectures = list(getattr(config, "architectures", None) or [])
    task = _task_of(architectures)
    try:
        model = _build(model_dir, task).eval()
    except Exception as error:
        raise ModelLoadError("invalid_model", f"cannot build the model from config.json: {error}") from error
    wrapper = {"causal_lm": CausalLMLogits, "classifier": ClassifierLogits}.get(task, EncoderMeanPooled)(model)
    specs = [
        InputSpec("input_ids", (None, None), "int64"),
        InputSpec("attention_mask", (None, None), "int64"),
    ]
    output = {"causal_lm": "logits", "classifier": "logits"}.get(task, "mean_pooled_embeddings")
    vocab = getattr(config, "vocab_size", None) if task == "causal_lm" else None
    info = describe_module(
        wrapper, architectures[0] if architectures else config.model_type, output=output, vocab_size=vocab
    )
    info["model_dir"] = str(model_dir)
    return LoadedModel("hf_dir", wrapper.eval(), specs, task, load_tokenizer(model_dir), None, info)


def inner_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The Hugging Face model inside one of our wrappers, and the prefix its module names carry there."""
    inner = getattr(model, "model", None)
    return (inner, "model.") if isinstance(model, WRAPPERS) and inner is not None else (model, "")


def export_hf_dir(model: nn.Module, loaded: LoadedModel, out_dir: Path) -> Path:
    """The compressed model as a Hugging Face directory that `transformers` loads as is.

    Weights are the fake-quantized float values (or the pruned shapes, with the rewritten config), saved
    as safetensors; the packed integer form lives in the job's safetensors artifact.
    """
    inner, _ = inner_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(str(out_dir), safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(out_dir))
    return out_dir
