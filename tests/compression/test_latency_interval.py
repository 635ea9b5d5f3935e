"""Latency you can believe: interleaved A/B timing, a bootstrap interval of the speedup, the gate on its bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compression.configs import Gate
from compression.evaluate import check_gate
from compression.evaluate.latency import bootstrap_ratio_ci, busy_note, paired_latency


def _tiny_onnx(path: Path) -> Path:
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    torch.onnx.export(
        net, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["input"],
        dynamic_axes={"input": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unchanged_compute_gets_an_interval_that_holds_one(tmp_path: Path, seed: int) -> None:
    # the same file as original and compressed: any "speedup" is noise, so 1.0 must lie in the interval
    path = _tiny_onnx(tmp_path / "net.onnx")
    feeds = {"input": np.random.default_rng(seed).standard_normal((8, 1, 8, 8)).astype(np.float32)}
    latency = paired_latency(path, path, feeds, threads=1, batch_sizes=(1, 8), budget_s=0.3, seed=seed)
    assert set(latency["by_batch"]) == {"1", "8"} and latency["threads"] == {"intra_op": 1, "inter_op": 1}
    for batch, row in latency["by_batch"].items():
        low, high = row["speedup_ci95"]
        assert low <= 1.0 <= high, f"batch {batch}: {row}"
        assert low <= row["speedup"] <= high and row["significant"] is False and row["rounds"] >= 5
        assert latency["speedup_by_batch"][batch] == row["speedup"]
    assert latency["speedup_ci95"] == latency["by_batch"]["1"]["speedup_ci95"]
    assert latency["original"]["batches"]["8"]["repeats"] == latency["by_batch"]["8"]["rounds"]


def test_bootstrap_interval_finds_a_real_difference_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    noise = rng.lognormal(0.0, 0.3, size=(400, 2))  # heavy-tailed call times
    original, compressed = 2.0 * noise[:, 0], 1.0 * noise[:, 1]
    low, high = bootstrap_ratio_ci(original, compressed, seed=3)
    assert 1.0 < low < 2.0 < high
    assert bootstrap_ratio_ci(original, compressed, seed=3) == (low, high)


def test_busy_note_compares_the_load_average_with_the_cores() -> None:
    assert busy_note(0.2, 0.4, cores=4) is None
    note = busy_note(3.0, 2.5, cores=2)
    assert note is not None and "3.0 at start" in note and "2.5 at end" in note and "2 cores" in note


def test_min_speedup_gate_judges_the_interval_lower_bound() -> None:
    gate = Gate(min_speedup=1.2)
    latency = {"speedup": 1.41, "speedup_ci95": [0.9, 2.1]}  # a fast-looking point that noise explains
    check = check_gate(gate, {"latency": latency})["checks"][0]
    assert check["passed"] is False and check["measured"] == 0.9 and check["point"] == 1.41
    assert check["ci95"] == [0.9, 2.1]
    sure = check_gate(gate, {"latency": {"speedup": 1.5, "speedup_ci95": [1.3, 1.7]}})
    assert sure["verdict"] == "pass"
    assert check_gate(gate, {"latency": {"speedup": 1.5}})["verdict"] == "fail"  # no interval: not proven
