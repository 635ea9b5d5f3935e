"""The FastAPI application: routes under /v1, health at the root, one error shape."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from app.api.body_limit import BodySizeLimit
from app.api.routes import dashboard, health, jobs, methods, uploads, webhooks
from app.core.errors import install_error_handlers
from app.core.janitor import start_janitor_thread
from app.core.settings import get_settings
from app.storage.store import get_store


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    stop = threading.Event()
    get_store().sweep_spool(older_than_s=get_settings().spool_orphan_age_s)
    if get_settings().janitor_enabled:
        start_janitor_thread(stop)
    yield
    stop.set()


def create_app() -> FastAPI:
    app = FastAPI(
        title="modelpress",
        version="0.1.0",
        description="Self-hostable model compression with an accuracy/latency gate.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        limit=get_settings().max_json_body_bytes,
        streamed_paths=frozenset({"/v1/models", "/v1/datasets"}),
    )
    v1 = APIRouter(prefix="/v1")
    for module in (uploads, jobs, methods, webhooks, dashboard):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(dashboard.page_router)
    return app


app = create_app()
