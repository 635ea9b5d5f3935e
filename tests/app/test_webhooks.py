"""Webhooks: outbox rows on state changes, HMAC signatures with a replay window, retries, delivery log,
and delivery that never holds a database transaction across network I/O."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from app.core.webhooks import SIGNATURE_HEADER, deliver_due, sign, verify_signature
from app.db.models import WebhookDelivery
from app.db.session import session_scope
from tests.app.test_api import _job, onnx_model  # noqa: F401 - fixture
from tests.helpers import files
from tests.helpers.webhooks import Receiver, http_receiver, silent_listener

ALLOW_PRIVATE = {"MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true"}


@pytest.fixture
def api(service_env, make_api):  # type: ignore[no-untyped-def]
    """These tests deliver to listeners on 127.0.0.1, which only a self-hoster's opt-in allows."""
    service_env(**ALLOW_PRIVATE)
    return make_api()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with http_receiver() as state:
        yield state


def _make_due_now() -> None:
    """Make retries due now instead of after their backoff."""
    with session_scope() as session:
        session.execute(update(WebhookDelivery).values(next_attempt_at=WebhookDelivery.created_at))


def test_signature_round_trip_and_replay_window() -> None:
    body = b'{"x": 1}'
    header = sign("s3cret", body, timestamp=1_000_000)
    assert verify_signature("s3cret", header, body, now=1_000_100)
    assert not verify_signature("s3cret", header, body, now=1_000_000 + 301), "outside the replay window"
    assert not verify_signature("other", header, body, now=1_000_100)
    assert not verify_signature("s3cret", header, b'{"x": 2}', now=1_000_100)
    assert not verify_signature("s3cret", "garbage", body)


def test_state_changes_are_delivered_signed_and_retried(api, onnx_model, receiver) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    created = api.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.queued", "job.cancelled"]})
    assert created.status_code == 201
    hook = created.json()
    assert len(hook["secret"]) == 64
    assert api.get("/v1/webhooks").json()[0]["secret"] is None, "the secret is shown once"
    job = _job(api, onnx_model["id"]).json()
    api.post(f"/v1/jobs/{job['id']}/cancel")
    receiver.fail_next = 1
    assert deliver_due() == {"delivered": 1, "retry": 1, "failed": 0}
    _make_due_now()
    assert deliver_due()["delivered"] == 1
    events = sorted(json.loads(body)["event"] for _, body in receiver.requests)
    assert events == ["job.cancelled", "job.queued", "job.queued"] or events == [
        "job.cancelled",
        "job.cancelled",
        "job.queued",
    ]
    for headers, body in receiver.requests:
        assert verify_signature(hook["secret"], headers[SIGNATURE_HEADER.lower()], body)
        assert json.loads(body)["job"]["id"] == job["id"]
    log = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()
    assert {d["status"] for d in log} == {"delivered"} and max(d["attempts"] for d in log) == 2
    assert all(isinstance(d["duration_ms"], int) and d["duration_ms"] >= 0 for d in log)
    assert api.get(f"/v1/webhooks/{hook['id']}/deliveries", key=api.new_key("other")).status_code == 404


def test_the_log_keeps_status_and_timing_never_the_response_body(api, onnx_model, receiver) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    receiver.fail_next, receiver.response_body = 1, b"internal-secret-in-error-page"
    hook = api.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.queued"]}).json()
    _job(api, onnx_model["id"])
    assert deliver_due() == {"delivered": 0, "retry": 1, "failed": 0}
    (entry,) = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()
    assert entry["last_status_code"] == 500 and entry["duration_ms"] >= 0 and entry["status"] == "pending"
    assert "internal-secret" not in json.dumps(entry)


def test_unknown_event_names_are_refused(api) -> None:  # type: ignore[no-untyped-def]
    response = api.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x", "events": ["job.exploded"]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_events"


def _other_project_submits(api, key: str, tmp_path: Path) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    """Another project's upload + job submission; returns (seconds taken, status codes)."""
    started = time.monotonic()
    upload = api.upload("/v1/models", files.tiny_onnx(tmp_path / "other.onnx"), key=key)
    model_id = upload.json().get("id", "") if upload.status_code == 201 else ""
    job = api.post("/v1/jobs", key=key, json={"model_id": model_id, "method": "quant_rtn", "config": {"bits": 4}})
    return time.monotonic() - started, [upload.status_code, job.status_code]


def test_a_listener_that_never_answers_blocks_no_one(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Sends run outside any transaction, a few at a time per project, each bounded by the request timeout."""
    service_env(**ALLOW_PRIVATE, MODELPRESS_WEBHOOK_TIMEOUT_S="3", MODELPRESS_WEBHOOK_CONCURRENCY_PER_PROJECT="2")
    api = make_api()
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    other_key = api.new_key("other-project")
    with silent_listener() as listener:
        for _ in range(5):
            assert api.post("/v1/webhooks", json={"url": listener.url}).status_code == 201
        assert _job(api, model["id"]).status_code == 202
        outcome: dict[str, int] = {}
        sender = threading.Thread(target=lambda: outcome.update(deliver_due()))
        sender.start()
        listener.wait_for_connections(2, timeout_s=15)
        elapsed, codes = _other_project_submits(api, other_key, tmp_path)
        overlapped = sender.is_alive()
        sender.join(60)
    assert codes == [201, 202], codes
    assert elapsed < 2.5, f"another project waited {elapsed:.1f} s for the webhook sender"
    assert overlapped, "the other project's requests ran while the sends were in progress"
    assert outcome == {"delivered": 0, "retry": 5, "failed": 0}
    assert listener.accepted == 5 and listener.max_open == 2, "at most 2 concurrent sends per project"
    with session_scope() as session:
        rows = session.query(WebhookDelivery).all()
        assert {(r.attempts, r.status, r.claimed_until) for r in rows} == {(1, "pending", None)}
        assert all("Timeout" in (r.last_error or "") and r.duration_ms >= 2500 for r in rows)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_concurrent_senders_send_each_delivery_once(db: str, service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Several API replicas run the janitor: a claimed delivery is sent by its claimer only."""
    service_env(db=db, **ALLOW_PRIVATE)
    api = make_api()
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    with http_receiver(delay_s=0.1) as receiver:
        for _ in range(3):
            api.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.queued"]})
        for _ in range(4):
            assert _job(api, model["id"]).status_code == 202
        delivered = _run_senders(2, lambda: deliver_due(limit=3))
    ids = [json.loads(body)["id"] for _, body in receiver.requests]
    assert len(ids) == 12 and len(set(ids)) == 12, f"{len(ids)} requests for {len(set(ids))} deliveries"
    assert sum(delivered) == 12


def _run_senders(count: int, one_pass: Callable[[], dict[str, int]]) -> list[int]:
    """`count` threads start together and each repeats passes until one finds nothing to send."""
    barrier, totals = threading.Barrier(count), [0] * count

    def sender(index: int) -> None:
        barrier.wait()
        while sum((outcome := one_pass()).values()):
            totals[index] += outcome["delivered"]

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return totals
