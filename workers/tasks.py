"""Celery tasks: thin glue. The DB row, not the task result, is the truth."""

from __future__ import annotations

import os

from celery import Task

from app.core.queue import RUN_JOB_TASK
from workers.celery_app import celery_app
from workers.pipeline import execute_job


@celery_app.task(name=RUN_JOB_TASK, acks_late=True, ignore_result=True, bind=True)
def run_job(self: Task, job_id: str) -> None:
    execute_job(job_id, worker_name=os.environ.get("MODELPRESS_WORKER_NODE") or self.request.hostname)
