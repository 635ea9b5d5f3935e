"""Channel groups and a replayable pruning history, on `torch_pruning`'s dependency graph and pruner.

A `ChannelGroup` is a set of prunable units (conv channels, attention heads, MLP neurons) whose removal
must happen in several modules at once: a conv's output channels, its BatchNorm, the next layers'
input channels, every conv feeding the same residual add, the slices of a concatenation.
- CNN-like models: groups come from torch_pruning's dependency graph, traced through autograd.
  Anything the tracer cannot map to channels raises `CompressionError("untraceable_model")`.
- Hugging Face transformers: groups come from the known block layout (q/k/v/o projections per head,
  MLP up/gate/down per neuron); grouped-query attention keeps the same number of query heads per
  key/value head.

CNN groups are pruned by torch_pruning's `MetaPruner` (`prune_cnn_groups`: one ranking scope and kept
count per group, chosen by the caller's cost search); transformer groups by applying torch_pruning's
per-module functions (`prune_group`). Both record JSON steps (module, function, removed indices,
attribute updates); `apply_pruning_history` replays them on a freshly built model, so the pruned
architecture is rebuilt from JSON + safetensors, never from a pickle.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops
from torch_pruning.pruner import function as tp_function

from compression.errors import CompressionError

HISTORY_FORMAT = "modelpress.pruning_history/v1"
HF_CONFIG_KEY = "modelpress_pruning"

TP_FUNCTIONS: dict[str, Callable[[nn.Module, list[int]], Any]] = {
    name: getattr(tp_function, name)
    for name in sorted(dir(tp_function))
    if name.startswith("prune_") and name.endswith("_channels")
}
# Ops that keep channel i in channel i (element-wise, pooling, resampling, layout, dropout).
_CHANNELWISE_NAMES = """
    add sub mul div neg pow sqrt rsqrt exp log abs where maximum minimum clamp clampmin clampmax
    relu relu6 hardtanh leakyrelu elu selu celu gelu silu sigmoid tanh hardswish hardsigmoid mish softplus
    maxpool1dwithindices maxpool2dwithindices maxpool3dwithindices avgpool1d avgpool2d avgpool3d
    adaptiveavgpool1d adaptiveavgpool2d adaptivemaxpool1d adaptivemaxpool2d
    upsamplenearest1d upsamplenearest2d upsamplebilinear2d constantpadnd reflectionpad2d replicationpad2d
    clone nativedropout dropout squeeze unsqueeze tocopy alias t permute transpose expand
    mean sum amax amin
"""
_CHANNELWISE_OPS = frozenset(_CHANNELWISE_NAMES.split())
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin"})
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Member:
    """One module dimension in a group: `idxs[i]` of that dimension belongs to group unit `units[i]`."""

    module: str
    fn: str  # a torch_pruning function name, e.g. "prune_conv_out_channels"
    idxs: list[int]
    units: list[int]

    @property
    def dim(self) -> str:
        """'out' for output channels (and one-sided layers: BatchNorm, depthwise conv), else 'in'."""
        return "in" if self.fn.endswith("_in_channels") else "out"


@dataclass
class ChannelGroup:
    """Units removed together across `members`. `tied` partitions the units into sets that can only go
    as a whole (same position in every group of a grouped conv); `blocks` > 1 splits the units into that
    many contiguous blocks that must keep equal counts (query heads per key/value head)."""

    name: str
    kind: str  # "channels" | "heads" | "neurons"
    size: int
    members: list[Member]
    tied: list[list[int]] = field(default_factory=list)
    blocks: int = 1
    attrs: Callable[[int], list[dict[str, Any]]] | None = None  # kept units -> attribute updates
    tp: Any = None  # the torch_pruning Group that importance criteria score (and MetaPruner prunes, for CNNs)

    def __post_init__(self) -> None:
        if not self.tied:
            self.tied = [[unit] for unit in range(self.size)]


@dataclass
class GroupScan:
    groups: list[ChannelGroup]
    skipped: dict[str, str]  # module or group name -> why it is not pruned
    ignored: list[str] = field(default_factory=list)  # layers whose output units are kept (model outputs)


# ---------------------------------------------------------------- history


def new_history() -> dict[str, Any]:
    return {"format": HISTORY_FORMAT, "steps": []}


def apply_history_step(model: nn.Module, step: dict[str, Any]) -> None:
    """Remove the recorded indices from each module and set the recorded attributes."""
    for op in step["ops"]:
        TP_FUNCTIONS[op["fn"]](model.get_submodule(op["module"]), list(op["idxs"]))
    for attr in step.get("attrs", []):
        setattr(model.get_submodule(attr["module"]), attr["name"], attr["value"])


def apply_pruning_history(model: nn.Module, history: dict[str, Any] | str) -> nn.Module:
    """Replay a pruning history (dict or JSON text) on a freshly built, unpruned model, in place."""
    if isinstance(history, str):
        history = json.loads(history)
    if history.get("format") != HISTORY_FORMAT:
        raise CompressionError("bad_pruning_history", f"expected format {HISTORY_FORMAT!r}")
    for step in history["steps"]:
        apply_history_step(model, step)
    return model


def prune_group(model: nn.Module, group: ChannelGroup, removed_units: list[int]) -> dict[str, Any]:
    """Physically remove `removed_units` from every member of `group`; returns the history step."""
    removed = set(removed_units)
    ops = []
    for member in group.members:
        idxs = sorted({i for i, unit in zip(member.idxs, member.units, strict=True) if unit in removed})
        if idxs:
            ops.append({"module": member.module, "fn": member.fn, "idxs": idxs})
    attrs = group.attrs(group.size - len(removed)) if group.attrs else []
    step = {"group": group.name, "kind": group.kind, "removed": sorted(removed), "ops": ops, "attrs": attrs}
    apply_history_step(model, step)
    return step


def relative_history(history: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The history with module names made relative to the submodule `prefix` (e.g. a wrapped HF model)."""
    if not prefix:
        return history
    cut = len(prefix) + 1

    def strip(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**entry, "module": entry["module"][cut:]} for entry in entries]

    steps = [{**s, "ops": strip(s["ops"]), "attrs": strip(s.get("attrs", []))} for s in history["steps"]]
    return {**history, "steps": steps}


def load_pruned_pretrained(path: str | Path, model_class: Any = None) -> nn.Module:
    """A pruned Hugging Face directory whose config could not describe the pruned shapes (it keeps the
    original sizes plus `modelpress_pruning`): build from config, replay the history, load safetensors."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    history = getattr(config, HF_CONFIG_KEY, None)
    builder = model_class or transformers.AutoModel
    if history is None:
        return builder.from_pretrained(path)
    model = builder.from_config(config) if hasattr(builder, "from_config") else builder(config)
    apply_pruning_history(model, history)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    current = model.state_dict()
    loaded = {current[key].data_ptr() for key in state if key in current}
    untied = [key for key in missing if current[key].data_ptr() not in loaded and not key.endswith("position_ids")]
    if unexpected or untied:
        raise CompressionError("bad_pruned_checkpoint", f"missing {untied[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


# ---------------------------------------------------------------- CNN groups (torch_pruning)


def build_cnn_groups(model: nn.Module, batch: dict[str, Any], protected: Callable[[str], bool]) -> GroupScan:
    """Every prunable channel group of a traced model; raises CompressionError('untraceable_model')."""
    inputs = _traceable_inputs(batch)
    _check_call_graph(model, inputs)
    graph = _build_graph(model, inputs)
    names: dict[Any, str] = dict(graph._module2name)
    outputs = _output_layers(graph, names)
    scan = GroupScan([], {n: "produces the model output: its output units are kept" for n in outputs}, outputs)
    ignored = [model.get_submodule(name) for name in outputs]
    for tp_group in graph.get_all_groups(ignored_layers=ignored, root_module_types=_ROOT_TYPES):
        _check_operators(tp_group, names)
        group = _channel_group(model, tp_group, names, protected)
        if isinstance(group, ChannelGroup):
            scan.groups.append(group)
        else:
            scan.skipped[names[tp_group[0].dep.target.module]] = group
    return scan


def prune_cnn_groups(
    model: nn.Module, batch: dict[str, Any], scan: GroupScan, keeps: list[int], importance: Any
) -> list[dict[str, Any]]:
    """Keep `keeps[i]` units of `scan.groups[i]` with torch_pruning's MetaPruner (each group its own
    ranking scope, the least important units by `importance` go); returns the history steps."""
    ratios = {
        model.get_submodule(group.name): 1 - (keep // len(group.tied[0]) + 0.5) / len(group.tied)
        for group, keep in zip(scan.groups, keeps, strict=True)
        if keep < group.size
    }
    if not ratios:
        return []
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            _traceable_inputs(batch),
            importance=importance,
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=[model.get_submodule(name) for name in scan.ignored],
            root_module_types=list(_ROOT_TYPES),
        )
        names = {module: name for name, module in model.named_modules()}
        steps = []
        for tp_group in pruner.step(interactive=True):
            steps.append(_history_step(tp_group, names))
            tp_group.prune()
    return steps


def _history_step(tp_group: Any, names: dict[Any, str]) -> dict[str, Any]:
    """A torch_pruning group as a history step; unnamed ops (concat, split) need no replay in eager mode."""
    ops = [
        {"module": names[dep.target.module], "fn": _fn_name(dep.handler), "idxs": sorted(int(i) for i in idxs)}
        for dep, idxs in tp_group
        if dep.target.module in names
    ]
    removed = sorted(int(i) for i in tp_group[0].idxs)
    return {"group": ops[0]["module"], "kind": "channels", "removed": removed, "ops": ops, "attrs": []}


def _traceable_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with float tensors requiring grad, so a cut autograd chain is visible."""
    with torch.inference_mode(False):
        return {
            key: value.detach().clone().requires_grad_(True)
            if isinstance(value, torch.Tensor) and value.is_floating_point()
            else value
            for key, value in batch.items()
        }


@dataclass
class _CallLog:
    """Forward pre-hook state: calls per module, call order, and the first cut in the autograd chain."""

    names: dict[nn.Module, str]
    expect_grad: bool
    calls: dict[str, int] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        name = self.names[module]
        self.calls[name] = self.calls.get(name, 0) + 1
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        if self.expect_grad and tensors and not any(t.requires_grad for t in tensors) and not self.problems:
            after = f" (after module '{self.order[-1]}')" if self.order else ""
            self.problems.append(
                f"the input of module '{name}'{after} has no autograd history: an operator before it "
                "(.detach(), torch.no_grad(), a numpy round-trip or an integer cast) cuts the graph"
            )
        self.order.append(name)


def _check_call_graph(model: nn.Module, inputs: dict[str, Any]) -> None:
    """Refuse weight-shared modules and modules whose input lost its autograd history."""
    expect_grad = any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values())
    log = _CallLog({module: name for name, module in model.named_modules()}, expect_grad)
    output = _forward_logged(model, inputs, log)
    reused = [f"module '{n}' is called {c} times per forward (shared weights)" for n, c in log.calls.items() if c > 1]
    if isinstance(output, torch.Tensor) and not output.requires_grad and log.order:
        log.problems.append(f"the model output has no autograd history after module '{log.order[-1]}'")
    if log.problems or reused:
        detail = "; ".join(log.problems + reused)
        raise CompressionError("untraceable_model", f"channel dependencies cannot be traced: {detail}")


def _forward_logged(model: nn.Module, inputs: dict[str, Any], log: _CallLog) -> Any:
    handles = [m.register_forward_pre_hook(log.pre_hook) for m in model.modules() if _has_own_params(m)]
    try:
        with torch.enable_grad():
            return model(**inputs)
    except Exception as error:
        where = f" in module '{log.order[-1]}'" if log.order else ""
        raise CompressionError(
            "untraceable_model",
            f"forward failed{where} while tracing: {error} (after an earlier pruning step this points at an "
            "operator with a fixed channel count, such as a hard-coded reshape)",
        ) from error
    finally:
        for handle in handles:
            handle.remove()


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _build_graph(model: nn.Module, inputs: dict[str, Any]) -> tp.DependencyGraph:
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    except CompressionError:
        raise
    except Exception as error:
        raise CompressionError("untraceable_model", f"dependency tracing failed: {error}") from error


def _output_layers(graph: tp.DependencyGraph, names: dict[Any, str]) -> list[str]:
    """Named modules whose output reaches a model output through unnamed ops only."""
    found: list[str] = []
    stack = [node for node in graph.module2node.values() if not node.outputs]  # sinks: the model outputs
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        name = names.get(node.module)
        if name is not None:
            found.append(name)
        else:
            stack.extend(node.inputs)
    return sorted(set(found))


def _check_operators(tp_group: Any, names: dict[Any, str]) -> None:
    for item in tp_group:
        node = item.dep.target
        if not isinstance(node.module, tp_ops._ElementWiseOp) or not node.inputs:
            continue  # modules, concat/split/reshape (mapped by torch_pruning), weight-only transposes
        op_name = str(node.module._grad_fn)
        if not _is_channelwise(op_name, node.grad_fn):
            near = _nearest_module(node, names)
            raise CompressionError(
                "untraceable_model",
                f"operator {op_name} next to module '{near}' mixes or reorders channels in a way the "
                "dependency tracer cannot map, so pruning could produce wrong shapes or wrong outputs",
            )


def _is_channelwise(op_name: str, grad_fn: Any) -> bool:
    base = op_name.lower().split("backward")[0]
    if base not in _CHANNELWISE_OPS:
        return False
    if base in _REDUCTIONS:
        dims = getattr(grad_fn, "_saved_dim", None)
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        if dims is None or sizes is None:
            return False
        rank = len(sizes)
        return rank == 3 or 1 not in {d % rank for d in dims}
    return True


def _nearest_module(node: Any, names: dict[Any, str]) -> str:
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.module in names:
            return names[current.module]
        frontier.extend(current.inputs + current.outputs)
    return "?"


def _channel_group(
    model: nn.Module, tp_group: Any, names: dict[Any, str], protected: Callable[[str], bool]
) -> ChannelGroup | str:
    members: list[Member] = []
    for item in tp_group:
        target = item.dep.target.module
        if isinstance(target, nn.Parameter):
            return "coupled to a parameter that belongs to no prunable module"
        name = names.get(target)
        if name is None:
            continue
        if protected(name):
            return f"coupled to skipped layer '{name}'"
        members.append(Member(name, _fn_name(item.dep.handler), list(item.idxs), list(item.root_idxs)))
    size = len(tp_group[0].idxs)
    name = names[tp_group[0].dep.target.module]
    return ChannelGroup(name, "channels", size, members, _tied(model, members, size), tp=tp_group)


def _fn_name(handler: Any) -> str:
    matches = [name for name, fn in TP_FUNCTIONS.items() if fn == handler]
    if not matches:
        raise CompressionError("untraceable_model", f"no pruning function for {handler}")
    outs = [name for name in matches if name.endswith("_out_channels")]
    return (outs or matches)[0]


def _tied(model: nn.Module, members: list[Member], size: int) -> list[list[int]]:
    """Units that share a position in every channel group of a grouped (not depthwise) conv: torch_pruning
    keeps those positions together (the group count is the largest of the group's grouped convs)."""
    counts = [1]
    for member in members:
        module = model.get_submodule(member.module)
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups not in (1, module.out_channels):
            counts.append(module.groups)
    width = size // max(counts)
    return [list(range(position, size, width)) for position in range(width)]


# ---------------------------------------------------------------- transformer groups (HF layouts)


@dataclass(frozen=True)
class AttentionLayout:
    name: str
    q: str
    k: str
    v: str
    o: str
    attr_module: str  # the module that stores head counts (num_attention_heads, num_key_value_groups, ...)
    head_dim: int
    n_q: int
    n_kv: int


@dataclass(frozen=True)
class MlpLayout:
    name: str
    ups: tuple[str, ...]  # layers whose output neurons are pruned (up, gate)
    down: str  # the layer that reads the neurons


def attention_layouts(model: nn.Module) -> list[AttentionLayout]:
    """BERT-style (`self.query/key/value` + `output.dense`) and Llama-style (`q/k/v/o_proj`) attention."""
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            head_dim = int(getattr(module, "head_dim", 0) or 0)
            parts = ("q_proj", "k_proj", "v_proj", "o_proj")
            attr_module = name
        elif _is_bert_attention(module):
            head_dim = int(module.self.attention_head_size)
            parts = ("self.query", "self.key", "self.value", "output.dense")
            attr_module = f"{prefix}self"
        else:
            continue
        q, k = module.get_submodule(parts[0]), module.get_submodule(parts[1])
        if head_dim <= 0 or q.out_features % head_dim or k.out_features % head_dim:
            continue
        paths = [prefix + p for p in parts]
        found.append(
            AttentionLayout(name, *paths, attr_module, head_dim, q.out_features // head_dim, k.out_features // head_dim)
        )
    return found


def _is_bert_attention(module: nn.Module) -> bool:
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    return (
        all(isinstance(getattr(inner, p, None), nn.Linear) for p in ("query", "key", "value"))
        and isinstance(getattr(output, "dense", None), nn.Linear)
        and hasattr(inner, "attention_head_size")
    )


def mlp_layouts(model: nn.Module) -> list[MlpLayout]:
    """Gated MLPs (gate/up/down_proj), BERT feed-forward (intermediate.dense -> output.dense), fc1 -> fc2."""
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if all(isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            found.append(MlpLayout(name, (prefix + "gate_proj", prefix + "up_proj"), prefix + "down_proj"))
        elif isinstance(getattr(getattr(module, "intermediate", None), "dense", None), nn.Linear) and isinstance(
            getattr(getattr(module, "output", None), "dense", None), nn.Linear
        ):
            found.append(MlpLayout(name, (prefix + "intermediate.dense",), prefix + "output.dense"))
        elif isinstance(getattr(module, "fc1", None), nn.Linear) and isinstance(
            getattr(module, "fc2", None), nn.Linear
        ):
            found.append(MlpLayout(name, (prefix + "fc1",), prefix + "fc2"))
    return found


def build_transformer_groups(model: nn.Module, protected: Callable[[str], bool]) -> GroupScan | None:
    """Head groups and MLP-neuron groups of a transformer, or None when no known block layout is found."""
    attentions, mlps = attention_layouts(model), mlp_layouts(model)
    if not attentions and not mlps:
        return None
    scan = GroupScan([], {})
    candidates = [_head_group(model, a) for a in attentions] + [_mlp_group(model, m) for m in mlps]
    for group in candidates:
        blocked = [m.module for m in group.members if protected(m.module)]
        if blocked:
            scan.skipped[group.name] = f"coupled to skipped layer '{blocked[0]}'"
        else:
            group.tp = _tp_group(model, group.members)
            scan.groups.append(group)
    return scan


def _tp_group(model: nn.Module, members: list[Member]) -> tp.dependency.Group:
    """The members of a layout group as a torch_pruning `Group`, so its importance criteria can score it."""
    group = tp.dependency.Group()
    for member in members:
        node = tp.dependency.Node(model.get_submodule(member.module), None, member.module)
        fn = TP_FUNCTIONS[member.fn]
        group.add_dep(tp.dependency.Dependency(fn, fn, source=node, target=node), list(member.idxs))
        group[-1].root_idxs = list(member.units)
    return group


def _rows(count: int, per_unit: int) -> tuple[list[int], list[int]]:
    return list(range(count * per_unit)), [i // per_unit for i in range(count * per_unit)]


def _head_group(model: nn.Module, layout: AttentionLayout) -> ChannelGroup:
    idxs, units = _rows(layout.n_q, layout.head_dim)
    shared_kv = layout.n_kv == layout.n_q  # plain multi-head attention: k and v heads go with q heads
    outs = (layout.q, layout.k, layout.v) if shared_kv else (layout.q,)
    members = [Member(path, "prune_linear_out_channels", idxs, units) for path in outs]
    members.append(Member(layout.o, "prune_linear_in_channels", idxs, units))
    holder = model.get_submodule(layout.attr_module)

    def attrs(kept: int) -> list[dict[str, Any]]:
        n_kv = kept if shared_kv else layout.n_kv
        values = {
            "num_attention_heads": kept,
            "num_heads": kept,
            "all_head_size": kept * layout.head_dim,
            "num_key_value_groups": kept // n_kv,
            "num_key_value_heads": n_kv,
        }
        return [
            {"module": layout.attr_module, "name": key, "value": value}
            for key, value in values.items()
            if isinstance(getattr(holder, key, None), int)
        ]

    blocks = 1 if shared_kv else layout.n_kv
    return ChannelGroup(layout.name, "heads", layout.n_q, members, blocks=blocks, attrs=attrs)


def _mlp_group(model: nn.Module, layout: MlpLayout) -> ChannelGroup:
    size = model.get_submodule(layout.down).in_features
    idxs, units = _rows(size, 1)
    members = [Member(path, "prune_linear_out_channels", idxs, units) for path in layout.ups]
    members.append(Member(layout.down, "prune_linear_in_channels", idxs, units))
    holder = model.get_submodule(layout.name)

    def attrs(kept: int) -> list[dict[str, Any]]:
        if isinstance(getattr(holder, "intermediate_size", None), int):
            return [{"module": layout.name, "name": "intermediate_size", "value": kept}]
        return []

    return ChannelGroup(layout.name, "neurons", size, members, attrs=attrs)
