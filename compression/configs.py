"""Inert, torch-free configs: one frozen pydantic model per method, one discriminated union.

The method key (`quant_rtn`, ...) is the config's `method` literal, the registry key, the module
name under `compression.methods`, the DB value and the URL segment. The API validates user JSON
against these models and never imports torch.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Bits = Literal[2, 3, 4, 8]
DATA_KINDS: tuple[str, ...] = ("npz", "text")  # dataset kinds an upload can be (app.core.inspect)
# Lists of layer names are bounded: a config is stored with its job and returned on every listing.
MAX_LAYER_ENTRIES = 4096
LayerName = Annotated[str, StringConstraints(min_length=1, max_length=512)]


def _schema_defaults(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """JSON schemas leave out defaults made by a factory (lists, dicts, nested models): fill them in,
    so every key of a method's schema states its default."""
    defaults = cls().model_dump(mode="json")
    for name, prop in schema.get("properties", {}).items():
        if "default" not in prop and name in defaults:
            prop["default"] = defaults[name]


class _Inert(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_schema_defaults)


class MethodConfigBase(_Inert):
    """Fields every method shares."""

    needs_calibration: ClassVar[bool] = True
    uses_calibration: ClassVar[bool] = True  # False: calibration data is never read (evaluation only measures)
    data_kinds: ClassVar[tuple[str, ...]] = DATA_KINDS
    summary: ClassVar[str] = ""
    # True: Hessians, sensitivity sweeps or training, which run much faster on a GPU (job routing: `gpu` queue)
    prefers_gpu: ClassVar[bool] = True
    # True: the method's result is an ONNX graph it writes itself (its MethodSpec has `write_onnx`); in a
    # pipeline such a step must come last
    ships_own_graph: ClassVar[bool] = False

    seed: int = Field(0, ge=0, description="Seed for every random choice; same seed, same result.")
    skip_layers: list[LayerName] = Field(
        default_factory=list,
        max_length=MAX_LAYER_ENTRIES,
        description="Module names (or fnmatch patterns) left untouched, e.g. from a previous report's suggestions.",
    )
    hf_float_dir: bool = Field(
        False,
        description="Hugging Face uploads: also write the dequantized float directory (artifact `hf_float_dir`); "
        "`hf_dir` is the compressed-tensors checkpoint.",
    )

    def calibration_cap(self, default: int) -> int:
        """Calibration samples the job reads at most for this config; `default`: the service's cap
        (`calibration_max_samples`), which a method that trains on its data may raise."""
        return default

    @classmethod
    def data_needs(cls) -> dict[str, Any]:
        """{calibration: required | optional | none, kinds: dataset kinds the method reads}."""
        use = "required" if cls.needs_calibration else "optional" if cls.uses_calibration else "none"
        return {"calibration": use, "kinds": list(cls.data_kinds)}


ZeroPointMode = Literal["float", "integer", "none"]
ZERO_POINT_DESCRIPTION = (
    "Per-group offset Z of W ≈ codes·S + Z: 'float' a free float Z (ONNX: a correction subgraph beside ORT's "
    "kernels; compressed-tensors cannot hold it, so `hf_dir` gets float weights), 'integer' Z = -zp·S with an "
    "integer zero point (packed uint8 zero points of ONNX Runtime's prepacked MatMulNBits kernels, GPTQ and "
    "compressed-tensors checkpoints), 'none' Z = 0 (symmetric, no zero points)."
)


class WeightFormatFields(MethodConfigBase):
    """How quantized weights are stored and run: shared by every weight-only quantizer and mixed_precision."""

    zero_point: ZeroPointMode = Field("integer", description=ZERO_POINT_DESCRIPTION)
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0,
        description="ONNX Runtime MatMulNBits accuracy_level written into the exported graph: 0 (unset) to 3 run "
        "fp32 activations on CPU; 4 quantizes activations to int8 per block (not exact; it can flip argmax tokens). "
        "Measured: 4 is 2.8-4.4x faster than fp32 per layer at one token (LLM decode) and the only 2-bit form "
        "faster than fp32, but no faster on an encoder's 64-token batches. The report measures the exported model "
        "at the other setting too (`fidelity.accuracy_level`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_symmetric(cls, data: Any) -> Any:
        """Configs written before `zero_point` carry `symmetric`: true is 'none', false was a float Z."""
        if isinstance(data, dict) and "symmetric" in data:
            data = dict(data)
            symmetric = data.pop("symmetric")
            data.setdefault("zero_point", "none" if symmetric else "float")
        return data

    @property
    def symmetric(self) -> bool:
        return self.zero_point == "none"


class QuantizerFields(WeightFormatFields):
    """Weight-only quantization: W ≈ W_int·S + Z per output row and group."""

    bits: Bits = 4
    group_size: int | None = Field(
        128, description="Input columns per (S, Z) group, a power of two >= 16; null for one group per output channel."
    )
    quantize_embeddings: Literal[None, 4, 8] = Field(
        None, description="Also RTN-quantize embedding tables at 4 or 8 bits (default: keep float)."
    )
    quantize_head: Literal[None, 4, 8] = Field(
        None, description="Also RTN-quantize the output head at 4 or 8 bits (default: keep float)."
    )

    @field_validator("group_size")
    @classmethod
    def _group_size_power_of_two(cls, value: int | None) -> int | None:
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError("group_size must be a power of two >= 16, or null for per-channel")
        return value


class RTNConfig(QuantizerFields):
    needs_calibration: ClassVar[bool] = False
    prefers_gpu: ClassVar[bool] = False
    summary: ClassVar[str] = "Round-to-nearest weight-only quantization (baseline)."
    method: Literal["quant_rtn"] = "quant_rtn"


class GPTQConfig(QuantizerFields):
    summary: ClassVar[str] = "GPTQ: Hessian-aware sequential rounding with error feedback."
    method: Literal["quant_gptq"] = "quant_gptq"
    damp_percent: float = Field(0.01, gt=0, le=1, description="Diagonal damping as a fraction of mean diag(H).")
    act_order: bool = Field(True, description="Quantize columns in order of decreasing Hessian diagonal.")
    block_size: int = Field(128, ge=1, le=4096, description="Columns per lazy-batch update.")


class DecoupleQConfig(QuantizerFields):
    summary: ClassVar[str] = (
        "decoupleQ: integer codes and float (S, Z) solved alternately against the layer Hessian, "
        "then an optional block-wise refinement of the float part."
    )
    method: Literal["quant_decoupleq"] = "quant_decoupleq"
    bits: Literal[2, 3, 4] = 2
    # decoupleQ's own form: at its default 2 bits an integer zero point costs accuracy (benchmarks/zero_points.py)
    zero_point: ZeroPointMode = Field("float", description=ZERO_POINT_DESCRIPTION)
    integer_step: Literal["gptq", "pgd"] = Field("gptq", description="How the integer codes are solved.")
    iterations: int = Field(3, ge=1, le=100, description="Alternations of integer step and (S, Z) least squares.")
    pgd_steps: int = Field(50, ge=1, le=10_000, description="Projected-gradient steps when integer_step='pgd'.")
    damp_percent: float = Field(0.01, gt=0, le=1)
    act_order: bool = True
    blockwise: bool = Field(True, description="Block-wise stage: freeze integers, train S, Z and norms.")
    blockwise_lr: float = Field(1e-4, gt=0, le=1)
    blockwise_epochs: int = Field(2, ge=0, le=100)


class PruneTarget(_Inert):
    metric: Literal["flops", "params", "latency", "ratio"] = "flops"
    reduction: float = Field(0.5, gt=0, lt=1, description="Fraction of the metric to remove.")


class PruneStructuredConfig(MethodConfigBase):
    summary: ClassVar[str] = (
        "Structured pruning of channels, filters, heads and FFN neurons into a smaller dense model."
    )
    method: Literal["prune_structured"] = "prune_structured"
    target: PruneTarget = Field(default_factory=PruneTarget)
    importance: Literal["l1", "l2", "bn_scale", "taylor", "activation"] = Field(
        "activation",
        description="How units are scored: weight norms (l1, l2), BatchNorm scales, first-order Taylor on the "
        "labels, or the calibration activations' mean magnitude (activation).",
    )
    recovery: Literal["none", "bn_recalibration", "distillation"] = Field(
        "bn_recalibration",
        description="After pruning: nothing, BatchNorm statistics re-estimated on the calibration data, or "
        "distillation from the original (until the held-out loss stops improving, within the time budget).",
    )
    global_pruning: bool | None = Field(
        None,
        description="Rank units across layers (true) or prune every layer by the same ratio (false); null: "
        "global for convolutional networks, per layer for transformers.",
    )
    round_to: int = Field(8, ge=1, le=128, description="Round kept channel counts to a multiple of this.")
    distillation_steps: int = Field(
        5000, ge=1, le=1_000_000, description="Most distillation steps (one calibration batch each)."
    )
    distillation_time_budget_s: float = Field(
        240.0,
        gt=0,
        le=86_400,
        description="Most seconds of distillation; the weights of the best held-out loss so far are kept.",
    )
    distillation_patience: int = Field(
        5,
        ge=1,
        le=1000,
        description="Held-out evaluations (every pass over the calibration batches, 10 to 100 steps) without a "
        "better held-out loss before the learning rate drops (x0.3, twice); the third stall stops distillation.",
    )
    max_calibration_samples: int = Field(
        8192,
        ge=1,
        le=1_000_000,
        description="Calibration samples read at most (in place of the service's calibration_max_samples): "
        "recovery trains on all of them, every 10th held out to decide when distillation stops.",
    )
    max_layer_ratio: float = Field(0.8, gt=0, lt=1, description="Never remove more than this fraction of a layer.")
    iterative_steps: int = Field(
        4, ge=1, le=50, description="Prune in this many steps towards the target, re-scoring units after each."
    )
    distillation_lr: float | None = Field(
        None, gt=0, le=1, description="AdamW learning rate for distillation; null: 3e-3 with BatchNorm, else 5e-5."
    )

    def calibration_cap(self, default: int) -> int:
        return self.max_calibration_samples


class PruneUnstructuredConfig(MethodConfigBase):
    needs_calibration: ClassVar[bool] = False
    prefers_gpu: ClassVar[bool] = False
    uses_calibration: ClassVar[bool] = False
    summary: ClassVar[str] = "Magnitude or N:M semi-structured sparsity (smaller on disk; no CPU speedup)."
    method: Literal["prune_unstructured"] = "prune_unstructured"
    sparsity: float = Field(0.5, gt=0, lt=1)
    pattern: Literal["unstructured", "2:4", "4:8"] = "unstructured"


class MixedPrecisionConfig(WeightFormatFields):
    summary: ClassVar[str] = "Per-layer bit widths from measured sensitivity and an integer program under a budget."
    method: Literal["mixed_precision"] = "mixed_precision"
    budget_bits: float = Field(3.0, gt=1, le=16, description="Average bits per quantized weight.")
    candidates: list[Literal[2, 3, 4, 8, 16]] = Field(default_factory=lambda: [2, 3, 4, 8], max_length=5)
    quantizer: Literal["rtn", "gptq", "decoupleq"] = "gptq"
    group_size: int | None = 128
    budgets: list[float] | None = Field(None, max_length=64, description="Several budgets for a Pareto sweep.")
    budget_kind: Literal["bits", "bitops", "latency"] = "bits"
    metric_weights: dict[str, float] = Field(
        default_factory=lambda: {"sqnr": 1.0, "kl": 1.0, "task": 1.0},
        max_length=8,
        description="Weights of the normalized per-layer damages: sqnr (output noise power), kl, task (metric drop).",
    )
    task_metric: Literal["auto", "accuracy", "top1_agreement", "cosine"] = Field(
        "auto",
        description="Task metric for sensitivity and the predicted drop; auto: accuracy with labels, else top-1 "
        "agreement with the float model (use cosine for encoders that output embeddings).",
    )
    sensitivity_samples: int = Field(
        128, ge=1, le=100_000, description="Calibration samples the one-layer-at-a-time sensitivity pass runs on."
    )
    sensitivity_holdout: bool = Field(
        True,
        description="gptq/decoupleq: fit the per-layer candidates on the calibration samples outside the "
        "sensitivity set (when at least as many remain), so sensitivities measure generalization, not the fit.",
    )
    max_predicted_drop: float | None = Field(
        None, ge=0, description="Also cap the predicted task-metric drop (sum of per-layer measured drops)."
    )
    auto_ties: list[Literal["shared_input", "residual_add"]] = Field(
        default_factory=lambda: ["shared_input"],
        max_length=2,
        description="Layers that must share a width: shared_input = read the same tensor (q/k/v, gate/up, "
        "conv + 1x1 shortcut); residual_add = convs/linears feeding one residual add (needs torch.fx).",
    )
    tie_groups: list[list[LayerName]] = Field(
        default_factory=list,
        max_length=MAX_LAYER_ENTRIES,
        description="Extra groups of layer names (or fnmatch patterns) sharing one width.",
    )
    activation_bits: int = Field(8, ge=2, le=16, description="Activation width in the BitOps count (MACs·b_w·b_a).")
    latency_table: dict[LayerName, Annotated[dict[int, float], Field(max_length=5)]] | None = Field(
        None,
        max_length=MAX_LAYER_ENTRIES,
        description="Per layer name, bits -> measured latency (any unit); needed for budget_kind='latency'.",
    )

    @field_validator("tie_groups")
    @classmethod
    def _tie_groups_bounded(cls, value: list[list[str]]) -> list[list[str]]:
        if sum(len(group) for group in value) > MAX_LAYER_ENTRIES:
            raise ValueError(f"tie_groups name more than {MAX_LAYER_ENTRIES} layers in all")
        return value

    @model_validator(mode="after")
    def _candidates_cover_budget(self) -> MixedPrecisionConfig:
        if not self.candidates:
            raise ValueError("candidates must not be empty")
        for budget in [self.budget_bits, *(self.budgets or [])]:
            if budget < min(self.candidates):
                raise ValueError(f"budget {budget} is below the smallest candidate {min(self.candidates)}")
        unknown = set(self.metric_weights) - {"sqnr", "kl", "task"}
        if unknown or any(w < 0 for w in self.metric_weights.values()) or not any(self.metric_weights.values()):
            raise ValueError("metric_weights: keys among sqnr, kl, task; weights >= 0, at least one > 0")
        if self.budget_kind == "latency" and not self.latency_table:
            raise ValueError("budget_kind 'latency' needs latency_table")
        return self


class DataFreeConfig(MethodConfigBase):
    needs_calibration: ClassVar[bool] = False
    prefers_gpu: ClassVar[bool] = False
    uses_calibration: ClassVar[bool] = False
    summary: ClassVar[str] = "UDFC: data-free pruning and quantization with closed-form compensation in the next layer."
    method: Literal["data_free"] = "data_free"
    prune_ratio: float = Field(0.3, ge=0, lt=1)
    bits: Literal[2, 3, 4, 6, 8] | None = 6
    criterion: Literal["l1", "l2"] = "l1"
    compensation: Literal["udfc", "none", "one_to_one"] = Field(
        "udfc",
        description="udfc: each pruned channel rebuilt from all kept channels (paper Eq. 20); "
        "none: plain pruning; one_to_one: Neuron-Merging-style single most similar partner.",
    )
    alpha1: float = Field(0.01, ge=0, description="Weight of the folded-bias term in the pruning fit (paper: 0.01).")
    alpha2: float = Field(
        0.008, ge=0, description="Weight of the folded-bias term in the quantization scale (paper: 0.008)."
    )
    ridge: float = Field(1e-4, ge=0, description="Ridge term for ill-conditioned fits, relative to mean diag(Gram).")
    nonnegative: bool = Field(
        False, description="Constrain the pruning coefficients to be >= 0 (NNLS). Not in the paper."
    )
    bias_correction: bool | None = Field(
        None,
        description="Absorb each pruned channel's expected residual (BN statistics, Gaussian ReLU mean; with "
        "BN folded into the layer, as in exported ONNX, a data-free prior) into the consumer bias. Not in the "
        "paper. Unset: on for udfc, off for none/one_to_one.",
    )
    layer_ratios: dict[LayerName, float] = Field(
        default_factory=dict,
        max_length=MAX_LAYER_ENTRIES,
        description="Per-layer prune ratios by producer name or fnmatch pattern.",
    )

    @field_validator("layer_ratios")
    @classmethod
    def _ratios_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, ratio in value.items():
            if not 0 <= ratio < 1:
                raise ValueError(f"layer_ratios[{pattern!r}] = {ratio} is outside [0, 1)")
        return value


class Int8Config(MethodConfigBase):
    ships_own_graph: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "Static W8A8: per-channel int8 weights and calibrated 8-bit activations, shipped as a QDQ ONNX graph "
        "that ONNX Runtime runs with integer kernels; a per-node diagnosis says which nodes hurt."
    )
    method: Literal["quant_int8"] = "quant_int8"
    calibration: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax",
        description="How activation ranges are set from the calibration data: minmax (observed range), percentile "
        "(the range covering `percentile` % of |x|, clipping outliers) or entropy (the range minimizing the KL "
        "divergence of the 8-bit histogram).",
    )
    percentile: float = Field(99.999, ge=90, le=100, description="Percentile kept by calibration='percentile'.")
    per_channel: bool = Field(True, description="One weight scale per output channel (false: one per tensor).")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8",
        description="uint8 (asymmetric) activations take ONNX Runtime's integer kernels on x86 (QLinearConv, "
        "QLinearMatMul); int8 activations mostly fall back to float kernels there.",
    )
    op_types: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        None,
        max_length=64,
        description="ONNX op types to quantize. null: every type ONNX Runtime can quantize when the graph has Conv "
        "layers (integer chains through Add, pooling, Relu); MatMul and Gemm only otherwise (a transformer's "
        "residual stream, LayerNorm and Softmax stay float).",
    )
    activation_matmuls: bool = Field(
        False, description="Also quantize MatMuls of two activations (attention scores); off: only weight MatMuls."
    )
    diagnose: int = Field(
        8,
        ge=0,
        le=256,
        description="Nodes whose exclusion is measured one at a time (those whose outputs lose the most SQNR "
        "first); 0: no diagnosis.",
    )
    auto_skip: int = Field(
        0, ge=0, le=64, description="Leave this many of the diagnosed nodes that hurt most in float (needs diagnose)."
    )

    @model_validator(mode="after")
    def _auto_skip_needs_diagnosis(self) -> Int8Config:
        if self.auto_skip > self.diagnose:
            raise ValueError(f"auto_skip ({self.auto_skip}) cannot exceed diagnose ({self.diagnose})")
        return self


STEP_CONFIG_CLASSES: tuple[type[MethodConfigBase], ...] = (
    RTNConfig,
    GPTQConfig,
    DecoupleQConfig,
    PruneStructuredConfig,
    PruneUnstructuredConfig,
    MixedPrecisionConfig,
    DataFreeConfig,
    Int8Config,
)
MAX_PIPELINE_STEPS = 8


def method_key(cls: type[MethodConfigBase]) -> str:
    return cls.model_fields["method"].default


def _step_class(cls: type[MethodConfigBase]) -> type[_Inert]:
    """{"method": key, "config": {...}}: one pipeline step of method `key`."""
    key = method_key(cls)
    return create_model(  # type: ignore[call-overload, no-any-return]
        f"{cls.__name__}Step",
        __base__=_Inert,
        method=(Literal[key], key),  # type: ignore[valid-type]
        config=(cls, Field(default_factory=cls, description=f"The {key} config.")),
    )


PIPELINE_STEP_CLASSES: dict[str, type[_Inert]] = {method_key(c): _step_class(c) for c in STEP_CONFIG_CLASSES}
_STEP_METHODS = ", ".join(PIPELINE_STEP_CLASSES)


def _step_tag(value: Any) -> str | None:
    method = value.get("method") if isinstance(value, dict) else getattr(value, "method", None)
    return method if method in PIPELINE_STEP_CLASSES else None


PipelineStep = Annotated[
    Union[tuple(Annotated[cls, Tag(key)] for key, cls in PIPELINE_STEP_CLASSES.items())],  # noqa: UP007
    Discriminator(
        _step_tag,
        custom_error_type="unknown_method",
        custom_error_message=f"unknown step method; a step is one of: {_STEP_METHODS}",
    ),
]
_STEPS_SCHEMA = {
    "type": "array",
    "default": [{"method": "prune_structured", "config": {}}, {"method": "quant_int8", "config": {}}],
    "minItems": 1,
    "maxItems": MAX_PIPELINE_STEPS,
    "items": {
        "type": "object",
        "properties": {"method": {"enum": list(PIPELINE_STEP_CLASSES)}, "config": {"type": "object"}},
    },
}


def _default_steps() -> list[Any]:
    return [PIPELINE_STEP_CLASSES[key](method=key) for key in ("prune_structured", "quant_int8")]


class PipelineConfig(MethodConfigBase):
    summary: ClassVar[str] = (
        "Several methods in order as one job (e.g. prune_structured then quant_int8): each step compresses the "
        "previous step's model, the report has each step's numbers, one gate judges the final model."
    )
    method: Literal["pipeline"] = "pipeline"
    steps: Annotated[list[PipelineStep], WithJsonSchema(_STEPS_SCHEMA)] = Field(
        default_factory=_default_steps,
        min_length=1,
        max_length=MAX_PIPELINE_STEPS,
        description="[{method, config}] run in order; each config as that method's own (its table here). A method "
        "that ships its own ONNX graph (quant_int8) must be the last step; pipelines do not nest. The pipeline's "
        "skip_layers are added to every step's, its seed is every step's that sets none.",
    )

    @field_validator("steps", mode="before")
    @classmethod
    def _no_nesting(cls, value: Any) -> Any:
        for index, step in enumerate(value if isinstance(value, list) else []):
            if isinstance(step, dict) and step.get("method") == "pipeline":
                raise PydanticCustomError("nested_pipeline", f"steps[{index}] is a pipeline: pipelines do not nest")
        return value

    @field_validator("steps")
    @classmethod
    def _graph_step_last(cls, value: list[Any]) -> list[Any]:
        for index, step in enumerate(value[:-1]):
            if type(step.config).ships_own_graph:
                raise PydanticCustomError(
                    "graph_step_not_last",
                    f"steps[{index}] ({step.method}) ships its own ONNX graph, so it must be the last step",
                )
        return value

    def step_configs(self) -> list[MethodConfigBase]:
        """Each step's config, with the pipeline's skip_layers added and its seed where the step set none."""
        configs = []
        for step in self.steps:
            update: dict[str, Any] = {"skip_layers": [*step.config.skip_layers, *self.skip_layers]}
            if "seed" not in step.config.model_fields_set:
                update["seed"] = self.seed
            configs.append(step.config.model_copy(update=update))
        return configs

    def calibration_cap(self, default: int) -> int:
        return max(config.calibration_cap(default) for config in self.step_configs())


MethodConfig = Annotated[
    Union[(*STEP_CONFIG_CLASSES, PipelineConfig)],  # built from the one list of step methods
    Field(discriminator="method"),
]

CONFIG_CLASSES: dict[str, type[MethodConfigBase]] = {
    method_key(cls): cls for cls in get_args(get_args(MethodConfig)[0])
}
"""Method key -> config class of every built-in method, read from `MethodConfig` (the one list)."""
METHOD_KEYS: tuple[str, ...] = tuple(CONFIG_CLASSES)

_method_config_adapter: TypeAdapter[Any] = TypeAdapter(MethodConfig)


def parse_config(method: str, config: dict[str, Any] | None) -> MethodConfigBase:
    """Validate a user's config for `method`; raises KeyError for an unknown method."""
    if method not in CONFIG_CLASSES:
        raise KeyError(method)
    return _method_config_adapter.validate_python({**(config or {}), "method": method})


class Gate(_Inert):
    """The job contract: every set field is checked against the measured report."""

    max_metric_drop: float | None = Field(None, ge=0, description="Largest allowed drop of the task metric.")
    drop_is_relative: bool = Field(False, description="Drop as a fraction of the original metric.")
    metric_drop_bound: Literal["point", "upper_ci"] = Field(
        "point",
        description="What max_metric_drop limits: the measured drop (point) or the upper end of its "
        "bootstrap 95% interval (upper_ci: the drop is below the limit with 97.5% confidence).",
    )
    min_recovery: float | None = Field(
        None,
        gt=0,
        description="Compressed metric / original metric, at least (perplexity, lower is better: "
        "original / compressed). 0.99 keeps 99% of the original quality.",
    )
    min_speedup: float | None = Field(
        None,
        gt=0,
        description="Original / compressed median latency at the smallest batch; judged on the lower bound of "
        "its 95% interval.",
    )
    max_size_bytes: int | None = Field(None, gt=0)
    min_fraction_at_target_bits: float | None = Field(None, ge=0, le=1)
