"""Which nodes hurt under static int8, and leaving the worst of them in float.

Two passes, both on a few calibration samples and both against the float graph's outputs:

1. Screen (one run of each graph): the SQNR of every quantized weight node's output, and its drop
   from the previous quantized node's (errors accumulate down the graph; a large drop is where damage
   enters), as in `compression.evaluate.diagnosis`.
2. Exclusion test (one quantization per node, the calibration reused): the `config.diagnose` nodes
   with the largest drops are each left in float alone, and the model output's SQNR gain is measured.
   This is the number that says what skipping a node buys.

`config.auto_skip` then leaves the nodes with the largest positive gains in float.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from compression.methods.quant_int8 import Quantizer, graph_inputs, quantized_layers
from compression.types import Batches, ProgressFn

DIAGNOSIS_ROWS = 32  # calibration samples the diagnosis runs on
MIN_GAIN_DB = 0.1  # exclusion gains below this are noise, never auto-skipped


class _Energy:
    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}

    def add(self, name: str, ref: np.ndarray, out: np.ndarray) -> None:
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        self.signal[name] = self.signal.get(name, 0.0) + float((ref64**2).sum())
        self.noise[name] = self.noise.get(name, 0.0) + float(((ref64 - out64) ** 2).sum())

    def sqnr(self, name: str) -> float | None:
        if name not in self.noise:
            return None
        if self.noise[name] == 0:
            return math.inf
        return 10 * math.log10(max(self.signal[name], 1e-300) / self.noise[name])


def diagnosis_batches(calib: Batches, rows: int = DIAGNOSIS_ROWS) -> Batches:
    inputs, left = [], rows
    for batch in calib.inputs:
        if left <= 0:
            break
        inputs.append({name: tensor[:left] for name, tensor in batch.items()})
        left -= next(iter(batch.values())).shape[0]
    return Batches(inputs=inputs)


def _session(model: onnx.ModelProto, extra_outputs: list[str]) -> Any:
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {value.name for value in model.graph.output}
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in extra_outputs if name not in present
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _runs(model: onnx.ModelProto, batches: Batches, extra: list[str]) -> list[dict[str, np.ndarray]]:
    session = _session(model, extra)
    names = [output.name for output in session.get_outputs()]
    wanted = graph_inputs(model)
    results = []
    for batch in batches.inputs:
        feeds = {k: v.detach().cpu().numpy() for k, v in batch.items() if k in wanted}
        results.append(dict(zip(names, session.run(None, feeds), strict=True)))
    return results


def output_sqnr(reference: onnx.ModelProto, candidate: onnx.ModelProto, batches: Batches) -> float | None:
    """SQNR (dB) of the candidate's first output against the reference's, over `batches`."""
    energy, name = _Energy(), reference.graph.output[0].name
    for ref, out in zip(_runs(reference, batches, []), _runs(candidate, batches, []), strict=True):
        energy.add(name, ref[name], out[name])
    return energy.sqnr(name)


def node_screen(reference: onnx.ModelProto, quantized: onnx.ModelProto, batches: Batches) -> list[dict[str, Any]]:
    """Per quantized weight node (graph order): output SQNR and its drop from the previous one. A node's
    output may be renamed in the QDQ graph (a graph output gets a QuantizeLinear after it): nodes are
    matched by name, each graph's tensor read under its own name."""
    ref_tensor = {node.name: node.output[0] for node in reference.graph.node}
    nodes = [n for n in quantized.graph.node if n.name in _quantized_node_names(quantized) and n.name in ref_tensor]
    energy = _Energy()
    ref_runs = _runs(reference, batches, [ref_tensor[n.name] for n in nodes])
    out_runs = _runs(quantized, batches, [n.output[0] for n in nodes])
    for ref, out in zip(ref_runs, out_runs, strict=True):
        for node in nodes:
            want, got = ref.get(ref_tensor[node.name]), out.get(node.output[0])
            if want is not None and got is not None and want.shape == got.shape:
                energy.add(node.name, want, got)
    rows, previous = [], math.inf
    for node in nodes:
        sqnr = energy.sqnr(node.name)
        finite = sqnr is not None and math.isfinite(sqnr)
        drop = (previous - sqnr) if finite and math.isfinite(previous) else 0.0
        previous = sqnr if finite else previous
        rows.append({"node": node.name, "op_type": node.op_type, "sqnr_db": sqnr, "sqnr_drop_db": drop})
    return rows


def _quantized_node_names(model: onnx.ModelProto) -> set[str]:
    return set(quantized_layers(model, {}))


def exclusion_gains(
    quantizer: Quantizer, rows: list[dict[str, Any]], base_sqnr: float, batches: Batches, progress: ProgressFn
) -> None:
    """Fill `excluded_output_sqnr_db` and `gain_db` of the `config.diagnose` rows with the largest drops."""
    reference = onnx.load(str(quantizer.graph.path))
    chosen = sorted(rows, key=lambda r: -(r["sqnr_drop_db"] or 0.0))[: quantizer.config.diagnose]
    for index, row in enumerate(chosen):
        progress(0.5 + 0.4 * index / max(len(chosen), 1), f"exclusion test {index + 1}/{len(chosen)}: {row['node']}")
        path = quantizer.quantize([row["node"]])
        sqnr = output_sqnr(reference, onnx.load(str(path)), batches)
        path.unlink(missing_ok=True)
        row["excluded_output_sqnr_db"] = sqnr
        row["gain_db"] = (sqnr - base_sqnr) if sqnr is not None and math.isfinite(sqnr) else None


def _worst(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    gaining = [r for r in rows if (r.get("gain_db") or 0.0) >= MIN_GAIN_DB]
    return sorted(gaining, key=lambda r: -r["gain_db"])[:count]


def diagnose_and_skip(
    quantizer: Quantizer, path: Path, progress: ProgressFn
) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """(the graph to ship, the diagnosis, auto-skipped node -> reason)."""
    config = quantizer.config
    if config.diagnose == 0:
        return path, {"ran": False}, {}
    batches = diagnosis_batches(quantizer.calib)
    reference, quantized = onnx.load(str(quantizer.graph.path)), onnx.load(str(path))
    base = output_sqnr(reference, quantized, batches)
    rows = node_screen(reference, quantized, batches)
    if base is not None and math.isfinite(base):
        exclusion_gains(quantizer, rows, base, batches, progress)
    for row in rows:
        row["layer"] = quantizer.graph.modules.get(row["node"], row["node"])
    diagnosis: dict[str, Any] = {
        "ran": True,
        "samples": sum(next(iter(b.values())).shape[0] for b in batches.inputs),
        "data": "calibration",
        "output_sqnr_db": base,
        "nodes": rows,
        "suggested_skip_layers": [r["layer"] for r in _worst(rows, 5)],
    }
    skip = _worst(rows, config.auto_skip)
    if not skip:
        return path, diagnosis, {}
    path = quantizer.quantize([r["node"] for r in skip])
    diagnosis["output_sqnr_db_after_auto_skip"] = output_sqnr(reference, onnx.load(str(path)), batches)
    reasons = {r["node"]: f"auto_skip: float output SQNR +{r['gain_db']:.2f} dB when left float" for r in skip}
    return path, diagnosis, reasons
