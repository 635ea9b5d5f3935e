"""Per-layer, per-bit-width sensitivity (MixDQ-style, metric-decoupled), measured one layer at a time.

For each layer and candidate width the layer's weight is swapped for its quantized version (every other
layer float), the model runs on a bounded set of calibration samples, and each output metric is measured
against the float outputs SEPARATELY: output SQNR (dB), KL(float || quantized) over the last axis,
top-1 agreement, cosine, and accuracy when labels exist. The metrics are only combined later
(`combine_sensitivity`): each becomes an additive damage (relative noise power 10^(-SQNR/10), KL, task
drop), is normalized by its total over layers at their worst width, and is weighted.

Transformer-style models (a ModuleList of chained blocks) skip recomputing the float blocks before the
layer being measured: those blocks are replaced by stubs that return recorded float outputs. The float
reference outputs and those block outputs come from one calibration pass (`capture.calibrate` with
`Outputs` and `BlockOutputs` recorders): `record_float` runs it, or mixed precision hands over the
recorders of its own single pass.
Measurements are cached per (model digest, data digest, quantizer settings) in memory and, optionally,
as one JSON file per key in a directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compression.evaluate.fidelity import sqnr_db
from compression.primitives.capture import BlockOutputs, Outputs, Recorder, calibrate
from compression.primitives.layers import get_weight_matrix, set_weight_matrix
from compression.primitives.sequential import batches_on, find_blocks
from compression.types import Batches, ProgressFn, no_progress, primary_output

Table = dict[str, dict[str, dict[str, float | None]]]
"""layer name -> str(bits) -> raw metrics (sqnr_db, kl, top1_agreement, cosine, accuracy, accuracy_ref)."""

METRICS = ("sqnr", "kl", "task")
TASK_METRICS = ("accuracy", "top1_agreement", "cosine")
CACHE_DIR_ENV = "MODELPRESS_SENSITIVITY_CACHE"
REPLAY_BYTES = 512 * 2**20


def count_samples(batches: Batches) -> int:
    return sum(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0] for batch in batches)


def split_samples(batches: Batches, first: int) -> tuple[Batches, Batches]:
    """(the first `first` rows, the rest), cutting a batch where the boundary falls inside it."""
    labelled = batches.labels is not None
    head, tail = Batches([], [] if labelled else None), Batches([], [] if labelled else None)
    seen = 0
    for index, batch in enumerate(batches.inputs):
        rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
        cut = min(max(first - seen, 0), rows)
        for part, (start, stop) in ((head, (0, cut)), (tail, (cut, rows))):
            if stop > start:
                part.inputs.append({k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
                if part.labels is not None and batches.labels is not None:
                    part.labels.append(batches.labels[index][start:stop])
        seen += rows
    return head, tail


def _hash_tensor(hasher: Any, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    hasher.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
    hasher.update(flat.view(torch.uint8).numpy().tobytes())


def digest_model(model: nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _hash_tensor(hasher, name, tensor)
    return hasher.hexdigest()


def digest_batches(batches: Batches) -> str:
    hasher = hashlib.sha256()
    for index, batch in enumerate(batches.inputs):
        for key in sorted(batch):
            if isinstance(batch[key], torch.Tensor):
                _hash_tensor(hasher, f"{index}.{key}", batch[key])
    for index, labels in enumerate(batches.labels or []):
        _hash_tensor(hasher, f"label{index}", labels)
    return hasher.hexdigest()


@torch.no_grad()
def run_outputs(model: nn.Module, batches: Batches) -> list[torch.Tensor]:
    return [primary_output(model(**batch)).float() for batch in batches]


def output_metrics(
    reference: list[torch.Tensor], outputs: list[torch.Tensor], labels: list[torch.Tensor] | None = None
) -> dict[str, float | None]:
    """Every raw metric of `outputs` against `reference` (same batches): sqnr_db, kl (mean per row, nats),
    top1_agreement and kl need a last axis of >= 2; accuracy / accuracy_ref need 2-D logits and labels."""
    ref, out = (
        torch.cat([r.reshape(-1, r.shape[-1]) for r in reference]),
        torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs]),
    )
    metrics: dict[str, float | None] = {"sqnr_db": sqnr_db(ref, out), "kl": None, "top1_agreement": None}
    metrics["cosine"] = float(F.cosine_similarity(ref.double(), out.double(), dim=-1).mean())
    if ref.shape[-1] >= 2:
        log_p, log_q = F.log_softmax(ref.double(), -1), F.log_softmax(out.double(), -1)
        metrics["kl"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        metrics["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).double().mean())
    metrics["accuracy"] = metrics["accuracy_ref"] = None
    if labels is not None and all(r.dim() == 2 for r in reference):
        target = torch.cat(labels).reshape(-1)
        if target.shape[0] == ref.shape[0]:
            metrics["accuracy"] = float((out.argmax(-1) == target).double().mean())
            metrics["accuracy_ref"] = float((ref.argmax(-1) == target).double().mean())
    return metrics


def task_drop(metrics: dict[str, float | None], task_metric: str) -> float | None:
    """How much the task metric fell versus the float model (positive = worse)."""
    value = metrics.get(task_metric)
    if value is None:
        return None
    original = metrics.get("accuracy_ref") if task_metric == "accuracy" else 1.0
    return None if original is None else original - value


def damage(metrics: dict[str, float | None], task_metric: str) -> dict[str, float]:
    """Additive, non-negative damage per metric: relative output noise power, KL, task-metric drop."""
    sqnr = metrics.get("sqnr_db")
    noise = 0.0 if sqnr is None or math.isinf(sqnr) else 10 ** (-sqnr / 10)
    drop = task_drop(metrics, task_metric)
    return {"sqnr": noise, "kl": max(metrics.get("kl") or 0.0, 0.0), "task": max(drop or 0.0, 0.0)}


class _Replay(nn.Module):
    """Stands in for a float block: returns the recorded output of the last replayed block, per batch."""

    def __init__(self, outputs: list[Any], state: dict[str, int]) -> None:
        super().__init__()
        self.outputs, self.state = outputs, state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.state["batch"]]


@dataclass
class FloatRecord:
    """The float model's outputs per batch and, for a model with repeated blocks, recorded block outputs."""

    reference: list[torch.Tensor]
    found: tuple[str, nn.ModuleList] | None = None
    records: dict[int, list[Any]] = field(default_factory=dict)


def record_float(model: nn.Module, batches: Batches, replay_bytes: int = REPLAY_BYTES) -> FloatRecord:
    """One calibration pass of the float model recording the reference outputs and replay checkpoints."""
    found = find_blocks(model)
    outputs = Outputs()
    blocks = None if found is None else BlockOutputs(found[1], list(batches), 0, replay_bytes)
    recorders: list[Recorder] = [outputs] if blocks is None else [outputs, blocks]
    calibrate(model, list(batches), recorders)
    return FloatRecord(outputs.outputs, found, {} if blocks is None else blocks.records())


class OutputRunner:
    """Runs the model on fixed batches; a layer inside block k is measured by replaying blocks < k.

    Float outputs of a few evenly spaced blocks (as many as fit in `replay_bytes`) are recorded once
    (`recorded`, else one pass of `record_float`); `outputs(layer)` stubs every block up to the last
    recorded one before the layer's block.
    """

    def __init__(
        self, model: nn.Module, batches: Batches, replay_bytes: int = REPLAY_BYTES, recorded: FloatRecord | None = None
    ) -> None:
        self.model, self.batches = model, batches
        self.state = {"batch": 0}
        recorded = recorded or record_float(model, batches, replay_bytes)
        self.reference = recorded.reference
        self.blocks_name, self.blocks, self.records = "", None, {}
        if recorded.found is None or not recorded.records:
            return  # no blocks, a block ran more or less than once per forward, or none fits: no replay
        self.blocks_name, self.blocks = recorded.found
        self.records = recorded.records
        if not self._replay_matches():
            self.blocks, self.records = None, {}

    def _replay_matches(self) -> bool:
        last = max(self.records)
        replayed = self._run_replaying(last)
        return all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(replayed, self.reference, strict=True))

    def _block_index(self, layer: str) -> int | None:
        prefix = f"{self.blocks_name}." if self.blocks_name else ""
        head, _, rest = layer.partition(prefix) if prefix else ("", "", layer)
        index = rest.split(".", 1)[0]
        return None if head or not index.isdigit() else int(index)

    def _checkpoint_for(self, layers: list[str]) -> int | None:
        """The last recorded block before every block holding one of `layers` (None: run everything)."""
        if self.blocks is None:
            return None
        indices = [self._block_index(layer) for layer in layers]
        if any(index is None for index in indices):
            return None
        before = [k for k in self.records if k < min(indices)]  # type: ignore[type-var]
        return max(before) if before else None

    @torch.no_grad()
    def _run_replaying(self, last: int) -> list[torch.Tensor]:
        assert self.blocks is not None
        originals = [self.blocks[i] for i in range(last + 1)]
        for i in range(last + 1):
            self.blocks[i] = _Replay(self.records[last], self.state)
        try:
            outputs = []
            for index, batch in enumerate(self.batches):
                self.state["batch"] = index
                outputs.append(primary_output(self.model(**batch)).float())
            return outputs
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def outputs(self, layers: list[str]) -> list[torch.Tensor]:
        """Model outputs with the current weights, given that only `layers` differ from float."""
        last = self._checkpoint_for(layers)
        return run_outputs(self.model, self.batches) if last is None else self._run_replaying(last)


QuantizedMatrixFn = Callable[[str, int], torch.Tensor]
"""(layer name, bits) -> the dequantized `[out, in_flat]` weight at those bits."""


def unit_key(names: list[str]) -> str:
    """Table key of a unit: one layer, or a tie group measured jointly."""
    return "+".join(names)


def measure_sensitivity(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Batches,
    bits: list[int],
    quantized_matrix: QuantizedMatrixFn,
    known: Table | None = None,
    progress: ProgressFn = no_progress,
    units: list[list[str]] | None = None,
    recorded: FloatRecord | None = None,
) -> tuple[Table, int]:
    """Raw metrics per (unit, bits) for the entries `known` lacks; returns (full table, entries measured).

    A unit is one layer or a tie group (layers that always share a width are quantized together, so the
    measurement includes their interaction, e.g. q and k of one attention). Default: one unit per layer.
    The model's weights are restored exactly after each measurement. `recorded`: what a calibration
    pass already recorded on `batches` (then on the model's device), else `record_float` runs one."""
    groups = {unit_key(unit): unit for unit in (units or [[name] for name in layers])}
    table: Table = {key: dict((known or {}).get(key, {})) for key in groups}
    todo = [(key, b) for key in groups for b in bits if b < 16 and str(b) not in table[key]]
    if not todo:
        return table, 0
    if recorded is None:
        batches = Batches(batches_on(batches, next(model.parameters()).device), batches.labels)
    runner = OutputRunner(model, batches, recorded=recorded)
    for done, (key, b) in enumerate(todo):
        names = groups[key]
        originals = {name: get_weight_matrix(layers[name]).clone() for name in names}
        try:
            for name in names:
                set_weight_matrix(layers[name], quantized_matrix(name, b).to(originals[name].device))
            outputs = runner.outputs(names)
        finally:
            for name in names:
                set_weight_matrix(layers[name], originals[name])
        table[key][str(b)] = output_metrics(runner.reference, outputs, batches.labels)
        progress((done + 1) / len(todo), f"sensitivity: {key} at {b} bits")
    return table, len(todo)


@dataclass
class SensitivityScores:
    """Per-metric damage [layers, candidates], its normalizer, the weights used and the combined score."""

    damage: dict[str, np.ndarray]
    normalizer: dict[str, float]
    weights: dict[str, float]
    combined: np.ndarray
    task_drop: np.ndarray  # signed task-metric drop (0 where unmeasurable), for the predicted-drop budget


def _metrics_at(table: Table, key: str, b: int) -> dict[str, float | None]:
    return {} if b >= 16 else table[key][str(b)]


def combine_sensitivity(
    table: Table,
    names: list[str],
    candidates: list[int],
    weights: dict[str, float],
    task_metric: str,
    units: list[list[str]] | None = None,
) -> SensitivityScores:
    """Per-layer [layers, candidates] scores for the integer program. Each metric's damage is normalized by
    Σ_units max_bits damage (1 = every unit at its worst width), then combined with `weights`; a metric with
    no signal (all zeros) gets weight 0. A unit's damage sits on its first layer (0 on the others: tied
    layers share one choice, so the sum is the unit's)."""
    leaders = {unit[0]: unit_key(unit) for unit in (units or [[name] for name in names])}
    per_metric = {m: np.zeros((len(names), len(candidates))) for m in METRICS}
    drops = np.zeros((len(names), len(candidates)))
    for i, name in enumerate(names):
        if name not in leaders:
            continue
        for j, b in enumerate(candidates):
            metrics = _metrics_at(table, leaders[name], b)
            for metric, value in damage(metrics, task_metric).items():
                per_metric[metric][i, j] = value
            drops[i, j] = task_drop(metrics, task_metric) or 0.0
    normalizer = {m: float(per_metric[m].max(axis=1).sum()) for m in METRICS}
    used = {m: (weights.get(m, 0.0) if normalizer[m] > 0 else 0.0) for m in METRICS}
    combined = np.zeros((len(names), len(candidates)))
    for metric in METRICS:
        if used[metric] > 0:
            combined += (used[metric] / normalizer[metric]) * per_metric[metric]
    return SensitivityScores(per_metric, normalizer, used, combined, drops)


class SensitivityCache:
    """Sensitivity tables by key: in memory, plus one JSON file per key under `directory` when given."""

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.memory: dict[str, Table] = {}

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def load(self, key: str) -> Table:
        if key not in self.memory and self.directory is not None:
            path = self.directory / f"{key}.json"
            if path.is_file():
                self.memory[key] = json.loads(path.read_text())
        return {name: dict(entries) for name, entries in self.memory.get(key, {}).items()}

    def save(self, key: str, table: Table) -> None:
        self.memory[key] = {name: dict(entries) for name, entries in table.items()}
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp", delete=False) as handle:
            json.dump(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, self.directory / f"{key}.json")


DEFAULT_CACHE = SensitivityCache(os.environ.get(CACHE_DIR_ENV) or None)
"""Process-wide cache; its on-disk directory comes from $MODELPRESS_SENSITIVITY_CACHE when set."""
