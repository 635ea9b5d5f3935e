"""ONNX Runtime latency: median / p95 per call and throughput, on the CUDA EP when available.

`ort_latency` times one model. `paired_latency` compares two (original vs compressed) the way a speedup can
be believed: fixed thread counts, warm-up, both sessions in one process with their calls interleaved round
by round (the order alternating), and a seeded bootstrap 95% interval of the ratio of medians, resampling
whole rounds so both models see the same machine noise.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

MIN_ROUNDS = 5
MAX_ROUNDS = 2000
BOOTSTRAP_RESAMPLES = 2000
# Two ONNX Runtime sessions of the very same file differ by up to about 1% in median on CPU (memory layout,
# allocator); with thousands of rounds the bootstrap interval gets narrower than that. The reported interval
# is therefore at least this wide (relative, each side of the point): smaller differences are not attributed
# to the compression.
SESSION_RESOLUTION = 0.03
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average above this share of the cores: timings are noisier


def _providers(prefer_cuda: bool) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if prefer_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def intra_op_threads(requested: int | None) -> int:
    """The intra-op thread count a session gets: `requested`, or min(4, cores) when not given."""
    return requested if requested else min(4, os.cpu_count() or 1)


def make_session(onnx_path: Path, *, threads: int | None = None, prefer_cuda: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads(threads)
    options.inter_op_num_threads = 1
    # Two sessions alternate in one process: a pool thread of the one that just ran, spinning for more work,
    # takes a core from the other, so whichever runs second was timed slower (up to 1.6x at batch 1).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), options, providers=_providers(prefer_cuda))


def _call_ms(session: Any, feeds: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feeds)
    return (time.perf_counter() - start) * 1000


def _time_calls(session: Any, feeds: dict[str, np.ndarray], warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Per-call times in ms; repeats shrink (to >= 5) so one batch size takes about `budget_s`."""
    first = _call_ms(session, feeds) / 1000
    for _ in range(min(warmup - 1, int(0.2 * budget_s / max(first, 1e-6)))):
        session.run(None, feeds)
    repeats = max(min(repeats, int(budget_s / max(first, 1e-6))), min(repeats, 5))
    return [_call_ms(session, feeds) for _ in range(repeats)]


def batch_feeds(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first `batch` rows of every feed, tiled when the feeds hold fewer rows."""
    out = {}
    for name, array in feeds.items():
        reps = -(-batch // array.shape[0])
        tiled = np.concatenate([array] * reps, axis=0) if reps > 1 else array
        out[name] = np.ascontiguousarray(tiled[:batch])
    return out


def _batch_row(times: list[float] | np.ndarray, batch: int) -> dict[str, Any]:
    median = float(statistics.median(times))
    return {
        "median_ms": median,
        "p95_ms": float(np.percentile(times, 95)),
        "throughput_per_s": batch * 1000.0 / median if median > 0 else None,
        "repeats": len(times),
    }


def _batch_sizes(sessions: list[Any], wanted: tuple[int, ...]) -> tuple[int, ...]:
    """A model exported with a static batch dimension is timed at that batch size only."""
    static = {i.shape[0] for s in sessions for i in s.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    return tuple(sorted(static)) if static else wanted


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
    """Latency of `onnx_path` at each batch size: {provider, threads, batches: {"1": {...}, "32": {...}}}."""
    session = make_session(onnx_path, threads=threads, prefer_cuda=prefer_cuda)
    results = {}
    for batch in _batch_sizes([session], batch_sizes):
        times = _time_calls(session, batch_feeds(feeds, batch), warmup, repeats, budget_s)
        results[str(batch)] = _batch_row(times, batch)
    return {"provider": session.get_providers()[0], "threads": intra_op_threads(threads), "batches": results}


def bootstrap_ratio_ci(
    original_ms: np.ndarray, compressed_ms: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(original) / median(compressed), rounds resampled as pairs."""
    rng = np.random.default_rng(seed)
    rounds = rng.integers(0, len(original_ms), size=(resamples, len(original_ms)))
    ratios = np.median(original_ms[rounds], axis=1) / np.median(compressed_ms[rounds], axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)


def _interleaved(sessions: tuple[Any, Any], feeds: dict[str, np.ndarray], rounds: int) -> np.ndarray:
    """(rounds, 2) call times in ms; even rounds run original first, odd rounds compressed first."""
    times = np.empty((rounds, 2))
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for side in order:
            times[r, side] = _call_ms(sessions[side], feeds)
    return times


def _warm_up(sessions: tuple[Any, Any], feeds: dict[str, np.ndarray], warmup: int, budget_s: float) -> float:
    """Seconds one round (a call of each) takes, after up to `warmup` rounds within a fifth of the budget."""
    spent = _interleaved(sessions, feeds, 1).sum() / 1000
    done, started = 1, time.perf_counter()
    while done < warmup and time.perf_counter() - started < 0.2 * budget_s:
        spent = _interleaved(sessions, feeds, 1).sum() / 1000
        done += 1
    return max(spent, 1e-6)


def _compare_batch(sessions: tuple[Any, Any], feeds: dict[str, np.ndarray], batch: int, timing: dict) -> dict:
    round_s = _warm_up(sessions, feeds, timing["warmup"], timing["budget_s"])
    # the budget is per model and batch size: both models together get twice of it
    rounds = int(min(timing["max_rounds"], max(2 * timing["budget_s"] / round_s, MIN_ROUNDS)))
    times = _interleaved(sessions, feeds, rounds)
    speedup = float(np.median(times[:, 0]) / np.median(times[:, 1]))
    boot = bootstrap_ratio_ci(times[:, 0], times[:, 1], seed=timing["seed"])
    low, high = min(boot[0], speedup / (1 + SESSION_RESOLUTION)), max(boot[1], speedup * (1 + SESSION_RESOLUTION))
    interval = {"speedup": speedup, "speedup_ci95": [low, high], "significant": not low <= 1.0 <= high}
    return {
        "original": _batch_row(times[:, 0], batch),
        "compressed": _batch_row(times[:, 1], batch),
        "interval": {**interval, "bootstrap_ci95": list(boot)},
        "rounds": rounds,
    }


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None  # no load average on this platform


def _load_text(load: float | None) -> str:
    return "unknown" if load is None else f"{load:.1f}"


def busy_note(load_start: float | None, load_end: float | None, cores: int) -> str | None:
    """A note when the 1-minute load average at start or end was above half the cores (noisier timings)."""
    loads = [x for x in (load_start, load_end) if x is not None]
    if not loads or max(loads) <= BUSY_LOAD_PER_CORE * cores:
        return None
    return (
        f"the machine was busy while timing (1-minute load average {_load_text(load_start)} at start, "
        f"{_load_text(load_end)} at end, on {cores} cores): latencies are noisier and the speedup intervals wider"
    )


def _load_section(load_start: float | None, load_end: float | None) -> tuple[dict[str, Any], str | None]:
    cores = os.cpu_count() or 1
    note = busy_note(load_start, load_end, cores)
    return {"cores": cores, "load_1m_start": load_start, "load_1m_end": load_end, "busy": note is not None}, note


def _side(session: Any, threads: int, rows: dict[str, dict]) -> dict[str, Any]:
    return {"provider": session.get_providers()[0], "threads": threads, "batches": rows}


def paired_latency(
    original: Path | Any,
    compressed: Path | Any,
    feeds: dict[str, np.ndarray],
    *,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    warmup: int = 5,
    budget_s: float = 10.0,
    max_rounds: int = MAX_ROUNDS,
    seed: int = 0,
    prefer_cuda: bool = True,
) -> dict[str, Any]:
    """Both models timed in interleaved rounds; the report's `latency` section. `original` and `compressed`
    are ONNX paths, or ORT sessions already open (the job times the sessions it measured the metric with).

    {original, compressed: {provider, threads, batches}, speedup_by_batch: {batch: ratio of medians},
    by_batch: {batch: {speedup, speedup_ci95: [lo, hi], significant, rounds}}, speedup / speedup_ci95 /
    significant (the smallest batch), threads: {intra_op, inter_op}, load, method, notes}.
    """
    load_start, intra = load_average(), intra_op_threads(threads)
    sessions = tuple(
        make_session(p, threads=intra, prefer_cuda=prefer_cuda) if isinstance(p, str | Path) else p
        for p in (original, compressed)
    )
    timing = {"warmup": warmup, "budget_s": budget_s, "max_rounds": max_rounds, "seed": seed}
    results = {
        str(batch): _compare_batch(sessions, batch_feeds(feeds, batch), batch, timing)
        for batch in _batch_sizes(list(sessions), batch_sizes)
    }
    by_batch = {b: {**r["interval"], "rounds": r["rounds"]} for b, r in results.items()}
    first = by_batch[min(by_batch, key=int)] if by_batch else {}
    load, note = _load_section(load_start, load_average())
    return {
        "original": _side(sessions[0], intra, {b: r["original"] for b, r in results.items()}),
        "compressed": _side(sessions[1], intra, {b: r["compressed"] for b, r in results.items()}),
        "speedup_by_batch": {b: r["speedup"] for b, r in by_batch.items()},
        "by_batch": by_batch,
        "speedup": first.get("speedup"),
        "speedup_ci95": first.get("speedup_ci95"),
        "significant": first.get("significant"),
        "threads": {"intra_op": intra, "inter_op": 1},
        "load": load,
        "method": f"{warmup} warm-up rounds, then original and compressed called alternately in one process; "
        f"95% interval of the ratio of medians from {BOOTSTRAP_RESAMPLES} bootstrap resamples of the rounds "
        f"(seed {seed}), widened to at least ±{SESSION_RESOLUTION:.0%} of the point (two sessions of one "
        "file differ by about that much)",
        "notes": [note] if note else [],
    }
