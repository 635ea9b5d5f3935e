"""The API against its own OpenAPI document: Schemathesis fuzzes a live `modelpress serve` with a real
API key, and every response must be a non-5xx that the document declares (status, content type,
headers, body schema). Then the regressions it found, pinned one by one."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import files

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]


@pytest.mark.services
@pytest.mark.timeout(300)
@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_fuzzed_api_answers_no_5xx_and_conforms_to_its_openapi(live_server, tmp_path: Path, db: str) -> None:
    url, api = live_server(workers=0, db=db)
    # Real rows, so that list endpoints return objects whose schema is checked, not only [].
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    data = files.npz(tmp_path / "d.npz", input=np.zeros((4, 8), np.float32))
    assert api.upload("/v1/datasets", data, model_id=model["id"]).status_code == 201
    # Nothing is excluded: `GET /v1/jobs/{id}?wait=` only blocks on an existing unfinished job, and the
    # fuzzer cannot make one (it has no valid model and config), so every call answers at once.
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {api.key}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        "100",
        "--generation-deterministic",  # same cases every run; implies no example database on disk
        "--workers",
        "1",
        "--no-color",
        "--report-dir",
        str(tmp_path / "schemathesis"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "Operations:" in run.stdout


def test_malformed_multipart_is_a_400_not_a_500(api) -> None:  # type: ignore[no-untyped-def]
    boundary = "b0undary"
    body = f"--{boundary}\r\n[[1], {{}}]--{boundary}--\r\n".encode()
    response = api.post(
        "/v1/models", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"], "the one error shape, with a machine-readable code"


def test_npz_with_a_member_that_is_not_an_array_is_refused(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    np.savez(buffer, input=np.zeros((2, 8), np.float32))
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("notes.txt", "not an array")
    path = tmp_path / "mixed.npz"
    path.write_bytes(buffer.getvalue())
    response = api.upload("/v1/datasets", path)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_dataset" and "notes.txt" in response.json()["error"]["message"]


def test_timestamps_carry_their_utc_offset_on_sqlite(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    assert model["created_at"].endswith(("Z", "+00:00")), model["created_at"]
    listed = api.get("/v1/models").json()
    assert listed[0]["created_at"] == model["created_at"]


def test_openapi_declares_the_error_shape_not_fastapis_default(api) -> None:  # type: ignore[no-untyped-def]
    document = api.client.get("/openapi.json").json()
    responses = document["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    for status in ("401", "404", "422"):
        assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorOut"}
    html_404 = document["paths"]["/v1/jobs/{job_id}/report.html"]["get"]["responses"]["404"]["content"]
    assert list(html_404) == ["application/json"]
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_an_offset_past_a_sql_bigint_is_a_422(api) -> None:  # type: ignore[no-untyped-def]
    response = api.get("/v1/jobs", params={"offset": 2**64})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["path"] == "query.offset"
    assert api.get("/v1/jobs", params={"offset": 2**63 - 1}).json()["items"] == []


@pytest.mark.services
def test_webhook_url_longer_than_its_column_is_a_422_on_postgres(service_env, make_api) -> None:  # type: ignore[no-untyped-def]
    service_env(db="postgres", MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS="true")  # no DNS lookup of a public name
    api = make_api()
    url = "http://127.0.0.1/" + "a" * 2000
    response = api.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["path"] == "body.url"
    assert api.post("/v1/webhooks", json={"url": url[:1990]}).status_code == 201


@pytest.mark.services
def test_nul_bytes_are_a_422_on_postgres(service_env, make_api) -> None:  # type: ignore[no-untyped-def]
    service_env(db="postgres")
    api = make_api()
    for url in ("/v1/models?sha256=a%00b", "/v1/jobs/a%00b", "/v1/jobs?method=a%00b"):
        response = api.get(url)
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["code"] == "invalid_value"
    created = api.post("/v1/jobs", json={"model_id": "a\x00b", "method": "quant_rtn"})
    assert created.status_code == 422 and created.json()["error"]["code"] == "invalid_value", created.text
    assert api.get("/v1/models").status_code == 200, "the session is usable after the refused value"
