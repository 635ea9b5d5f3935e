"""Peak memory per job stage: the report's `resources` section.

Linux keeps a resident-memory high-water mark per process (`VmHWM` in /proc/self/status); writing "5" to
/proc/self/clear_refs resets it to the current resident size. Each stage resets it when it starts and reads
it when it ends, so a stage's peak is exact (not sampled) and its own. Where the reset is refused, the mark
is the process's peak since it started, and `resources.basis` says so. On CUDA the allocator's peak
(`torch.cuda.max_memory_allocated`) is reset and read the same way.
"""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
EXACT = "VmHWM of the job's process, reset at each stage start (/proc/self/clear_refs)"
CUMULATIVE = "VmHWM of the job's process since it started (the per-stage reset is not permitted here)"


def status_bytes(field: str) -> int:
    """One `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where /proc is missing."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def trim_heap() -> None:
    """Give freed heap memory back to the system. glibc raises its mmap threshold after a large block is freed,
    so later weight-sized tensors (up to 32 MB) live on the heap, and freeing them leaves the pages resident
    (a freed model's weights stayed in RSS); malloc_trim(0) releases every free page. No-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


def reset_peak() -> bool:
    """Reset the process's resident high-water mark to its current resident size; False where refused."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class StageMemory:
    """Reset at a stage's start, read at its end: {stage: {peak_rss_bytes, end_rss_bytes[, cuda_peak_bytes]}}."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, int]] = {}
        self.exact = True

    def start(self) -> None:
        trim_heap()  # what the last stage freed leaves RSS before this stage's peak is measured from it
        self.exact = reset_peak() and self.exact
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def end(self, stage: str) -> None:
        rss = status_bytes("VmRSS")  # the kernel updates VmHWM lazily: it can trail the current size a little
        entry = {"peak_rss_bytes": max(status_bytes("VmHWM"), rss), "end_rss_bytes": rss}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            entry["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        self.stages[stage] = entry

    def section(self) -> dict[str, Any]:
        """The report's `resources`: per stage, the job's peak over stages and the stage it happened in."""
        peaks = {stage: entry["peak_rss_bytes"] for stage, entry in self.stages.items()}
        worst = max(peaks, key=peaks.get) if peaks else None
        return {
            "stages": self.stages,
            "peak_rss_bytes": peaks[worst] if worst else None,
            "peak_stage": worst,
            "pid": os.getpid(),
            "basis": EXACT if self.exact else CUMULATIVE,
        }


def release_weights(*modules: nn.Module) -> None:
    """Free the modules' parameters and buffers once nothing reads their values again: they move to the
    `meta` device, so shapes, dtypes and counts (the report's sizes) stay and the memory goes."""
    for module in modules:
        try:
            module.to("meta")
        except (RuntimeError, NotImplementedError, TypeError):  # a module that cannot move keeps its memory
            continue
    gc.collect()
    trim_heap()
