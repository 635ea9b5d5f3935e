"""Deep pre-flight for `POST /v1/jobs?dry_run=true`: load the model and data for real, in a subprocess.

Where torch is installed beside the API (the embedded default, all-in-one images) the dry run loads
the model with the worker's code and reports op support, skipped layers and estimates. The API image
without torch answers with the torch-free checks only and says so; the worker repeats the checks
before spending compute either way.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.core.errors import APIError
from app.core.limits import RESOURCE_LIMIT, gib
from app.core.redact import redact_value
from app.core.settings import get_settings
from app.db.models import Dataset, Model
from app.storage.store import Store

TIMEOUT_S = 120
RETRY_AFTER_S = 10
# what the subprocess prints when an allocation fails under its RLIMIT_DATA (Python, torch, C++)
_OUT_OF_MEMORY_MARKERS = ("MemoryError", "can't allocate memory", "std::bad_alloc", "Cannot allocate memory")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


@lru_cache
def _slots(size: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(size)


@contextmanager
def dry_run_slot() -> Iterator[None]:
    """One of `dry_run_max_concurrent` slots in this process, or 429 `too_many_dry_runs` with Retry-After."""
    size = get_settings().dry_run_max_concurrent
    slots = _slots(size)
    if not slots.acquire(blocking=False):
        raise APIError(
            429,
            "too_many_dry_runs",
            f"{size} dry run(s) already running on this API process; retry in {RETRY_AFTER_S}s",
            {"max_concurrent": size},
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        yield
    finally:
        slots.release()


def deep_preflight(
    *,
    store: Store,
    model: Model,
    method: str,
    config: dict[str, Any],
    calibration: Dataset | None,
    evaluation: Dataset | None,
) -> dict[str, Any] | None:
    """The worker-side pre-flight result, or None when this API process cannot run it."""
    if not torch_available():
        return None
    with dry_run_slot(), tempfile.TemporaryDirectory(prefix="modelpress-dryrun-") as tmp:
        request: dict[str, Any] = {
            "method": method,
            "config": config,
            "model_path": str(store.fetch(model.sha256, Path(tmp) / "model")),
        }
        for role, dataset in (("calibration_path", calibration), ("evaluation_path", evaluation)):
            if dataset is not None:
                suffix = Path(dataset.filename).suffix or ".bin"
                request[role] = str(store.fetch(dataset.sha256, Path(tmp) / f"{role}{suffix}"))
        return redact_value(_run_subprocess(request))


def _run_subprocess(request: dict[str, Any]) -> dict[str, Any]:
    """The child reads its request before touching the model, so its memory cap is in place by then."""
    limit = get_settings().resolved_dry_run_max_memory_bytes
    with subprocess.Popen(
        [sys.executable, "-m", "compression.preflight_cli"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        resource.prlimit(child.pid, resource.RLIMIT_DATA, (limit, limit))
        try:
            stdout, stderr = child.communicate(json.dumps(request), timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            return _failed(f"pre-flight did not finish in {TIMEOUT_S}s")
    if child.returncode == 0:
        return json.loads(stdout)
    if any(marker in stderr for marker in _OUT_OF_MEMORY_MARKERS):
        return _failed(
            f"{RESOURCE_LIMIT}: the dry run needed more than its memory limit of {gib(limit)} ({limit} bytes)"
        )
    tail = stderr.strip().splitlines()[-1:] or ["no output"]
    return _failed(tail[0][:500])


def _failed(message: str) -> dict[str, Any]:
    return {"ok": False, "checks": [{"name": "deep_preflight", "ok": False, "message": message}]}
