"""`GET /v1/jobs/{id}` checks the key and reads the job in one query; the answers stay those of every route:
401 for a missing, unknown or revoked key (whether or not the job exists), 404 for another project's job."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update

from app.core.security import hash_api_key
from app.db.models import ApiKey, utcnow
from app.db.session import session_scope
from tests.helpers import files


def _queued_job(api, tmp_path: Path) -> dict:  # type: ignore[no-untyped-def]
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    body = {"model_id": model["id"], "method": "quant_rtn", "config": {"bits": 8, "group_size": None}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def _code(response) -> str:  # type: ignore[no-untyped-def]
    return response.json()["error"]["code"]


def test_status_answers_per_key(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = _queued_job(api, tmp_path)
    url = f"/v1/jobs/{job['id']}"
    ok = api.get(url)
    assert ok.status_code == 200 and ok.json()["id"] == job["id"] and ok.json()["status"] == "queued"
    assert ok.headers["content-type"] == "application/json" and ok.headers["ETag"].startswith('"')
    assert _code(api.client.get(url)) == "missing_api_key"
    for missing_or_not in (url, "/v1/jobs/nope"):
        unknown = api.client.get(missing_or_not, headers={"Authorization": "Bearer mp_nope_nope"})
        assert unknown.status_code == 401 and _code(unknown) == "invalid_api_key"
    other = api.get(url, key=api.new_key("other-project"))
    assert other.status_code == 404 and _code(other) == "not_found"
    assert api.get("/v1/jobs/nope").status_code == 404


def test_revoked_key_is_refused_at_once(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = _queued_job(api, tmp_path)
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 200
    with session_scope() as session:
        session.execute(update(ApiKey).where(ApiKey.key_hash == hash_api_key(api.key)).values(revoked_at=utcnow()))
    refused = api.get(f"/v1/jobs/{job['id']}")
    assert refused.status_code == 401 and _code(refused) == "invalid_api_key"
