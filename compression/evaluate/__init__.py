"""Metrics: output fidelity and task metric, per-layer diagnosis, ORT latency, size, FLOPs, gate."""

from compression.evaluate.diagnosis import layer_diagnosis, layer_sqnr
from compression.evaluate.fidelity import compare_outputs, metric_drop, sqnr_db
from compression.evaluate.gate import check_gate
from compression.evaluate.latency import ort_latency
from compression.evaluate.size import bits_per_weight, estimate_flops, model_size, param_count

__all__ = [
    "bits_per_weight",
    "check_gate",
    "compare_outputs",
    "estimate_flops",
    "layer_diagnosis",
    "layer_sqnr",
    "metric_drop",
    "model_size",
    "ort_latency",
    "param_count",
    "sqnr_db",
]
