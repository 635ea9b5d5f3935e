"""`modelpress serve` owns its worker processes: they stop with it, however it stops.

A worker left behind keeps consuming from the broker; with a shared Redis it took the next server's
jobs and dropped them (their rows live in another database), so those jobs waited for the janitor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.cli import ROOT


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_until(condition, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)


@pytest.mark.parametrize("api_workers", [1, 2], ids=["one-api-process", "two-api-processes"])
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_workers_stop_with_the_server(service_env, tmp_path: Path, stop: signal.Signals, api_workers: int) -> None:  # type: ignore[no-untyped-def]
    """Every child (API processes of `--api-workers`, supervised workers) ends with `serve`; each runs on
    the data dir `serve` resolved, and none runs the janitor (`serve` runs the one janitor itself)."""
    service_env(MODELPRESS_JANITOR_ENABLED="true")
    port = 18500 + os.getpid() % 400
    children = 1 + (api_workers if api_workers > 1 else 0)
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--api-workers", str(api_workers)],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            assert _wait_until(lambda: _ready(port), 60), (tmp_path / "serve.log").read_text()[-2000:]
            assert _wait_until(lambda: len(_children(server.pid)) >= children, 30), _children(server.pid)
            workers = _children(server.pid)
            for pid in workers:
                env = _environ(pid)
                assert env["MODELPRESS_JANITOR_ENABLED"] == "false"
                assert env["MODELPRESS_DATA_DIR"] == os.environ["MODELPRESS_DATA_DIR"]
            server.send_signal(stop)
            server.wait(timeout=30)
            assert _wait_until(lambda: not any(_alive(pid) for pid in workers), 30), "worker outlived serve"
        finally:
            if server.poll() is None:
                server.kill()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
