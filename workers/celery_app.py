"""The Celery worker application: the API's client config plus the registered tasks."""

from __future__ import annotations

from app.core.queue import get_celery

celery_app = get_celery()
celery_app.conf.update(include=["workers.tasks"])
app = celery_app
