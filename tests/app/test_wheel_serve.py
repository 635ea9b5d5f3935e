"""`modelpress serve` from an installed wheel, started the way a user starts it: from any folder, with no
MODELPRESS_* environment. The API and its supervised workers must use one data dir (`./var` of that folder);
workers that resolved `var` in another working directory used another database, and jobs stayed queued.
The installed package must also migrate by itself: its migrations ship inside it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.cli import ROOT
from app.client.demo import wait_ready
from tests.helpers import files

pytestmark = pytest.mark.slow

PACKAGED = ("app", "workers", "compression", "pyproject.toml", "README.md")


def _run(command: list[str | Path], **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _build_wheel(base: Path) -> Path:
    """From a copy of the sources, so that the build's scratch folders stay out of the checkout."""
    source = base / "src"
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source])
    return next(dist.glob("modelpress-*.whl"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, not editable. Its dependencies come from this venv through a
    `.pth` path line (fast, offline); that folder's own `.pth` files, the editable install among them, are
    not processed, so `app` can only come from the wheel."""
    base = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(base)
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    purelib = _run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(purelib.stdout.strip()) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel])
    return venv


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready_or_show_log(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    try:
        wait_ready(url, server, timeout_s=90)
    except RuntimeError as error:
        pytest.fail(f"{error}\n--- serve log ---\n{log.read_text(errors='replace')[-4000:]}")


def _run_job(url: str, key: str, inputs: Path) -> dict:
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    with client:
        model = client.post("/v1/models", files={"file": files.tiny_onnx(inputs / "tiny.onnx").open("rb")})
        assert model.status_code == 201, model.text
        rng = np.random.default_rng(0)
        data = files.npz(inputs / "eval.npz", input=rng.standard_normal((32, 8)).astype(np.float32))
        dataset = client.post("/v1/datasets", files={"file": data.open("rb")}).json()
        body = {"model_id": model.json()["id"], "method": "quant_rtn", "config": {"bits": 8, "group_size": None}}
        job = client.post("/v1/jobs", json={**body, "evaluation_id": dataset["id"]}).json()
        deadline = time.monotonic() + 150
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        return job


def test_installed_wheel_runs_app_from_its_own_files(installed: Path, tmp_path: Path) -> None:
    code = "import app, workers; print(app.__file__, workers.__file__)"
    where = _run([installed / "bin" / "python", "-c", code], cwd=tmp_path)
    for module_file in where.stdout.split():
        assert Path(module_file).resolve().is_relative_to(installed.resolve()), where.stdout


def test_serve_from_any_folder_runs_a_job(installed: Path, tmp_path: Path) -> None:
    folder, inputs = tmp_path / "project", tmp_path / "inputs"
    folder.mkdir()
    inputs.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    modelpress = installed / "bin" / "modelpress"
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [modelpress, "serve", "--port", str(port)], cwd=folder, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            _wait_ready_or_show_log(f"http://127.0.0.1:{port}", server, log)
            key = _run([modelpress, "admin", "create-key", "--project", "wheel"], cwd=folder, env=env)
            job = _run_job(f"http://127.0.0.1:{port}", key.stdout.strip().splitlines()[-1], inputs)
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert job["status"] == "succeeded", f"{job}\n--- serve log ---\n{log.read_text(errors='replace')[-4000:]}"
    assert (folder / "var" / "modelpress.db").is_file()
    assert not list(installed.rglob("modelpress.db")), "a data dir was created inside the installed package"
    assert not list(installed.rglob("var")), "a data dir was created inside the installed package"
