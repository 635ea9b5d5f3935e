"""Shared fixtures: a fresh environment per test (data dir, database, broker), real services where used.

`service_env(db=..., broker=...)` points every cached factory (settings, engine, store, Celery) at a
new place and migrates the database with Alembic, the same code path production uses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

POSTGRES_ADMIN_URL = os.environ.get("MODELPRESS_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is visible; elsewhere they are skipped, saying why."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    reason = f"needs a CUDA device; none is visible (torch {torch.__version__}, {build})"
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


def clear_caches() -> None:
    from app.core.queue import get_celery
    from app.core.settings import get_settings
    from app.db.session import get_engine, get_sessionmaker
    from app.storage.store import get_store

    for factory in (get_settings, get_sessionmaker, get_store, get_celery):
        factory.cache_clear()
    with contextlib.suppress(Exception):
        get_engine().dispose()
    get_engine.cache_clear()


def create_postgres_database() -> str:
    import sqlalchemy as sa

    name = f"mp_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres_database(url: str) -> None:
    import sqlalchemy as sa

    name = url.rsplit("/", 1)[1]
    engine = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def service_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., dict[str, str]]]:
    """Call with db='sqlite'|'postgres', broker='embedded'|<redis url>; returns the env it set."""
    created: list[str] = []

    def configure(db: str = "sqlite", broker: str = "embedded", **extra: str) -> dict[str, str]:
        env = {
            "MODELPRESS_DATA_DIR": str(tmp_path / "var"),
            "MODELPRESS_JANITOR_ENABLED": "false",
            "MODELPRESS_DATABASE_URL": "",
            "MODELPRESS_BROKER_URL": "" if broker == "embedded" else broker,
            **extra,
        }
        if db == "postgres":
            env["MODELPRESS_DATABASE_URL"] = create_postgres_database()
            created.append(env["MODELPRESS_DATABASE_URL"])
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        clear_caches()
        from app.cli import migrate

        migrate()
        return env

    yield configure
    clear_caches()
    for url in created:
        drop_postgres_database(url)


@pytest.fixture
def redis_db() -> Iterator[str]:
    import redis

    url = REDIS_URL if REDIS_URL.rstrip("/").rsplit("/", 1)[-1].isdigit() else f"{REDIS_URL}/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def make_api() -> Iterator[Callable[[], ApiClient]]:
    """Opens API clients (lifespan and janitor included) on the current env; closes them all after."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    clients: list[TestClient] = []

    def open_client() -> ApiClient:
        client = TestClient(create_app())
        client.__enter__()
        clients.append(client)
        return ApiClient(client)

    yield open_client
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(service_env: Callable[..., dict[str, str]], make_api: Callable[[], ApiClient]) -> ApiClient:
    service_env()
    return make_api()


class ApiClient:
    """A TestClient plus helpers to make projects and keys through the same crud code the CLI uses."""

    def __init__(self, client: object) -> None:
        self.client = client
        self.key = self.new_key("default")

    @staticmethod
    def new_key(project: str) -> str:
        from app.db import crud
        from app.db.session import session_scope

        with session_scope() as session:
            return crud.create_api_key(
                session=session, project=crud.get_or_create_project(session=session, name=project)
            )

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def get(self, url: str, key: str | None = None, **kw: object):  # type: ignore[no-untyped-def]
        return self.client.get(url, headers={**self.headers(key), **kw.pop("headers", {})}, **kw)  # type: ignore[attr-defined]

    def post(self, url: str, key: str | None = None, **kw: object):  # type: ignore[no-untyped-def]
        return self.client.post(url, headers={**self.headers(key), **kw.pop("headers", {})}, **kw)  # type: ignore[attr-defined]

    def upload(self, url: str, path: Path, key: str | None = None, **fields: str):  # type: ignore[no-untyped-def]
        with open(path, "rb") as fh:
            return self.post(url, key, files={"file": (path.name, fh)}, data=fields)


@pytest.fixture
def live_server(service_env, make_api, tmp_path):  # type: ignore[no-untyped-def]
    """A real `modelpress serve` process on the test's environment; returns (url, ApiClient)."""
    import subprocess
    import sys
    import time

    import httpx

    from app.cli import ROOT

    servers: list[tuple[subprocess.Popen[bytes], object]] = []

    def start(workers: int = 1, **env: str) -> tuple[str, ApiClient]:
        service_env(**{"MODELPRESS_FAULT_STAGE_DELAY_S": "0.5", **env})
        port = 18000 + (os.getpid() + len(servers)) % 1000
        log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers)],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        servers.append((server, log))
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        return url, make_api()

    yield start
    for server, log in servers:
        server.terminate()
        server.wait(timeout=30)
        log.close()  # type: ignore[attr-defined]


class Workers:
    """Real `celery worker` processes in their own process groups, logs kept for failures."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.procs = log_dir, []  # type: ignore[var-annotated]

    def start(self, name: str, queues: str = "gpu,cpu", **env: str) -> subprocess.Popen[bytes]:
        """One worker consuming `queues`, with `env` added to this test's environment."""
        from app.cli import ROOT, worker_command

        log = open(self.log_dir / f"worker-{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            worker_command(queues, 1, f"{name}@%h"),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.log_dir.glob("worker-*.log"))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.stop_all()
