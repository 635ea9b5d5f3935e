"""prune_structured: remove whole channels, attention heads and MLP neurons -> a smaller dense model.

Pipeline (`prune_structured`):
1. Find the channel groups (`primitives.depgraph`): torch_pruning's dependency graph for CNN-like models,
   the known block layout for Hugging Face transformers (heads, grouped-query attention, MLP neurons).
2. In `config.iterative_steps` steps towards the target (a channel ratio, or a FLOPs/params reduction
   measured on the model): score units (`primitives.importance`, Torch-Pruning importance objects),
   search the per-layer ratio (local) or the global score threshold that meets the step's target under
   the cost model (`primitives.prune_costs`), round every kept count to a multiple of `round_to`, cap each
   layer at `max_layer_ratio`, then remove the units: CNNs through torch_pruning's `MetaPruner` driven
   with those per-group counts, transformers through the block layout.
   A "latency" target prunes by growing FLOPs steps until `measure_latency(model)` meets it.
3. Recover (`primitives.recovery`): BatchNorm re-estimation, or bounded distillation from the original.
4. Hugging Face configs are rewritten when they can describe the result (uniform head counts with an
   explicit `head_dim`, uniform `intermediate_size`); otherwise the config keeps the original sizes plus
   the pruning history under `modelpress_pruning`, replayed by `depgraph.load_pruned_pretrained`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compression.configs import PruneStructuredConfig
from compression.errors import CompressionError
from compression.primitives import depgraph
from compression.primitives.depgraph import ChannelGroup, GroupScan
from compression.primitives.importance import Criterion, make_importance, score_groups
from compression.primitives.layers import matches_any
from compression.primitives.prune_costs import CostTable, measure_costs, removed_counts
from compression.primitives.recovery import DistillBudget, distill, recalibrate_batchnorm
from compression.types import (
    Batches,
    CompressionResult,
    ProgressFn,
    no_progress,
    primary_output,
    scaled_progress,
)

LatencyFn = Callable[[nn.Module], float]
_SEARCH_ITERATIONS = 40
_DATA_CRITERIA = ("taylor", "activation")  # scores read activations: refresh BatchNorm between steps
_STEP_RECALIBRATION_BATCHES = 8


def compress(
    model: nn.Module,
    calib: Batches | None,
    config: PruneStructuredConfig,
    *,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Registry entry point; a "latency" target is measured with eager PyTorch on the first batch."""
    return prune_structured(model, calib, config, progress=progress)


@dataclass
class _State:
    """What stays fixed across pruning steps: the baseline costs and each group's original size."""

    config: PruneStructuredConfig
    calib: Batches
    transformer: bool
    base: CostTable
    importance: Criterion
    sizes0: dict[str, int] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=depgraph.new_history)
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def example(self) -> dict[str, Any]:
        return self.calib.inputs[0]

    @property
    def global_ranking(self) -> bool:
        """config.global_pruning; unset: global for convolutional networks, per layer for transformers."""
        chosen = self.config.global_pruning
        return not self.transformer if chosen is None else chosen

    def protected(self, name: str) -> bool:
        return matches_any(name, self.config.skip_layers)

    def scan(self, model: nn.Module) -> GroupScan:
        if self.transformer:
            return depgraph.build_transformer_groups(model, self.protected) or GroupScan([], {})
        return depgraph.build_cnn_groups(model, self.example, self.protected)


def prune_structured(
    model: nn.Module,
    calib: Batches | None,
    config: PruneStructuredConfig,
    *,
    measure_latency: LatencyFn | None = None,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Structured pruning of a deep copy of `model` to `config.target`; the input is never mutated.

    `measure_latency(model) -> seconds` is used when `config.target.metric == "latency"` (the job runner
    passes an ONNX Runtime measurement); without it, eager PyTorch on the first calibration batch is timed.
    """
    progress = progress or no_progress
    if calib is None or len(calib) == 0:
        raise CompressionError("calibration_required", "prune_structured needs at least one calibration batch")
    with torch.inference_mode(False), _eval_mode(model), torch.no_grad():
        reference = primary_output(model(**calib.inputs[0]))
        work = copy.deepcopy(model).eval()
    with torch.inference_mode(False), torch.random.fork_rng():
        torch.manual_seed(config.seed)
        state, scan0 = _initial_state(work, calib, config)
        progress(0.05, f"{sum(g.size for g in scan0.groups)} prunable units in {len(scan0.groups)} groups")
        latency = _prune_to_target(work, state, measure_latency, scaled_progress(progress, 0.05, 0.7))
        _check_runs(work, calib.inputs[0], reference)
        recovery = _recover(work, model, calib, config, scaled_progress(progress, 0.7, 0.98))
    result = _result(work, model, state, scan0, recovery, latency)
    progress(1.0, "structured pruning done")
    return result


def _initial_state(work: nn.Module, calib: Batches, config: PruneStructuredConfig) -> tuple[_State, GroupScan]:
    transformer = bool(depgraph.attention_layouts(work) or depgraph.mlp_layouts(work))
    base = measure_costs(work, calib.inputs[0])
    state = _State(config, calib, transformer, base, make_importance(config.importance))
    scan = state.scan(work)
    if not scan.groups:
        raise CompressionError("nothing_to_prune", f"no prunable channel group found ({len(scan.skipped)} skipped)")
    state.sizes0 = {group.name: group.size for group in scan.groups}
    return state, scan


# ---------------------------------------------------------------- targets


def _prune_to_target(
    work: nn.Module, state: _State, measure_latency: LatencyFn | None, progress: ProgressFn
) -> dict[str, Any] | None:
    config = state.config
    if config.target.metric == "latency":
        return _prune_to_latency(work, state, measure_latency or _torch_latency(state.example), progress)
    steps = config.iterative_steps
    for k in range(1, steps + 1):
        _prune_step(work, state, config.target.metric, config.target.reduction, share=1 / (steps - k + 1))
        if k < steps and config.recovery != "none" and config.importance in _DATA_CRITERIA:
            recalibrate_batchnorm(work, state.calib, max_batches=_STEP_RECALIBRATION_BATCHES)
        progress(
            k / steps,
            f"pruning step {k}/{steps}: {state.steps[-1]['achieved']:.1%} {config.target.metric} removed",
        )
    return None


def _prune_to_latency(work: nn.Module, state: _State, measure: LatencyFn, progress: ProgressFn) -> dict[str, Any]:
    """Grow the FLOPs reduction in 10-point steps until the measured latency meets the target."""
    goal = state.config.target.reduction
    base = measure(work)
    trace = [{"flops_reduction": 0.0, "latency_s": base}]
    for tenth in range(1, 10):
        if state.steps and state.steps[-1]["achieved"] >= tenth / 10:
            continue  # rounding already took the previous step this far
        _prune_step(work, state, "flops", tenth / 10, share=1.0)
        if state.config.recovery != "none":
            recalibrate_batchnorm(work, state.calib, max_batches=_STEP_RECALIBRATION_BATCHES)
        latency = measure(work)
        trace.append({"flops_reduction": state.steps[-1]["achieved"], "latency_s": latency})
        progress(tenth / 9, f"latency {latency * 1e3:.3g} ms vs {base * 1e3:.3g} ms")
        if latency <= base * (1 - goal):
            break
    return {
        "base_s": base,
        "final_s": trace[-1]["latency_s"],
        "reached": trace[-1]["latency_s"] <= base * (1 - goal),
        "trace": trace,
    }


def _torch_latency(batch: dict[str, Any], repeats: int = 10) -> LatencyFn:
    def measure(model: nn.Module) -> float:
        times = []
        with torch.no_grad():
            model(**batch)
            for _ in range(repeats):
                start = time.perf_counter()
                model(**batch)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    return measure


def _prune_step(work: nn.Module, state: _State, metric: str, target: float, share: float) -> None:
    """One step: score units, plan the kept counts that meet `target` (a reduction vs the original) from
    the current model, go `share` of the way there (1 = all), remove the least important units."""
    scan = state.scan(work)
    state.importance.prepare(work, state.calib)
    try:
        scores = score_groups(state.importance, scan.groups)
        planner = _Planner(scan.groups, scores, state, measure_costs(work, state.example), metric)
        # Transformers keep one ratio for every layer (uniform sizes reload natively) unless ranked globally.
        final = planner.search(target, refine=state.global_ranking or not state.transformer)
        keeps = [planner.partway(index, keep, share) for index, keep in enumerate(final)]
        removals = planner.removals(keeps)
        if state.transformer:
            for group, removed in zip(scan.groups, removals, strict=True):
                if removed:
                    state.history["steps"].append(depgraph.prune_group(work, group, removed))
        else:
            state.history["steps"] += depgraph.prune_cnn_groups(work, state.example, scan, keeps, state.importance)
    finally:
        state.importance.release(work)
    state.steps.append({"target": target, "share": share, "achieved": planner.reduction(removals)})


# ---------------------------------------------------------------- planning


@dataclass
class _Planner:
    groups: list[ChannelGroup]
    scores: list[torch.Tensor]
    state: _State
    table: CostTable
    metric: str

    def __post_init__(self) -> None:
        self.options = [self._keep_options(g) for g in self.groups]
        self.set_scores = [_tied_scores(g, s) for g, s in zip(self.groups, self.scores, strict=True)]
        self.units_now = sum(g.size for g in self.groups)
        self.global_ranking = self.state.global_ranking
        top = max((float(s.max()) for s in self.scores if s.numel()), default=1.0)
        self.high = top * 1.001 + 1e-9 if self.global_ranking else 1.0
        self.cache: dict[tuple[int, int], list[int]] = {}

    def _keep_options(self, group: ChannelGroup) -> list[int]:
        config = self.state.config
        original = self.state.sizes0.get(group.name, group.size)
        min_keep = max(1, math.ceil(original * (1 - config.max_layer_ratio)))
        granularity = 1 if group.kind == "heads" else config.round_to
        step = max(group.blocks, len(group.tied[0]))  # equal counts per block, whole tied sets
        allowed = {k for k in range(step, group.size, step) if k >= min_keep and k % granularity == 0}
        return sorted(allowed | {group.size})

    def partway(self, index: int, final: int, share: float) -> int:
        """The allowed count closest to `share` of the way from the current size down to `final`."""
        size = self.groups[index].size
        wanted = size - (size - final) * share
        return min((k for k in self.options[index] if k >= final), key=lambda k: (abs(k - wanted), -k))

    def keep_counts(self, knob: float) -> list[int]:
        counts = []
        for group, options, scores in zip(self.groups, self.options, self.set_scores, strict=True):
            if self.global_ranking:
                wanted = sum(len(s) for s, value in scores if value >= knob)
            else:
                wanted = self.state.sizes0.get(group.name, group.size) * (1 - knob)
            counts.append(min(options, key=lambda k: (abs(k - wanted), -k)))
        return counts

    def removals(self, keeps: list[int]) -> list[list[int]]:
        return [
            self._removed(index, group.size - keep)
            for index, (group, keep) in enumerate(zip(self.groups, keeps, strict=True))
        ]

    def _removed(self, index: int, count: int) -> list[int]:
        key = (index, count)
        if key not in self.cache:
            self.cache[key] = _lowest_units(self.groups[index], self.scores[index], count)
        return self.cache[key]

    def reduction(self, removals: list[list[int]]) -> float:
        if self.metric == "ratio":
            return 1 - (self.units_now - sum(len(r) for r in removals)) / sum(self.state.sizes0.values())
        macs, params = self.table.estimate(removed_counts(self.groups, removals))
        if self.metric == "params":
            return 1 - params / self.state.base.params
        return 1 - macs / self.state.base.macs

    def _reached(self, keeps: list[int]) -> float:
        return self.reduction(self.removals(keeps))

    def search(self, target: float, refine: bool) -> list[int]:
        """Keep counts of the smallest knob that reaches `target` (the largest knob when none does),
        then, with `refine`, give back rounding steps while the target still holds."""
        low, high = 0.0, self.high
        if self._reached(self.keep_counts(high)) >= target:
            for _ in range(_SEARCH_ITERATIONS):
                middle = (low + high) / 2
                if self._reached(self.keep_counts(middle)) >= target:
                    high = middle
                else:
                    low = middle
        keeps = self.keep_counts(high)
        return self._give_back(keeps, target) if refine else keeps

    def _give_back(self, keeps: list[int], target: float) -> list[int]:
        """Greedily raise single groups to their next allowed count while the reduction stays >= target."""
        while True:
            best: tuple[float, int, int] | None = None
            for index, options in enumerate(self.options):
                larger = [k for k in options if k > keeps[index]]
                if not larger:
                    continue
                trial = [*keeps[:index], larger[0], *keeps[index + 1 :]]
                reached = self._reached(trial)
                if reached >= target and (best is None or reached < best[0]):
                    best = (reached, index, larger[0])
            if best is None:
                return keeps
            keeps[best[1]] = best[2]


def _tied_scores(group: ChannelGroup, scores: torch.Tensor) -> list[tuple[list[int], float]]:
    return [(units, float(scores[units].mean())) for units in group.tied]


def _lowest_units(group: ChannelGroup, scores: torch.Tensor, count: int) -> list[int]:
    """The `count` least important units, whole tied sets at a time, equal counts per block."""
    if count <= 0:
        return []
    if group.blocks > 1:
        width, removed = group.size // group.blocks, []
        for start in range(0, group.size, width):
            removed += sorted(range(start, start + width), key=lambda i: (float(scores[i]), i))[: count // group.blocks]
        return sorted(removed)
    ranked = sorted(group.tied, key=lambda units: (float(scores[units].mean()), min(units)))
    return sorted(unit for units in ranked[: math.ceil(count / len(group.tied[0]))] for unit in units)


# ---------------------------------------------------------------- checks, recovery, report


def _check_runs(work: nn.Module, batch: dict[str, Any], reference: torch.Tensor) -> None:
    """The pruned model must run and give the original output shape; otherwise name the failing module."""
    last: list[str] = []
    names = {module: name for name, module in work.named_modules()}
    handles = [m.register_forward_pre_hook(lambda mod, args: last.append(names[mod])) for m in work.modules()]
    try:
        with torch.no_grad():
            output = primary_output(work(**batch))
    except Exception as error:
        where = f" in module '{last[-1]}'" if last else ""
        raise CompressionError(
            "untraceable_model",
            f"the pruned model fails{where}: {error}. An operator there depends on channel counts in a way "
            "the dependency tracer could not see (a fixed reshape, an indexing or a channel-mixing op)",
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    if output.shape != reference.shape:
        raise CompressionError(
            "untraceable_model", f"pruned output shape {tuple(output.shape)} != {tuple(reference.shape)}"
        )


def _recover(
    work: nn.Module, original: nn.Module, calib: Batches, config: PruneStructuredConfig, progress: ProgressFn
) -> dict[str, Any]:
    if config.recovery == "none":
        return {"method": "none"}
    if config.recovery == "bn_recalibration":
        return recalibrate_batchnorm(work, calib)
    lr = config.distillation_lr or (3e-3 if _has_batchnorm(work) else 5e-5)
    budget = DistillBudget(
        max_steps=config.distillation_steps,
        time_budget_s=config.distillation_time_budget_s,
        patience=config.distillation_patience,
    )
    with _eval_mode(original):
        report = distill(work, original, calib, budget=budget, lr=lr, seed=config.seed, progress=progress)
    if _has_batchnorm(work):
        report["bn_recalibration"] = recalibrate_batchnorm(work, calib)
    return report


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _result(
    work: nn.Module,
    original: nn.Module,
    state: _State,
    scan0: GroupScan,
    recovery: dict[str, Any],
    latency: dict[str, Any] | None,
) -> CompressionResult:
    config = state.config
    after = measure_costs(work, state.example)
    achieved = _achieved(state, after, latency)
    hf = _rewrite_hf_configs(work, state.history)
    stats = {
        "metric": config.target.metric,
        "target_reduction": config.target.reduction,
        "achieved_reduction": achieved,
        "macs_before": state.base.macs,
        "macs_after": after.macs,
        "flops_before": 2 * state.base.macs,
        "flops_after": 2 * after.macs,
        "params_before": state.base.params,
        "params_after": after.params,
        "channels": _channels(original, work),
        "heads": _heads(original, work),
        "importance": state.importance.name,
        "global_pruning": state.global_ranking,
        "steps": state.steps,
        "pruning_history": state.history,
        "recovery": recovery,
        "hf_config": hf,
        "latency": latency,
    }
    skipped = dict(scan0.skipped)
    skipped.update({name: "skip_layers" for name, _ in original.named_modules() if name and state.protected(name)})
    notes = _notes(state, stats, hf)
    return CompressionResult(model=work, method="prune_structured", skipped=skipped, stats=stats, notes=notes)


def _achieved(state: _State, after: CostTable, latency: dict[str, Any] | None) -> float:
    metric = state.config.target.metric
    if metric == "params":
        return 1 - after.params / state.base.params
    if metric == "ratio":
        return state.steps[-1]["achieved"] if state.steps else 0.0
    if metric == "latency" and latency:
        return 1 - latency["final_s"] / latency["base_s"]
    return 1 - after.macs / state.base.macs


def _channels(original: nn.Module, work: nn.Module) -> dict[str, list[int]]:
    pruned = dict(work.named_modules())
    return {
        name: [int(module.weight.shape[0]), int(pruned[name].weight.shape[0])]
        for name, module in original.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and name in pruned
    }


def _heads(original: nn.Module, work: nn.Module) -> dict[str, list[int]]:
    pruned = {layout.name: layout for layout in depgraph.attention_layouts(work)}
    return {
        layout.name: [layout.n_q, pruned[layout.name].n_q]
        for layout in depgraph.attention_layouts(original)
        if layout.name in pruned
    }


def _notes(state: _State, stats: dict[str, Any], hf: dict[str, Any]) -> list[str]:
    config = state.config
    ranking = "global ranking" if state.global_ranking else "per-layer ratio"
    notes = [
        f"importance {state.importance.name}, {ranking}, {len(state.steps)} pruning step(s); kept channel "
        f"and neuron counts rounded to multiples of {config.round_to}, at most "
        f"{config.max_layer_ratio:.0%} of a layer removed",
        f"target: {config.target.reduction:.0%} {config.target.metric} reduction; achieved "
        f"{stats['achieved_reduction']:.1%} (MACs {stats['macs_before']:.4g} -> {stats['macs_after']:.4g} "
        f"per sample, params {stats['params_before']} -> {stats['params_after']})",
        "FLOPs = 2 x multiply-accumulates of Conv/Linear layers and attention matmuls, per sample of the "
        "first calibration batch",
    ]
    if stats["achieved_reduction"] + 1e-9 < config.target.reduction:
        notes.append("target not reached: max_layer_ratio, round_to or skipped layers leave too little to remove")
    notes += state.importance.notes[:3]
    notes.append(_recovery_note(stats["recovery"]))
    if hf:
        notes.append(hf["note"])
    return notes


def _recovery_note(recovery: dict[str, Any]) -> str:
    if recovery["method"] == "bn_recalibration":
        return (
            f"recovery: BatchNorm statistics re-estimated on {recovery['batches']} batches "
            f"({recovery['layers']} layers)"
        )
    if recovery["method"] == "distillation":
        return _distillation_note(recovery)
    return "recovery: none"


_STOPS = {
    "converged": "the held-out loss stopped improving",
    "time_budget": "distillation_time_budget_s ran out",
    "max_steps": "distillation_steps ran",
}


def _distillation_note(recovery: dict[str, Any]) -> str:
    held, samples = recovery["held_out_loss"], recovery["samples"]
    return (
        f"recovery: {recovery['steps']} distillation steps from the original model in {recovery['seconds']:.0f} s "
        f"on {samples['train']} calibration samples, stopped because {_STOPS[recovery['stop_reason']]}; "
        f"{recovery['loss']} loss on {samples['held_out']} held-out samples {held['first']:.4g} -> best "
        f"{held['best']:.4g} (step {held['best_step']}, kept) -> last {held['last']:.4g}; lr {recovery['lr']:g} "
        f"with {recovery['lr_drops']} drop(s)"
    )


# ---------------------------------------------------------------- Hugging Face configs


def _hf_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        nested = any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found)
        if hasattr(module, "save_pretrained") and hasattr(config, "to_dict") and not nested:
            found.append((name, module))
    return found


def _rewrite_hf_configs(work: nn.Module, history: dict[str, Any]) -> dict[str, Any]:
    """Rewrite each HF config to the pruned sizes when it can express them, else attach the history."""
    report: dict[str, Any] = {}
    for prefix, hf_model in _hf_submodules(work):
        changes = _config_changes(hf_model)
        if changes is not None:
            for key, value in changes.items():
                setattr(hf_model.config, key, value)
            report = {"reload": "native", "changes": changes, "module": prefix}
            report["note"] = f"Hugging Face config rewritten ({changes}): reloads with from_pretrained"
        else:
            setattr(hf_model.config, depgraph.HF_CONFIG_KEY, depgraph.relative_history(history, prefix))
            report = {"reload": "history_replay", "changes": {}, "module": prefix}
            report["note"] = (
                "Hugging Face config cannot describe the pruned shapes (per-layer sizes, or head pruning in "
                "a model whose head size is hidden_size / num_attention_heads); it keeps the original sizes "
                "plus the pruning history under 'modelpress_pruning': reload with "
                "depgraph.load_pruned_pretrained"
            )
    return report


def _config_changes(hf_model: nn.Module) -> dict[str, int] | None:
    """Config fields that describe the pruned model, or None when the config cannot express it."""
    config = hf_model.config
    changes: dict[str, int] = {}
    layouts = depgraph.attention_layouts(hf_model)
    heads = {(layout.n_q, layout.n_kv, layout.head_dim) for layout in layouts}
    if len(heads) > 1:
        return None
    if heads:
        n_q, n_kv, head_dim = heads.pop()
        if n_q != config.num_attention_heads:
            if not layouts[0].q.endswith("q_proj"):
                return None  # BERT-style: head size is derived from hidden_size / num_attention_heads
            changes.update(num_attention_heads=n_q, head_dim=head_dim)
            if getattr(config, "num_key_value_heads", n_kv) != n_kv:
                changes["num_key_value_heads"] = n_kv
    sizes = {hf_model.get_submodule(m.down).in_features for m in depgraph.mlp_layouts(hf_model)}
    if len(sizes) > 1:
        return None
    if sizes and sizes != {getattr(config, "intermediate_size", None)}:
        if not isinstance(getattr(config, "intermediate_size", None), int):
            return None
        changes["intermediate_size"] = sizes.pop()
    return changes


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every module's training flag as it was (the input is not mutated)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
