"""The janitor on both databases: reaping with timezone-safe datetimes, isolated steps whose failures are
counted and shown on /readyz and /metrics, cancellation of a job whose worker is gone, and the worker's
sweep of temp dirs left by a killed job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.core import janitor
from app.db import crud
from app.db.models import Job, Model, Webhook, WebhookDelivery, WorkerHeartbeat, utcnow
from app.db.session import session_scope

DATABASES = ["sqlite", "postgres"]


def make_job(**values: object) -> str:
    with session_scope() as session:
        project = crud.get_or_create_project(session=session, name="default")
        model = Model(project_id=project.id, filename="m.onnx", format="onnx", sha256="sha256:00", size_bytes=1)
        session.add(model)
        session.flush()
        job = Job(project_id=project.id, model_id=model.id, method="quant_rtn", **values)
        session.add(job)
        session.flush()
        return job.id


def stale_running(**values: object) -> str:
    old = utcnow() - timedelta(hours=1)
    fields = {"status": "running", "worker_host": "gone:1", "attempts": 1, "stage": "compress", "heartbeat_at": old}
    return make_job(**{**fields, **values})


def read_job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


@pytest.mark.parametrize("db", DATABASES)
def test_datetimes_read_back_timezone_aware_and_utc(service_env, db) -> None:  # type: ignore[no-untyped-def]
    service_env(db=db)
    east = datetime(2026, 1, 2, 12, 0, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    job_id = make_job(heartbeat_at=east)
    job = read_job(job_id)
    assert job.heartbeat_at == east and job.heartbeat_at.utcoffset() == timedelta(0)
    assert job.created_at.tzinfo is not None


@pytest.mark.parametrize("db", DATABASES)
def test_reap_requeues_fails_or_cancels_stale_jobs(service_env, db) -> None:  # type: ignore[no-untyped-def]
    service_env(db=db, MODELPRESS_MAX_ATTEMPTS="2")
    retry, give_up, cancel = (stale_running(), stale_running(attempts=2), stale_running(cancel_requested=True))
    fresh = stale_running(heartbeat_at=utcnow())
    result = janitor.reap_stale_jobs()
    assert result == {"requeued": 1, "failed": 1, "cancelled": 1}
    assert read_job(retry).status == "queued" and "stopped heartbeating" in read_job(retry).message
    failed = read_job(give_up)
    assert (failed.status, failed.error_code) == ("failed", "worker_lost")
    assert "stopped heartbeating during stage 'compress'" in failed.error_message
    assert (read_job(cancel).status, read_job(cancel).error_code) == ("cancelled", None)
    assert read_job(fresh).status == "running"


@pytest.mark.parametrize("db", DATABASES)
def test_a_failing_step_is_counted_and_shown_and_the_others_still_run(  # type: ignore[no-untyped-def]
    service_env, make_api, monkeypatch, caplog, db
) -> None:
    service_env(db=db, MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS="true")  # a refused local port: retry
    stale_id, queued_id = stale_running(), make_job(status="queued")
    delivery_id = pending_delivery(queued_id)
    with session_scope() as session:
        session.add(WorkerHeartbeat(name="gone@host", queues="gpu", last_seen_at=utcnow() - timedelta(hours=1)))
    failures_before = janitor.HEALTH["reap"].failures

    def broken(**_: object) -> None:
        raise RuntimeError("database hiccup")

    monkeypatch.setattr(crud, "stale_running_jobs", broken)
    result = janitor.run_janitor_once()
    assert result["reap_failed"] == 1 and result["resent"] == 1 and result["webhooks_retry"] == 1
    assert janitor.HEALTH["reap"].failures == failures_before + 1
    assert any(r.exc_info and "janitor step 'reap' failed" in r.getMessage() for r in caplog.records)
    assert read_job(queued_id).enqueued_at is not None
    with session_scope() as session:
        assert session.get(WebhookDelivery, delivery_id).attempts == 1  # type: ignore[union-attr]

    api = make_api()
    ready = api.client.get("/readyz").json()  # type: ignore[attr-defined]
    assert ready["janitor"]["reap"]["failing"] is True
    assert "RuntimeError: database hiccup" in ready["janitor"]["reap"]["last_error"]
    assert ready["heartbeats"] == {"stale_workers": 1, "stale_running_jobs": 1}
    metrics = api.client.get("/metrics").text  # type: ignore[attr-defined]
    assert f'modelpress_janitor_failures_total{{step="reap"}} {failures_before + 1}.0' in metrics
    assert 'modelpress_janitor_step_failing{step="reap"} 1.0' in metrics
    assert 'modelpress_janitor_step_failing{step="resend"} 0.0' in metrics
    assert "modelpress_jobs_heartbeat_stale 1.0" in metrics and "modelpress_workers_stale 1.0" in metrics

    monkeypatch.undo()
    janitor.run_janitor_once()
    assert read_job(stale_id).status == "queued"
    assert api.client.get("/readyz").json()["janitor"]["reap"]["failing"] is False  # type: ignore[attr-defined]


def pending_delivery(job_id: str) -> str:
    with session_scope() as session:
        project = crud.get_or_create_project(session=session, name="default")
        hook = Webhook(project_id=project.id, url="http://127.0.0.1:9/hook", secret="s", events=[])
        session.add(hook)
        session.flush()
        delivery = WebhookDelivery(webhook_id=hook.id, job_id=job_id, event="job.queued", payload={})
        session.add(delivery)
        session.flush()
        return delivery.id


@pytest.mark.parametrize("db", DATABASES)
def test_cancel_of_a_running_job_whose_worker_is_dead_ends_it_cancelled(service_env, make_api, db) -> None:  # type: ignore[no-untyped-def]
    service_env(db=db)
    api = make_api()
    dead, alive = stale_running(), stale_running(heartbeat_at=utcnow())
    job = api.post(f"/v1/jobs/{dead}/cancel").json()
    assert (job["status"], job["stage"], job["error"]) == ("cancelled", "cancelled", None)
    assert api.post(f"/v1/jobs/{alive}/cancel").json()["status"] == "running"  # its worker stops it
    assert read_job(alive).cancel_requested is True
