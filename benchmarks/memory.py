"""Peak memory of a GPTQ W4 g128 job against model size, through the service.

Builds Llama-architecture causal LMs with random weights, all of one width (TinyLlama-1.1B's: hidden 2048,
MLP 5632, 32 heads, 4 KV heads, vocabulary 32,000) and 3 / 8 / 22 decoder layers (about 0.27 / 0.48 /
1.10 B parameters), saved as bf16 safetensors shards. Random weights are fine for memory. Starts the
embedded deployment (`modelpress serve`: uvicorn plus a supervised Celery worker; SQLite and the
filesystem broker) and runs the installed `modelpress compress --wait` per model, with a tiny calibration
and evaluation set (random token ids, `--samples` x `--seq-len`) so the CPU time stays in minutes.

A sampler thread adds up the resident memory (RSS) of every process of the server's tree every 50 ms: the
`server peak` column. The worker's own per-stage peaks come from the job's `report.resources`.

    .venv/bin/python benchmarks/memory.py                 # all three sizes
    .venv/bin/python benchmarks/memory.py --layers 3      # one size

Writes benchmarks/results/memory.json (with a `table` for the README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from app.client.demo import wait_ready  # noqa: E402 - after the path insert

RESULTS = ROOT / "benchmarks" / "results" / "memory.json"
MODELPRESS = Path(sys.executable).with_name("modelpress")
WIDTH = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4}
STAGES = ("load", "compress", "export", "evaluate", "benchmark")


def build_llama(layers: int, out: Path) -> dict[str, Any]:
    """A random-weight Llama of `layers` decoder layers, written as bf16 safetensors shards."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        **WIDTH, num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy in this process either
    try:
        model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="500MB")
    del model
    shards = sorted(out.glob("*.safetensors"))
    return {"params": params, "shards": len(shards), "bytes_on_disk": sum(p.stat().st_size for p in shards)}


def token_data(path: Path, samples: int, seq_len: int, seed: int) -> Path:
    ids = np.random.default_rng(seed).integers(3, 32000, size=(samples, seq_len), dtype=np.int64)
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    return path


class TreeSampler:
    """The summed RSS of a process and all its descendants, sampled until stopped; its peak."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.peak, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak, self.samples = max(self.peak, self.current()), self.samples + 1

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_case(model: Path, data: tuple[Path, Path], url: str, key: str, out: Path, server_pid: int) -> dict[str, Any]:
    command = [
        str(MODELPRESS), "compress", str(model), "--method", "quant_gptq",
        "--config", json.dumps({"bits": 4, "group_size": 128}), "--calibration", str(data[0]),
        "--evaluation", str(data[1]), "--wait", "--timeout", "7200",
        "--out", str(out), "--url", url, "--api-key", key, "--no-progress",
    ]  # fmt: skip
    sampler = TreeSampler(server_pid)
    idle = sampler.current()
    started = time.perf_counter()
    with sampler, (out.parent / f"{out.name}.log").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return {
        "exit_code": code,
        "wall_s": round(time.perf_counter() - started, 1),
        "server_idle_rss_bytes": idle,
        "server_peak_rss_bytes": sampler.peak,
        "samples": sampler.samples,
        "cli_log_tail": (out.parent / f"{out.name}.log").read_text().splitlines()[-8:],
        "resources": (report or {}).get("resources"),
        "timings_s": (report or {}).get("timings_s"),
        "top1_agreement": ((report or {}).get("fidelity") or {}).get("top1_agreement"),
    }


def table(results: list[dict[str, Any]]) -> dict[str, Any]:
    columns = ["model", "params (B)", "fp32 GB", "server peak GB", "x fp32", "worker peak GB (stage)"]
    columns += [f"{stage} GB" for stage in STAGES] + ["exit", "job s"]
    rows = []
    for result in sorted(results, key=lambda r: r["params"]):
        fp32 = 4 * result["params"]
        stages = ((result.get("resources") or {}).get("stages")) or {}
        resources = result.get("resources") or {}
        worker = resources.get("peak_rss_bytes")
        rows.append(
            [
                f"Llama {result['layers']} layers (random, bf16 shards)",
                round(result["params"] / 1e9, 3),
                round(fp32 / 1e9, 2),
                round(result["server_peak_rss_bytes"] / 1e9, 2),
                round(result["server_peak_rss_bytes"] / fp32, 2),
                f"{worker / 1e9:.2f} ({resources.get('peak_stage')})" if worker else None,
                *[round(stages[s]["peak_rss_bytes"] / 1e9, 2) if s in stages else None for s in STAGES],
                result["exit_code"],
                result["wall_s"],
            ]
        )
    return {"columns": columns, "rows": rows}


def deployment_env(tmp: Path, args: argparse.Namespace) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MODELPRESS_DATA_DIR": str(tmp / "server"),
        "MODELPRESS_SEQ_LEN": str(args.seq_len),
        "MODELPRESS_CALIBRATION_MAX_SAMPLES": str(args.samples),
        "MODELPRESS_EVALUATION_MAX_SAMPLES": str(args.samples),
        "MODELPRESS_BENCHMARK_BUDGET_S": "1",
        "MODELPRESS_MAX_UPLOAD_BYTES": str(8 * 2**30),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, action="append", help="decoder layers (default: 3, 8, 22)")
    parser.add_argument("--samples", type=int, default=8, help="calibration and evaluation sequences")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=8830)
    args = parser.parse_args()
    from service import create_key, start_server

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-memory-") as name:
        tmp = Path(name)
        data = (token_data(tmp / "calib.npz", args.samples, args.seq_len, 0),
                token_data(tmp / "eval.npz", args.samples, args.seq_len, 1))  # fmt: skip
        env = deployment_env(tmp, args)
        server = start_server(env, args.port, tmp / "server.log", 1)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_ready(url, server)
            key = create_key(env)
            for layers in args.layers or [3, 8, 22]:
                model = tmp / f"llama{layers}"
                built = build_llama(layers, model)
                print(f"built {layers} layers: {built}", flush=True)
                result = run_case(model, data, url, key, tmp / f"out{layers}", server.pid)
                results.append({"layers": layers, **built, **result})
                print(json.dumps(table(results)["rows"][-1]), flush=True)
                save(results, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(table(results), indent=1))


def save(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Write this run's results; sizes not rerun keep their earlier results, and the readings (`notes`) stay."""
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    ran = {result["layers"] for result in results}
    results = [r for r in earlier.get("results", []) if r["layers"] not in ran] + results
    payload = {
        "benchmark": "memory",
        "command": " ".join(["benchmarks/memory.py", *sys.argv[1:]]),
        "deployment": "`modelpress serve --workers 1` embedded (uvicorn + one Celery worker; SQLite, filesystem "
        "broker)",
        "job": f"quant_gptq bits 4 group 128; {args.samples} x {args.seq_len} random tokens for calibration and for "
        "evaluation; ONNX Runtime timing budget 1 s",
        "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, shared with other jobs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
        "table": table(results),
        "notes": earlier.get("notes", []),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
