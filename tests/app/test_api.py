"""The HTTP contract against the embedded default (SQLite, local store, filesystem broker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import files


@pytest.fixture
def onnx_model(api, tmp_path: Path) -> dict:  # type: ignore[no-untyped-def]
    response = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx"))
    assert response.status_code == 201, response.text
    return response.json()


def _error_code(response) -> str:  # type: ignore[no-untyped-def]
    return response.json()["error"]["code"]


def test_auth_is_required_and_checked(api) -> None:  # type: ignore[no-untyped-def]
    assert _error_code(api.client.get("/v1/jobs")) == "missing_api_key"
    response = api.client.get("/v1/jobs", headers={"Authorization": "Bearer mp_nope_nope"})
    assert response.status_code == 401 and _error_code(response) == "invalid_api_key"
    assert api.get("/v1/jobs").status_code == 200


def test_model_upload_detects_onnx_from_content(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    assert onnx_model["format"] == "onnx"
    assert onnx_model["param_count"] == 16 * 8 + 16 + 3 * 16 + 3
    assert onnx_model["sha256"].startswith("sha256:") and len(onnx_model["sha256"]) == 71
    assert onnx_model["info"]["inputs"] == [{"name": "input", "shape": [None, 8], "dtype": "float32"}]
    assert api.get(f"/v1/models/{onnx_model['id']}").json()["id"] == onnx_model["id"]


@pytest.mark.parametrize(
    ("maker", "code"),
    [
        (files.garbage, "invalid_model"),
        (files.pickled, "pickle_refused"),
        (files.torch_save_zip, "pickle_refused"),
        (files.zip_with_escape, "unsafe_archive"),
        (files.tar_with_link, "unsafe_archive"),
    ],
)
def test_bad_model_uploads_are_refused_and_nothing_is_stored(api, tmp_path, maker, code) -> None:  # type: ignore[no-untyped-def]
    path = maker(tmp_path / "upload.bin")
    response = api.upload("/v1/models", path)
    assert response.status_code == 422, response.text
    assert _error_code(response) == code
    store_root = tmp_path / "var" / "store"
    assert not list((store_root / "tmp").iterdir()), "the spool file must be discarded"
    assert not (store_root / "sha256").exists()


def test_pickle_refusal_names_the_safe_formats(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    message = api.upload("/v1/models", files.pickled(tmp_path / "model.pt")).json()["error"]["message"]
    assert "never unpickles" in message and "ONNX" in message and ".pt2" in message


def test_truncated_onnx_is_refused(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    whole = files.tiny_onnx(tmp_path / "whole.onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(whole[: len(whole) // 2])
    response = api.upload("/v1/models", truncated)
    assert response.status_code == 422 and _error_code(response) == "invalid_model"


def test_upload_over_the_limit_is_413(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_MAX_UPLOAD_BYTES="1000")
    api = make_api()
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * 5000)
    response = api.upload("/v1/models", big)
    assert response.status_code == 413 and _error_code(response) == "too_large"
    assert not list((tmp_path / "var" / "store" / "tmp").iterdir())


def test_dataset_validated_against_model_inputs(api, onnx_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = files.npz(tmp_path / "good.npz", input=np.zeros((4, 8), np.float32), labels=np.zeros(4, np.int64))
    response = api.upload("/v1/datasets", good, model_id=onnx_model["id"])
    assert response.status_code == 201, response.text
    assert response.json()["info"]["has_labels"] is True
    wrong_name = files.npz(tmp_path / "wrong.npz", pixels=np.zeros((4, 8), np.float32))
    response = api.upload("/v1/datasets", wrong_name, model_id=onnx_model["id"])
    assert response.status_code == 422 and _error_code(response) == "dataset_mismatch"
    assert "'input' missing" in response.json()["error"]["message"]
    wrong_shape = files.npz(tmp_path / "shape.npz", input=np.zeros((4, 9), np.float32))
    message = api.upload("/v1/datasets", wrong_shape, model_id=onnx_model["id"]).json()["error"]["message"]
    assert "shape [4, 9]" in message
    wrong_dtype = files.npz(tmp_path / "dtype.npz", input=np.zeros((4, 8), np.float64))
    assert (
        "dtype float64" in api.upload("/v1/datasets", wrong_dtype, model_id=onnx_model["id"]).json()["error"]["message"]
    )


def _job(api, model_id: str, **overrides):  # type: ignore[no-untyped-def]
    body = {
        "model_id": model_id,
        "method": "quant_rtn",
        "config": {"bits": 4, "group_size": None},
        **overrides,
    }
    headers = overrides.pop("headers", {}) if "headers" in overrides else {}
    return api.post("/v1/jobs", json=body, headers=headers)


def test_job_create_is_202_queued_and_sent(api, onnx_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    response = _job(api, onnx_model["id"])
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["queue"] == "cpu"
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    messages = list((tmp_path / "var" / "broker").glob("*.cpu.msg"))
    assert len(messages) == 1 and job["id"] in messages[0].read_text()


def test_job_validation_errors(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    response = _job(api, onnx_model["id"], method="quant_magic")
    assert response.status_code == 422 and _error_code(response) == "unknown_method"
    response = _job(api, onnx_model["id"], config={"bits": 5})
    assert _error_code(response) == "invalid_config"
    assert response.json()["error"]["details"][0]["path"] == "config.bits"
    response = _job(api, onnx_model["id"], config={"group_size": 48})
    assert response.json()["error"]["details"][0]["path"] == "config.group_size"
    response = _job(api, onnx_model["id"], method="quant_gptq", config={})
    assert response.status_code == 422 and _error_code(response) == "calibration_required"
    assert _job(api, "0" * 32).status_code == 404


def test_idempotency_key_returns_the_same_job(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    body = {"model_id": onnx_model["id"], "method": "quant_rtn", "config": {"bits": 4}}
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "build-42"})
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "build-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert api.get("/v1/jobs").json()["total"] == 1
    conflict = api.post("/v1/jobs", json={**body, "config": {"bits": 8}}, headers={"Idempotency-Key": "build-42"})
    assert conflict.status_code == 409 and _error_code(conflict) == "idempotency_conflict"


def test_other_projects_objects_answer_404(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    job = _job(api, onnx_model["id"]).json()
    other = api.new_key("someone-else")
    assert api.get(f"/v1/models/{onnx_model['id']}", key=other).status_code == 404
    assert api.get(f"/v1/jobs/{job['id']}", key=other).status_code == 404
    assert api.post(f"/v1/jobs/{job['id']}/cancel", key=other).status_code == 404
    response = api.post("/v1/jobs", key=other, json={"model_id": onnx_model["id"], "method": "quant_rtn"})
    assert response.status_code == 404
    assert api.get("/v1/jobs", key=other).json()["total"] == 0


def test_list_filters_and_paginates_newest_first(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    ids = [_job(api, onnx_model["id"], config={"bits": b}).json()["id"] for b in (2, 3, 4, 8)]
    page = api.get("/v1/jobs?limit=3").json()
    assert page["total"] == 4 and [j["id"] for j in page["items"]] == ids[::-1][:3]
    assert [j["id"] for j in api.get("/v1/jobs?limit=3&offset=3").json()["items"]] == ids[:1]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    assert [j["id"] for j in api.get("/v1/jobs?status=cancelled").json()["items"]] == ids[:1]
    assert api.get("/v1/jobs?method=quant_gptq").json()["total"] == 0
    assert api.get(f"/v1/jobs?model_id={onnx_model['id']}").json()["total"] == 4
    assert _error_code(api.get("/v1/jobs?status=bogus")) == "invalid_filter"


def test_cancel_queued_job_and_refuse_cancel_of_finished(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    job = _job(api, onnx_model["id"]).json()
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and _error_code(again) == "job_finished"
    assert _error_code(api.get(f"/v1/jobs/{job['id']}/report")) == "report_not_ready"


def test_dry_run_preflight_records_nothing(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    body = {"model_id": onnx_model["id"], "method": "quant_gptq", "config": {"bits": 2}}
    response = api.post("/v1/jobs?dry_run=true", json=body)
    assert response.status_code == 422 and _error_code(response) == "calibration_required"
    result = response.json()["error"]["details"]
    assert result["ok"] is False
    assert {c["name"]: c["ok"] for c in result["checks"]}["calibration_present"] is False
    assert result["estimate"]["peak_memory_bytes"] > 0
    assert api.get("/v1/jobs").json()["total"] == 0


def test_methods_list_schemas(api) -> None:  # type: ignore[no-untyped-def]
    methods = {m["key"]: m for m in api.get("/v1/methods").json()}
    assert {
        "quant_rtn",
        "quant_gptq",
        "quant_decoupleq",
        "prune_structured",
        "mixed_precision",
        "data_free",
    } <= set(methods)
    assert methods["quant_rtn"]["needs_calibration"] is False and methods["quant_gptq"]["needs_calibration"] is True
    assert methods["quant_decoupleq"]["config_schema"]["properties"]["bits"]["enum"] == [2, 3, 4]
    assert methods["quant_rtn"]["data"] == {"calibration": "optional", "kinds": ["npz", "text"]}
    assert methods["data_free"]["data"]["calibration"] == "none"
    assert methods["mixed_precision"]["config_schema"]["properties"]["candidates"]["default"] == [2, 3, 4, 8]


def test_unknown_config_key_lists_the_valid_keys(api) -> None:  # type: ignore[no-untyped-def]
    response = api.post("/v1/methods/prune_structured/validate", json={"config": {"flops_target": 0.5}})
    detail = response.json()["error"]["details"][0]
    assert response.status_code == 422 and detail["path"] == "config.flops_target"
    assert "target" in detail["valid"] and "importance" in detail["valid"] and "method" not in detail["valid"]
    assert "valid keys: " in detail["message"]
    nested = api.post("/v1/methods/prune_structured/validate", json={"config": {"target": {"metrc": "flops"}}})
    assert nested.json()["error"]["details"][0]["valid"] == ["metric", "reduction"]


def test_pipeline_steps_are_validated_at_job_creation(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    def create(steps: list[dict]) -> list[dict]:
        response = _job(api, onnx_model["id"], method="pipeline", config={"steps": steps})
        assert response.status_code == 422 and _error_code(response) == "invalid_config", response.text
        return response.json()["error"]["details"]

    prune = {"method": "prune_structured", "config": {}}
    (unknown,) = create([prune, {"method": "quant_nope", "config": {}}])
    assert unknown["type"] == "unknown_method" and unknown["path"] == "config.steps.1"
    assert "quant_int8" in unknown["message"]
    bad_bits, extra = create([{"method": "quant_rtn", "config": {"bits": 5, "bitz": 4}}])
    assert (bad_bits["type"], bad_bits["path"]) == ("literal_error", "config.steps.0.config.bits")
    assert extra["path"] == "config.steps.0.config.bitz" and "bits" in extra["valid"]
    (order,) = create([{"method": "quant_int8", "config": {}}, prune])
    assert order["type"] == "graph_step_not_last" and "must be the last step" in order["message"]
    (nested,) = create([{"method": "pipeline", "config": {}}])
    assert nested["type"] == "nested_pipeline" and nested["path"] == "config.steps"
    methods = {m["key"]: m for m in api.get("/v1/methods").json()}
    assert methods["pipeline"]["config_schema"]["properties"]["steps"]["maxItems"] == 8
    assert api.get("/v1/jobs").json()["total"] == 0


def test_health_readiness_metrics_and_docs(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    _job(api, onnx_model["id"])
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {
        "database": True,
        "broker": True,
        "store": True,
    }
    metrics = api.client.get("/metrics").text
    assert 'modelpress_jobs{status="queued"} 1.0' in metrics
    assert 'modelpress_queue_depth{queue="cpu"} 1.0' in metrics  # quant_rtn routes to cpu
    assert "modelpress_job_duration_seconds_bucket" in metrics
    assert api.client.get("/openapi.json").json()["info"]["title"] == "modelpress"
    assert api.client.get("/docs").status_code == 200


def test_importing_app_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, app.main, app.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_etag_and_long_poll(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    job = _job(api, onnx_model["id"]).json()
    first = api.get(f"/v1/jobs/{job['id']}")
    etag = first.headers["ETag"]
    assert api.get(f"/v1/jobs/{job['id']}", headers={"If-None-Match": etag}).status_code == 304
    started = time.monotonic()
    unchanged = api.get(f"/v1/jobs/{job['id']}?wait=1", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and time.monotonic() - started >= 0.9
    canceller = threading.Timer(0.5, lambda: api.post(f"/v1/jobs/{job['id']}/cancel"))
    canceller.start()
    started = time.monotonic()
    changed = api.get(f"/v1/jobs/{job['id']}?wait=20", headers={"If-None-Match": etag})
    canceller.join()
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert time.monotonic() - started < 10 and changed.headers["ETag"] != etag


def test_dashboard_summary_and_job_events(api, onnx_model) -> None:  # type: ignore[no-untyped-def]
    job = _job(api, onnx_model["id"]).json()
    api.post(f"/v1/jobs/{job['id']}/cancel")
    summary = api.get("/v1/dashboard/summary").json()
    assert summary["counts"] == {"cancelled": 1} and summary["queues"]["cpu"] == 1
    assert len(summary["throughput"]) == 24 and summary["workers"] == []
    events = api.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["status"] for e in events] == ["queued", "cancelled"]
    page = api.client.get("/dashboard")
    assert page.status_code == 200 and 'data-testid="jobs"' in page.text


def test_dry_run_loads_the_model_for_real(api, onnx_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = api.post("/v1/jobs?dry_run=true", json={"model_id": onnx_model["id"], "method": "quant_rtn"}).json()
    assert result["deep"] is True and result["ok"] is True, result
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["model_loads"]["ok"] and checks["exportable"]["ok"]
    assert result["details"]["quantizable_layers"] == 2 and result["estimate"]
    odd = api.upload("/v1/models", files.onnx_with_op(tmp_path / "odd.onnx", "Hardmax")).json()
    response = api.post("/v1/jobs?dry_run=true", json={"model_id": odd["id"], "method": "quant_rtn"})
    assert response.status_code == 422 and _error_code(response) == "unsupported_operator"
    result = response.json()["error"]["details"]
    assert result["ok"] is False
    failed = next(c for c in result["checks"] if not c["ok"])
    assert "unsupported_operator" in failed["message"] and "Hardmax" in failed["message"]


def test_dry_run_refuses_an_unprunable_graph_naming_the_module(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = api.upload("/v1/models", files.channel_shuffle_onnx(tmp_path / "shuffle.onnx")).json()
    data = files.npz(
        tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    )
    dataset = api.upload("/v1/datasets", data, model_id=model["id"]).json()
    body = {"model_id": model["id"], "method": "prune_structured", "calibration_id": dataset["id"]}
    response = api.post("/v1/jobs?dry_run=true", json=body)
    assert response.status_code == 422 and _error_code(response) == "untraceable_model"
    assert "'conv2'" in response.json()["error"]["message"]
