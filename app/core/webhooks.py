"""Signed webhook delivery from the outbox, with retries and backoff.

Signature header: `Modelpress-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
A receiver recomputes it and rejects timestamps outside its replay window (`verify_signature`).

No database transaction is open while a request is in flight: a pass claims due deliveries in one short
transaction (a lease, so a sender that dies gives them back), sends outside any session, a few at a time
per project, and records each outcome in its own short transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from app.core.settings import Settings, get_settings
from app.core.webhook_targets import PinnedTarget, TargetForbidden, TargetUnresolvable, resolve_target
from app.db import crud
from app.db.models import new_id, utcnow
from app.db.session import session_scope

SIGNATURE_HEADER = "Modelpress-Signature"
MAX_ATTEMPTS = 8
BACKOFF_BASE_S = 2.0
REPLAY_WINDOW_S = 300
MAX_SENDER_THREADS = 16
MAX_ADDRESSES_TRIED = 2
# Each connect, the send and the read get the timeout: no send starts unless all fit in the claim's lease.
SEND_PHASES = MAX_ADDRESSES_TRIED + 2


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


@dataclass(frozen=True)
class Outgoing:
    """A claimed delivery, detached from the database while it is sent."""

    delivery_id: str
    project_id: str
    url: str
    secret: str
    event: str
    body: bytes
    attempts: int


@dataclass(frozen=True)
class Pass:
    """What every send of one delivery pass shares."""

    token: str
    settings: Settings
    last_start: float  # monotonic time after which a send could outlive the claim
    client: httpx.Client | None


def deliver_due(*, client: httpx.Client | None = None, limit: int = 50) -> dict[str, int]:
    """Send due deliveries; returns counts by outcome. `client`: send with it instead of a fresh one per request."""
    settings = get_settings()
    token, lease_s = new_id(), settings.webhook_claim_lease_s
    lease_start = time.monotonic()
    outgoing = _claim(token=token, lease_s=lease_s, limit=limit)
    run = Pass(token, settings, lease_start + lease_s - SEND_PHASES * settings.webhook_timeout_s, client)
    lanes = _lanes(outgoing, settings.webhook_concurrency_per_project)
    outcome: Counter[str] = Counter({"delivered": 0, "retry": 0, "failed": 0})
    unsent: list[str] = []
    if lanes:
        with ThreadPoolExecutor(max_workers=min(MAX_SENDER_THREADS, len(lanes))) as pool:
            for kinds, skipped in pool.map(lambda lane: _send_lane(lane, run), lanes):
                outcome.update(kinds)
                unsent.extend(skipped)
    if unsent:
        with session_scope() as session:
            crud.release_deliveries(session=session, delivery_ids=unsent, token=token)
    return dict(outcome)


def _claim(*, token: str, lease_s: float, limit: int) -> list[Outgoing]:
    lease_until = utcnow() + timedelta(seconds=lease_s)
    with session_scope() as session:
        rows = crud.claim_due_deliveries(session=session, token=token, lease_until=lease_until, limit=limit)
        return [
            Outgoing(
                delivery_id=delivery.id,
                project_id=hook.project_id,
                url=hook.url,
                secret=hook.secret,
                event=delivery.event,
                body=json.dumps({"id": delivery.id, **delivery.payload}, sort_keys=True).encode(),
                attempts=delivery.attempts,
            )
            for delivery, hook in rows
        ]


def _lanes(outgoing: Sequence[Outgoing], per_project: int) -> list[list[Outgoing]]:
    """At most `per_project` sequential lanes per project, so a project never has more requests in flight."""
    by_project: dict[str, list[Outgoing]] = defaultdict(list)
    for item in outgoing:
        by_project[item.project_id].append(item)
    return [items[i::per_project] for items in by_project.values() for i in range(min(per_project, len(items)))]


def _send_lane(lane: list[Outgoing], run: Pass) -> tuple[list[str], list[str]]:
    """Send one lane in order; returns (outcome of each sent, ids left unsent because the lease ran short)."""
    kinds: list[str] = []
    unsent: list[str] = []
    for item in lane:
        if time.monotonic() > run.last_start:
            unsent.append(item.delivery_id)
        else:
            kinds.append(_attempt(item, run))
    return kinds, unsent


def _attempt(item: Outgoing, run: Pass) -> str:
    try:
        target = resolve_target(item.url, allow_private=run.settings.webhook_allow_private_targets)
    except TargetForbidden as exc:  # refused without contacting it: no status, no timing to leak
        return _settle(item, run.token, ok=False, final=True, error=f"target_forbidden: {exc}")
    except TargetUnresolvable as exc:
        return _settle(item, run.token, ok=False, error=f"unresolvable: {exc}")
    status, error, duration_ms = _post(item, target, run)
    ok = status is not None and 200 <= status < 300
    return _settle(item, run.token, ok=ok, status=status, error=error, duration_ms=duration_ms)


def _post(item: Outgoing, target: PinnedTarget, run: Pass) -> tuple[int | None, str | None, int]:
    """POST to a checked address; returns (status, transport error, ms). The response body is never read.

    Like a plain connect, the next address is tried when one refuses the connection (a name with an
    IPv6 address the sender cannot reach, say), up to MAX_ADDRESSES_TRIED.
    """
    started = time.monotonic()
    status, error = None, None
    for ip in target.ips[:MAX_ADDRESSES_TRIED]:
        try:
            status, error = _post_to(item, target.request_args(ip), run), None
            break
        except httpx.ConnectError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
            break
    return status, error, round((time.monotonic() - started) * 1000)


def _post_to(item: Outgoing, pinned: dict[str, Any], run: Pass) -> int:
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(item.secret, item.body),
        "Modelpress-Delivery": item.delivery_id,
        "Modelpress-Event": item.event,
        **pinned["headers"],
    }
    with (
        _http(run) as http,
        http.stream(
            "POST",
            pinned["url"],
            content=item.body,
            headers=headers,
            extensions=pinned["extensions"],
            timeout=run.settings.webhook_timeout_s,
            follow_redirects=False,  # a redirect could point anywhere, inside included
        ) as response,
    ):
        return response.status_code


def _http(run: Pass) -> AbstractContextManager[httpx.Client]:
    """A fresh client per request: a pooled connection made for one host name must not carry another's."""
    if run.client is not None:
        return nullcontext(run.client)
    return httpx.Client(trust_env=False)  # a proxy from the environment would undo the pinning


def _settle(
    item: Outgoing,
    token: str,
    *,
    ok: bool,
    final: bool = False,
    status: int | None = None,
    error: str | None = None,
    duration_ms: int | None = None,
) -> str:
    """Record the attempt in its own short transaction; returns delivered, retry or failed."""
    values: dict[str, Any] = {"last_status_code": status, "last_error": error, "duration_ms": duration_ms}
    if ok:
        kind, values["status"], values["delivered_at"] = "delivered", "delivered", utcnow()
    elif final or item.attempts >= MAX_ATTEMPTS:
        kind, values["status"] = "failed", "failed"
    else:
        kind = "retry"
        values["next_attempt_at"] = utcnow() + timedelta(seconds=BACKOFF_BASE_S * 2 ** (item.attempts - 1))
    with session_scope() as session:
        crud.settle_delivery(session=session, delivery_id=item.delivery_id, token=token, values=values)
    return kind
