"""The CI client for real: the installed `modelpress` CLI against a live server and worker, for a
passing and a failing gate, with exit codes and JUnit checked; and the CI example files."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import yaml

from app.cli import ROOT, build_parser
from tests.helpers import files

pytestmark = pytest.mark.services


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("modelpress")), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def ci(live_server, tmp_path):  # type: ignore[no-untyped-def]
    import os

    url, api = live_server(workers=1)
    env = {**os.environ, "MODELPRESS_URL": url, "MODELPRESS_API_KEY": api.key}
    model = files.tiny_onnx(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    data = files.npz(
        tmp_path / "eval.npz", input=rng.standard_normal((64, 8)).astype(np.float32), labels=rng.integers(0, 3, 64)
    )
    return env, model, data, tmp_path


def junit_cases(path: Path) -> dict[str, bool]:
    suite = ET.parse(path).getroot()
    return {case.get("name"): case.find("failure") is None for case in suite.iter("testcase")}


def test_passing_and_failing_gates_exit_0_and_1(ci) -> None:  # type: ignore[no-untyped-def]
    env, model, data, tmp = ci
    common = [
        str(model),
        "--method",
        "quant_rtn",
        "--config",
        '{"bits": 8, "group_size": null}',
        "--evaluation",
        str(data),
        "--wait",
        "--timeout",
        "180",
    ]
    passing = run_cli("compress", *common, "--max-metric-drop", "0.5", "--out", str(tmp / "pass"), env=env)
    assert passing.returncode == 0, passing.stderr
    assert junit_cases(tmp / "pass" / "junit.xml") == {"max_metric_drop": True}
    assert json.loads((tmp / "pass" / "report.json").read_text())["gate"]["verdict"] == "pass"
    assert {p.suffix for p in (tmp / "pass" / "artifacts").iterdir()} >= {".onnx", ".safetensors", ".json"}
    assert "verdict: pass" in passing.stdout
    failing = run_cli("compress", *common, "--max-size-bytes", "10", "--out", str(tmp / "fail"), env=env)
    assert failing.returncode == 1, failing.stderr
    assert junit_cases(tmp / "fail" / "junit.xml") == {"max_size_bytes": False}
    assert "already on server" in failing.stderr, "the model was uploaded once, then found by sha256"


def test_retried_step_reuses_the_job(ci) -> None:  # type: ignore[no-untyped-def]
    env, model, data, tmp = ci
    args = ["compress", str(model), "--method", "quant_rtn", "--evaluation", str(data), "--out", str(tmp / "o")]
    first, second = run_cli(*args, env=env), run_cli(*args, env=env)
    assert first.returncode == second.returncode == 0
    assert json.loads(first.stdout)["job_id"] == json.loads(second.stdout)["job_id"]


def test_usage_and_unreachable_exit_codes(ci) -> None:  # type: ignore[no-untyped-def]
    env, model, _, tmp = ci
    bad_config = run_cli("compress", str(model), "--method", "quant_rtn", "--config", '{"bits": 5}', env=env)
    assert bad_config.returncode == 3 and "invalid_config" in bad_config.stderr
    missing = run_cli("compress", str(tmp / "nope.onnx"), "--method", "quant_rtn", env=env)
    assert missing.returncode == 3
    unreachable = run_cli(
        "compress",
        str(model),
        "--method",
        "quant_rtn",
        "--url",
        "http://127.0.0.1:9",
        env={**env, "MODELPRESS_CLIENT_RETRIES": "1"},
    )
    assert unreachable.returncode == 4 and "unreachable" in unreachable.stderr


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_examples_parse_and_call_the_real_cli(name: str) -> None:
    document = yaml.safe_load((ROOT / "docs" / "ci" / name).read_text())
    text = json.dumps(document)
    commands = [line for line in _strings(document) if line.strip().startswith("modelpress compress")]
    assert commands, f"{name} does not call modelpress compress"
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.wait and args.max_metric_drop is not None and args.out == Path("modelpress-out")
    assert "junit.xml" in text


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []
