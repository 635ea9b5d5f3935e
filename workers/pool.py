"""The worker's process pool: Celery's prefork pool, with no lock a SIGKILLed pool process can leave held.

With a broker that has no event loop (the embedded filesystem transport), Celery runs billiard's
blocking pool: one job pipe shared by every pool process, read under a process-shared semaphore. An
idle pool process waits for its next job *holding* that semaphore. SIGKILLed there (by an operator or
the OOM killer), it never releases it: its replacement blocks on the semaphore forever, the worker keeps
one message it can never run, and with prefetch 1 it takes no other. (With Redis, Celery's asynchronous
pool gives each process pipes of its own and no shared lock.)

Here the locks that pool processes take (the job pipe's read lock, the result pipe's write lock) are
POSIX record locks on an anonymous file, which the kernel releases when their holder dies.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading

from billiard.pool import Pool
from celery.concurrency.prefork import TaskPool as PreforkTaskPool


class KernelLock:
    """A lock between forked processes (and the threads of each) that dies with the process holding it.

    The file is opened once and inherited by `fork`; record locks belong to the process that takes them,
    so each process contends with the others and the kernel drops a dead holder's lock. Within a process
    a thread lock (made anew after a fork) keeps threads apart, as record locks do not.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the pool that owns the lock
        self._pid = os.getpid()
        self._threads = threading.Lock()

    def _thread_lock(self) -> threading.Lock:
        if self._pid != os.getpid():  # forked: the copied lock may be held by a thread that is not here
            self._pid, self._threads = os.getpid(), threading.Lock()
        return self._threads

    def acquire(self, block: bool = True) -> bool:
        threads = self._thread_lock()
        if not threads.acquire(block):
            return False
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            threads.release()
            return False
        except BaseException:
            threads.release()
            raise
        return True

    def release(self) -> None:
        fcntl.lockf(self._file, fcntl.LOCK_UN)
        self._thread_lock().release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


class KernelLockPool(Pool):
    """billiard's blocking pool whose pool-process-side pipe locks are `KernelLock`s."""

    def _setup_queues(self) -> None:
        super()._setup_queues()
        self._inqueue._rlock = KernelLock()  # held by an idle pool process while it waits for a job
        self._outqueue._wlock = KernelLock()  # held by a pool process while it writes a result


class TaskPool(PreforkTaskPool):
    """Celery's prefork pool (`worker_pool` of the worker app) with `KernelLockPool` as its blocking pool."""

    BlockingPool = KernelLockPool
