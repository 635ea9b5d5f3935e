"""One quantized Linear in ONNX Runtime (CPU): fp32 MatMul vs the export's W4 and W2 forms, by zero-point form and
accuracy_level, at 1 token and 128 tokens.

Variants at each (N, K), W4 with groups of 32 and 64 and W2 g64: the MatMulNBits forms of the three zero-point
modes the quantizers emit (`zero_point` float: ORT's default zero point plus the float-Z subgraph, or float zero
points as a MatMulNBits input; integer: packed uint8 zero points; none: symmetric, no zero points), each at
accuracy_level 0 (fp32 activations) and 4 (int8). Which form the export writes is
`compression.io.onnx_rewrite.matmul_nbits_nodes`' rule (decided from these rows).
Each variant is timed against the fp32 MatMul with `compression.evaluate.latency.paired_latency` (the job's
helper: both sessions in one process, calls interleaved round by round, intra-op spinning off, bootstrap 95%
interval of the ratio of medians). `speedup` = fp32 median / variant median; `error` = max |ORT − reference| /
max |reference| against the dequantized weights' float64 matmul.

    .venv/bin/python benchmarks/matmul_nbits.py [--budget 0.4] [--threads 1]

Writes benchmarks/results/matmul_nbits.json (with a `table` and `notes` for the README).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compression.evaluate.latency import load_average, paired_latency  # noqa: E402
from compression.io.onnx_rewrite import matmul_nbits_nodes  # noqa: E402
from compression.methods.quant_rtn import rtn_quantize  # noqa: E402
from compression.types import QuantizedLayer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "matmul_nbits.json"
SHAPES = [(1536, 384), (2048, 640), (640, 2048)]  # MiniLM FFN up; Gemma-3-270M MLP up and down
SETTINGS = ((4, 32), (4, 64), (2, 64))  # (bits, group_size)
TOKENS = (1, 128)
FORMS = {  # name -> (quantizer zero_point, float zero points as a MatMulNBits input)
    "float Z (zero-term subgraph)": ("float", False),
    "float zero points input": ("float", True),
    "integer zero points (uint8)": ("integer", False),
    "symmetric (no zero points)": ("none", False),
}


def layer_for(n: int, k: int, bits: int, group: int, zero_point: str) -> QuantizedLayer:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scales, zeros = rtn_quantize(weight, bits, group, zero_point)
    return QuantizedLayer("w", "linear", bits, group, codes, scales, zeros, (n, k))


def save_model(path: Path, nodes: list, inits: list, k: int) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    path.write_bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())
    return path


def variant_path(work: Path, layer: QuantizedLayer, level: int, float_points: bool | None) -> Path:
    graph = matmul_nbits_nodes(layer, "A", "Y", "q", accuracy_level=level, use_float_zero_points=float_points)
    name = f"{layer.zero_point_kind()}-{float_points}-{level}-{layer.bits}-{layer.group_size}.onnx"
    return save_model(work / name, graph.nodes, graph.initializers, layer.codes.shape[1])


def relative_error(path: Path, a: np.ndarray, reference: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"A": a})[0]
    return float(np.abs(out - reference).max() / np.abs(reference).max())


def compare(fp32: Path, path: Path, a: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    return paired_latency(
        fp32, path, {"A": a}, threads=args.threads, batch_sizes=TOKENS, budget_s=args.budget, prefer_cuda=False
    )


def shape_rows(work: Path, n: int, k: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    a = np.random.default_rng(0).standard_normal((max(TOKENS), k)).astype(np.float32)
    for bits, group in SETTINGS:
        for form, (zero_point, float_points) in FORMS.items():
            layer = layer_for(n, k, bits, group, zero_point)
            weight = layer.dequantize().numpy()
            matmul = [helper.make_node("MatMul", ["A", "W"], ["Y"])]
            weight_t = [numpy_helper.from_array(np.ascontiguousarray(weight.T), "W")]
            fp32 = save_model(work / f"fp32-{bits}-{group}-{zero_point}.onnx", matmul, weight_t, k)
            reference = a.astype(np.float64) @ weight.T.astype(np.float64)
            for level in (0, 4):
                path = variant_path(work, layer, level, float_points)
                timed = compare(fp32, path, a, args)
                error = relative_error(path, a, reference)
                for tokens in TOKENS:
                    key = str(tokens)
                    row = {"N": n, "K": k, "tokens": tokens, "weights": f"W{bits} g{group}", "form": form}
                    row |= {"level": level, "median_ms": timed["compressed"]["batches"][key]["median_ms"]}
                    row |= {"fp32_ms": timed["original"]["batches"][key]["median_ms"], "error": error}
                    interval = timed["by_batch"][key]
                    row |= {"speedup": interval["speedup"], "ci95": interval["speedup_ci95"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = ["N×K", "tokens", "weights", "zero points", "accuracy_level", "median ms", "fp32 ms", "speedup vs fp32"]
    columns += ["95% interval", "error"]
    order = sorted(rows, key=lambda r: (r["N"], r["K"], r["tokens"], r["weights"], list(FORMS).index(r["form"])))
    body = [
        [f"{r['N']}×{r['K']}", r["tokens"], r["weights"], r["form"], r["level"], round(r["median_ms"], 4),
         round(r["fp32_ms"], 4), round(r["speedup"], 2), f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}",
         f"{r['error']:.1e}"]
        for r in order
    ]  # fmt: skip
    return {"columns": columns, "rows": body}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.4, help="timing seconds per model, variant and token count")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    started, load_start = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="matmul-nbits-") as work:
        rows = [row for n, k in SHAPES for row in shape_rows(Path(work), n, k, args)]
    payload = {
        "benchmark": "matmul_nbits",
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "budget_s": args.budget,
        "load_1m": [load_start, load_average()],
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "table": table(rows),
        "notes": [],
    }
    if RESULTS.exists():  # notes are written by hand after reading the numbers; keep them across reruns
        payload["notes"] = json.loads(RESULTS.read_text()).get("notes", [])
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
