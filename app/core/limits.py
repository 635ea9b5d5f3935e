"""Memory and wall-time limits shared by the API (dry runs, job creation) and the workers (running jobs).

Torch-free: memory is read from /proc and sysconf, the machine's size from cgroups where one caps it.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.core.errors import APIError
from app.core.settings import get_settings

RESOURCE_LIMIT = "resource_limit"
_CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory_bytes() -> int:
    """Physical memory, or the container's cgroup memory limit when that is smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in _CGROUP_LIMIT_FILES:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of one process, from /proc/<pid>/statm (pages)."""
    resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def memory_exceeded_message(*, limit: int, peak: int, stage: str | None) -> str:
    return (
        f"job exceeded its memory limit of {gib(limit)} ({limit} bytes): "
        f"peak {gib(peak)} ({peak} bytes) during stage {stage!r}"
    )


def time_exceeded_message(*, limit_s: float, elapsed_s: float, stage: str | None) -> str:
    return f"job exceeded its wall-time limit of {limit_s:g}s: ran {elapsed_s:.1f}s, stopped during stage {stage!r}"


def estimate_too_large(*, estimate: int, limit: int) -> str:
    """The `exceeds_worker_memory` reason, worded the same at creation, in the dry run and in the worker."""
    return (
        f"exceeds_worker_memory: the pre-flight estimate of peak memory, {gib(estimate)} ({estimate} bytes), "
        f"exceeds the worker's per-job memory limit of {gib(limit)} ({limit} bytes)"
    )


def refuse_if_over_worker_memory(*, estimate: int) -> None:
    """422 `resource_limit` at job creation (and in a dry run) when the estimate cannot fit the workers' limit."""
    limit = get_settings().known_worker_memory_limit
    if limit is not None and estimate > limit:
        raise APIError(
            422,
            RESOURCE_LIMIT,
            estimate_too_large(estimate=estimate, limit=limit),
            {"reason": "exceeds_worker_memory", "estimated_peak_bytes": estimate, "limit_bytes": limit},
        )
