"""Output fidelity of a compressed model against the original, on the same batches.

`compare_outputs` reports top-1 agreement, KL(original || compressed) over the last axis, SQNR of
the outputs, and the task metric of both models: accuracy with labels (classifiers), perplexity
(causal LMs, labels = input ids), mean cosine of the outputs (encoders: cosine to the original).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compression.evaluate.uncertainty import bootstrap_interval, drop_interval
from compression.types import Batches, primary_output

_CHUNK_ELEMENTS = 1 << 22  # float64 work per step: 32 MB, however wide the outputs (a 262k vocabulary)


def _row_chunks(ref: torch.Tensor, out: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Both outputs as [rows, last dim], a few rows at a time, so float64 copies stay small."""
    width = ref.shape[-1] if ref.dim() > 0 else 1
    flat_ref, flat_out = ref.reshape(-1, width), out.reshape(-1, width)
    step = max(1, _CHUNK_ELEMENTS // width)
    for start in range(0, flat_ref.shape[0], step):
        yield flat_ref[start : start + step], flat_out[start : start + step]


def energy_sums(reference: torch.Tensor, approximation: torch.Tensor) -> tuple[float, float]:
    """(‖reference‖², ‖reference − approximation‖²) in float64, a few rows at a time."""
    signal = noise = 0.0
    for ref, approx in _row_chunks(reference, approximation):
        signal += ref.double().pow(2).sum().item()
        noise += (ref.double() - approx.double()).pow(2).sum().item()
    return signal, noise


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """10·log10(‖reference‖² / ‖reference − approximation‖²); inf when identical."""
    signal, noise = energy_sums(reference, approximation)
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


@torch.no_grad()
def paired_outputs(
    original: nn.Module, compressed: nn.Module, batches: Batches
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]]:
    """(original output, compressed output, labels or None, batch) for every batch, both in eval mode."""
    original.eval()
    compressed.eval()
    labels = batches.labels or [None] * len(batches)
    for batch, label in zip(batches.inputs, labels, strict=True):
        yield primary_output(original(**batch)).float(), primary_output(compressed(**batch)).float(), label, batch


class _Accumulator:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}  # per-sample values, for the drop's interval

    def add_rows(self, key: str, values: torch.Tensor) -> None:
        self.rows.setdefault(key, []).append(values.detach().double().cpu().reshape(-1))

    def per_sample(self, key: str) -> np.ndarray:
        return torch.cat(self.rows[key]).numpy()

    def add(self, key: str, total: float, count: int) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + total
        self.counts[key] = self.counts.get(key, 0) + count

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else None


def _window_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window (row): summed next-token negative log-likelihood and token count (padding excluded)."""
    shift_logits, targets = logits[:, :-1], input_ids[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="none")
    keep = mask[:, 1:].bool() if mask is not None else torch.ones_like(targets, dtype=torch.bool)
    nll = nll.reshape(targets.shape) * keep
    return nll.double().sum(dim=1), keep.sum(dim=1)


def _add_distribution_metrics(acc: _Accumulator, ref: torch.Tensor, out: torch.Tensor) -> None:
    if ref.dim() < 2 or ref.shape[-1] < 2:
        return
    matches = (ref.argmax(-1) == out.argmax(-1)).reshape(ref.shape[0], -1)
    acc.add_rows("top1_matches", matches.sum(dim=1))
    acc.add_rows("top1_positions", torch.full((ref.shape[0],), matches.shape[1]))
    for chunk_ref, chunk_out in _row_chunks(ref, out):
        acc.add("top1", float((chunk_ref.argmax(-1) == chunk_out.argmax(-1)).sum()), chunk_ref.shape[0])
        log_p, log_q = F.log_softmax(chunk_ref.double(), -1), F.log_softmax(chunk_out.double(), -1)
        acc.add("kl", float((log_p.exp() * (log_p - log_q)).sum()), chunk_ref.shape[0])


def _add_task_metrics(
    acc: _Accumulator,
    task: str,
    ref: torch.Tensor,
    out: torch.Tensor,
    label: torch.Tensor | None,
    batch: dict,
) -> None:
    if task == "causal_lm" and "input_ids" in batch:
        for key, logits in (("nll_original", ref), ("nll_compressed", out)):
            sums, counts = _window_nll(logits, batch["input_ids"], batch.get("attention_mask"))
            acc.add(key, float(sums.sum()), int(counts.sum()))
            acc.add_rows(key, sums)
        acc.add_rows("tokens", counts)
    elif label is not None and ref.dim() == 2 and label.dim() == 1:
        for key, logits in (("acc_original", ref), ("acc_compressed", out)):
            correct = logits.argmax(-1) == label.to(logits.device)
            acc.add(key, float(correct.sum()), len(label))
            acc.add_rows(key, correct)
    if task == "encoder" or ref.dim() == 2:
        cosine = F.cosine_similarity(ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1), dim=-1)
        acc.add("cosine", float(cosine.sum()), cosine.numel())
        acc.add_rows("cosine", cosine)


def _task_metric(acc: _Accumulator, task: str) -> dict[str, Any]:
    if acc.counts.get("nll_original"):
        ppl = {k: math.exp(acc.mean(f"nll_{k}")) for k in ("original", "compressed")}
        return {"name": "perplexity", "higher_is_better": False, **ppl}
    if acc.counts.get("acc_original"):
        accuracy = {k: acc.mean(f"acc_{k}") for k in ("original", "compressed")}
        return {"name": "accuracy", "higher_is_better": True, **accuracy}
    if task == "encoder" and acc.counts.get("cosine"):
        return {
            "name": "mean_cosine",
            "higher_is_better": True,
            "original": 1.0,
            "compressed": acc.mean("cosine"),
        }
    if acc.counts.get("top1"):
        return {
            "name": "top1_agreement",
            "higher_is_better": True,
            "original": 1.0,
            "compressed": acc.mean("top1"),
        }
    return {"name": "sqnr_db", "higher_is_better": True, "original": math.inf, "compressed": None}


def compare_outputs(
    original: nn.Module, compressed: nn.Module, batches: Batches, *, task: str = "classifier"
) -> dict[str, Any]:
    """Fidelity of `compressed` against `original` on `batches` (both run on the same inputs).

    Returns top1_agreement, kl_divergence (mean per sample/token, nats), sqnr_db (outputs),
    mean_cosine, samples, and `metric` {name, original, compressed, drop, higher_is_better}.
    """
    acc = _Accumulator()
    signal = noise = 0.0
    samples = 0
    for ref, out, label, batch in paired_outputs(original, compressed, batches):
        if ref.shape != out.shape:
            raise ValueError(f"output shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
        batch_signal, batch_noise = energy_sums(ref, out)
        signal, noise = signal + batch_signal, noise + batch_noise
        samples += ref.shape[0]
        if task != "encoder":  # argmax / softmax over embedding dimensions mean nothing
            _add_distribution_metrics(acc, ref, out)
        _add_task_metrics(acc, task, ref, out, label, batch)
    metric = _task_metric(acc, task)
    if metric["name"] == "sqnr_db":
        metric["compressed"] = 10 * math.log10(signal / noise) if noise else math.inf
    metric["drop"] = metric_drop(metric)
    metric["drop_ci95"] = _drop_interval(acc, metric["name"])
    return {
        "samples": samples,
        "top1_agreement": acc.mean("top1"),
        "kl_divergence": acc.mean("kl"),
        "sqnr_db": 10 * math.log10(max(signal, 1e-300) / noise) if noise else math.inf,
        "mean_cosine": acc.mean("cosine"),
        "metric": metric,
    }


def _drop_interval(acc: _Accumulator, name: str) -> list[float] | None:
    """Bootstrap 95% interval of the task metric's drop over the evaluation samples (None: not per sample)."""
    if name == "perplexity":
        original, compressed, weights = (acc.per_sample(k) for k in ("nll_original", "nll_compressed", "tokens"))
        return drop_interval(original, compressed, weights, higher_is_better=False, transform=np.exp)
    if name == "accuracy":
        original, compressed = acc.per_sample("acc_original"), acc.per_sample("acc_compressed")
        return drop_interval(original, compressed, np.ones_like(original), higher_is_better=True)
    if name == "mean_cosine":
        cosine = acc.per_sample("cosine")
        return drop_interval(np.ones_like(cosine), cosine, np.ones_like(cosine), higher_is_better=True)
    if name == "top1_agreement":
        positions = acc.per_sample("top1_positions")
        return drop_interval(positions, acc.per_sample("top1_matches"), positions, higher_is_better=True)
    return None


def metric_drop(metric: dict[str, Any]) -> float | None:
    """How much worse the compressed model is (positive = worse), in the metric's own units."""
    original, compressed = metric.get("original"), metric.get("compressed")
    if original is None or compressed is None or math.isinf(original) or math.isinf(compressed):
        return None
    return original - compressed if metric.get("higher_is_better", True) else compressed - original


@torch.no_grad()
def _embed(module: nn.Module, tokenizer: Any, texts: list[str], seq_len: int, device: torch.device) -> torch.Tensor:
    chunks = []
    for start in range(0, len(texts), 32):
        tokens = tokenizer(
            texts[start : start + 32], padding=True, truncation=True, max_length=seq_len, return_tensors="pt"
        )
        chunks.append(
            module(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
            .float()
            .cpu()
        )
    return torch.cat(chunks)


def _pair_cosines(module: nn.Module, tokenizer: Any, pairs: list[tuple[str, str, float]], seq_len: int) -> np.ndarray:
    device = next((p.device for p in module.parameters()), torch.device("cpu"))  # an ONNX runtime has none
    a = _embed(module, tokenizer, [p[0] for p in pairs], seq_len, device)
    b = _embed(module, tokenizer, [p[1] for p in pairs], seq_len, device)
    return F.cosine_similarity(a, b, dim=-1).numpy()


def pair_spearman(module: nn.Module, tokenizer: Any, pairs: list[tuple[str, str, float]], seq_len: int = 128) -> float:
    """Spearman correlation between the cosine of each pair's embeddings and its human score."""
    from scipy.stats import spearmanr

    return float(spearmanr(_pair_cosines(module, tokenizer, pairs, seq_len), [p[2] for p in pairs]).statistic)


def spearman_drop_interval(before: np.ndarray, after: np.ndarray, scores: np.ndarray) -> list[float] | None:
    """Bootstrap 95% interval of Spearman(before, scores) - Spearman(after, scores), resampling pairs."""
    from scipy.stats import spearmanr

    def drop(indices: np.ndarray) -> np.ndarray:
        return np.array(
            [spearmanr(before[i], scores[i]).statistic - spearmanr(after[i], scores[i]).statistic for i in indices]
        )

    return bootstrap_interval(drop, len(scores))


def spearman_metric(
    original: nn.Module, compressed: nn.Module, tokenizer: Any, pairs: list[tuple[str, str, float]], seq_len: int = 128
) -> dict[str, Any]:
    from scipy.stats import spearmanr

    scores = np.array([p[2] for p in pairs])
    cosines = [_pair_cosines(model, tokenizer, pairs, seq_len) for model in (original, compressed)]
    before, after = (float(spearmanr(cosine, scores).statistic) for cosine in cosines)
    return {
        "name": "spearman",
        "higher_is_better": True,
        "original": before,
        "compressed": after,
        "drop": before - after,
        "drop_ci95": spearman_drop_interval(cosines[0], cosines[1], scores),
        "pairs": len(pairs),
    }
