"""mixed_precision end to end: budgets, ties, cache, determinism, uniform equivalence, beats uniform."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from compression.configs import GPTQConfig, MixedPrecisionConfig, RTNConfig
from compression.job import JobSpec, run_job
from compression.methods import quant_gptq, quant_rtn
from compression.methods.mixed_precision import apply_allocation, compress
from compression.methods.mixed_precision_analysis import residual_add_ties
from compression.methods.mixed_precision_report import best_point, frontier, pick_cheapest_passing, select_point
from compression.primitives.layers import get_weight_matrix
from compression.primitives.sensitivity import (
    OutputRunner,
    SensitivityCache,
    count_samples,
    measure_sensitivity,
    output_metrics,
    run_outputs,
    split_samples,
)
from compression.types import Batches, CompressionResult
from compression.zoo.fmnist_resnet import (
    build_fmnist_resnet,
    load_fashion_mnist,
    load_pretrained,
)


class BranchyMLP(nn.Module):
    """fc1 -> two branches reading the same tensor, summed -> fc3 (the head, left float)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.branch_a = nn.Linear(96, 64)
        self.branch_b = nn.Linear(96, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.fc1(pixels))
        hidden = torch.relu(self.branch_a(hidden) + self.branch_b(hidden))
        return self.fc3(torch.relu(self.fc2(hidden)))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small tensors: extra threads only contend on the shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, Batches]:
    """A BranchyMLP trained for a second on sklearn digits, and 4 labelled batches of held-out digits."""
    torch.manual_seed(0)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    model = BranchyMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        optimizer.step()
    model.eval()
    held_x, held_y = x[1400:1656], y[1400:1656]
    batches = Batches([{"pixels": held_x[i : i + 64]} for i in range(0, 256, 64)], list(held_y.split(64)))
    return model, batches


def config(**overrides: object) -> MixedPrecisionConfig:
    base = {"quantizer": "rtn", "group_size": 32, "candidates": [2, 3, 4, 8], "sensitivity_samples": 128}
    return MixedPrecisionConfig(**{**base, **overrides})


def average_bits(result: CompressionResult) -> float:
    layers = list(result.stats["layers"].values())
    total = sum(row["cost"]["weights"] for row in layers)
    return sum(row["cost"]["weights"] * row["bits"] for row in layers) / total


def test_budgets_respected_and_layers_explained(digits: tuple[nn.Module, Batches]) -> None:
    model, calib = digits
    result = compress(model, calib, config(budget_bits=3.0, budgets=[2.5, 3.5], candidates=[2, 3, 4, 8, 16]))
    points = {point["budget"]: point for point in result.stats["pareto"]}
    assert sorted(points) == [2.5, 3.0, 3.5]
    for budget, point in points.items():
        assert point["avg_bits"] <= budget + 1e-9
        assert point["measured"]["task_metric"] is not None and point["measured"]["sqnr_db"] > 0
    assert average_bits(result) == pytest.approx(points[3.0]["avg_bits"])
    rows = result.stats["layers"]
    assert set(rows) == {"fc1", "branch_a", "branch_b", "fc2"} and result.skipped["fc3"].startswith("output head")
    for name, row in rows.items():
        assert set(row["sensitivity"]) == {"2", "3", "4", "8", "16"} and row["reason"]
        if row["bits"] == 16:
            assert name not in result.quantized and result.skipped[name].startswith("allocated float")
        else:
            assert result.quantized[name].bits == row["bits"]
            weight = get_weight_matrix(dict(result.model.named_modules())[name])
            assert torch.equal(result.quantized[name].dequantize().reshape(weight.shape), weight)
    # More bits measured better: the sweep's measured SQNR rises with the budget.
    assert points[2.5]["measured"]["sqnr_db"] < points[3.5]["measured"]["sqnr_db"]


def test_ties_shared_input_and_user_groups(digits: tuple[nn.Module, Batches]) -> None:
    model, calib = digits
    result = compress(model, calib, config(budget_bits=2.6, tie_groups=[["fc1", "fc2"]]))
    bits = result.stats["allocation"]
    assert bits["branch_a"] == bits["branch_b"] and bits["fc1"] == bits["fc2"]
    assert sorted(map(sorted, result.stats["ties"])) == [["branch_a", "branch_b"], ["fc1", "fc2"]]
    untied = compress(model, calib, config(budget_bits=2.6, auto_ties=[]))
    assert untied.stats["ties"] == []


def test_residual_add_ties_found_by_fx() -> None:
    model = build_fmnist_resnet().eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    groups = residual_add_ties(model, layers)
    assert groups == [["layer2.conv2", "layer2.shortcut.0"], ["layer3.conv2", "layer3.shortcut.0"]]


def test_bitops_latency_and_predicted_drop_budgets(digits: tuple[nn.Module, Batches]) -> None:
    model, calib = digits
    bitops = compress(model, calib, config(budget_bits=3.0, budget_kind="bitops"))
    rows = list(bitops.stats["layers"].values())
    # MACs counted apart from the method: a Linear on one [features] sample does in * out of them.
    linears = dict(model.named_modules())
    macs = {row["name"]: linears[row["name"]].in_features * linears[row["name"]].out_features for row in rows}
    for row in rows:  # BitOps = MACs * weight bits * activation bits (8 by default)
        assert row["cost"]["bitops"] == pytest.approx(macs[row["name"]] * row["bits"] * 8)
    used = sum(row["cost"]["bitops"] for row in rows)
    assert used <= sum(macs.values()) * 3.0 * 8 + 1e-6
    table = {name: {2: 1.0, 3: 1.2, 4: 1.5, 8: 3.0} for name in macs}
    table["fc2"] = {2: 5.0, 3: 6.0, 4: 7.0, 8: 9.0}  # slow layer: the latency budget pushes it down
    latency = compress(model, calib, config(budget_bits=3.0, budget_kind="latency", latency_table=table))
    chosen = latency.stats["allocation"]
    assert sum(table[n][b] for n, b in chosen.items()) <= sum(table[n][3] for n in chosen) + 1e-9
    capped = compress(model, calib, config(budget_bits=8.0, max_predicted_drop=0.0))
    assert capped.stats["pareto"][0]["predicted_drop"] == 0.0


def test_sensitivity_cache_hit_on_second_budget(digits: tuple[nn.Module, Batches], tmp_path) -> None:
    model, calib = digits
    cache = SensitivityCache(tmp_path)
    narrow = compress(model, calib, config(budget_bits=3.0, candidates=[3, 4]), cache=cache)
    assert narrow.stats["sensitivity"]["units"] == 3  # branch_a + branch_b are measured together
    assert narrow.stats["sensitivity"]["entries_measured"] == 6
    first = compress(model, calib, config(budget_bits=3.0), cache=cache)
    second = compress(model, calib, config(budget_bits=2.5), cache=cache)
    assert first.stats["sensitivity"]["cache"] == "partial" and first.stats["sensitivity"]["entries_measured"] == 6
    assert second.stats["sensitivity"]["cache"] == "hit" and second.stats["sensitivity"]["entries_measured"] == 0
    from_disk = compress(model, calib, config(budget_bits=2.5), cache=SensitivityCache(tmp_path))
    assert from_disk.stats["sensitivity"]["cache"] == "hit"
    assert from_disk.stats["allocation"] == second.stats["allocation"]
    other_data = Batches(calib.inputs[:2], calib.labels[:2])
    assert compress(model, other_data, config(), cache=cache).stats["sensitivity"]["cache"] == "miss"


def test_deterministic_and_input_untouched(digits: tuple[nn.Module, Batches]) -> None:
    model, calib = digits
    before = copy.deepcopy(model.state_dict())
    runs = [compress(model, calib, config(quantizer="gptq", budget_bits=3.0), cache=SensitivityCache()) for _ in "ab"]
    assert runs[0].stats["allocation"] == runs[1].stats["allocation"]
    assert runs[0].stats["sensitivity"]["held_out"]  # 256 samples: candidates fitted on 128, measured on 128
    for name, layer in runs[0].quantized.items():
        assert torch.equal(layer.codes, runs[1].quantized[name].codes)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_single_candidate_reproduces_the_uniform_quantizer(digits: tuple[nn.Module, Batches], quantizer: str) -> None:
    model, calib = digits
    ours = compress(model, calib, config(quantizer=quantizer, candidates=[3], budget_bits=3.0))
    if quantizer == "rtn":
        uniform = quant_rtn.compress(model, calib, RTNConfig(bits=3, group_size=32))
    else:
        uniform = quant_gptq.compress(model, calib, GPTQConfig(bits=3, group_size=32))
    assert set(ours.quantized) == set(uniform.quantized)
    for name, layer in ours.quantized.items():
        assert torch.equal(layer.codes, uniform.quantized[name].codes), name


def test_replay_matches_full_forward() -> None:
    """Measuring with recorded float blocks replayed gives the same metrics as running the whole model."""
    torch.manual_seed(1)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
    model = _Stack(nn.Linear(8, 16), blocks).eval()
    calib = Batches([{"x": torch.randn(5, 8)} for _ in range(3)])
    layers = {f"blocks.{i}.0": block[0] for i, block in enumerate(blocks)}

    def quantized(name: str, bits: int) -> torch.Tensor:
        return torch.round(get_weight_matrix(layers[name]) * 2**bits) / 2**bits

    assert OutputRunner(model, calib).records  # replay is really on for this model
    replayed, count = measure_sensitivity(model, layers, calib, [2, 4], quantized)
    assert count == 8
    reference = run_outputs(model, calib)
    for name, module in layers.items():
        original = module.weight.detach().clone()
        with torch.no_grad():
            module.weight.copy_(quantized(name, 2))
        direct = output_metrics(reference, run_outputs(model, calib))
        with torch.no_grad():
            module.weight.copy_(original)
        assert replayed[name]["2"]["sqnr_db"] == pytest.approx(direct["sqnr_db"], rel=1e-5)


class _Stack(nn.Module):
    def __init__(self, stem: nn.Module, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.stem, self.blocks = stem, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(x)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def test_apply_allocation_rebuilds_a_pareto_point(digits: tuple[nn.Module, Batches]) -> None:
    model, calib = digits
    cfg = config(quantizer="gptq", budget_bits=3.0, budgets=[2.5])
    result = compress(model, calib, cfg)
    point = next(p for p in result.stats["pareto"] if p["budget"] == 3.0)
    rebuilt = apply_allocation(model, calib, cfg, point["allocation"])
    assert rebuilt.stats["avg_bits"] == pytest.approx(point["avg_bits"])
    for name, layer in result.quantized.items():
        assert torch.equal(layer.codes, rebuilt.quantized[name].codes) and layer.bits == rebuilt.quantized[name].bits


def test_split_samples_keeps_rows_and_labels(digits: tuple[nn.Module, Batches]) -> None:
    _, calib = digits
    head, tail = split_samples(calib, 100)  # the boundary falls inside the second batch
    assert count_samples(head) == 100 and count_samples(tail) == 156
    assert torch.equal(torch.cat([b["pixels"] for b in head] + [b["pixels"] for b in tail]),
                       torch.cat([b["pixels"] for b in calib]))  # fmt: skip
    assert torch.equal(torch.cat(head.labels + tail.labels), torch.cat(calib.labels))


def test_pick_cheapest_passing_else_best() -> None:
    points = [
        {"budget": b, "avg_bits": b, "evaluation": {"drop": drop, "passed": ok, "metric": 0.9 - drop, "size_bytes": 1}}
        for b, drop, ok in [(2.5, 0.08, False), (3.0, 0.02, True), (3.5, 0.005, True), (4.0, 0.001, False)]
    ]
    assert pick_cheapest_passing(points)["budget"] == 3.0
    assert select_point(points)["budget"] == 3.0
    for point in points:
        point["evaluation"]["passed"] = False
    assert pick_cheapest_passing(points) is None
    assert best_point(points)["budget"] == select_point(points)["budget"] == 4.0
    assert [row["budget"] for row in frontier(list(reversed(points)))] == [2.5, 3.0, 3.5, 4.0]


@pytest.fixture(scope="module")
def digits_job_files(digits: tuple[nn.Module, Batches], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits MLP as an ONNX upload, unlabelled calibration digits and a disjoint labelled evaluation set."""
    model, _ = digits
    folder = tmp_path_factory.mktemp("mixed_job")
    images, labels = load_digits(return_X_y=True)
    pixels = (images / 16.0).astype(np.float32)
    torch.onnx.export(model, (torch.tensor(pixels[:2]),), str(folder / "mlp.onnx"), input_names=["pixels"],
                      output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)  # fmt: skip
    np.savez(folder / "calib.npz", pixels=pixels[1400:1600])
    np.savez(folder / "eval.npz", pixels=pixels[1600:], labels=labels[1600:])
    return {"model": folder / "mlp.onnx", "calib": folder / "calib.npz", "eval": folder / "eval.npz"}


def _sweep_job(files: dict[str, Path], work: Path, gate: dict) -> dict:
    spec = JobSpec(
        model_path=files["model"],
        method="mixed_precision",
        # float zero points: with integer ones the 4-bit and 2.5-bit points tie on this evaluation set (3 of 197
        # images each), and the sweep tests below need a strict order
        config={
            "quantizer": "rtn",
            "group_size": None,
            "candidates": [2, 3, 4, 8],
            "budgets": [2.5, 3.0, 4.0],
            "zero_point": "float",
        },
        calibration_path=files["calib"],
        evaluation_path=files["eval"],
        gate=gate,
        work_dir=work,
        benchmark_repeats=3,
    )
    return run_job(spec, progress=lambda *event: None, should_cancel=lambda: False).report


def test_sweep_ships_best_point_with_fail_and_frontier_when_none_passes(
    digits_job_files: dict[str, Path], tmp_path: Path
) -> None:
    report = _sweep_job(digits_job_files, tmp_path, {"max_metric_drop": 1.0, "max_size_bytes": 1})
    rows = report["stats"]["frontier"]
    assert [row["budget"] for row in rows] == [2.5, 3.0, 4.0] and not any(row["passed"] for row in rows)
    assert all(row["size_bytes"] > 1 and row["metric"] is not None for row in rows)
    best = min(rows, key=lambda row: (row["drop"], row["avg_bits"]))
    assert [row["shipped"] for row in rows] == [row is best for row in rows]
    assert report["stats"]["chosen_budget"] == best["budget"] and report["stats"]["selected_on"] == "evaluation"
    assert report["gate"]["verdict"] == "fail"
    # measured on the evaluation set: the job's own evaluation of the shipped point agrees
    assert report["fidelity"]["metric"]["compressed"] == pytest.approx(best["metric"], abs=0.02)


def test_sweep_ships_the_cheapest_point_that_passes_the_gate_on_evaluation_data(
    digits_job_files: dict[str, Path], tmp_path: Path
) -> None:
    frontier_rows = _sweep_job(digits_job_files, tmp_path / "probe", {"max_size_bytes": 1})["stats"]["frontier"]
    drops = {row["budget"]: row["drop"] for row in frontier_rows}
    assert drops[4.0] < min(drops[2.5], drops[3.0])  # the allocation at 4 bits is the most faithful
    limit = max(0.0, (drops[4.0] + min(drops[2.5], drops[3.0])) / 2)  # only the 4-bit point is within it
    report = _sweep_job(digits_job_files, tmp_path / "gated", {"max_metric_drop": limit})
    rows = {row["budget"]: row for row in report["stats"]["frontier"]}
    assert [rows[b]["passed"] for b in (2.5, 3.0, 4.0)] == [False, False, True]
    assert report["stats"]["chosen_budget"] == 4.0 and rows[4.0]["shipped"]
    assert report["gate"]["verdict"] == "pass"
    assert report["compressed"]["bits"]["nominal_bits"] > 3.0


@pytest.mark.slow
def test_allocation_beats_uniform_on_fashion_mnist_resnet() -> None:
    """Same RTN quantizer, same average bits: ours has a higher output SQNR on held-out images."""
    model = load_pretrained()
    images, labels = load_fashion_mnist("test", limit=768)
    calib = Batches([{"input": images[i : i + 128]} for i in (0, 128)], [labels[:128], labels[128:256]])
    held_out = Batches([{"input": images[256:]}], [labels[256:]])
    reference = run_outputs(model, held_out)
    gains = {}
    for bits in (3, 4):
        ours = compress(model, calib, config(budget_bits=float(bits), group_size=None), cache=SensitivityCache())
        uniform = quant_rtn.compress(model, None, RTNConfig(bits=bits, group_size=None))
        assert ours.stats["avg_bits"] <= bits
        mine = output_metrics(reference, run_outputs(ours.model, held_out), held_out.labels)
        theirs = output_metrics(reference, run_outputs(uniform.model, held_out), held_out.labels)
        gains[bits] = (mine["sqnr_db"] - theirs["sqnr_db"], mine["accuracy"] - theirs["accuracy"])
    assert all(sqnr_gain > 1.0 for sqnr_gain, _ in gains.values()), gains
    assert np.mean([acc_gain for _, acc_gain in gains.values()]) >= 0, gains
