"""Deep pre-flight for `POST /v1/jobs?dry_run=true`: load the model and data for real, in a subprocess.

Where torch is installed beside the API (the embedded default, all-in-one images) the dry run loads
the model with the worker's code and reports op support, skipped layers and estimates. The API image
without torch answers with the torch-free checks only and says so; the worker repeats the checks
before spending compute either way.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.db.models import Dataset, Model
from app.storage.store import Store

TIMEOUT_S = 120


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


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
    with tempfile.TemporaryDirectory(prefix="modelpress-dryrun-") as tmp:
        request: dict[str, Any] = {
            "method": method,
            "config": config,
            "model_path": str(store.fetch(model.sha256, Path(tmp) / "model")),
        }
        for role, dataset in (("calibration_path", calibration), ("evaluation_path", evaluation)):
            if dataset is not None:
                suffix = Path(dataset.filename).suffix or ".bin"
                request[role] = str(store.fetch(dataset.sha256, Path(tmp) / f"{role}{suffix}"))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "compression.preflight_cli"],
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return {
                "ok": False,
                "checks": [
                    {"name": "deep_preflight", "ok": False, "message": f"pre-flight did not finish in {TIMEOUT_S}s"}
                ],
            }
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "checks": [{"name": "deep_preflight", "ok": False, "message": tail[0][:500]}]}
    return json.loads(done.stdout)
