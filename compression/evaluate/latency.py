"""ONNX Runtime latency: median / p95 per call and throughput, on the CUDA EP when available."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _providers(prefer_cuda: bool) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if prefer_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(onnx_path: Path, *, threads: int | None = None, prefer_cuda: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=_providers(prefer_cuda))


def _time_calls(session: Any, feeds: dict[str, np.ndarray], warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Per-call times in ms; repeats shrink (to >= 5) so one batch size takes about `budget_s`."""
    start = time.perf_counter()
    session.run(None, feeds)
    first = time.perf_counter() - start
    for _ in range(min(warmup - 1, int(0.2 * budget_s / max(first, 1e-6)))):
        session.run(None, feeds)
    repeats = max(min(repeats, int(budget_s / max(first, 1e-6))), min(repeats, 5))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return times


def batch_feeds(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first `batch` rows of every feed, tiled when the feeds hold fewer rows."""
    out = {}
    for name, array in feeds.items():
        reps = -(-batch // array.shape[0])
        tiled = np.concatenate([array] * reps, axis=0) if reps > 1 else array
        out[name] = np.ascontiguousarray(tiled[:batch])
    return out


def ort_latency(
    onnx_path: Path,
    feeds: dict[str, np.ndarray],
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    prefer_cuda: bool = True,
    budget_s: float = 10.0,
) -> dict[str, Any]:
    """Latency of `onnx_path` at each batch size: {provider, threads, batches: {"1": {...}, "32": {...}}}.

    A model exported with a static batch dimension is timed at that batch size only.
    """
    session = make_session(onnx_path, threads=threads, prefer_cuda=prefer_cuda)
    static = {i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    sizes = tuple(sorted(static)) if static else batch_sizes
    results = {}
    for batch in sizes:
        times = _time_calls(session, batch_feeds(feeds, batch), warmup, repeats, budget_s)
        median = statistics.median(times)
        results[str(batch)] = {
            "median_ms": median,
            "p95_ms": float(np.percentile(times, 95)),
            "throughput_per_s": batch * 1000.0 / median if median > 0 else None,
            "repeats": len(times),
        }
    return {"provider": session.get_providers()[0], "threads": threads, "batches": results}
