"""Signed webhook delivery from the outbox, with retries and backoff.

Signature header: `Modelpress-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
A receiver recomputes it and rejects timestamps outside its replay window (`verify_signature`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import timedelta

import httpx
from sqlalchemy import select

from app.db.models import Webhook, WebhookDelivery, utcnow
from app.db.session import session_scope

SIGNATURE_HEADER = "Modelpress-Signature"
MAX_ATTEMPTS = 8
BACKOFF_BASE_S = 2.0
REPLAY_WINDOW_S = 300


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance_s: int = REPLAY_WINDOW_S, now: float | None = None
) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is inside the replay window."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def deliver_due(*, client: httpx.Client | None = None, limit: int = 50) -> dict[str, int]:
    """Send every pending delivery whose time has come; returns counts by outcome."""
    outcome = {"delivered": 0, "retry": 0, "failed": 0}
    http = client or httpx.Client(timeout=5.0)
    try:
        with session_scope() as session:
            due = session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                .order_by(WebhookDelivery.created_at)
                .limit(limit)
            ).all()
            for delivery in due:
                hook = session.get(Webhook, delivery.webhook_id)
                if hook is not None:
                    outcome[_attempt(http, hook, delivery)] += 1
    finally:
        if client is None:
            http.close()
    return outcome


def _attempt(http: httpx.Client, hook: Webhook, delivery: WebhookDelivery) -> str:
    body = json.dumps({"id": delivery.id, **delivery.payload}, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(hook.secret, body),
        "Modelpress-Delivery": delivery.id,
        "Modelpress-Event": delivery.event,
    }
    delivery.attempts += 1
    try:
        response = http.post(hook.url, content=body, headers=headers)
        delivery.last_status_code, delivery.last_error = response.status_code, None
        ok = 200 <= response.status_code < 300
    except httpx.HTTPError as exc:
        delivery.last_error, ok = f"{type(exc).__name__}: {exc}"[:500], False
    if ok:
        delivery.status, delivery.delivered_at = "delivered", utcnow()
        return "delivered"
    if delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = "failed"
        return "failed"
    delivery.next_attempt_at = utcnow() + timedelta(seconds=BACKOFF_BASE_S * 2 ** (delivery.attempts - 1))
    return "retry"
