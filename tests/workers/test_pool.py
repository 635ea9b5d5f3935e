"""KernelLock: the lock between pool processes that a SIGKILLed holder cannot leave held."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

from workers.pool import KernelLock, KernelLockPool


def _hold(lock: KernelLock, held: multiprocessing.synchronize.Event) -> None:
    lock.acquire()
    held.set()
    time.sleep(60)


def _acquire_within(lock: KernelLock, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lock.acquire(block=False):
            return True
        time.sleep(0.05)
    return False


def test_lock_of_a_sigkilled_holder_is_released() -> None:
    context = multiprocessing.get_context("fork")
    lock, held = KernelLock(), context.Event()
    holder = context.Process(target=_hold, args=(lock, held))
    holder.start()
    try:
        assert held.wait(10)
        assert not lock.acquire(block=False), "another process holds it"
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        assert _acquire_within(lock, 5), "the kernel released the dead holder's lock"
        lock.release()
    finally:
        if holder.is_alive():
            holder.kill()


def test_threads_of_one_process_exclude_each_other() -> None:
    lock, results = KernelLock(), []
    with lock:
        thread = threading.Thread(target=lambda: results.append(lock.acquire(block=False)))
        thread.start()
        thread.join()
    assert results == [False]
    assert lock.acquire(block=False)
    lock.release()


def test_pool_processes_take_kernel_locks_and_run_work() -> None:
    pool = KernelLockPool(processes=2, threads=True)
    try:
        assert isinstance(pool._inqueue._rlock, KernelLock) and isinstance(pool._outqueue._wlock, KernelLock)
        assert pool.map(abs, range(-20, 0)) == list(range(20, 0, -1))
    finally:
        pool.terminate()
        pool.join()
