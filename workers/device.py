"""Which device a worker's jobs run on, decided without creating a CUDA context in the prefork parent.

CUDA cannot be used in a process forked from one that initialised it (the child fails with "Cannot
re-initialize CUDA in forked subprocess"), and even `torch.cuda.is_available()` initialises the driver.
So the Celery parent never calls into `torch.cuda`: it asks a short-lived interpreter how many GPUs it sees
(`probe_device`), and only pool processes, each running one job (`job_device`), touch CUDA. On a CUDA
worker a pool process is replaced after each job by default, so every job starts with a fresh CUDA context
and all of its GPU memory goes back to the driver.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)
PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
PROBE_TIMEOUT_S = 120


class DeviceUnavailable(Exception):
    """MODELPRESS_WORKER_DEVICE=cuda on a process that sees no GPU."""

    code = "device_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def probe_device(settings: Settings | None = None) -> str:
    """`cuda` or `cpu` for this worker, safe to call in the prefork parent: CUDA is asked in a subprocess."""
    import torch

    wanted = (settings or get_settings()).worker_device
    if wanted != "auto":
        return wanted
    if not torch.backends.cuda.is_built():  # a CPU build of torch: nothing to ask (reads a build flag only)
        return "cpu"
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=True
        )
        count = int(done.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as error:
        log.warning("could not probe for CUDA devices (%s); this worker runs jobs on the CPU", error)
        return "cpu"
    return "cuda" if count > 0 else "cpu"


def job_device(settings: Settings | None = None) -> str:
    """The device of the job about to run, in the pool process that runs it (CUDA may initialise here)."""
    import torch

    wanted = (settings or get_settings()).worker_device
    available = torch.cuda.is_available()
    if wanted == "cuda" and not available:
        raise DeviceUnavailable("MODELPRESS_WORKER_DEVICE=cuda but this worker process sees no CUDA device")
    if wanted == "cpu" or not available:
        return "cpu"
    return "cuda"


def max_tasks_per_child(device: str, settings: Settings | None = None) -> int | None:
    """Jobs per pool process (None: no limit): the setting when given, else 1 on CUDA and no limit on CPU."""
    configured = (settings or get_settings()).worker_max_tasks_per_child
    if configured is not None:
        return configured or None
    return 1 if device == "cuda" else None
