"""Request dependencies: a DB session per request and the project behind the bearer key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.core.errors import APIError
from app.core.settings import Settings, get_settings
from app.db import crud
from app.db.models import Project
from app.db.session import get_sessionmaker
from app.storage.store import Store, get_store


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


def get_project(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Project:
    if not authorization:
        raise APIError(401, "missing_api_key", "send 'Authorization: Bearer <api key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing_api_key", "send 'Authorization: Bearer <api key>'")
    project = crud.project_for_key(session=session, key=key.strip())
    # Hand the connection back to the pool now: a route that opens its own sessions (the long-poll) must
    # not hold two connections at once, or many concurrent requests can exhaust the pool and wait on it.
    session.close()
    if project is None:
        raise APIError(401, "invalid_api_key", "unknown or revoked API key")
    return project


ProjectDep = Annotated[Project, Depends(get_project)]
