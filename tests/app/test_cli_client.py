"""The CI client for real: the installed `modelpress` CLI against a live server and worker, for a
passing and a failing gate, with exit codes and JUnit checked; rejections explained before any
upload; Ctrl-C and reattaching; reruns after a dead job; and the CI example files."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import yaml

from app.cli import ROOT, build_parser
from tests.helpers import files

pytestmark = pytest.mark.services


MODELPRESS = str(Path(sys.executable).with_name("modelpress"))


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELPRESS, *args], env=env, capture_output=True, text=True, timeout=300)


def start_ci(live_server, tmp_path: Path, **server):  # type: ignore[no-untyped-def]
    url, api = live_server(**server)
    env = {**os.environ, "MODELPRESS_URL": url, "MODELPRESS_API_KEY": api.key}
    model = files.tiny_onnx(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    data = files.npz(
        tmp_path / "eval.npz", input=rng.standard_normal((64, 8)).astype(np.float32), labels=rng.integers(0, 3, 64)
    )
    return env, model, data, tmp_path, api


@pytest.fixture
def ci(live_server, tmp_path):  # type: ignore[no-untyped-def]
    return start_ci(live_server, tmp_path, workers=1)[:4]


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
    assert junit_cases(tmp / "pass" / "junit.xml") == {"max_metric_drop": True, "export_check": True}
    assert json.loads((tmp / "pass" / "report.json").read_text())["gate"]["verdict"] == "pass"
    assert {p.suffix for p in (tmp / "pass" / "artifacts").iterdir()} >= {".onnx", ".safetensors", ".json"}
    assert "verdict: pass" in passing.stdout
    summary = passing.stdout.splitlines()  # the installed CLI prints the summary the report implies
    assert any(line.startswith("accuracy: ") and "(change " in line for line in summary)
    assert any(line.startswith("size: ") and line.count(" MB") == 2 for line in summary)
    assert any(
        line.startswith("latency batch 1: ") and "ms median" in line and "95% interval" in line for line in summary
    )
    failing = run_cli("compress", *common, "--max-size-bytes", "10", "--out", str(tmp / "fail"), env=env)
    assert failing.returncode == 1, failing.stderr
    assert junit_cases(tmp / "fail" / "junit.xml") == {"max_size_bytes": False, "export_check": True}
    assert "already on server" in failing.stderr, "the model was uploaded once, then found by sha256"


def test_no_evaluation_data_is_inconclusive_and_exits_5(ci) -> None:  # type: ignore[no-untyped-def]
    env, model, _, tmp = ci
    args = [str(model), "--method", "quant_rtn", "--config", '{"bits": 8, "group_size": null}', "--wait"]
    done = run_cli("compress", *args, "--max-metric-drop", "0.5", "--out", str(tmp / "none"), env=env)
    assert done.returncode == 5, done.stderr
    report = json.loads((tmp / "none" / "report.json").read_text())
    assert report["gate"]["verdict"] == "inconclusive" and report["data"]["used_for"]["fidelity"] == "synthetic"
    assert "verdict: inconclusive" in done.stdout and "note: no evaluation data" in done.stdout
    suite = ET.parse(tmp / "none" / "junit.xml").getroot()
    assert suite.get("errors") == "1" and suite.get("failures") == "0"
    assert [case.get("name") for case in suite.iter("testcase") if case.find("skipped") is not None] == [
        "max_metric_drop",
        "export_check",
    ]


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
    started = time.monotonic()
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
    assert time.monotonic() - started < 8, "MODELPRESS_CLIENT_RETRIES=1: one retry (0.5 s), not the default five (15 s)"


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


def test_rejections_name_each_field_and_the_valid_methods_before_any_upload(live_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, model, _, _, api = start_ci(live_server, tmp_path, workers=0)
    extra = run_cli(
        "compress", str(model), "--method", "prune_structured", "--config", '{"flops_target": 0.5}', env=env
    )
    assert extra.returncode == 3, extra.stderr
    assert "invalid_config" in extra.stderr
    assert "config.flops_target: Extra inputs are not permitted" in extra.stderr
    unknown = run_cli("compress", str(model), "--method", "quant_nope", env=env)
    assert unknown.returncode == 3 and "unknown_method" in unknown.stderr
    assert "valid: " in unknown.stderr and "quant_rtn" in unknown.stderr and "prune_structured" in unknown.stderr
    bad_gate = run_cli("compress", str(model), "--method", "quant_rtn", "--gate", '{"max_drop": 1}', env=env)
    assert bad_gate.returncode == 3 and "gate.max_drop" in bad_gate.stderr, bad_gate.stderr
    assert api.get("/v1/models").json() == [], "nothing may be uploaded for a request the server refuses"


def test_missing_config_file_and_url_without_scheme_are_usage_errors(ci) -> None:  # type: ignore[no-untyped-def]
    env, model, _, tmp = ci
    missing = run_cli("compress", str(model), "--method", "quant_rtn", "--config", str(tmp / "cfg.json"), env=env)
    assert missing.returncode == 3
    assert f"--config: file {tmp / 'cfg.json'} does not exist" in missing.stderr
    no_scheme = run_cli("compress", str(model), "--method", "quant_rtn", "--url", "localhost:8000", env=env)
    assert no_scheme.returncode == 3, no_scheme.stderr
    assert "did you mean http://localhost:8000" in no_scheme.stderr and "unreachable" not in no_scheme.stderr


def test_methods_from_a_server_match_the_local_catalog(live_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, *_ = start_ci(live_server, tmp_path, workers=0)
    remote = run_cli("methods", "mixed_precision", "--url", env["MODELPRESS_URL"], "--json", env=env)
    local = run_cli("methods", "mixed_precision", "--json", env=env)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert json.loads(remote.stdout)[0]["data"]["calibration"] == "required"
    unreachable = run_cli("methods", "--url", "http://127.0.0.1:9", env=env)
    assert unreachable.returncode == 4 and "unreachable" in unreachable.stderr


def test_rerun_after_a_cancelled_job_runs_again_and_new_forces_a_job(live_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, model, _, _, api = start_ci(live_server, tmp_path, workers=0)  # no worker: jobs stay queued
    args = ["compress", str(model), "--method", "quant_rtn"]

    def job_of(*extra: str) -> str:
        run = run_cli(*args, *extra, env=env)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["job_id"]

    first = job_of()
    assert api.post(f"/v1/jobs/{first}/cancel").json()["status"] == "cancelled"
    second = job_of()
    assert second != first, "a cancelled job must not capture the command's idempotency key"
    assert job_of() == second, "a live job is still found again by the rerun"
    forced = job_of("--new")
    assert forced not in (first, second)
    assert job_of() == second, "--new does not take the key over"
    assert api.get(f"/v1/jobs/{first}").json()["status"] == "cancelled"


def test_ctrl_c_during_wait_leaves_the_job_running_and_the_hint_reattaches(live_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, model, data, tmp, _ = start_ci(live_server, tmp_path, workers=1, MODELPRESS_FAULT_STAGE_DELAY_S="2")
    out = tmp / "out"
    command = [MODELPRESS, "compress", str(model), "--method", "quant_rtn", "--evaluation", str(data)]
    command += ["--max-metric-drop", "0.5", "--wait", "--no-progress", "--timeout", "180", "--out", str(out)]
    cli = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    while not any(line.startswith("modelpress: running") for line in seen):
        line = cli.stderr.readline()  # type: ignore[union-attr]
        assert line, f"the CLI ended before the job ran: {seen}"
        seen.append(line)
    cli.send_signal(signal.SIGINT)
    rest = cli.communicate(timeout=60)[1]
    assert cli.returncode == 130, rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    job_id = next(line.split()[2] for line in seen if line.startswith("modelpress: job "))
    assert f"interrupted: job {job_id} goes on on the server" in rest
    hint = rest.strip().splitlines()[-1].strip()
    assert hint.startswith(f"modelpress wait {job_id} ")
    reattached = run_cli(*shlex.split(hint)[1:], env=env)
    assert reattached.returncode == 0, reattached.stderr
    assert "verdict: pass" in reattached.stdout
    assert junit_cases(out / "junit.xml") == {"max_metric_drop": True, "export_check": True}
