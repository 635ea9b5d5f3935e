"""Runs onnxruntime-genai's model builder (`python -m compression.io.genai_builder <builder arguments>`).

The builder is run in its own process: its package puts its own folder on sys.path (top-level modules
named `builders`, `loaders`, `quantization`). This launcher adds one thing before handing over: the
Gemma-3 config as transformers 5 writes it (RoPE per layer type, `rope_parameters = {"full_attention":
{...}, "sliding_attention": {...}}`) also in the flat form the builder reads (`rope_parameters.rope_type`,
`rope_theta`, `rope_local_base_freq`). Only plain RoPE on both layer types is rewritten; anything else is
left as is (the builder then refuses it).
"""

from __future__ import annotations

import runpy
from typing import Any

LAYER_TYPES = ("full_attention", "sliding_attention")


def flatten_rope(config: Any) -> Any:
    """Add the flat RoPE fields to a per-layer-type RoPE config whose layer types all use plain RoPE."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not all(isinstance(rope.get(kind), dict) for kind in LAYER_TYPES):
        return config
    if any(rope[kind].get("rope_type", "default") != "default" for kind in LAYER_TYPES):
        return config
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", rope["full_attention"]["rope_theta"])
    config.rope_theta = rope["full_attention"]["rope_theta"]
    config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
    return config


def _patch_auto_config() -> None:
    import transformers

    original = transformers.AutoConfig.from_pretrained.__func__  # type: ignore[attr-defined]

    def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
        loaded = original(cls, *args, **kwargs)
        return (flatten_rope(loaded[0]), *loaded[1:]) if isinstance(loaded, tuple) else flatten_rope(loaded)

    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign]


if __name__ == "__main__":
    _patch_auto_config()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
