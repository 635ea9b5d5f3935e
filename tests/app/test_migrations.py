"""Alembic: upgrade -> downgrade -> upgrade on SQLite and PostgreSQL, and no drift from the models."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app.db.models import Base
from app.db.schema import alembic_config
from tests.conftest import create_postgres_database, drop_postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_without_drift(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "head")
    assert _tables(database_url) == set(Base.metadata.tables)
    command.downgrade(config, "base")
    assert _tables(database_url) == set()
    command.upgrade(config, "head")
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_developer_alembic_ini_points_at_the_packaged_migrations() -> None:
    """`alembic -c alembic.ini ...` in the checkout uses the same scripts the installed package ships."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from app.cli import ROOT
    from app.db.schema import MIGRATIONS

    script = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    assert Path(script.dir).resolve() == MIGRATIONS
    assert script.get_heads() == ScriptDirectory(str(MIGRATIONS)).get_heads()
