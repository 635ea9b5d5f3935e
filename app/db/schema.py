"""The database schema's version: the Alembic migrations shipped in the package, upgrade and check."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    """A config without an ini file: the installed package has none, and the script location is ours."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # the ini parser interpolates '%'
    return config


def upgrade_to_head(url: str) -> None:
    command.upgrade(alembic_config(url), "head")


@lru_cache
def head_revisions() -> frozenset[str]:
    return frozenset(ScriptDirectory(str(MIGRATIONS)).get_heads())


def schema_is_current(connection: Connection) -> bool:
    """True when the database's Alembic revision is the head this code ships (not missing, not behind)."""
    return frozenset(MigrationContext.configure(connection).get_current_heads()) == head_revisions()
