"""One quantized Linear in ONNX Runtime (CPU, 1 thread): fp32 MatMul vs the export's 2/4-bit forms.

Variants at each (N, K, tokens): fp32 MatMul; MatMulNBits with the default zero point plus the float-Z
correction subgraph; MatMulNBits with float zero points; each at accuracy_level 0 (fp32 activations) and 4
(int8); the in-graph dequantize subgraph that ORT constant-folds ("option A"). Medians of ~1.5 s per
variant, all in one process side by side; `error` = max |ORT − reference| / max |reference|.
Decides compression.io.onnx_rewrite.FLOAT_ZERO_POINT_BITS.

    .venv/bin/python benchmarks/matmul_nbits.py

Writes benchmarks/results/matmul_nbits.json (with a `table` for the README).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compression.io.onnx_rewrite import dequant_weight_nodes, matmul_nbits_nodes  # noqa: E402
from compression.primitives.quant import dequantize  # noqa: E402
from compression.types import QuantizedLayer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "matmul_nbits.json"
SHAPES = [(1536, 384, 128), (2048, 640, 128), (640, 2048, 128), (2048, 640, 1)]  # MiniLM FFN, Gemma MLP


def random_layer(n: int, k: int, bits: int, group: int) -> QuantizedLayer:
    generator = torch.Generator().manual_seed(0)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (n, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(n, k // group, generator=generator) * 0.01 + 0.001
    zeros = torch.randn(n, k // group, generator=generator) * 0.001
    return QuantizedLayer("w", "linear", bits, group, codes, scales, zeros, (n, k))


def model_bytes(nodes: list, inits: list, k: int) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def median_ms(blob: bytes, a: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        out = session.run(None, {"A": a})[0]
    times, end = [], time.perf_counter() + 1.5
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, float(np.abs(out - reference).max() / np.abs(reference).max())


def variants(layer: QuantizedLayer, k: int, n: int, weight: np.ndarray) -> dict[str, bytes]:
    fp32 = [helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(weight.T.copy(), "W")]
    out = {"fp32 MatMul": model_bytes(*fp32, k)}
    for level in (0, 4):
        for zero_points in (False, True):
            graph = matmul_nbits_nodes(layer, "A", "Y", "q", accuracy_level=level, zero_points=zero_points)
            name = f"MatMulNBits {'float zero points' if zero_points else 'zero-term subgraph'} L{level}"
            out[name] = model_bytes(graph.nodes, graph.initializers, k)
    folded = dequant_weight_nodes(layer, "Wq", "d", transpose=True)
    nodes = [*folded.nodes, helper.make_node("MatMul", ["A", "Wq"], ["Y"])]
    out["dequantize subgraph (folded)"] = model_bytes(nodes, folded.initializers, k)
    return out


def main() -> None:
    rows = []
    for n, k, tokens in SHAPES:
        a = np.random.default_rng(0).standard_normal((tokens, k)).astype(np.float32)
        for bits in (2, 4):
            layer = random_layer(n, k, bits, 64)
            weight = dequantize(layer.codes, layer.scales, layer.zeros, 64).numpy()
            reference = a @ weight.T
            timed = {name: median_ms(blob, a, reference) for name, blob in variants(layer, k, n, weight).items()}
            base = timed["fp32 MatMul"][0]
            for name, (ms, error) in timed.items():
                rows.append(
                    [
                        f"N={n} K={k} tokens={tokens}",
                        f"W{bits} g64",
                        name,
                        round(ms, 4),
                        round(ms / base, 2),
                        f"{error:.1e}",
                    ]
                )
                print(rows[-1], flush=True)
    columns = ["shape", "weights", "variant", "median ms", "vs fp32", "error"]
    payload = {"benchmark": "matmul_nbits", "onnxruntime": ort.__version__, "threads": 1, "rows": rows,
               "table": {"columns": columns, "rows": rows}}  # fmt: skip
    RESULTS.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
