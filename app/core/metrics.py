"""Prometheus metrics computed from the DB at scrape time, so every API replica reports the same truth."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from app.core.janitor import HEALTH, stale_before
from app.core.queue import queue_depths
from app.db import crud
from app.db.models import JOB_STATUSES
from app.db.session import get_sessionmaker

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


class JobCollector:
    def collect(self) -> Iterator[Metric]:
        session = get_sessionmaker()()
        try:
            counts = crud.count_jobs_by_status(session=session)
            durations = crud.finished_job_durations(session=session)
            stale = crud.count_stale(session=session, before=stale_before())
        finally:
            session.close()
        yield _jobs_by_status(counts)
        yield _duration_histogram(durations)
        yield from _staleness(stale)
        yield from _janitor_steps()
        depths = safe_queue_depths()
        if depths is not None:
            gauge = GaugeMetricFamily("modelpress_queue_depth", "Messages waiting in the broker", labels=["queue"])
            for queue, depth in depths.items():
                gauge.add_metric([queue], depth)
            yield gauge


def _jobs_by_status(counts: dict[str, int]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily("modelpress_jobs", "Jobs by status", labels=["status"])
    for status in JOB_STATUSES:
        gauge.add_metric([status], counts.get(status, 0))
    return gauge


def _duration_histogram(durations: list[float]) -> HistogramMetricFamily:
    buckets = [(str(edge), sum(1 for d in durations if d <= edge)) for edge in DURATION_BUCKETS]
    buckets.append(("+Inf", len(durations)))
    histogram = HistogramMetricFamily("modelpress_job_duration_seconds", "Run time of finished jobs")
    histogram.add_metric([], buckets, sum_value=sum(durations))
    return histogram


def _staleness(stale: dict[str, int]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "modelpress_workers_stale", "Workers whose heartbeat is older than stale_after_s", value=stale["stale_workers"]
    )
    yield GaugeMetricFamily(
        "modelpress_jobs_heartbeat_stale",
        "Running jobs whose heartbeat is older than stale_after_s (the janitor should reap them)",
        value=stale["stale_running_jobs"],
    )


def _janitor_steps() -> Iterator[Metric]:
    """This process's janitor: failures per step, and whether the last run of each step failed."""
    failures = CounterMetricFamily("modelpress_janitor_failures", "Janitor step runs that raised", labels=["step"])
    failing = GaugeMetricFamily("modelpress_janitor_step_failing", "1 when the step's last run raised", labels=["step"])
    for step, health in HEALTH.items():
        failures.add_metric([step], health.failures)
        failing.add_metric([step], 1 if health.consecutive_failures else 0)
    yield failures
    yield failing


def safe_queue_depths() -> dict[str, int] | None:
    try:
        return queue_depths()
    except Exception:
        return None


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(JobCollector())  # type: ignore[arg-type]
