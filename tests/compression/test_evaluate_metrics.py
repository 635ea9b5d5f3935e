"""Evaluation: fidelity and task metrics, per-layer diagnosis, size/bits/FLOPs, ORT latency, the gate."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression.configs import Gate
from compression.evaluate import (
    bits_per_weight,
    check_gate,
    compare_outputs,
    estimate_flops,
    layer_diagnosis,
    model_size,
    ort_latency,
    sqnr_db,
)
from compression.types import Batches, CompressionResult, QuantizedLayer

warnings.filterwarnings("ignore")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(input)).flatten(1))))


def _batches(labels: bool = True) -> Batches:
    generator = torch.Generator().manual_seed(0)
    inputs = [{"input": torch.randn(16, 1, 8, 8, generator=generator)} for _ in range(3)]
    targets = [torch.randint(0, 5, (16,), generator=generator) for _ in range(3)] if labels else None
    return Batches(inputs=inputs, labels=targets)


def _noisy(model: nn.Module, layer: str, scale: float) -> nn.Module:
    noisy = copy.deepcopy(model)
    weight = noisy.get_submodule(layer).weight
    with torch.no_grad():
        weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    return noisy


def test_identical_models_are_perfectly_faithful() -> None:
    torch.manual_seed(0)
    model = _Net()
    report = compare_outputs(model, copy.deepcopy(model), _batches())
    assert report["top1_agreement"] == 1.0 and report["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert math.isinf(report["sqnr_db"]) and report["samples"] == 48
    assert report["metric"]["name"] == "accuracy" and report["metric"]["drop"] == 0.0


def test_fidelity_degrades_with_noise_and_accuracy_matches_manual() -> None:
    torch.manual_seed(0)
    model = _Net()
    batches = _batches()
    small, large = (compare_outputs(model, _noisy(model, "fc1", s), batches) for s in (0.05, 1.0))
    assert small["sqnr_db"] > large["sqnr_db"] and small["kl_divergence"] < large["kl_divergence"]
    noisy = _noisy(model, "fc1", 1.0)
    with torch.no_grad():
        hits = sum((noisy(**b).argmax(1) == y).sum().item() for b, y in zip(batches, batches.labels, strict=True))
    assert large["metric"]["compressed"] == pytest.approx(hits / 48)


def test_perplexity_for_causal_lm_matches_cross_entropy() -> None:
    class _Bigram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(11, 11)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.table(input_ids)

    torch.manual_seed(0)
    model = _Bigram()
    ids = torch.randint(0, 11, (4, 9))
    batches = Batches(inputs=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], labels=[ids])
    report = compare_outputs(model, model, batches, task="causal_lm")
    with torch.no_grad():
        logits = model(ids, None)
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1)).item())
    assert report["metric"]["name"] == "perplexity"
    assert report["metric"]["original"] == pytest.approx(expected, rel=1e-6)


def test_encoder_metric_is_mean_cosine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    wrapped = _Wrap(model)
    report = compare_outputs(wrapped, _Wrap(_noisy(model, "1", 0.3)), _batches(labels=False), task="encoder")
    assert report["metric"]["name"] == "mean_cosine" and 0.5 < report["metric"]["compressed"] < 1.0


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.inner(input)


def test_layer_diagnosis_points_at_the_damaged_layer() -> None:
    torch.manual_seed(0)
    model = _Net()
    damaged = _noisy(model, "fc1", 2.0)
    report = layer_diagnosis(model, damaged, _batches(), ["conv", "fc1", "fc2"], top_k=2)
    by_name = {row["name"]: row for row in report["layers"]}
    assert math.isinf(by_name["conv"]["sqnr_db"])  # upstream of the damage: untouched
    assert report["largest_drop"][0]["name"] == "fc1"
    assert report["suggested_skip_layers"][0] == "fc1"


def test_sqnr_of_known_noise() -> None:
    reference = torch.ones(1000)
    assert sqnr_db(reference, reference * 1.1) == pytest.approx(20.0)


def _quantized_result() -> CompressionResult:
    torch.manual_seed(0)
    model = _Net()
    codes = torch.zeros(32, 256, dtype=torch.int8)
    layer = QuantizedLayer("fc1", "linear", 2, 64, codes, torch.ones(32, 4), torch.ones(32, 4), (32, 256))
    return CompressionResult(model, "test", {"fc1": layer})


def test_bits_per_weight_nominal_vs_actual() -> None:
    bits = bits_per_weight(_quantized_result())
    assert bits["nominal_bits"] == 2.0
    assert bits["actual_bits"] == pytest.approx(2.0 + 64 / 64)  # fp32 S + fp32 Z per group of 64, as shipped
    float_weights = 4 * 9 + 5 * 32
    assert bits["all_weights_bits"] == pytest.approx((32 * 256 * 3.0 + 32 * float_weights) / (32 * 256 + float_weights))


def test_flops_and_size_of_a_known_net() -> None:
    model = _Net()
    flops = estimate_flops(model, {"input": torch.zeros(2, 1, 8, 8)})
    conv_macs = 2 * 4 * 8 * 8 * 9
    assert flops["layers"]["conv"] == conv_macs and flops["macs"] == conv_macs + 2 * (256 * 32 + 32 * 5)
    assert flops["per_sample_flops"] == flops["flops"] / 2
    size = model_size(model)
    assert size["params"] == sum(p.numel() for p in model.parameters()) and size["float_bytes"] == 4 * size["params"]


def test_ort_latency_reports_each_batch(tmp_path: Path) -> None:
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        _Net().eval(), (torch.zeros(1, 1, 8, 8),), str(path), input_names=["input"],
        dynamic_axes={"input": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    feeds = {"input": np.zeros((3, 1, 8, 8), np.float32)}
    report = ort_latency(path, feeds, warmup=1, repeats=5, threads=1, batch_sizes=(1, 8))
    assert report["provider"] == "CPUExecutionProvider" and set(report["batches"]) == {"1", "8"}
    row = report["batches"]["8"]
    assert 0 < row["median_ms"] <= row["p95_ms"] and row["throughput_per_s"] == pytest.approx(8000 / row["median_ms"])


def _report(drop: float, original: float, speedup: float | None, size: int) -> dict:
    return {
        "fidelity": {"metric": {"name": "accuracy", "original": original, "drop": drop}},
        "latency": {"speedup": speedup, "speedup_ci95": None if speedup is None else [speedup, speedup]},
        "compressed": {"size_bytes": size, "fraction_at_target_bits": 0.9},
        "export_check": {"passed": True, "worst_rel_error": 1e-6, "tolerance": 0.02},
    }


def test_gate_passes_fails_and_fails_unmeasured() -> None:
    gate = Gate(max_metric_drop=0.01, min_speedup=1.2, max_size_bytes=1000, min_fraction_at_target_bits=0.8)
    passed = check_gate(gate, _report(0.005, 0.9, 1.5, 900))
    assert passed["verdict"] == "pass" and len(passed["checks"]) == 5  # the export check is always there
    failed = check_gate(gate, _report(0.02, 0.9, 1.5, 900))
    assert failed["verdict"] == "fail"
    assert [c["name"] for c in failed["checks"] if not c["passed"]] == ["max_metric_drop"]
    unmeasured = check_gate(Gate(min_speedup=1.0), _report(0.0, 0.9, None, 900))
    assert unmeasured["verdict"] == "fail" and unmeasured["checks"][0]["measured"] is None
    relative = check_gate(Gate(max_metric_drop=0.01, drop_is_relative=True), _report(0.02, 4.0, 1.0, 1))
    assert relative["verdict"] == "pass" and relative["checks"][0]["measured"] == pytest.approx(0.005)

    # A gate asks only what it names (and the always-on export check): the empty gate passes even this
    # terrible report, while each single limit alone rejects it (the report is bad, and every field reads it).
    terrible = {
        "fidelity": {"metric": {"name": "accuracy", "original": 0.9, "compressed": 0.1, "drop": 0.8}},
        "latency": {"speedup": 0.1, "speedup_ci95": [0.09, 0.11]},
        "compressed": {"size_bytes": 10**9, "fraction_at_target_bits": 0.1},
        "export_check": {"passed": True, "worst_rel_error": 1e-6, "tolerance": 0.02},
    }
    empty = check_gate(Gate(), terrible)
    assert empty["verdict"] == "pass" and [c["name"] for c in empty["checks"]] == ["export_check"]
    singles = [
        Gate(max_metric_drop=0.5),
        Gate(min_recovery=0.5),
        Gate(min_speedup=0.5),
        Gate(max_size_bytes=10**6),
        Gate(min_fraction_at_target_bits=0.5),
    ]
    for single in singles:
        judged = check_gate(single, terrible)
        checks = [(c["passed"], c["measured"] is not None) for c in judged["checks"] if c["name"] != "export_check"]
        assert judged["verdict"] == "fail" and checks == [(False, True)], single  # failed on its value


def test_pair_spearman_on_scored_pairs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    import transformers

    from compression.evaluate.fidelity import _pair_cosines, pair_spearman, spearman_metric
    from compression.io import load_model
    from compression.io.data import read_pairs

    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(115)]]
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab))
    transformers.BertTokenizer(str(tmp_path / "bert" / "vocab.txt")).save_pretrained(tmp_path / "bert")
    loaded = load_model(tmp_path / "bert", work_dir=tmp_path / "work")
    rows = [{"text_a": f"w{i} w{i + 1}", "text_b": f"w{i} w{(i * 7) % 100}", "score": float(i % 5)} for i in range(20)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = read_pairs(data)
    assert pairs is not None and len(pairs) == 20 and pairs[3] == ("w3 w4", "w3 w21", 3.0)
    # Human scores that rank the pairs exactly as the original model does: its Spearman is 1, reversed -1
    # (the pairs, their scores and the original side are wired together right).
    cosines = _pair_cosines(loaded.module, loaded.tokenizer, pairs, 128)
    scored = [(a, b, float(c)) for (a, b, _), c in zip(pairs, cosines, strict=True)]
    reversed_ = [(a, b, -score) for a, b, score in scored]
    damaged = copy.deepcopy(loaded.module)
    with torch.no_grad():  # a compressed stand-in: embeddings damaged enough to reorder some pairs
        embeddings = damaged.model.get_input_embeddings().weight
        embeddings.add_(
            0.5 * embeddings.std() * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(2))
        )
    metric = spearman_metric(loaded.module, damaged, loaded.tokenizer, scored)
    assert metric["name"] == "spearman" and metric["original"] == pytest.approx(1.0)
    assert metric["compressed"] == pytest.approx(pair_spearman(damaged, loaded.tokenizer, scored))
    assert metric["compressed"] < 0.95 and metric["drop"] == pytest.approx(1.0 - metric["compressed"])
    low, high = metric["drop_ci95"]
    assert low <= metric["drop"] <= high and high > 0
    assert spearman_metric(loaded.module, damaged, loaded.tokenizer, reversed_)["original"] == pytest.approx(-1.0)
    assert read_pairs(tmp_path / "bert" / "vocab.txt") is None


def test_wide_outputs_are_measured_in_chunks_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 262k-vocabulary LM's logits are scored a few rows at a time; the sums must not change."""
    from compression.evaluate import fidelity

    generator = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 7, 50, generator=generator)
    out = ref + 0.3 * torch.randn(3, 7, 50, generator=generator)
    log_p, log_q = F.log_softmax(ref.double(), -1), F.log_softmax(out.double(), -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    signal, noise = ref.double().pow(2).sum().item(), (ref.double() - out.double()).pow(2).sum().item()
    monkeypatch.setattr(fidelity, "_CHUNK_ELEMENTS", 120)  # 2 rows of 50 per chunk: 11 chunks, the last short
    assert len(list(fidelity._row_chunks(ref, out))) == 11
    assert fidelity.energy_sums(ref, out) == (pytest.approx(signal, rel=1e-12), pytest.approx(noise, rel=1e-12))
    acc = fidelity._Accumulator()
    fidelity._add_distribution_metrics(acc, ref, out)
    assert acc.mean("kl") == pytest.approx(kl, rel=1e-12)
    assert acc.mean("top1") == pytest.approx(float((ref.argmax(-1) == out.argmax(-1)).double().mean()))
