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


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_workers_stop_with_the_server(service_env, tmp_path: Path, stop: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    service_env()
    port = 18500 + os.getpid() % 400
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "1"],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            assert _wait_until(lambda: _ready(port), 60), (tmp_path / "serve.log").read_text()[-2000:]
            assert _wait_until(lambda: bool(_children(server.pid)), 30)
            workers = _children(server.pid)
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
