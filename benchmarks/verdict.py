"""Can the verdict be trusted? The same job run five times, and what its report claims checked.

    .venv/bin/python benchmarks/verdict.py --part latency

The job: the Fashion-MNIST ResNet ONNX from compression/zoo, quant_rtn W4 per-channel, 512 train images
for calibration and 2,000 test images for evaluation, run through `compression.job.run_job` with the
worker's default timing settings (ORT intra-op threads min(4, cores); timing budget 10 s per model and
batch size unless `--budget-s` says otherwise).

Parts (each writes its own section of benchmarks/results/verdict.json and keeps the others):
- `latency`: each run's speedup, 95% interval and `significant` flag per batch size, and whether the
  five intervals overlap (a speedup that is a result, not noise, reproduces within its interval).
- `metrics`: reported vs re-measured artifact metrics. Each run's shipped ONNX (and the original ONNX the
  job measured it against) is loaded here with a plain ONNX Runtime session of our own, its top-1 accuracy
  re-measured on the 2,000 evaluation images, and compared with the report's `fidelity.metric`; beside it
  the report's PyTorch cross-check and the export check's largest relative error.
"""

from __future__ import annotations

import argparse
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

RESULTS = ROOT / "benchmarks" / "results" / "verdict.json"
JOB = {"method": "quant_rtn", "config": {"bits": 4, "group_size": None}}


def job_inputs(tmp: Path) -> tuple[Path, Path, Path]:
    """The ResNet ONNX, 512 train images (calibration) and 2,000 test images (evaluation) as .npz."""
    from compression.zoo import fmnist_resnet

    onnx_path = fmnist_resnet.export_fmnist_onnx(tmp / "resnet.onnx")
    paths = []
    for split, limit in (("train", 512), ("test", 2000)):
        images, labels = fmnist_resnet.load_fashion_mnist(split, limit=limit)
        paths.append(tmp / f"fmnist_{split}.npz")
        np.savez(paths[-1], input=images.numpy(), labels=labels.numpy())
    return onnx_path, paths[0], paths[1]


def run_jobs(runs: int, tmp: Path, budget_s: float) -> list[dict[str, Any]]:
    """The same job `runs` times; each run's report and artifact paths."""
    from compression.job import JobSpec, run_job

    model, calibration, evaluation = job_inputs(tmp)
    outputs = []
    for index in range(runs):
        spec = JobSpec(
            model_path=model,
            calibration_path=calibration,
            evaluation_path=evaluation,
            gate={"max_metric_drop": 0.02},
            work_dir=tmp / f"run{index}",
            benchmark_budget_s=budget_s,
            **JOB,
        )
        started = time.perf_counter()
        output = run_job(spec, progress=lambda *_: None, should_cancel=lambda: False)
        seconds = time.perf_counter() - started
        timings = {stage: round(s, 1) for stage, s in output.report["timings_s"].items()}
        print(f"run {index + 1}/{runs}: {seconds:.0f} s {timings}", flush=True)
        outputs.append(
            {
                "report": output.report,
                "artifacts": output.artifacts,
                "wall_s": round(seconds, 1),
                "budget_s": budget_s,
                "model": model,
                "evaluation": evaluation,
            }
        )
    return outputs


def intervals_overlap(intervals: list[list[float]]) -> bool:
    """Whether all intervals share a point: the largest lower bound is at most the smallest upper bound."""
    return max(low for low, _ in intervals) <= min(high for _, high in intervals)


def latency_run(output: dict[str, Any]) -> dict[str, Any]:
    latency = output["report"]["latency"]
    return {
        "by_batch": {
            batch: {
                "original_ms": latency["original"]["batches"][batch]["median_ms"],
                "compressed_ms": latency["compressed"]["batches"][batch]["median_ms"],
                "speedup": row["speedup"],
                "speedup_ci95": row["speedup_ci95"],
                "significant": row["significant"],
                "rounds": row["rounds"],
            }
            for batch, row in latency["by_batch"].items()
        },
        "threads": latency["threads"],
        "load": latency["load"],
        "wall_s": output["wall_s"],
    }


def latency_part(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [latency_run(output) for output in outputs]
    batches = sorted(runs[0]["by_batch"], key=int)
    overlap = {b: intervals_overlap([r["by_batch"][b]["speedup_ci95"] for r in runs]) for b in batches}
    table = latency_table(runs, batches)
    return {"job": JOB, "budget_s": outputs[0]["budget_s"], "runs": runs, "intervals_overlap": overlap, "table": table}


def latency_table(runs: list[dict[str, Any]], batches: list[str]) -> dict[str, Any]:
    columns = ["run", "batch", "original ms", "compressed ms", "speedup", "95% interval", "significant", "rounds"]
    columns.append("load 1m start/end")
    rows = []
    for index, run in enumerate(runs, start=1):
        load = run["load"]
        for batch in batches:
            row = run["by_batch"][batch]
            low, high = row["speedup_ci95"]
            rows.append(
                [
                    index,
                    batch,
                    round(row["original_ms"], 4),
                    round(row["compressed_ms"], 4),
                    round(row["speedup"], 3),
                    f"[{low:.3f}, {high:.3f}]",
                    row["significant"],
                    row["rounds"],
                    f"{load['load_1m_start']:.1f} / {load['load_1m_end']:.1f} ({load['cores']} cores)",
                ]
            )
    return {"columns": columns, "rows": rows}


def onnx_accuracy(onnx_path: Path, evaluation: Path, input_name: str) -> float:
    """Top-1 accuracy of an ONNX file on a labelled .npz, with a plain CPU session (nothing from the job)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with np.load(evaluation) as data:
        images, labels = data[input_name], data["labels"]
    logits = np.concatenate(
        [session.run(None, {input_name: images[i : i + 256]})[0] for i in range(0, len(images), 256)]
    )
    return float((logits.argmax(1) == labels).mean())


def metrics_run(output: dict[str, Any]) -> dict[str, Any]:
    report = output["report"]
    name = report["model"]["inputs"][0]["name"]
    metric, cross = report["fidelity"]["metric"], report["fidelity"]["cross_check"]["metric"]
    remeasured = {
        "original": onnx_accuracy(output["model"], output["evaluation"], name),
        "compressed": onnx_accuracy(output["artifacts"]["onnx"], output["evaluation"], name),
    }
    return {
        "measured_on": report["fidelity"]["measured_on"],
        "samples": report["fidelity"]["samples"],
        "reported": {k: metric[k] for k in ("original", "compressed", "drop")},
        "remeasured": {**remeasured, "drop": remeasured["original"] - remeasured["compressed"]},
        "torch_cross_check": {k: cross[k] for k in ("original", "compressed", "drop")},
        "export_check": {k: report["export_check"].get(k) for k in ("passed", "worst_rel_error", "tolerance")},
        "verdict": (report.get("gate") or {}).get("verdict"),
    }


def metrics_part(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [metrics_run(output) for output in outputs]
    columns = ["run", "measured on", "samples", "reported orig / comp", "re-measured orig / comp", "difference"]
    columns += ["PyTorch cross-check orig / comp", "export check max rel. error", "verdict"]
    rows = []
    for index, run in enumerate(runs, start=1):
        reported, again, cross = run["reported"], run["remeasured"], run["torch_cross_check"]
        difference = max(abs(reported[k] - again[k]) for k in ("original", "compressed"))
        rows.append(
            [
                index,
                run["measured_on"],
                run["samples"],
                f"{reported['original']:.4f} / {reported['compressed']:.4f}",
                f"{again['original']:.4f} / {again['compressed']:.4f}",
                difference,
                f"{cross['original']:.4f} / {cross['compressed']:.4f}",
                f"{run['export_check']['worst_rel_error']:.1e}",
                run["verdict"],
            ]
        )
    agree = all(row[5] == 0 for row in rows)
    head = (
        "Reported vs re-measured top-1 accuracy of the shipped artifacts (each run's ONNX files loaded with a "
        "session of the benchmark's own, on the same evaluation images); every run identical: "
        f"{'yes' if agree else 'no'}."
    )
    return {"job": JOB, "runs": runs, "all_identical": agree, "head": head, "table": {"columns": columns, "rows": rows}}


# A part: a function (the runs' outputs) -> its section of verdict.json, with a `table` for the README.
PARTS = {"latency": latency_part, "metrics": metrics_part}


def save(sections: dict[str, Any], runs: int) -> None:
    """Write the parts that ran; other parts' sections and the readings (`notes`, written by a person) stay."""
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    payload = {
        **earlier,
        "benchmark": "verdict",
        "command": " ".join(["benchmarks/verdict.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs",
        "runs": runs,
        **sections,
        "notes": earlier.get("notes", []),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), action="append", help="default: every part")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=10.0, help="ORT timing budget per model and batch size")
    args = parser.parse_args()
    parts = args.part or sorted(PARTS)
    with tempfile.TemporaryDirectory(prefix="modelpress-verdict-") as name:
        outputs = run_jobs(args.runs, Path(name), args.budget_s)
        sections = {part: PARTS[part](outputs) for part in parts}
    save(sections, args.runs)
    print(json.dumps({part: section.get("table") for part, section in sections.items()}, indent=1))


if __name__ == "__main__":
    main()
