"""A method is a config class plus a `MethodSpec`: registering one is all it takes to run it as a job."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
from pydantic import Field
from torch import nn

from compression import registry
from compression.configs import METHOD_KEYS, MethodConfigBase
from compression.io import LoadedModel
from compression.job import JobError, JobSpec, run_job
from compression.methods.spec import MethodRun, MethodSpec
from compression.pipeline.preflight import preflight
from compression.types import Batches, CompressionResult, ProgressFn
from tests.helpers import files

ROOT = Path(__file__).resolve().parents[2]


class IdentityConfig(MethodConfigBase):
    summary: ClassVar[str] = "Changes nothing (a method defined outside the library)."
    method: Literal["quant_identity"] = "quant_identity"
    copies: int = Field(1, ge=1, le=3, description="Candidates the method produces; the pick ships the last.")


def identity_compress(
    model: nn.Module, calib: Batches | None, config: IdentityConfig, *, progress: ProgressFn | None = None
) -> CompressionResult:
    assert calib is not None  # needs_calibration: the pipeline planned data for it
    candidates = [copy.deepcopy(model) for _ in range(config.copies)]
    return CompressionResult(model=candidates[0], method=config.method, stats={"candidates": len(candidates)})


def adapt(config: IdentityConfig, loaded: LoadedModel) -> IdentityConfig:
    return config.model_copy(update={"copies": 2}) if loaded.format == "onnx" else config


def pick_last(result: CompressionResult, run: MethodRun) -> CompressionResult:
    result.notes.append(f"picked candidate {result.stats['candidates']} under gate {run.job.gate}")
    return result


def layer_count_check(loaded: LoadedModel, sample: Batches, config: IdentityConfig) -> dict[str, Any]:
    return {"name": "identity_ready", "ok": True, "message": f"{len(sample)} sample batches"}


@pytest.fixture
def identity_method() -> Iterator[MethodSpec]:
    spec = registry.register(
        MethodSpec(
            config_class=IdentityConfig,
            compress=identity_compress,
            cost=0.5,
            adapt_config=adapt,
            pick=pick_last,
            preflight_checks=(layer_count_check,),
            report_section=lambda result: {"identity": result.stats},
        )
    )
    yield spec
    registry.unregister(IdentityConfig)


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    return {
        "model": files.tiny_onnx(tmp_path / "tiny.onnx"),
        "calib": files.npz(tmp_path / "calib.npz", input=rng.standard_normal((16, 8)).astype(np.float32)),
    }


def _spec(tiny: dict[str, Path], work: Path, **overrides: Any) -> JobSpec:
    fields = {
        "model_path": tiny["model"],
        "method": "quant_identity",
        "config": {},
        "calibration_path": tiny["calib"],
        "evaluation_path": None,
        "gate": {"max_metric_drop": 0.5},
        "work_dir": work,
        "benchmark_repeats": 2,
        "benchmark_budget_s": 0.5,
    }
    return JobSpec(**{**fields, **overrides})


def test_a_registered_method_runs_end_to_end(
    identity_method: MethodSpec, tiny: dict[str, Path], tmp_path: Path
) -> None:
    stages: list[str] = []
    output = run_job(
        _spec(tiny, tmp_path / "work"), progress=lambda s, *_: stages.append(s), should_cancel=lambda: False
    )
    report = output.report
    assert report["method"] == "quant_identity" and report["config"]["copies"] == 2  # adapt_config ran
    assert report["stats"] == {"identity": {"candidates": 2}}  # the method's report section
    assert report["variant_notes"] == ["picked candidate 2 under gate {'max_metric_drop': 0.5}"]
    assert report["data"]["used_for"] == {"method": "calibration", "fidelity": "evaluation"}
    assert report["data"]["split"]["from"] == "calibration"  # the one dataset was split, not reused
    assert report["fidelity"]["metric"]["drop"] == 0.0  # the identity changes nothing
    assert report["gate"]["verdict"] == "pass"
    assert output.artifacts["onnx"].is_file()
    assert {"load", "compress", "evaluate", "export", "benchmark"} <= set(stages)


def test_a_registered_method_needing_data_is_refused_without_it(
    identity_method: MethodSpec, tiny: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(JobError) as error:
        run_job(_spec(tiny, tmp_path / "work", calibration_path=None), progress=lambda *_: None, should_cancel=bool)
    assert error.value.code == "calibration_required"


def test_a_registered_method_gets_its_preflight_checks_and_cost(
    identity_method: MethodSpec, tiny: dict[str, Path]
) -> None:
    result = preflight(tiny["model"], "quant_identity", {"copies": 3}, tiny["calib"])
    assert result["ok"] is True
    assert [c["name"] for c in result["checks"]][-1] == "identity_ready"
    assert identity_method.data == {"calibration": "required", "kinds": ["npz", "text"]}
    assert registry.get_method("quant_identity") is identity_compress


def test_unknown_method_and_invalid_config_name_the_valid_ones(
    identity_method: MethodSpec, tiny: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(JobError) as error:
        run_job(_spec(tiny, tmp_path / "a", method="quant_magic"), progress=lambda *_: None, should_cancel=bool)
    assert error.value.code == "unknown_method" and "quant_identity" in error.value.message
    with pytest.raises(JobError) as error:
        run_job(_spec(tiny, tmp_path / "b", config={"copies": 9}), progress=lambda *_: None, should_cancel=bool)
    assert error.value.code == "invalid_config"


def test_unregistered_methods_are_unknown_again(tiny: dict[str, Path], tmp_path: Path) -> None:
    assert "quant_identity" not in registry.known_methods()
    with pytest.raises(KeyError):
        registry.get_spec("quant_identity")


def test_every_builtin_method_has_a_spec() -> None:
    for key in METHOD_KEYS:
        spec = registry.get_spec(key)
        assert spec.key == key and spec.config_class is registry.config_class(key)


def test_the_job_pipeline_names_no_method() -> None:
    """Method-specific behaviour lives in the method's spec, never in the stages."""
    sources = [ROOT / "compression" / "job.py", *sorted((ROOT / "compression" / "pipeline").glob("*.py"))]
    # the `pipeline` method's key is also the stages' package name: only a quoted key counts for it
    keys = [key for key in METHOD_KEYS if key != "pipeline"]
    pattern = re.compile("|".join([*keys, "[\"']pipeline[\"']"]))
    hits = [
        f"{path.name}:{n}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
