"""Structured pruning alone and the pipeline prune_structured -> quant_int8 through the HTTP service, with
default settings, on the Fashion-MNIST ResNet (the issue's goal: <= 1 point top-1 lost at -50% FLOPs; the
pipeline >= 2.0x ONNX Runtime latency at batch 64 with <= 1 point lost).

Starts the production deployment on this machine (PostgreSQL, Redis, `modelpress serve` = uvicorn plus a
supervised Celery worker process) and runs the installed `modelpress compress` command per job, the way a
user does: 4,096 Fashion-MNIST training images uploaded for calibration (a seeded sample, with labels),
the 10,000 test images for evaluation, gate `--max-metric-drop 0.01`. The service's own settings are the
defaults (calibration_max_samples 512, evaluation 10,000); the configs set only what the user set:

- prune_structured: {"recovery": "distillation"} (target: the default -50% FLOPs)
- pipeline: {"steps": [{"method": "prune_structured", "config": {"recovery": "distillation"}},
  {"method": "quant_int8", "config": {}}]}

Top-1 is the job's own (the shipped ONNX in ONNX Runtime, on the 10,000 test images). Latency at batch 64:
the service times batch 1 and 32; this script times the downloaded artifact against the original ONNX at
batch 64 in interleaved rounds (`compression.evaluate.latency.paired_latency`, 2 intra-op threads).

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline.py [--only prune|pipeline]

Writes benchmarks/results/pipeline.json (with a `table` for the README).
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
from app.client.demo import wait_ready  # noqa: E402 - after the path insert

RESULTS = ROOT / "benchmarks" / "results" / "pipeline.json"
MODELPRESS = Path(sys.executable).with_name("modelpress")
CALIBRATION_IMAGES = 4096
PRUNE = {"recovery": "distillation"}
CASES = {
    "prune": ("prune_structured", PRUNE),
    "pipeline": (
        "pipeline",
        {"steps": [{"method": "prune_structured", "config": PRUNE}, {"method": "quant_int8", "config": {}}]},
    ),
}


def write_data(tmp: Path) -> tuple[Path, Path, Path]:
    from compression.zoo import fmnist_resnet

    model = fmnist_resnet.export_fmnist_onnx(tmp / "fmnist_resnet.onnx")
    images, labels = fmnist_resnet.load_fashion_mnist("train")
    order = np.random.default_rng(0).permutation(len(labels))[:CALIBRATION_IMAGES]
    np.savez(tmp / "calib.npz", input=images.numpy()[order], labels=labels.numpy()[order])
    images, labels = fmnist_resnet.load_fashion_mnist("test")
    np.savez(tmp / "test.npz", input=images.numpy(), labels=labels.numpy())
    return model, tmp / "calib.npz", tmp / "test.npz"


def run_job(name: str, data: tuple[Path, Path, Path], url: str, key: str, tmp: Path) -> dict[str, Any]:
    method, config = CASES[name]
    model, calib, test = data
    out, log = tmp / f"out-{name}", tmp / f"cli-{name}.log"
    command = [
        str(MODELPRESS), "compress", str(model), "--method", method, "--config", json.dumps(config),
        "--calibration", str(calib), "--evaluation", str(test), "--max-metric-drop", "0.01",
        "--wait", "--timeout", "7200", "--out", str(out), "--url", url, "--api-key", key, "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as stream:
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - started
    print(f"{name}: exit {code} in {seconds:.0f} s", flush=True)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    result: dict[str, Any] = {"case": name, "method": method, "config": config, "exit_code": code}
    result.update(wall_s=round(seconds, 1), cli_log_tail=log.read_text().splitlines()[-15:])
    if report is not None:
        # the whole report stays readable after the run (the results keep a summary)
        (Path(tempfile.gettempdir()) / f"modelpress-pipeline-{name}-report.json").write_text(json.dumps(report))
        result["report"] = summarize(report)
        result["latency_b64"] = batch64(model, next((out / "artifacts").glob("*.onnx")), test)
    return result


def batch64(original: Path, compressed: Path, test: Path) -> dict[str, Any]:
    from compression.evaluate.latency import paired_latency

    feeds = {"input": np.load(test)["input"][:64]}
    timing = paired_latency(original, compressed, feeds, threads=2, batch_sizes=(64,), budget_s=20.0)
    return {
        "original_ms": timing["original"]["batches"]["64"]["median_ms"],
        "compressed_ms": timing["compressed"]["batches"]["64"]["median_ms"],
        "speedup": timing["by_batch"]["64"]["speedup"],
        "speedup_ci95": timing["by_batch"]["64"]["speedup_ci95"],
        "load": timing["load"],
    }


def _recovery(stats: dict[str, Any]) -> dict[str, Any] | None:
    prune = stats if "recovery" in stats else next(s["report_section"] for s in stats.get("steps", []))
    recovery = dict(prune["recovery"])
    recovery["held_out_loss"] = {k: v for k, v in recovery["held_out_loss"].items() if k != "curve"}
    return recovery | {"achieved_reduction": prune["achieved_reduction"]}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    metric, latency = report["fidelity"]["metric"], report["latency"]
    steps = report["stats"]["steps"] if report["method"] == "pipeline" else []
    return {
        "top1_original": metric["original"],
        "top1_compressed": metric["compressed"],
        "drop_points": 100 * (metric["original"] - metric["compressed"]),
        # an int8 graph has no torch layers to count: a pipeline's own record carries its pruned model's FLOPs
        "flops_per_sample": [
            report["original"]["flops_per_sample"],
            report["stats"]["flops_per_sample_after"] if steps else report["compressed"]["flops_per_sample"],
        ],
        "onnx_bytes": [report["original"]["size_bytes"], report["compressed"]["size_bytes"]],
        "service_speedup_by_batch": latency["speedup_by_batch"],
        "recovery": _recovery(report["stats"]),
        "steps": [{k: s[k] for k in ("method", "seconds", "params", "size_bytes", "flops_per_sample")} for s in steps],
        "data": {k: report["data"][k] for k in ("calibration", "method_data", "notes")},
        "timings_s": report["timings_s"],
        "gate": report["gate"],
        "variant_notes": report["variant_notes"],
    }


def table(results: list[dict[str, Any]]) -> dict[str, Any]:
    columns = [
        "job", "top-1 original → compressed", "points lost", "FLOPs removed", "distillation", "ORT b64 speedup",
        "service b1 / b32 speedup", "gate (≤ 1 point)", "job s",
    ]  # fmt: skip
    rows = []
    for result in results:
        report, b64 = result.get("report") or {}, result.get("latency_b64") or {}
        recovery, flops = report.get("recovery") or {}, report.get("flops_per_sample") or [1, 1]
        held = recovery.get("held_out_loss") or {}
        service = report.get("service_speedup_by_batch") or {}
        rows.append(
            [
                f"{result['method']} {json.dumps(result['config'])}",
                f"{report.get('top1_original', 0):.2%} → {report.get('top1_compressed', 0):.2%}",
                round(report.get("drop_points", float("nan")), 2),
                f"{1 - flops[1] / flops[0]:.1%}",
                distillation_cell(recovery, held),
                f"{b64.get('speedup', 0):.2f}x [{', '.join(f'{v:.2f}' for v in b64.get('speedup_ci95') or [])}]",
                " / ".join(f"{v:.2f}x" for v in service.values()),
                (report.get("gate") or {}).get("verdict"),
                result["wall_s"],
            ]
        )
    return {"columns": columns, "rows": rows}


def distillation_cell(recovery: dict[str, Any], held: dict[str, Any]) -> str:
    samples = recovery.get("samples") or {}
    return (
        f"{recovery.get('steps')} steps, {recovery.get('seconds', 0):.0f} s, stop: {recovery.get('stop_reason')}; "
        f"held-out KL {held.get('first', 0):.3g} → {held.get('best', 0):.3g}; "
        f"{samples.get('train')} + {samples.get('held_out')} held-out images"
    )


def deployment_env(tmp: Path, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MODELPRESS_DATA_DIR": str(tmp / "server"),
        "MODELPRESS_DATABASE_URL": database_url,
        "MODELPRESS_BROKER_URL": "redis://127.0.0.1:6379/4",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(CASES), action="append")
    parser.add_argument("--port", type=int, default=8840)
    args = parser.parse_args()
    from service import create_key, start_server

    from tests.conftest import create_postgres_database, drop_postgres_database

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-pipeline-") as name:
        tmp = Path(name)
        data = write_data(tmp)
        database = create_postgres_database()
        env = deployment_env(tmp, database)
        server = start_server(env, args.port, tmp / "server.log", 1)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_ready(url, server)
            key = create_key(env)
            for case in args.only or list(CASES):
                results.append(run_job(case, data, url, key, tmp))
                save(results, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
            drop_postgres_database(database)
    print(json.dumps(table(results), indent=1))


def save(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """This run's results; with --only, the other case's earlier result stays, and the readings (`notes`)."""
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    ran = {result["case"] for result in results}
    kept = [result for result in earlier.get("results", []) if result["case"] not in ran] if args.only else []
    results = kept + results
    payload = {
        "benchmark": "pipeline",
        "deployment": "PostgreSQL + Redis + `modelpress serve --workers 1` (uvicorn + one Celery worker process)",
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
        "table": table(results),
        "notes": earlier.get("notes", []),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
