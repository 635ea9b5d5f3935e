"""A supervised worker's sign of progress: its consumer loop touches a file `modelpress serve` watches.

The beat runs on the consumer's own loop (a timer asks the loop to run it) and only while every message
the worker took is in a pool process's hands. A worker whose loop hangs, or whose pool cannot take the
message it holds (so, with prefetch 1, it takes no other), goes silent; `serve` then restarts it, and
the message is restored on the way down or re-sent by the janitor. The per-job heartbeat in the database
cannot see this: no job runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.worker import state

from app.core.queue import WORKER_ALIVE_FILE_ENV
from app.core.settings import get_settings


def pool_has_every_message() -> bool:
    """True unless a message this worker took is still waiting for a pool process to accept it."""
    return len(state.reserved_requests) <= len(state.active_requests)


def beat(path: Path) -> None:
    if pool_has_every_message():
        path.touch()


class ConsumerHeartbeat(bootsteps.StartStopStep):
    """Consumer step: every heartbeat interval the consumer's loop calls `beat` (when `serve` asked for it)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        alive_file = os.environ.get(WORKER_ALIVE_FILE_ENV)
        self.path = Path(alive_file) if alive_file else None
        self.enabled = self.path is not None
        self.entry: Any = None

    def start(self, parent: Any) -> None:
        assert self.path is not None
        beat(self.path)
        interval = get_settings().heartbeat_interval_s
        self.entry = parent.timer.call_repeatedly(interval, parent.call_soon, (beat, self.path))

    def stop(self, parent: Any) -> None:
        if self.entry is not None:
            self.entry.cancel()
            self.entry = None

    shutdown = stop
