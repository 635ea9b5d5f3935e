"""`/readyz` is ready only on a database migrated to the schema this code ships.

A reachable but unmigrated database answered `SELECT 1`, so `/readyz` said ready while every job query
failed with 'no such table'.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from fastapi.testclient import TestClient

from app.cli import migrate
from app.db.schema import alembic_config
from tests.conftest import clear_caches


@pytest.fixture
def unmigrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for key, value in {
        "MODELPRESS_DATA_DIR": str(tmp_path / "var"),
        "MODELPRESS_DATABASE_URL": "",
        "MODELPRESS_BROKER_URL": "",
        "MODELPRESS_JANITOR_ENABLED": "false",
    }.items():
        monkeypatch.setenv(key, value)
    clear_caches()
    from app.main import create_app

    with TestClient(create_app()) as client:
        yield client
    clear_caches()


def _database_check(client: TestClient) -> tuple[int, bool]:
    response = client.get("/readyz")
    return response.status_code, response.json()["checks"]["database"]


def test_readyz_waits_for_the_head_revision(unmigrated: TestClient, tmp_path: Path) -> None:
    assert _database_check(unmigrated) == (503, False)
    command.upgrade(alembic_config(f"sqlite:///{tmp_path / 'var' / 'modelpress.db'}"), "0001")
    assert _database_check(unmigrated) == (503, False), "a database behind the head is not ready"
    migrate()
    assert _database_check(unmigrated) == (200, True)
