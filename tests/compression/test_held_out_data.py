"""Held-out data by construction (one dataset is split, never reused) and the metric's uncertainty:
the drop's bootstrap interval, `min_recovery`, and a gate on the interval's bound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compression.configs import Gate, RTNConfig, parse_config
from compression.evaluate import check_gate, compare_outputs
from compression.evaluate.uncertainty import drop_interval
from compression.io import load_model
from compression.pipeline.context import JobSpec
from compression.pipeline.data import read_job_data, split_step
from compression.types import Batches
from tests.helpers import files

SAMPLES = 100


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("held_out")
    rows = np.arange(SAMPLES, dtype=np.float32)[:, None] * np.ones((1, 8), np.float32)  # row i is all i
    labels = np.arange(SAMPLES) % 3
    return {
        "model": files.tiny_onnx(folder / "tiny.onnx"),
        "data": files.npz(folder / "data.npz", input=rows, labels=labels),
        "copy": files.npz(folder / "copy.npz", input=rows, labels=labels),
        "other": files.npz(folder / "other.npz", input=rows + 1000, labels=labels),
    }


def _read(tiny: dict[str, Path], tmp_path: Path, calibration: str | None, evaluation: str | None, **ids: str):
    spec = JobSpec(
        model_path=tiny["model"],
        method="quant_rtn",
        config={},
        calibration_path=tiny[calibration] if calibration else None,
        evaluation_path=tiny[evaluation] if evaluation else None,
        gate=None,
        work_dir=tmp_path,
        **ids,
    )
    loaded = load_model(tiny["model"], work_dir=tmp_path / "load")
    return read_job_data(spec, loaded, parse_config("quant_rtn", {"bits": 8}))


def _row_ids(batches: Batches) -> list[int]:
    return [int(value) for batch in batches.inputs for value in batch["input"][:, 0].tolist()]


def test_one_dataset_is_split_into_disjoint_sets(tiny: dict[str, Path], tmp_path: Path) -> None:
    calibration, evaluation, split = _read(tiny, tmp_path, "data", None)
    assert calibration is not None and evaluation is not None and split is not None
    calibration_rows, evaluation_rows = _row_ids(calibration), _row_ids(evaluation)
    assert set(calibration_rows).isdisjoint(evaluation_rows)
    assert sorted(calibration_rows + evaluation_rows) == list(range(SAMPLES))  # nothing lost either
    step = split_step(SAMPLES)
    assert step == 3 and evaluation_rows == list(range(step - 1, SAMPLES, step))
    assert split == {"from": "calibration", "rule": split["rule"], "calibration": 67, "evaluation": 33}
    assert "k = 3" in split["rule"]
    labels = torch.cat(evaluation.labels).tolist()  # labels follow their rows
    assert labels == [row % 3 for row in evaluation_rows]


@pytest.mark.parametrize(
    ("evaluation", "ids"),
    [
        ("data", {"calibration_id": "d1", "evaluation_id": "d1"}),  # the same id, the same file
        ("copy", {"calibration_id": "d1", "evaluation_id": "d2", "calibration_sha256": "s", "evaluation_sha256": "s"}),
        ("copy", {"calibration_id": "d1", "evaluation_id": "d1"}),  # the same dataset fetched twice
    ],
)
def test_the_same_dataset_for_both_roles_is_split(
    tiny: dict[str, Path], tmp_path: Path, evaluation: str, ids: dict[str, str]
) -> None:
    calibration, held_out, split = _read(tiny, tmp_path, "data", evaluation, **ids)
    assert split is not None and split["from"] == ids["evaluation_id"]
    assert calibration is not None and held_out is not None
    assert set(_row_ids(calibration)).isdisjoint(_row_ids(held_out))


def test_two_different_datasets_are_used_whole(tiny: dict[str, Path], tmp_path: Path) -> None:
    ids = {"calibration_id": "d1", "evaluation_id": "d2", "calibration_sha256": "a", "evaluation_sha256": "b"}
    calibration, evaluation, split = _read(tiny, tmp_path, "data", "other", **ids)
    assert split is None and calibration is not None and evaluation is not None
    assert len(_row_ids(calibration)) == len(_row_ids(evaluation)) == SAMPLES


def test_an_evaluation_set_alone_stays_whole_when_nothing_calibrates(tiny: dict[str, Path], tmp_path: Path) -> None:
    assert not RTNConfig(bits=8).needs_calibration
    calibration, evaluation, split = _read(tiny, tmp_path, None, "data")
    assert calibration is None and split is None and evaluation is not None
    assert len(_row_ids(evaluation)) == SAMPLES


def _report(original: float, compressed: float, *, higher_is_better: bool = True, ci=None, fidelity="evaluation"):
    metric = {"original": original, "compressed": compressed, "higher_is_better": higher_is_better}
    drop = original - compressed if higher_is_better else compressed - original
    return {
        "fidelity": {"metric": {**metric, "drop": drop, "drop_ci95": ci}},
        "data": {"used_for": {"method": "calibration", "fidelity": fidelity}},
        "export_check": {"passed": True, "worst_rel_error": 1e-6, "tolerance": 0.02},
    }


def test_min_recovery_passes_and_fails() -> None:
    gate = Gate(min_recovery=0.95)
    assert check_gate(gate, _report(0.90, 0.87))["verdict"] == "pass"  # 0.967 kept
    failed = check_gate(gate, _report(0.90, 0.80))
    assert failed["verdict"] == "fail" and failed["checks"][0]["measured"] == pytest.approx(0.8 / 0.9)
    # perplexity, lower is better: recovery = original / compressed
    assert check_gate(gate, _report(20.0, 20.5, higher_is_better=False))["verdict"] == "pass"
    assert check_gate(gate, _report(20.0, 25.0, higher_is_better=False))["checks"][0]["measured"] == 0.8


def test_the_drop_gate_can_require_the_intervals_upper_bound() -> None:
    report = _report(0.90, 0.89, ci=[-0.01, 0.03])
    assert check_gate(Gate(max_metric_drop=0.02), report)["verdict"] == "pass"  # the point: 0.01
    bounded = check_gate(Gate(max_metric_drop=0.02, metric_drop_bound="upper_ci"), report)
    assert bounded["verdict"] == "fail" and bounded["checks"][0]["measured"] == 0.03
    no_interval = check_gate(Gate(max_metric_drop=0.02, metric_drop_bound="upper_ci"), _report(0.9, 0.89))
    assert no_interval["verdict"] == "fail"  # an interval the report cannot give is not passed


def test_no_evaluation_data_is_inconclusive_never_pass() -> None:
    synthetic = _report(1.0, 1.0, fidelity="synthetic")
    assert check_gate(Gate(max_metric_drop=0.5), synthetic)["verdict"] == "inconclusive"
    assert check_gate(Gate(max_metric_drop=0.5), _report(1.0, 1.0))["verdict"] == "pass"


def _accuracy_interval(samples: int, seed: int) -> tuple[float, list[float]]:
    rng = np.random.default_rng(seed)
    original = (rng.random(samples) < 0.9).astype(float)
    compressed = np.where(rng.random(samples) < 0.05, 1 - original, original)
    interval = drop_interval(original, compressed, np.ones(samples), higher_is_better=True)
    assert interval is not None
    return float(original.mean() - compressed.mean()), interval


def test_the_drop_interval_holds_the_point_and_narrows_with_more_samples() -> None:
    widths = []
    for samples in (100, 1000, 10_000):
        point, (low, high) = _accuracy_interval(samples, seed=samples)
        assert low <= point <= high
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # about 1/sqrt(n): x3.2 per tenfold
    assert _accuracy_interval(500, 7)[1] == _accuracy_interval(500, 7)[1]  # seeded


class _Noisy(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input + self.scale * torch.sin(1000 * input)


@pytest.mark.parametrize("labelled", [True, False])
def test_compare_outputs_reports_an_interval_around_the_drop(labelled: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = [{"input": torch.randn(50, 5, generator=generator)} for _ in range(4)]
    labels = [batch["input"].argmax(-1) for batch in inputs] if labelled else None
    metric = compare_outputs(_Noisy(0.0), _Noisy(0.5), Batches(inputs=inputs, labels=labels))["metric"]
    assert metric["name"] == ("accuracy" if labelled else "top1_agreement")
    low, high = metric["drop_ci95"]
    assert metric["drop"] > 0 and low <= metric["drop"] <= high and high - low < 0.2


def test_perplexity_interval_comes_from_per_window_losses() -> None:
    vocab = 11

    class Lm(torch.nn.Module):
        def __init__(self, noise: float) -> None:
            super().__init__()
            self.noise = noise

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            logits = torch.nn.functional.one_hot((input_ids + 1) % vocab, vocab).float() * 3
            return logits + self.noise * torch.sin(7 * input_ids.float())[..., None] * torch.arange(vocab)

    generator = torch.Generator().manual_seed(0)
    inputs = [{"input_ids": torch.randint(0, vocab, (8, 16), generator=generator)} for _ in range(4)]
    fidelity = compare_outputs(Lm(0.0), Lm(0.3), Batches(inputs=inputs), task="causal_lm")
    metric = fidelity["metric"]
    assert metric["name"] == "perplexity" and metric["drop"] != 0
    low, high = metric["drop_ci95"]
    assert low < metric["drop"] < high
