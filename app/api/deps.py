"""Request dependencies: a DB session per request and the project behind the bearer key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.core.errors import APIError
from app.core.security import hash_api_key
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


async def api_key_hash(authorization: Annotated[str | None, Header()] = None) -> str:
    """The hash of the bearer key; no I/O, so it runs on the event loop rather than in a thread."""
    if not authorization:
        raise APIError(401, "missing_api_key", "send 'Authorization: Bearer <api key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing_api_key", "send 'Authorization: Bearer <api key>'")
    return hash_api_key(key.strip())


ApiKeyHashDep = Annotated[str, Depends(api_key_hash)]


def authenticate(*, session: Session, key_hash: str) -> Project:
    project = crud.project_for_key_hash(session=session, key_hash=key_hash)
    if project is None:
        raise APIError(401, "invalid_api_key", "unknown or revoked API key")
    return project


def get_project(session: SessionDep, key_hash: ApiKeyHashDep) -> Project:
    try:
        return authenticate(session=session, key_hash=key_hash)
    finally:
        # Hand the connection back to the pool now: a route that opens its own sessions must not hold two
        # connections at once, or many concurrent requests can exhaust the pool and wait on it.
        session.close()


ProjectDep = Annotated[Project, Depends(get_project)]
