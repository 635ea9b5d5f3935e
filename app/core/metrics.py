"""Prometheus metrics computed from the DB at scrape time, so every API replica reports the same truth."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

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
        finally:
            session.close()
        yield _jobs_by_status(counts)
        yield _duration_histogram(durations)
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


def safe_queue_depths() -> dict[str, int] | None:
    try:
        return queue_depths()
    except Exception:
        return None


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(JobCollector())  # type: ignore[arg-type]
