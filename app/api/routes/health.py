"""Liveness, readiness (DB, broker, store) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, StoreDep
from app.core.janitor import janitor_health, stale_before
from app.core.metrics import REGISTRY
from app.core.queue import broker_reachable
from app.db import crud
from app.db.schema import schema_is_current

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is down (same body, `not_ready`)"}})
async def readyz(session: SessionDep, store: StoreDep) -> Any:
    checks = {
        "database": await run_in_threadpool(_database_ok, session),
        "broker": await run_in_threadpool(broker_reachable),
        "store": await run_in_threadpool(store.healthy),
    }
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    # reported, not gating: a failing janitor step or a dead worker does not stop this replica serving
    body["janitor"] = janitor_health()
    body["heartbeats"] = await run_in_threadpool(_staleness, session)
    return JSONResponse(body, status_code=200 if ready else 503)


def _staleness(session: Any) -> dict[str, int] | None:
    try:
        return crud.count_stale(session=session, before=stale_before())
    except Exception:
        return None


def _database_ok(session: Session) -> bool:
    """Reachable and migrated to the schema this code ships: an unmigrated database is reachable too,
    then fails every query with 'no such table'."""
    try:
        return schema_is_current(session.connection())
    except Exception:
        return False


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
