"""The Celery worker application: the API's client config plus the registered tasks.

Each worker process also keeps a row in `workers` fresh (name, queues, device, current job) so the
dashboard can show heartbeat age and what every worker is doing.
"""

from __future__ import annotations

import logging
import os
import threading

from celery.signals import worker_init, worker_ready, worker_shutting_down

from app.core.queue import get_celery
from app.core.settings import get_settings
from app.db import crud
from app.db.session import session_scope

celery_app = get_celery()
celery_app.conf.update(include=["workers.tasks"])
app = celery_app
log = logging.getLogger(__name__)
_stop = threading.Event()


def _device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _beat(name: str, queues: str) -> None:
    device = _device()
    while True:
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
    """Pool children are forked after this: they inherit the node name to report their current job."""
    name = getattr(sender, "hostname", None)
    if name:
        os.environ["MODELPRESS_WORKER_NODE"] = name


@worker_ready.connect
def _start_heartbeat(sender: object = None, **_: object) -> None:
    name = getattr(sender, "hostname", None) or "worker"
    queues = ",".join(sorted(q.name for q in celery_app.amqp.queues.consume_from.values())) or "gpu,cpu"
    threading.Thread(target=_beat, args=(name, queues), daemon=True, name="worker-heartbeat").start()


@worker_shutting_down.connect
def _stop_heartbeat(**_: object) -> None:
    _stop.set()
