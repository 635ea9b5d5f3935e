"""Generation speed and greedy output of onnxruntime-genai folders (decoder with a KV cache).

- prefill: tokens/s of one `append_tokens` call on a prompt (the whole prompt in one forward pass, its
  keys and values kept in the cache);
- decode: tokens/s of the `generate_next_token` steps that follow at batch 1 (one token per forward pass,
  reading the cache instead of recomputing the prompt).

`paired_generation` times the original and the compressed folder the way `latency.paired_latency` times
two ONNX files: fixed threads, spinning off, rounds alternating which model goes first, medians with a
seeded bootstrap 95% interval over rounds (per model and for the ratio, rounds resampled as pairs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compression.evaluate.latency import bootstrap_ratio_ci, intra_op_threads, load_average
from compression.evaluate.uncertainty import bootstrap_interval

MIN_ROUNDS = 3


@dataclass
class GenaiModel:
    """An og.Model and its sliding window (0: none): a window layer's cache buffer must hold the window."""

    model: Any
    window: int


def open_genai(folder: Path, threads: int | None = None) -> GenaiModel:
    """A GenAI folder on the CPU, `threads` intra-op threads, pool threads not spinning."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": intra_op_threads(threads), "inter_op_num_threads": 1}
    options["allow_spinning"] = "0"  # a string in genai_config.json
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    decoder = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
    return GenaiModel(og.Model(config), int(decoder.get("sliding_window", {}).get("window_size", 0)))


def greedy_generator(genai: GenaiModel, total_tokens: int) -> Any:
    """A greedy generator with room for `total_tokens` that never stops early at an end-of-sequence token."""
    import onnxruntime_genai as og

    length = max(total_tokens, genai.window)
    params = og.GeneratorParams(genai.model)
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    return og.Generator(genai.model, params)


def greedy_tokens(genai: GenaiModel, prompt: list[int], new_tokens: int) -> list[int]:
    """The `new_tokens` greedy tokens after `prompt`."""
    generator = greedy_generator(genai, len(prompt) + new_tokens)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    for _ in range(new_tokens):
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]]


def timed_generation(genai: GenaiModel, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds for the prompt, decode seconds for `new_tokens` single-token steps)."""
    generator = greedy_generator(genai, len(prompt) + new_tokens + 1)
    start = time.perf_counter()
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        generator.generate_next_token()
    return prefill, time.perf_counter() - start


def _rounds(
    models: tuple[GenaiModel, GenaiModel], prompt: list[int], new_tokens: int, budget_s: float, max_rounds: int
) -> np.ndarray:
    """(rounds, 2 models, 2 phases) seconds; even rounds run the original first."""
    for model in models:  # warm-up: first-call allocations and kernel selection
        timed_generation(model, prompt[: min(8, len(prompt))], 2)
    times: list[np.ndarray] = []
    started = time.perf_counter()
    while len(times) < max_rounds and (len(times) < MIN_ROUNDS or time.perf_counter() - started < 2 * budget_s):
        row = np.empty((2, 2))
        for side in (0, 1) if len(times) % 2 == 0 else (1, 0):
            row[side] = timed_generation(models[side], prompt, new_tokens)
        times.append(row)
    return np.stack(times)


def _rate(tokens: int, seconds: np.ndarray) -> dict[str, Any]:
    rates = tokens / seconds
    interval = bootstrap_interval(lambda idx: np.median(rates[idx], axis=1), len(rates))
    return {"tok_s": float(np.median(rates)), "tok_s_ci95": interval}


def _phase(tokens: int, times: np.ndarray) -> dict[str, Any]:
    """One phase's rates for both models and the speedup (ratio of median times) with its interval."""
    original, compressed = times[:, 0], times[:, 1]
    speedup = float(np.median(original) / np.median(compressed))
    return {
        "tokens": tokens,
        "original": _rate(tokens, original),
        "compressed": _rate(tokens, compressed),
        "speedup": speedup,
        "speedup_ci95": list(bootstrap_ratio_ci(original, compressed)),
    }


def paired_generation(
    original: Path,
    compressed: Path,
    *,
    prompt_tokens: int = 512,
    new_tokens: int = 32,
    vocab_size: int,
    threads: int | None = None,
    budget_s: float = 10.0,
    max_rounds: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill and decode tokens/s of both GenAI folders at batch 1: the report's `latency.generation`."""
    intra, load_start = intra_op_threads(threads), load_average()
    models = (open_genai(original, intra), open_genai(compressed, intra))
    prompt = np.random.default_rng(seed).integers(0, vocab_size, size=prompt_tokens).tolist()
    times = _rounds(models, prompt, new_tokens, budget_s, max_rounds)
    return {
        "batch": 1,
        "prefill": _phase(prompt_tokens, times[:, :, 0]),
        "decode": _phase(new_tokens, times[:, :, 1]),
        "rounds": len(times),
        "threads": {"intra_op": intra, "inter_op": 1},
        "load_1m": [load_start, load_average()],
        "method": f"onnxruntime-genai, CPU, batch 1: a {prompt_tokens}-token random prompt (seed {seed}) in one "
        f"append_tokens call (prefill), then {new_tokens} generate_next_token steps on the KV cache (decode); "
        "original and compressed alternate round by round; medians with 95% bootstrap intervals over rounds",
    }
