"""The Celery worker application: the API's client config plus the registered tasks.

Each worker process also keeps a row in `workers` fresh (name, queues, device, current job) so the
dashboard can show heartbeat age and what every worker is doing.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutting_down

from app.core.queue import get_celery
from app.core.settings import get_settings
from app.db import crud
from app.db.session import get_engine, session_scope
from workers.device import max_tasks_per_child, probe_device
from workers.liveness import ConsumerHeartbeat
from workers.pipeline import sweep_orphaned_temp_dirs

celery_app = get_celery()
# the prefork pool with locks a SIGKILLed pool process cannot leave held (workers/pool.py); `--pool prefork`
# on the command line picks this configured pool too
celery_app.conf.update(include=["workers.tasks"], worker_pool="workers.pool:TaskPool")
celery_app.steps["consumer"].add(ConsumerHeartbeat)
app = celery_app
log = logging.getLogger(__name__)
_stop = threading.Event()
TEMP_SWEEP_INTERVAL_S = 60.0
_detected: dict[str, str] = {}


def _beat(name: str, queues: str) -> None:
    """The worker's heartbeat row; also sweeps job temp dirs left by killed runs, at start and then every
    TEMP_SWEEP_INTERVAL_S (a pool child SIGKILLed mid-job is replaced without the worker restarting)."""
    device = _detected.get("device", "cpu")
    last_sweep = -TEMP_SWEEP_INTERVAL_S
    while True:
        if time.monotonic() - last_sweep >= TEMP_SWEEP_INTERVAL_S:
            _sweep_temp_dirs()
            last_sweep = time.monotonic()
        try:
            with session_scope() as session:
                crud.touch_worker(
                    session=session,
                    name=name,
                    queues=queues,
                    device=device,
                )
        except Exception:
            log.exception("worker heartbeat failed")
        if _stop.wait(get_settings().heartbeat_interval_s):
            return


@worker_init.connect
def _export_node_name(sender: object = None, **_: object) -> None:
    """Pool children are forked after this: they inherit the node name to report their current job. The
    device is found here too, and with it how many jobs a pool process runs before it is replaced."""
    name = getattr(sender, "hostname", None)
    if name:
        os.environ["MODELPRESS_WORKER_NODE"] = name
    # Imports torch here, on the main thread before any fork. Importing it in the heartbeat thread raced
    # with billiard re-forking a SIGKILLed pool child: the child inherited torch's import lock held and
    # hung forever on its first `import compression.job`. Only the import: `torch.cuda` stays untouched in
    # this parent (workers/device.py), or no forked pool process could use CUDA.
    import torch  # noqa: F401

    device = _detected["device"] = probe_device()
    if getattr(sender, "max_tasks_per_child", None) is None and sender is not None:
        sender.max_tasks_per_child = max_tasks_per_child(device)  # type: ignore[attr-defined]
    _detected["jobs_per_process"] = str(getattr(sender, "max_tasks_per_child", None))


@worker_ready.connect
def _log_device(**_: object) -> None:
    """Logged once the worker's logging is set up (it is not yet at `worker_init`)."""
    log.info("worker device %s; jobs per pool process: %s", _detected.get("device"), _detected.get("jobs_per_process"))


@worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    """A pool child (also one re-forked after a kill) must not share the parent's pooled DB connections."""
    get_engine().dispose(close=False)


@worker_ready.connect
def _start_heartbeat(sender: object = None, **_: object) -> None:
    name = getattr(sender, "hostname", None) or "worker"
    queues = ",".join(sorted(q.name for q in celery_app.amqp.queues.consume_from.values())) or "gpu,cpu"
    threading.Thread(target=_beat, args=(name, queues), daemon=True, name="worker-heartbeat").start()


def _sweep_temp_dirs() -> None:
    try:
        removed = sweep_orphaned_temp_dirs()
    except Exception:
        log.exception("could not sweep orphaned job temp dirs")
        return
    if removed:
        log.info("removed %d job temp dir(s) left by killed workers: %s", len(removed), removed)


@worker_shutting_down.connect
def _stop_heartbeat(**_: object) -> None:
    _stop.set()
