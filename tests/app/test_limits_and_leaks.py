"""Resource limits the API enforces (dry-run cap and memory, estimates over the worker limit) and what one
tenant must not see of another or of the server (current job ids, absolute paths, lost tracebacks)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ApiClient
from tests.helpers import files


def _upload(api: ApiClient, path: Path, key: str | None = None) -> str:
    response = api.upload("/v1/models", path, key)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _body(model_id: str) -> dict:
    return {"model_id": model_id, "method": "quant_rtn", "config": {"bits": 4, "group_size": None}}


def test_dry_runs_beyond_the_cap_answer_429_with_retry_after(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.core.deep_preflight import dry_run_slot

    service_env(MODELPRESS_DRY_RUN_MAX_CONCURRENT="1")
    api = make_api()
    model_id = _upload(api, files.tiny_onnx(tmp_path / "tiny.onnx"))
    with dry_run_slot():  # one dry run in flight on this API process
        busy = api.post("/v1/jobs?dry_run=true", json=_body(model_id))
    assert busy.status_code == 429, busy.text
    assert busy.json()["error"]["code"] == "too_many_dry_runs" and int(busy.headers["Retry-After"]) > 0
    assert busy.json()["error"]["details"] == {"max_concurrent": 1}
    assert api.post("/v1/jobs?dry_run=true", json=_body(model_id)).status_code == 200


def test_dry_run_cap_is_a_setting(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.core.deep_preflight import dry_run_slot

    service_env(MODELPRESS_DRY_RUN_MAX_CONCURRENT="2")
    api = make_api()
    model_id = _upload(api, files.tiny_onnx(tmp_path / "tiny.onnx"))
    with dry_run_slot():
        assert api.post("/v1/jobs?dry_run=true", json=_body(model_id)).status_code == 200
        with dry_run_slot():
            assert api.post("/v1/jobs?dry_run=true", json=_body(model_id)).status_code == 429


def test_dry_run_of_a_memory_bomb_stops_at_its_memory_limit(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    limit = 1_500_000_000  # torch loads in it; the bomb's 2.5 GB tensor does not fit
    service_env(MODELPRESS_DRY_RUN_MAX_MEMORY_BYTES=str(limit))
    api = make_api()
    model_id = _upload(api, files.constant_of_shape_bomb(tmp_path / "bomb.onnx"))
    response = api.post("/v1/jobs?dry_run=true", json=_body(model_id))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "resource_limit" and str(limit) in error["message"]


def test_jobs_whose_estimate_exceeds_the_worker_limit_are_refused(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    limit = 100 * 1024**2  # below the estimate's fixed 512 MiB of working memory
    service_env(MODELPRESS_JOB_MAX_MEMORY_BYTES=str(limit))
    api = make_api()
    model_id = _upload(api, files.tiny_onnx(tmp_path / "tiny.onnx"))
    for url in ("/v1/jobs", "/v1/jobs?dry_run=true"):
        response = api.post(url, json=_body(model_id))
        assert response.status_code == 422, (url, response.text)
        error = response.json()["error"]
        assert error["code"] == "resource_limit" and "exceeds_worker_memory" in error["message"]
    details = api.post("/v1/jobs", json=_body(model_id)).json()["error"]["details"]
    assert details["reason"] == "exceeds_worker_memory" and details["limit_bytes"] == limit
    assert details["estimated_peak_bytes"] > limit
    assert api.get("/v1/jobs").json()["total"] == 0


def test_dashboard_shows_a_workers_current_job_only_to_its_project(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.db import crud
    from app.db.session import session_scope

    other_key = api.new_key("other-tenant")
    other_job = api.post(
        "/v1/jobs", other_key, json=_body(_upload(api, files.tiny_onnx(tmp_path / "o.onnx"), other_key))
    )
    own_job = api.post("/v1/jobs", json=_body(_upload(api, files.tiny_onnx(tmp_path / "m.onnx"))))
    with session_scope() as session:
        crud.set_worker_job(session=session, name="w-other@host", job_id=other_job.json()["id"])
        crud.set_worker_job(session=session, name="w-own@host", job_id=own_job.json()["id"])

    def current(key: str | None) -> dict[str, str | None]:
        workers = api.get("/v1/dashboard/summary", key).json()["workers"]
        return {w["name"]: w["current_job_id"] for w in workers}

    assert current(None) == {"w-other@host": None, "w-own@host": own_job.json()["id"]}
    assert current(other_key) == {"w-other@host": other_job.json()["id"], "w-own@host": None}


def _running_job(api: ApiClient, tmp_path: Path, host: str) -> str:
    from app.db import crud
    from app.db.session import session_scope

    job_id = api.post("/v1/jobs", json=_body(_upload(api, files.tiny_onnx(tmp_path / "tiny.onnx")))).json()["id"]
    with session_scope() as session:
        assert crud.claim_job(session=session, job_id=job_id, worker_host=host)
    return job_id


def _raise_with_server_paths(data_dir: Path) -> None:
    def read_model() -> None:
        open(data_dir / "store" / "sha256" / "ab" / "missing.bin")  # noqa: SIM115 - raises

    try:
        read_model()
    except OSError as error:
        raise RuntimeError(f"could not load {Path(tempfile.gettempdir()) / 'modelpress-x' / 'model.onnx'}") from error


def test_failed_job_error_and_events_carry_no_server_paths_and_keep_the_traceback(  # type: ignore[no-untyped-def]
    api, tmp_path, caplog
) -> None:
    from workers.pipeline import _fail

    job_id = _running_job(api, tmp_path, "host:1")
    data_dir = (tmp_path / "var").resolve()
    with caplog.at_level(logging.ERROR, logger="workers.pipeline"):
        try:
            _raise_with_server_paths(data_dir)
        except RuntimeError as error:
            _fail(job_id, "host:1", error)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "internal_error"
    assert job["error"]["message"] == "RuntimeError: could not load <tmp>/modelpress-x/model.onnx"
    events = api.get(f"/v1/jobs/{job_id}/events").json()
    trace = events[-1]["message"]
    assert trace.startswith("traceback: FileNotFoundError") and "<data>/store/sha256/ab/missing.bin" in trace
    assert "in read_model" in trace and "tests/app/test_limits_and_leaks.py:" in trace
    assert str(tmp_path) not in trace and str(Path(__file__).parent) not in trace and len(trace) <= 500
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "job %s failed" in logged[0].msg and logged[0].exc_info[0] is RuntimeError


def test_api_errors_carry_no_server_paths(api) -> None:  # type: ignore[no-untyped-def]
    from app.core.errors import APIError
    from app.core.settings import get_settings

    app = api.client.app
    secret = get_settings().data_dir.resolve() / "store" / "x.bin"

    @app.get("/v1/raise-with-path")
    def _raise() -> None:
        raise APIError(
            422, "bad_file", f"cannot read {secret}", {"path": str(secret), "list": [f"/srv/a/{secret.name}"]}
        )

    body = api.get("/v1/raise-with-path").json()["error"]
    assert body["message"] == "cannot read <data>/store/x.bin"
    assert body["details"] == {"path": "<data>/store/x.bin", "list": ["<path>/x.bin"]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("open /etc/passwd failed", "open <path>/passwd failed"),
        ("see http://host/a/b and a/b and 3/4", "see http://host/a/b and a/b and 3/4"),
        ("'(/opt/models/m.onnx)'", "'(<path>/m.onnx)'"),
    ],
)
def test_redact_paths_other_absolute_paths_keep_only_their_name(api, text, expected) -> None:  # type: ignore[no-untyped-def]
    from app.core.redact import redact_paths

    assert redact_paths(text) == expected


def test_library_paths_become_placeholders(api) -> None:  # type: ignore[no-untyped-def]
    import onnx

    from app.core.redact import redact_paths

    assert redact_paths(f"File {onnx.__file__}") == "File <site-packages>/onnx/__init__.py"


def test_roots_are_replaced_on_whole_path_components_only(api) -> None:  # type: ignore[no-untyped-def]
    from app.core.redact import redact_paths
    from app.core.settings import get_settings

    data = get_settings().data_dir.resolve()
    first, sibling, last = redact_paths(f"{data}/a {data}x/b {data}").split(" ")
    assert (first, last) == ("<data>/a", "<data>")
    assert sibling.endswith("/varx/b") and "<data>" not in sibling and not sibling.startswith("/")
    assert redact_paths(f"/srv{data}/c") == "<path>/c"
