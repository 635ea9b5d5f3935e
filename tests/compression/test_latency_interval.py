"""Latency you can believe: interleaved A/B timing, a bootstrap interval of the speedup, the gate on its bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compression.configs import Gate
from compression.evaluate import check_gate
from compression.evaluate.latency import bootstrap_ratio_ci, busy_note, make_session, paired_latency
from tests.helpers.files import tiny_onnx


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
    exported = {"export_check": {"passed": True, "worst_rel_error": 1e-6, "tolerance": 0.02}}
    sure = check_gate(gate, {"latency": {"speedup": 1.5, "speedup_ci95": [1.3, 1.7]}, **exported})
    assert sure["verdict"] == "pass"
    assert check_gate(gate, {"latency": {"speedup": 1.5}, **exported})["verdict"] == "fail"  # no interval: not proven


def test_w4_conv_job_reports_an_interval_holding_one_and_the_threads(tmp_path: Path) -> None:
    # W4 conv weights are dequantized in the graph and constant-folded by ORT: the compute is unchanged.
    # Random images: only latency is asserted here, which does not depend on the pixel values.
    from compression.job import JobSpec, run_job
    from compression.zoo.fmnist_resnet import export_fmnist_onnx

    generator = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "eval.npz", input=torch.randn(64, 1, 28, 28, generator=generator).numpy())
    np.savez(tmp_path / "calib.npz", input=torch.randn(32, 1, 28, 28, generator=generator).numpy())
    spec = JobSpec(
        export_fmnist_onnx(tmp_path / "resnet.onnx"), "quant_rtn", {"bits": 4, "group_size": None},
        tmp_path / "calib.npz", tmp_path / "eval.npz", {"min_speedup": 1.0}, tmp_path / "work",
        benchmark_budget_s=0.5, benchmark_threads=1,
    )  # fmt: skip
    report = run_job(spec, progress=lambda *_: None, should_cancel=lambda: False).report
    latency = report["latency"]
    assert latency["threads"] == {"intra_op": 1, "inter_op": 1} and latency["original"]["threads"] == 1
    for batch, row in latency["by_batch"].items():
        assert row["speedup_ci95"][0] <= 1.0 <= row["speedup_ci95"][1], f"batch {batch}: {row}"
    assert latency["speedup_ci95"] == latency["by_batch"]["1"]["speedup_ci95"] and latency["significant"] is False
    check = report["gate"]["checks"][0]
    assert check["measured"] == latency["speedup_ci95"][0] and check["point"] == latency["speedup"]
    assert set(latency["load"]) == {"cores", "load_1m_start", "load_1m_end", "busy"}
    assert latency["load"]["busy"] == bool(latency["notes"])


def test_timed_sessions_do_not_spin(tmp_path: Path) -> None:
    """Two sessions alternate in one process: a spinning pool thread of one would take a core from the other."""
    options = make_session(tiny_onnx(tmp_path / "m.onnx"), threads=2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
