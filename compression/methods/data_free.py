"""data_free: UDFC (Bai, Chen et al., ICCV 2023), pruning + quantization with no data and no fine-tuning.

For every producer -> [BN] -> ReLU -> consumer pair (`compression.primitives.channel_graph`):

1. Prune the producer's output channels with the smallest filter l1/l2 norm (paper §3.1).
2. Rebuild each pruned channel j from all kept channels (Eq. 4) by the closed form of Eq. 20:
   ŝ = argmin ‖ŵ_j − Σ ŝ_i ŵ_i‖² + α1·(γ_j/σ_j)²·(K_j − Σ ŝ_i K_i)² in BN-folded space
   (ŵ = γ/σ·W, K = β − γμ/σ), plus a ridge term. Fold it into the consumer, V_i += ŝ_i·V_j (Eq. 8),
   then remove channel j from the producer, its BN and every consumer (the model gets smaller).
3. Quantize every weight layer per output channel; for a producer with a ReLU consumer rescale the
   consumer's slice V_m by s̃_m = (R̃·R + α2 K²)/(R̃·R̃ + α2 K²), R = γ/σ·W, R̃ = γ/σ·W̃ (Eq. 9 with
   Eq. 21 corrected: the printed Eq. 21 lost its tildes and is identically 1).

Baselines in the same code: `compensation="none"` (plain pruning, plain RTN) and `"one_to_one"`
(Neuron-Merging style). Not in the paper, both off/on by config: `nonnegative` (ŝ >= 0 by NNLS, which the
paper's ReLU bound, Eq. 11, needs) and `bias_correction` (absorb E[a_j − Σ ŝ_i a_i], from the BN statistics,
into the consumer bias; on by default for udfc because the printed form alone can be worse than plain
pruning: see the toy check in the reference note and benchmarks/data_free.py). A layer whose BatchNorm was
folded into it (exported ONNX graphs) has no statistics left: its bias correction uses a data-free prior
(`folded_preactivation_prior`), and the result says so; given calibration data, the method checks the
compensated model against plain pruning on it and ships the better one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from compression.configs import DataFreeConfig
from compression.evaluate.fidelity import energy_sums, paired_outputs
from compression.primitives.bn_fold import (
    bn_gain_shift,
    bn_output_moments,
    folded_preactivation_prior,
    gaussian_relu_mean,
    identity_gain_shift,
)
from compression.primitives.channel_graph import (
    ChannelGraph,
    ChannelPair,
    WeightLayer,
    find_channel_graph,
    input_slices,
    keep_bn_channels,
    keep_input_channels,
    keep_output_channels,
)
from compression.primitives.layers import matches_any
from compression.primitives.quant import dequantize, round_to_nearest
from compression.types import Batches, CompressionResult, ProgressFn, QuantizedLayer, no_progress

METHOD = "data_free"
_CHECK_BATCHES = 4  # calibration batches the compensated result is checked on against plain pruning


# ---- closed forms (tensor level) --------------------------------------------------------------------


def select_pruned_channels(
    weight: torch.Tensor, ratio: float, criterion: str = "l1"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned, kept) sorted output-channel indices: the round(ratio·N) filters of smallest l1/l2 norm."""
    rows = weight.detach().double().flatten(1)
    norms = rows.abs().sum(1) if criterion == "l1" else rows.pow(2).sum(1).sqrt()
    n_pruned = min(round(ratio * rows.shape[0]), rows.shape[0] - 1)
    order = torch.argsort(norms, stable=True)
    return order[:n_pruned].sort().values, order[n_pruned:].sort().values


def udfc_pruning_scales(
    folded_weight: torch.Tensor,
    folded_bias: torch.Tensor,
    gain: torch.Tensor,
    pruned: torch.Tensor,
    kept: torch.Tensor,
    alpha1: float,
    ridge: float,
    nonnegative: bool = False,
) -> torch.Tensor:
    """ŝ [n_pruned, n_kept] of paper Eq. 20 plus a ridge: one joint least-squares fit per pruned channel.

    Minimizes ‖ŵ_j − Σ_i ŝ_i ŵ_i‖² + λ_j (K_j − Σ_i ŝ_i K_i)² + ρ‖ŝ‖² with λ_j = α1·gain_j²: the paper's
    ℓ_p (Eq. 12) divided by (σ_j/γ_j)², so a channel with γ_j = 0 is handled. ρ = ridge·mean(diag(Gram)).
    """
    rows = folded_weight.double().flatten(1)
    kept_rows, pruned_rows = rows[kept], rows[pruned]
    bias_kept, bias_pruned = folded_bias.double()[kept], folded_bias.double()[pruned]
    lam = alpha1 * gain.double()[pruned] ** 2
    gram = with_ridge(kept_rows @ kept_rows.T, ridge)
    cross = pruned_rows @ kept_rows.T
    if not nonnegative:
        return _rank_one_updated_solve(gram, cross, bias_kept, bias_pruned, lam)
    scales = torch.zeros_like(cross)
    for j in range(len(pruned)):
        gram_j = gram + lam[j] * torch.outer(bias_kept, bias_kept)
        rhs_j = cross[j] + lam[j] * bias_pruned[j] * bias_kept
        scales[j] = solve_gram(gram_j, rhs_j[None], nonnegative=True)[0]
    return scales


def with_ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """gram + ρI with ρ = ridge·mean(diag(gram)), floored at 1e-12 relative so it is never singular."""
    scale = float(gram.diagonal().mean()) or 1.0
    return gram + max(ridge, 1e-12) * scale * torch.eye(gram.shape[0], dtype=gram.dtype)


def _rank_one_updated_solve(
    gram: torch.Tensor,
    cross: torch.Tensor,
    bias_kept: torch.Tensor,
    bias_pruned: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """(G + λ_j p pᵀ)⁻¹ (c_j + λ_j K_j p) for all j at once, by Sherman–Morrison on the rank-1 term."""
    factor = torch.linalg.cholesky(gram)
    inv_cross = torch.cholesky_solve(cross.T, factor).T  # [n_pruned, n_kept]: G⁻¹ c_j
    inv_p = torch.cholesky_solve(bias_kept[:, None], factor)[:, 0]  # G⁻¹ p
    inv_rhs = inv_cross + (lam * bias_pruned)[:, None] * inv_p  # G⁻¹ b_j
    correction = lam * (inv_rhs @ bias_kept) / (1.0 + lam * (bias_kept @ inv_p))
    return inv_rhs - correction[:, None] * inv_p


def solve_gram(gram: torch.Tensor, rhs: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """Rows s_j minimizing sᵀGs − 2sᵀrhs_j (G positive definite), optionally subject to s >= 0.

    The constrained case is an NNLS on the Cholesky factor: sᵀGs − 2sᵀc = ‖Lᵀs − L⁻¹c‖² + const.
    """
    factor = torch.linalg.cholesky(gram)
    if not nonnegative:
        return torch.cholesky_solve(rhs.T, factor).T
    upper = factor.T.numpy()
    targets = torch.linalg.solve_triangular(factor, rhs.T, upper=False).T.numpy()
    solved = [nnls(upper, target, maxiter=50 * gram.shape[0])[0] for target in targets]
    return torch.from_numpy(np.stack(solved)).to(gram.dtype)


def one_to_one_scales(folded_weight: torch.Tensor, pruned: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Neuron-Merging-style scales [n_pruned, n_kept]: each pruned channel goes to its most cosine-similar
    kept BN-folded filter, scaled by the norm ratio; no merge when the best cosine similarity is <= 0."""
    rows = folded_weight.double().flatten(1)
    norms = rows.norm(dim=1).clamp_min(1e-12)
    cosine = (rows[pruned] / norms[pruned, None]) @ (rows[kept] / norms[kept, None]).T
    best_cos, best = cosine.max(dim=1)
    ratio = torch.where(best_cos > 0, norms[pruned] / norms[kept][best], torch.zeros_like(best_cos))
    scales = torch.zeros(len(pruned), len(kept), dtype=torch.float64)
    scales[torch.arange(len(pruned)), best] = ratio
    return scales


def udfc_quant_scales(
    weight: torch.Tensor, weight_q: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor, alpha2: float
) -> torch.Tensor:
    """s̃ per output channel, corrected Eq. 21: argmin ‖R − s̃R̃‖² + α2 (K − s̃K)², R = gain·W, R̃ = gain·W̃.

    Falls back to 1 where the fit is degenerate or not positive (only positive scales pass a ReLU).
    """
    rows = weight.detach().double().flatten(1) * gain.double()[:, None]
    rows_q = weight_q.detach().double().flatten(1) * gain.double()[:, None]
    bias_term = alpha2 * shift.double() ** 2
    numerator = (rows_q * rows).sum(1) + bias_term
    denominator = (rows_q * rows_q).sum(1) + bias_term
    scales = numerator / denominator.clamp_min(1e-300)
    return torch.where((denominator > 0) & (scales > 0), scales, torch.ones_like(scales))


def merge_pruned_into_consumer(
    weight: torch.Tensor, scales: torch.Tensor, pruned: torch.Tensor, kept: torch.Tensor, block: int = 1
) -> torch.Tensor:
    """Consumer weight with V_i += Σ_j ŝ_ji V_j for kept i (paper Eq. 8); pruned slices stay in place."""
    slices = input_slices(weight.detach().double().clone(), block)
    slices[:, kept] += torch.einsum("ji,ojr->oir", scales.double(), slices[:, pruned])
    return slices.reshape(weight.shape).to(weight.dtype)


def expected_activation(activation: str, bn: nn.Module | None, weight: torch.Tensor) -> torch.Tensor | None:
    """E[a] per channel: from BN statistics (BN output ~ N(β, γ²)) or, with no BN after the layer (folded
    into `weight`, as in an exported ONNX graph), from `folded_preactivation_prior`. A ReLU mean only:
    None for other activations, and for identity without BN (the prior's mean, 0, corrects nothing)."""
    if activation == "identity" and bn is not None:
        return bn_output_moments(bn)[0]
    if activation != "relu":
        return None
    mean, std = bn_output_moments(bn) if bn is not None else folded_preactivation_prior(weight)
    return gaussian_relu_mean(mean, std)


def absorb_residual_mean(
    layer: WeightLayer,
    scales: torch.Tensor,
    expected: torch.Tensor,
    pruned: torch.Tensor,
    kept: torch.Tensor,
    block: int = 1,
) -> None:
    """consumer bias += Σ_j (Σ_r V_j[:, r])·(E[a_j] − Σ_i ŝ_ji E[a_i]); exact away from zero padding."""
    residual = expected[pruned] - scales.double() @ expected[kept]
    slice_sums = input_slices(layer.weight.detach().double(), block)[:, pruned].sum(-1)  # [out, n_pruned]
    shift = (slice_sums @ residual).to(layer.weight.dtype)
    base = layer.bias.detach() if layer.bias is not None else torch.zeros_like(shift)
    layer.bias = nn.Parameter(base + shift)


def scale_consumer_inputs(layer: WeightLayer, channel_scales: torch.Tensor, block: int = 1) -> None:
    """V_m ← s̃_m·V_m for every input channel m of the consumer (paper Eq. 9)."""
    slices = input_slices(layer.weight.detach().double().clone(), block)
    slices *= channel_scales.double()[None, :, None]
    layer.weight = nn.Parameter(slices.reshape(layer.weight.shape).to(layer.weight.dtype))


# ---- model level ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Bookkeeping of one compress() call."""

    model: nn.Module
    graph: ChannelGraph
    config: DataFreeConfig
    result: CompressionResult
    pruned: dict[str, tuple[int, int]] = field(default_factory=dict)
    not_pruned: dict[str, str] = field(default_factory=dict)
    compensated: dict[str, dict[str, float]] = field(default_factory=dict)
    uncompensated: dict[str, str] = field(default_factory=dict)
    bias_corrected: list[str] = field(default_factory=list)
    prior_corrected: list[str] = field(default_factory=list)  # bias-corrected from the folded-BN prior

    @property
    def bias_correction(self) -> bool:
        """The config's choice; unset means on for udfc and off for the baselines."""
        if self.config.bias_correction is None:
            return self.config.compensation == "udfc"
        return self.config.bias_correction


def compress(
    model: nn.Module, calib: Batches | None, config: DataFreeConfig, *, progress: ProgressFn | None = None
) -> CompressionResult:
    """UDFC data-free pruning + quantization. The compression reads no data; `calib`, when given, only
    checks the compensated result against plain pruning on a few batches and ships the better one."""
    progress = progress or no_progress
    result = _compress_once(model, config, progress)
    if calib is not None and len(calib) and result.stats["channels_pruned"] and config.compensation != "none":
        result = _check_against_plain(model, calib, config, result)
    elif result.stats["bias_correction_prior"]:
        result.notes.append(
            "Not checked against plain pruning (no data was given): the bias correction of the BN-folded "
            "layers rests on a prior, not on BN statistics; on a model far from it, the result can be worse "
            "than plain pruning. Give calibration data to have the method compare both and ship the better."
        )
    progress(1.0, "data_free: done")
    return result


def _compress_once(model: nn.Module, config: DataFreeConfig, progress: ProgressFn) -> CompressionResult:
    started = time.perf_counter()
    work = copy.deepcopy(model).eval()
    params_before = _count_params(work)
    with torch.no_grad():
        graph = find_channel_graph(work)
        run = _Run(work, graph, config, CompressionResult(model=work, method=METHOD))
        for index, name in enumerate(graph.layers):
            progress(index / max(len(graph.layers), 1), f"data_free: {name}")
            _process_layer(run, name)
    _finish(run, params_before, time.perf_counter() - started)
    return run.result


def _check_against_plain(
    model: nn.Module, calib: Batches, config: DataFreeConfig, compensated: CompressionResult
) -> CompressionResult:
    """Plain pruning (same channels criterion, no compensation) and the compensated result, each measured by
    its relative output error against `model` on the first batches of `calib`; the lower one is shipped."""
    plain = _compress_once(
        model, config.model_copy(update={"compensation": "none", "bias_correction": None}), no_progress
    )
    batches = Batches(calib.inputs[:_CHECK_BATCHES])
    errors = {
        "compensated": _output_error(model, compensated.model, batches),
        "plain": _output_error(model, plain.model, batches),
    }
    chosen, shipped = (plain, "plain") if errors["plain"] < errors["compensated"] else (compensated, "compensated")
    chosen.stats["check_against_plain"] = {"relative_output_error": errors, "shipped": shipped, "batches": len(batches)}
    chosen.notes.append(
        f"Checked against plain pruning on {len(batches)} calibration batches (relative output error vs the "
        f"original: compensated {errors['compensated']:.4f}, plain {errors['plain']:.4f}): shipped "
        + ("the compensated result." if shipped == "compensated" else "PLAIN PRUNING, the compensation made it worse.")
    )
    return chosen


def _output_error(original: nn.Module, compressed: nn.Module, batches: Batches) -> float:
    signal = noise = 0.0
    for reference, output, _, _ in paired_outputs(original, compressed, batches):
        batch_signal, batch_noise = energy_sums(reference, output)
        signal, noise = signal + batch_signal, noise + batch_noise
    return math.sqrt(noise / max(signal, 1e-300))


def _process_layer(run: _Run, name: str) -> None:
    layer = run.model.get_submodule(name)
    if matches_any(name, run.config.skip_layers):
        run.result.skipped[name] = "matched skip_layers"
        return
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        run.result.skipped[name] = "grouped/depthwise conv: UDFC's channel compensation does not apply"
        return
    pair = _usable_pair(run, name)
    ratio = _layer_ratio(name, run.config)
    if pair is not None and ratio > 0:
        _prune_pair(run, pair, ratio)
    if run.config.bits is not None:
        _quantize_layer(run, name, pair)


def _usable_pair(run: _Run, name: str) -> ChannelPair | None:
    """The producer's pair if its channels may be pruned and compensated; else None, reason recorded."""
    pair = run.graph.pairs.get(name)
    if pair is None:
        run.not_pruned[name] = run.graph.unpaired.get(name, "no producer/consumer pair")
        return None
    skipped = [c.name for c in pair.consumers if matches_any(c.name, run.config.skip_layers)]
    if skipped:
        run.not_pruned[name] = f"its consumer {skipped[0]} matched skip_layers"
        return None
    if not pair.positively_homogeneous:
        run.not_pruned[name] = f"activation {pair.activation} is not ReLU-like: channel scales do not pass it"
        return None
    return pair


def _layer_ratio(name: str, config: DataFreeConfig) -> float:
    for pattern, ratio in config.layer_ratios.items():
        if matches_any(name, [pattern]):
            return ratio
    return config.prune_ratio


def _gain_shift(run: _Run, pair: ChannelPair | None, layer: WeightLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (γ/σ, K) of the producer's BN, with the producer's own bias folded into K."""
    if pair is None or pair.bn is None:
        return identity_gain_shift(layer.weight.shape[0], layer.bias)
    gain, shift = bn_gain_shift(run.model.get_submodule(pair.bn))
    if layer.bias is not None:
        shift = shift + gain * layer.bias.detach().double()
    return gain, shift


def _prune_pair(run: _Run, pair: ChannelPair, ratio: float) -> None:
    producer = run.model.get_submodule(pair.producer)
    pruned, kept = select_pruned_channels(producer.weight, ratio, run.config.criterion)
    if len(pruned) == 0:
        return
    scales = _pruning_scales(run, pair, producer, pruned, kept)
    bn = run.model.get_submodule(pair.bn) if pair.bn is not None else None
    expected = expected_activation(pair.activation, bn, producer.weight) if run.bias_correction else None
    for consumer in pair.consumers:
        layer = run.model.get_submodule(consumer.name)
        if expected is not None and consumer.mean_preserving:
            absorb_residual_mean(layer, scales, expected, pruned, kept, consumer.block)
        layer.weight = nn.Parameter(merge_pruned_into_consumer(layer.weight, scales, pruned, kept, consumer.block))
        keep_input_channels(layer, kept, consumer.block)
    keep_output_channels(producer, kept)
    if bn is not None:
        keep_bn_channels(bn, kept)
    if expected is not None:
        run.bias_corrected.append(pair.producer)
        if bn is None:
            run.prior_corrected.append(pair.producer)
    run.pruned[pair.producer] = (len(pruned), len(pruned) + len(kept))


def _pruning_scales(
    run: _Run, pair: ChannelPair, producer: WeightLayer, pruned: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    config = run.config
    gain, shift = _gain_shift(run, pair, producer)
    folded = producer.weight.detach().double().flatten(1) * gain[:, None]
    if config.compensation == "udfc":
        return udfc_pruning_scales(folded, shift, gain, pruned, kept, config.alpha1, config.ridge, config.nonnegative)
    if config.compensation == "one_to_one":
        return one_to_one_scales(folded, pruned, kept)
    return torch.zeros(len(pruned), len(kept), dtype=torch.float64)


def _quantize_layer(run: _Run, name: str, pair: ChannelPair | None) -> None:
    layer = run.model.get_submodule(name)
    bits = run.config.bits
    codes, scales, zeros = round_to_nearest(layer.weight.detach().flatten(1), bits, None, "none")
    weight_q = dequantize(codes, scales, zeros, None).reshape(layer.weight.shape).to(layer.weight.dtype)
    if run.config.compensation == "udfc" and pair is not None:
        gain, shift = _gain_shift(run, pair, layer)
        channel_scales = udfc_quant_scales(layer.weight, weight_q, gain, shift, run.config.alpha2)
        for consumer in pair.consumers:
            scale_consumer_inputs(run.model.get_submodule(consumer.name), channel_scales, consumer.block)
        run.compensated[name] = _summary(channel_scales)
    elif run.config.compensation == "udfc":
        run.uncompensated[name] = run.not_pruned.get(name, "no ReLU consumer")
    run.result.quantized[name] = QuantizedLayer(
        name=name,
        kind="linear" if isinstance(layer, nn.Linear) else "conv2d",
        bits=bits,
        group_size=None,
        codes=codes,
        scales=scales,
        zeros=zeros,
        orig_shape=tuple(layer.weight.shape),
    )
    layer.weight = nn.Parameter(weight_q)


def _summary(values: torch.Tensor) -> dict[str, float]:
    return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finish(run: _Run, params_before: int, seconds: float) -> None:
    params_after = _count_params(run.model)
    run.result.stats.update(
        {
            "channels_pruned": {name: {"pruned": p, "total": t} for name, (p, t) in run.pruned.items()},
            "not_pruned": run.not_pruned if run.config.prune_ratio or run.config.layer_ratios else {},
            "quant_scale_compensation": run.compensated,
            "quantized_without_compensation": run.uncompensated,
            "bias_corrected": run.bias_corrected,
            "bias_correction_prior": run.prior_corrected,
            "params_before": params_before,
            "params_after": params_after,
            "param_reduction": 1.0 - params_after / max(params_before, 1),
            "time_s": seconds,
        }
    )
    run.result.notes.extend(_variant_notes(run))


def _variant_notes(run: _Run) -> list[str]:
    config = run.config
    notes = [_pruning_note(run)] if run.pruned else []
    if (config.prune_ratio > 0 or config.layer_ratios) and not run.pruned:
        notes.append(
            "No channel was pruned: no producer -> [BN] -> ReLU -> consumer pair whose channels can be "
            "removed consistently (residual adds, model outputs, non-ReLU activations and untraceable "
            "modules couple them); see stats.not_pruned."
        )
    if config.bits is not None:
        notes.append(_quant_note(run))
    if run.pruned and any(reason.startswith("feeds a residual add") for reason in run.not_pruned.values()):
        notes.append(
            "Channels coupled through residual adds were not pruned (only quantized): removing them needs "
            "every producer and consumer of the residual stream pruned together; see stats.not_pruned."
        )
    if not any(isinstance(m, nn.Conv2d) for m in run.model.modules()):
        notes.append(
            "Linear-only model: data-free weight quantization of every Linear; pruning and scale "
            f"compensation only on Linear -> [BN1d] -> ReLU -> Linear pairs ({len(run.pruned)} pruned, "
            f"{len(run.compensated)} compensated). Attention, residual-stream and GELU/SiLU channels were "
            "neither pruned nor compensated; embeddings and norms stay float."
        )
    return notes


def _pruning_note(run: _Run) -> str:
    config = run.config
    sign = "coefficients constrained >= 0 (NNLS, not in the paper)" if config.nonnegative else "signed coefficients"
    variant = {
        "udfc": "udfc: paper Eq. 20 as printed, each pruned BN-folded filter fit by all kept filters of its "
        f"layer (alpha1={config.alpha1} on the folded-bias term, ridge={config.ridge}·mean diag(Gram)), "
        f"{sign}, merged into the consumer's input kernels by Eq. 8",
        "one_to_one": "one_to_one: Neuron-Merging-style, each pruned channel merged into its most "
        "cosine-similar kept BN-folded filter with the norm-ratio scale (no merge when the best cosine <= 0)",
        "none": "none: plain pruning, no compensation",
    }[config.compensation]
    if run.bias_corrected:
        variant += (
            f"; plus, in {len(run.bias_corrected)} layers, the residual mean E[a_j − Σ ŝ_i a_i] (Gaussian ReLU "
            "mean) absorbed into the consumer bias (not in the paper)"
        )
        with_bn = len(run.bias_corrected) - len(run.prior_corrected)
        variant += f", from BN statistics in {with_bn}" if with_bn else ""
        if run.prior_corrected:
            variant += (
                f", and in {len(run.prior_corrected)} with no BatchNorm after the layer (folded into it, as in an "
                "exported ONNX graph) from a data-free prior: pre-activation ~ N(0, ‖ŵ_i‖²) per channel"
            )
    total = sum(p for p, _ in run.pruned.values())
    return (
        f"Pruned {total} output channels in {len(run.pruned)} producer layers by the {config.criterion}-norm "
        f"of their filters and removed them physically. Compensation {variant}."
    )


def _quant_note(run: _Run) -> str:
    config = run.config
    base = (
        f"Weights quantized to {config.bits} bits per output channel, symmetric round-to-nearest on the "
        "library's signed integer grid (not the paper's DoReFa Eq. 3 grid); biases and BN stay float."
    )
    if config.compensation != "udfc":
        return base + " No quantization-scale compensation (baseline)."
    return base + (
        f" UDFC scale compensation by corrected Eq. 21 (alpha2={config.alpha2}; the printed Eq. 21 is "
        f"identically 1) on the consumer slices (Eq. 9) of {len(run.compensated)} layers; "
        f"{len(run.uncompensated)} layers were quantized without it (no single-path ReLU consumer)."
    )
