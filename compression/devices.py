"""GPU out-of-memory as a failure a person can act on: what was asked for, what the device had, what the job held."""

from __future__ import annotations

import re

import torch

GPU_OUT_OF_MEMORY = "gpu_out_of_memory"
_ASKED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_CAPACITY = re.compile(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free")


def gpu_oom_in(error: BaseException | None) -> torch.cuda.OutOfMemoryError | None:
    """The CUDA out-of-memory error behind `error` (itself or a cause it was raised from), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def _measured() -> list[str]:
    """What the device reports now and this process's peak, when CUDA was initialised here."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    free, total = torch.cuda.mem_get_info()
    return [
        f"device {torch.cuda.current_device()} ({torch.cuda.get_device_name()}): {_gib(total)} total, "
        f"{_gib(free)} free after the failure",
        f"peak allocated by this job {_gib(torch.cuda.max_memory_allocated())}",
        f"reserved {_gib(torch.cuda.memory_reserved())}",
    ]


def gpu_oom_message(error: torch.cuda.OutOfMemoryError, *, where: str) -> str:
    """One line with the numbers: the allocation that failed, the device's capacity and free memory (from
    PyTorch's message), and, measured now, the device state and this process's peak."""
    text = str(error)
    parts = []
    if asked := _ASKED.search(text):
        parts.append(f"tried to allocate {asked.group(1)}")
    if capacity := _CAPACITY.search(text):
        parts.append(f"GPU total capacity {capacity.group(1)}, {capacity.group(2)} free")
    parts += _measured()
    numbers = "; ".join(parts) or text.splitlines()[0][:300]
    return (
        f"GPU out of memory in {where}: {numbers}. Send the job to the cpu queue, or use fewer calibration "
        "samples or shorter sequences"
    )
