"""The Celery client the API and janitor send with. Tasks are sent by name: `app` never imports `workers`."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange, Queue

from app.core.settings import Settings, get_settings

if TYPE_CHECKING:
    from compression.configs import MethodConfigBase

RUN_JOB_TASK = "modelpress.run_job"
QUEUES = ("gpu", "cpu")
# `modelpress serve` names a file per supervised worker here; the worker's consumer loop touches it while it
# makes progress (workers/liveness.py), and `serve` restarts a worker whose file went stale
WORKER_ALIVE_FILE_ENV = "MODELPRESS_WORKER_ALIVE_FILE"


def parse_queues(text: str) -> list[str]:
    """`gpu,cpu` -> ["gpu", "cpu"]; ValueError naming the valid queues for anything else."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUEUES]
    if unknown or not names:
        raise ValueError(f"unknown queue(s) {unknown or [text]}; valid: {', '.join(QUEUES)}")
    return list(dict.fromkeys(names))


def route_job(*, requested: str | None, config: MethodConfigBase, params: int | None) -> tuple[str, str]:
    """(queue, why) for a new job: the request's queue, else MODELPRESS_DEFAULT_QUEUE, which `auto` resolves
    by the job's device need: a method that gains from a GPU on a model big enough for it goes to `gpu`."""
    if requested:
        return requested, "named in the request"
    settings = get_settings()
    if settings.default_queue != "auto":
        return settings.default_queue, "MODELPRESS_DEFAULT_QUEUE"
    if not config.prefers_gpu:
        return "cpu", f"{config.method} gains little from a GPU"
    if params is not None and params < settings.gpu_min_params:
        return "cpu", f"{params:,} parameters, under MODELPRESS_GPU_MIN_PARAMS ({settings.gpu_min_params:,})"
    return "gpu", f"{config.method} runs faster on a GPU"


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # every send names its queue (route_job); these only name where an unrouted message would go
        "task_default_queue": QUEUES[0],
        "task_default_exchange": QUEUES[0],
        "task_default_routing_key": QUEUES[0],
        # one direct exchange per queue: with a shared default exchange a message routed to `gpu` was also
        # bound to `cpu`, so every job was delivered twice and the duplicate stalled a prefetch-1 worker
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": 3,
        "worker_hijack_root_logger": False,
        "broker_transport_options": {"visibility_timeout": 6 * 3600},
    }
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    return config


@lru_cache
def get_celery() -> Celery:
    celery = Celery("modelpress")
    celery.conf.update(celery_config(get_settings()))
    return celery


def send_job(job_id: str, *, queue: str, dispatch: int) -> None:
    """Publish one run of a job. The task id names the dispatch so duplicates are traceable."""
    get_celery().send_task(RUN_JOB_TASK, args=[job_id], queue=queue, task_id=f"{job_id}-{dispatch}")


def queue_depths() -> dict[str, int] | None:
    """Messages waiting per queue when the broker can tell (Redis, filesystem); None otherwise."""
    settings = get_settings()
    url = settings.resolved_broker_url
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            return {name: int(client.llen(name)) for name in QUEUES}
        finally:
            client.close()
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        return {name: sum(1 for p in folder.glob(f"*.{name}.msg")) for name in QUEUES}
    return None


def broker_reachable() -> bool:
    try:
        with get_celery().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
    except Exception:
        return False
    return True
