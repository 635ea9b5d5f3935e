"""The job pipeline's view of `prune_structured`: a latency target is measured by exporting each
candidate and timing it in ONNX Runtime, and the pre-flight checks the dependency graph."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compression.configs import PruneStructuredConfig
from compression.errors import CompressionError
from compression.evaluate import ort_latency
from compression.io import LoadedModel
from compression.io.export import write_onnx
from compression.methods.prune_structured import compress, prune_structured
from compression.methods.spec import MethodRun, MethodSpec
from compression.pipeline.context import check, example
from compression.pipeline.data import latency_batches
from compression.primitives import depgraph
from compression.primitives.layers import matches_any
from compression.types import Batches, CompressionResult


def ort_latency_probe(run: MethodRun, calib: Batches) -> Callable[[nn.Module], float]:
    """measure_latency(model) for a latency target: export the candidate and time it in ONNX Runtime
    at its largest batch, the same way the benchmark stage times the shipped model."""
    small = example(calib, 8)
    batch = max(latency_batches(run.loaded, run.job.seq_len))
    feeds = {name: t.numpy() for name, t in example(calib, batch).items()}
    counter = iter(range(10**6))

    def measure(model: nn.Module) -> float:
        path = run.job.work_dir / f"latency_probe_{next(counter)}.onnx"
        write_onnx(CompressionResult(model=model, method="probe"), run.loaded, path, small)
        budget = min(2.0, run.job.benchmark_budget_s)
        # best of two medians: the first session on a busy machine often runs cold
        runs = [ort_latency(path, feeds, batch_sizes=(batch,), budget_s=budget) for _ in range(2)]
        path.unlink(missing_ok=True)
        return min(next(iter(r["batches"].values()))["median_ms"] for r in runs) / 1000.0

    return measure


def run_with_latency_probe(run: MethodRun) -> CompressionResult | None:
    """A latency target with data prunes against ONNX Runtime timings; anything else runs plainly (None)."""
    if run.config.target.metric != "latency" or run.calib is None:
        return None
    probe = ort_latency_probe(run, run.calib)
    return prune_structured(run.loaded.module, run.calib, run.config, measure_latency=probe, progress=run.progress)


def dependency_check(loaded: LoadedModel, sample: Batches, config: PruneStructuredConfig) -> dict[str, Any]:
    """Trace the dependency graph now, and for CNNs remove one channel of every group from a copy and run
    it, so a model with hard-coded channel counts fails in the pre-flight, not in the worker."""

    def protected(name: str) -> bool:
        return matches_any(name, config.skip_layers)

    try:
        if depgraph.build_transformer_groups(loaded.module, protected) is not None:
            return check("dependency_graph", True, "attention heads and MLP neurons found")
        trial = copy.deepcopy(loaded.module)
        scan = depgraph.build_cnn_groups(trial, sample.inputs[0], protected)
        for group in scan.groups:
            depgraph.prune_group(trial, group, [0])
        _trial_forward(trial, sample.inputs[0])
    except CompressionError as error:
        return check("dependency_graph", False, f"{error.code}: {error.message}")
    ok = bool(scan.groups)
    message = f"{len(scan.groups)} prunable channel groups" if ok else "nothing_to_prune: no prunable channel group"
    return check("dependency_graph", ok, message)


def _trial_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    failed: list[str] = []

    def remember(name: str) -> Callable[..., None]:
        return lambda *_: failed.append(name)

    hooks = [m.register_forward_pre_hook(remember(n)) for n, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(**batch)
    except Exception as error:
        where = failed[-1] if failed else "the model"
        raise CompressionError(
            "untraceable_model",
            f"removing one channel per group breaks module {where!r}: {error} (an operator with a fixed channel "
            "count, such as a hard-coded Reshape or channel shuffle); add it to skip_layers or use quantization",
        ) from error
    finally:
        for hook in hooks:
            hook.remove()


SPEC = MethodSpec(
    config_class=PruneStructuredConfig,
    compress=compress,
    cost=6.0,
    run=run_with_latency_probe,
    preflight_checks=(dependency_check,),
)
