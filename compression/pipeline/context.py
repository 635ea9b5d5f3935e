"""What every stage shares: the job's request (`JobSpec`), its result, its failure, stage progress."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from compression import registry
from compression.archives import ArchiveLimits
from compression.configs import MethodConfigBase
from compression.pipeline.resources import StageMemory
from compression.types import Batches

ProgressCallback = Callable[[str, float, str], None]
STAGES: dict[str, tuple[float, float]] = {
    "load": (0.0, 0.10),
    "compress": (0.10, 0.65),
    "export": (0.65, 0.78),
    "evaluate": (0.78, 0.90),
    "benchmark": (0.90, 1.0),
}


@dataclass
class JobSpec:
    model_path: Path
    method: str
    config: dict
    calibration_path: Path | None
    evaluation_path: Path | None
    gate: dict | None
    work_dir: Path
    device: str = "cpu"
    calibration_samples: int = 512
    evaluation_samples: int = 10_000
    batch_size: int = 64
    seq_len: int = 512
    benchmark_repeats: int = 2000  # most interleaved rounds (one call of each model) per batch size
    benchmark_budget_s: float = 10.0  # wall-time cap per model and batch size; rounds shrink to fit
    benchmark_threads: int | None = None  # ORT intra-op threads for timing; None: min(4, cores)
    max_memory_bytes: int | None = None  # the worker's per-job limit: a larger pre-flight estimate is refused
    archive_limits: ArchiveLimits = field(default_factory=ArchiveLimits)  # uploads unpack within these
    # The datasets' ids and content hashes: one dataset given for both roles is split, not reused.
    calibration_id: str | None = None
    evaluation_id: str | None = None
    calibration_sha256: str | None = None
    evaluation_sha256: str | None = None


@dataclass
class JobOutput:
    report: dict
    artifacts: dict[str, Path] = field(default_factory=dict)


class JobError(Exception):
    """A job failed for a stated reason: `code` is stable (API error bodies), `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Stages:
    """Maps a stage's own 0..1 progress onto the job's, honours cancellation at every report, and records
    each stage's wall time (`timings`) and peak memory (`memory`)."""

    def __init__(self, progress: ProgressCallback, should_cancel: Callable[[], bool]) -> None:
        self.progress, self.should_cancel = progress, should_cancel
        self.timings: dict[str, float] = {}
        self.memory = StageMemory()
        self._stage, self._started = "load", time.perf_counter()

    def start(self, stage: str, message: str) -> None:
        self.check_cancel()
        self._stage, self._started = stage, time.perf_counter()
        self.memory.start()
        self.report(0.0, message)

    def end(self) -> None:
        self.timings[self._stage] = round(time.perf_counter() - self._started, 3)
        self.memory.end(self._stage)

    def report(self, fraction: float, message: str) -> None:
        self.check_cancel()
        low, high = STAGES[self._stage]
        self.progress(self._stage, low + (high - low) * min(max(fraction, 0.0), 1.0), message)

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise JobError("cancelled", f"cancelled during {self._stage}")


def json_safe(value: Any) -> Any:
    """Report values JSON can carry: tensors to lists, paths to str, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist() if value.numel() > 1 else value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def check(name: str, ok: bool, message: str) -> dict[str, Any]:
    """One pre-flight check as the API returns it."""
    return {"name": name, "ok": bool(ok), "message": message}


def to_device(batches: Batches | None, device: str) -> Batches | None:
    if batches is None or device == "cpu":
        return batches
    moved = [{k: v.to(device) for k, v in b.items()} for b in batches.inputs]
    return Batches(inputs=moved, labels=[t.to(device) for t in batches.labels] if batches.labels else None)


def example(batches: Batches, rows: int = 8) -> dict[str, torch.Tensor]:
    """The first `rows` rows of the first batch, on the CPU (export and ONNX Runtime feeds)."""
    return {name: tensor[:rows].cpu() for name, tensor in batches.inputs[0].items()}


def parse(method: str, config: dict) -> MethodConfigBase:
    try:
        return registry.parse_config(method, config)
    except KeyError as error:
        raise JobError("unknown_method", f"unknown method {method!r}; known: {registry.known_methods()}") from error
    except ValidationError as error:
        raise JobError("invalid_config", str(error)) from error
