"""Webhooks: outbox rows on state changes, HMAC signatures with a replay window, retries, delivery log."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy import update

from app.core.webhooks import SIGNATURE_HEADER, deliver_due, sign, verify_signature
from app.db.models import WebhookDelivery
from app.db.session import session_scope
from tests.app.test_api import _job, onnx_model  # noqa: F401 - fixture


class Receiver:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_next = 0


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append((dict(self.headers), body))
            status = 500 if state.fail_next > 0 else 204
            state.fail_next -= 1
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state, f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


def test_signature_round_trip_and_replay_window() -> None:
    body = b'{"x": 1}'
    header = sign("s3cret", body, timestamp=1_000_000)
    assert verify_signature("s3cret", header, body, now=1_000_100)
    assert not verify_signature("s3cret", header, body, now=1_000_000 + 301), "outside the replay window"
    assert not verify_signature("other", header, body, now=1_000_100)
    assert not verify_signature("s3cret", header, b'{"x": 2}', now=1_000_100)
    assert not verify_signature("s3cret", "garbage", body)


def test_state_changes_are_delivered_signed_and_retried(api, onnx_model, receiver) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    state, url = receiver
    created = api.post("/v1/webhooks", json={"url": url, "events": ["job.queued", "job.cancelled"]})
    assert created.status_code == 201
    hook = created.json()
    assert len(hook["secret"]) == 64
    assert api.get("/v1/webhooks").json()[0]["secret"] is None, "the secret is shown once"
    job = _job(api, onnx_model["id"]).json()
    api.post(f"/v1/jobs/{job['id']}/cancel")
    state.fail_next = 1
    assert deliver_due() == {"delivered": 1, "retry": 1, "failed": 0}
    with session_scope() as session:  # make the retry due now instead of after its backoff
        session.execute(update(WebhookDelivery).values(next_attempt_at=WebhookDelivery.created_at))
    assert deliver_due()["delivered"] == 1
    events = sorted(json.loads(body)["event"] for _, body in state.requests)
    assert events == ["job.cancelled", "job.queued", "job.queued"] or events == [
        "job.cancelled",
        "job.cancelled",
        "job.queued",
    ]
    for headers, body in state.requests:
        assert verify_signature(hook["secret"], headers[SIGNATURE_HEADER], body)
        assert json.loads(body)["job"]["id"] == job["id"]
    log = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()
    assert {d["status"] for d in log} == {"delivered"} and max(d["attempts"] for d in log) == 2
    assert api.get(f"/v1/webhooks/{hook['id']}/deliveries", key=api.new_key("other")).status_code == 404


def test_unknown_event_names_are_refused(api) -> None:  # type: ignore[no-untyped-def]
    response = api.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x", "events": ["job.exploded"]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_events"
