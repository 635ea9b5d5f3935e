"""Idempotency-Key semantics on PostgreSQL through a live server: a key replays its job while that job
is alive or succeeded; once it failed or was cancelled, the same request makes one new job, even when
many clients retry at the same moment."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import files

pytestmark = pytest.mark.services


def test_a_cancelled_jobs_key_goes_to_exactly_one_new_job(live_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url, api = live_server(workers=0, db="postgres")  # no worker: jobs stay queued until cancelled
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    body = {"model_id": model["id"], "method": "quant_rtn"}
    headers = {**api.headers(), "Idempotency-Key": "retry-me"}

    def post(json_body: dict[str, object] = body) -> httpx.Response:
        return httpx.post(f"{url}/v1/jobs", json=json_body, headers=headers, timeout=30)

    first = post().json()["id"]
    assert post().headers.get("Idempotent-Replayed") == "true"
    assert api.post(f"/v1/jobs/{first}/cancel").json()["status"] == "cancelled"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(), range(8)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1 and first not in ids, ids
    assert sum(a.headers.get("Idempotent-Replayed") != "true" for a in answers) == 1
    conflict = post({**body, "method": "prune_unstructured"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
    assert api.get(f"/v1/jobs/{first}").json()["status"] == "cancelled"
