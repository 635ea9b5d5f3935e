"""Gemma-3-270M through onnxruntime-genai (KV cache, CPU): fp32 against our W4 `ort_genai` artifact.

The original is the model builder's fp32 folder of the cached fp32 directory (`benchmarks/gemma_cache.py`,
outside the repository); the compressed one is `write_ort_genai` of a W4 result: RTN, symmetric, group 32
(integer codes, Z = 0: a GPTQ-format input as it is; RTN keeps the quantization cheap on a 2-core machine;
the timing does not depend on how the codes were found). Every decoder Linear is quantized. Variants: the
embedding table (= the tied head, 168M of the 268M parameters) float, at MatMulNBits accuracy_level 0
(fp32 activations: what the job ships) and 4 (int8 activations, the builder's CPU default); and the table
quantized too (`quantize_embeddings: 4`): the head then runs as MatMulNBits of the table's codes, the
Gather reads the dequantized table.

Per variant: greedy agreement with transformers on the compressed model (first 32 generated tokens after a
real prompt), prefill tokens/s of a 512-token prompt and decode tokens/s of 32 steps at batch 1, original
and compressed alternating round by round in one process (compression.evaluate.generation), medians
with bootstrap 95% intervals; folder sizes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/genai.py [--gemma /work/cache/gemma3-270m] [--threads 2]

Writes benchmarks/results/genai.json (with a `table` for the README).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compression.configs import RTNConfig  # noqa: E402
from compression.evaluate.generation import greedy_tokens, open_genai, paired_generation  # noqa: E402
from compression.io import load_model  # noqa: E402
from compression.io.ort_genai_export import run_builder, unzip_genai, write_ort_genai  # noqa: E402
from compression.methods.quant_rtn import compress as rtn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "genai.json"
PROMPT_TEXT = "Hundreds of people have been forced to vacate their homes in the Southern Highlands of New South Wales"


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in {".onnx", ".data"}) / 1e6


def transformers_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def agreement(reference: list[int], got: list[int]) -> dict[str, Any]:
    first = next((i for i, (a, b) in enumerate(zip(reference, got, strict=True)) if a != b), len(reference))
    return {"equal": reference == got, "first_difference": None if first == len(reference) else first}


# name: (RTN config, MatMulNBits accuracy_level, what the table calls it)
VARIANTS = {
    "w4_l0": ({}, 0, "W4 RTN g32 sym, head float, accuracy_level 0"),
    "w4_l4": ({}, 4, "W4 RTN g32 sym, head float, accuracy_level 4"),
    "w4h_l0": ({"quantize_embeddings": 4}, 0, "W4 + table/head 4-bit codes, accuracy_level 0"),
}


def build(args: argparse.Namespace, work: Path) -> tuple[Any, dict[str, Path], dict[str, Any]]:
    loaded = load_model(args.gemma)
    folders, record, results = {"fp32": work / "fp32"}, {}, {}
    started = time.perf_counter()
    run_builder(args.gemma, folders["fp32"], "fp32", {})
    record["build_fp32_s"] = time.perf_counter() - started
    for name, (extra, level, _) in VARIANTS.items():
        key = json.dumps(extra, sort_keys=True)
        if key not in results:
            started = time.perf_counter()
            results[key] = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32, symmetric=True, **extra))
            record[f"quantize_{name}_s"] = time.perf_counter() - started
        started = time.perf_counter()
        section = write_ort_genai(results[key], loaded.tokenizer, work / f"{name}.zip", accuracy_level=level)
        record[name] = {"build_s": time.perf_counter() - started, "section": section}
        folders[name] = unzip_genai(work / f"{name}.zip", work / name)
    models = {name: results[json.dumps(extra, sort_keys=True)] for name, (extra, _, _) in VARIANTS.items()}
    return (loaded, models), folders, record


def measure(args: argparse.Namespace, models: Any, folders: dict[str, Path]) -> list[dict[str, Any]]:
    loaded, results = models
    prompt = [loaded.tokenizer.bos_token_id, *loaded.tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]]
    vocab = loaded.module.model.config.vocab_size
    rows = []
    for name, result in results.items():
        timing = paired_generation(
            folders["fp32"], folders[name], prompt_tokens=512, new_tokens=args.new_tokens, vocab_size=vocab,
            threads=args.threads, budget_s=args.budget_s, max_rounds=args.max_rounds,
        )  # fmt: skip
        reference = transformers_greedy(result.model.model, prompt, args.new_tokens)
        greedy = greedy_tokens(open_genai(folders[name], args.threads), prompt, args.new_tokens)
        rows.append({"variant": name, "timing": timing, "greedy_vs_transformers": agreement(reference, greedy)})
    reference = transformers_greedy(loaded.module.model, prompt, args.new_tokens)
    fp32 = greedy_tokens(open_genai(folders["fp32"], args.threads), prompt, args.new_tokens)
    rows.append({"variant": "fp32", "greedy_vs_transformers": agreement(reference, fp32)})
    return rows


def _cell(phase: dict[str, Any], side: str) -> str:
    rate = phase[side]
    low, high = rate["tok_s_ci95"] or (None, None)
    return f"{rate['tok_s']:.1f} [{low:.1f}, {high:.1f}]" if low is not None else f"{rate['tok_s']:.1f}"


def table(rows: list[dict[str, Any]], sizes: dict[str, float]) -> dict[str, Any]:
    out = []
    for row in (r for r in rows if "timing" in r):
        prefill, decode = row["timing"]["prefill"], row["timing"]["decode"]
        out.append(
            [
                VARIANTS[row["variant"]][2],
                _cell(prefill, "original"), _cell(prefill, "compressed"),
                f"{prefill['speedup']:.2f} [{prefill['speedup_ci95'][0]:.2f}, {prefill['speedup_ci95'][1]:.2f}]",
                _cell(decode, "original"), _cell(decode, "compressed"),
                f"{decode['speedup']:.2f} [{decode['speedup_ci95'][0]:.2f}, {decode['speedup_ci95'][1]:.2f}]",
                f"{sizes['fp32']:.0f} → {sizes[row['variant']]:.0f}",
                row["greedy_vs_transformers"]["equal"],
            ]
        )  # fmt: skip
    columns = ["compressed model", "prefill tok/s fp32", "prefill tok/s W4", "prefill speedup"]
    columns += ["decode tok/s fp32", "decode tok/s W4", "decode speedup", "ONNX MB", "greedy = transformers"]
    return {"columns": columns, "rows": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemma", type=Path, default=Path("/work/cache/gemma3-270m"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=20.0)
    parser.add_argument("--max-rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genai_bench_") as work:
        models, folders, record = build(args, Path(work))
        rows = measure(args, models, folders)
        sizes = {name: folder_mb(folder) for name, folder in folders.items()}
    data = {
        "model": "Gemma-3-270M (fp32 dequantized from the Q4_K_M GGUF, benchmarks/gemma_cache.py)",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/genai.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} intra-op threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "build": record,
        "rows": rows,
        "sizes_mb": sizes,
        "table": table(rows, sizes),
        "total_s": time.perf_counter() - started,
    }
    RESULTS.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(json.dumps(data["table"], indent=2))


if __name__ == "__main__":
    main()
