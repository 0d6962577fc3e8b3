"""Prometheus metrics of the API (``GET /metrics``), with ``prometheus_client`` on a per-app registry.

HTTP: requests by endpoint (route template), method, slug and status code, and a latency
histogram per endpoint. Jobs: finished jobs by slug and status, failures by reason, queue and
inference time histograms, jobs running now; queue depth and jobs per status are read from the
job store at scrape time. Triton: restarts of a Triton server this process started and supervises
(``diffserve_triton_restarts_total``), read from its supervisor at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from diffserve.engine.catalog import CATALOG

__all__ = ["CONTENT_TYPE_LATEST", "ApiMetrics", "slug_label"]

# The *_created series double the output and no dashboard here reads them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


def slug_label(slug: str | None) -> str:
    """Catalog slugs as themselves; anything a client made up collapses to one label value."""
    if not slug:
        return ""
    return slug if slug in CATALOG else "unknown"


class _StoreCollector:
    def __init__(self, queue_depth: Callable[[], int], count_by_status: Callable[[], dict[str, int]]):
        self._queue_depth = queue_depth
        self._count_by_status = count_by_status

    def collect(self):
        depth = GaugeMetricFamily("diffserve_queue_depth", "Jobs waiting in the queue")
        depth.add_metric([], self._queue_depth())
        yield depth
        jobs = GaugeMetricFamily("diffserve_jobs", "Unexpired jobs in the store by status", labels=["status"])
        for status, count in self._count_by_status().items():
            jobs.add_metric([status], count)
        yield jobs


class _TritonRestartsCollector:
    def __init__(self, restarts: Callable[[], int]):
        self._restarts = restarts

    def collect(self):
        # CounterMetricFamily appends the _total suffix.
        family = CounterMetricFamily("diffserve_triton_restarts",
                                     "Restart attempts of the Triton server this process started")
        family.add_metric([], self._restarts())
        yield family


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "diffserve_http_requests", "HTTP requests answered", ["endpoint", "method", "slug", "code"], registry=r)
        self.http_latency = Histogram(
            "diffserve_http_request_duration_seconds", "HTTP request latency", ["endpoint", "method"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.jobs_finished = Counter(
            "diffserve_jobs_finished", "Jobs that reached a terminal state", ["slug", "status"], registry=r)
        self.job_failures = Counter(
            "diffserve_job_failures", "Failed jobs by reason", ["slug", "reason"], registry=r)
        self.job_queue_time = Histogram(
            "diffserve_job_queue_seconds", "Time from submission to start", ["slug"], buckets=_JOB_BUCKETS, registry=r)
        self.job_inference_time = Histogram(
            "diffserve_job_inference_seconds", "Backend compute time of completed jobs", ["slug"],
            buckets=_JOB_BUCKETS, registry=r)
        self.jobs_running = Gauge("diffserve_jobs_running", "Jobs running on the backend now", registry=r)
        self.webhook_attempts = Counter(
            "diffserve_webhook_attempts", "Webhook delivery attempts made by this process, by outcome: delivered, "
            "retry (failed, another follows), given_up (failed, the last), dropped (request expired or no secret)",
            ["outcome"], registry=r)

    def watch_store(self, queue_depth: Callable[[], int], count_by_status: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_StoreCollector(queue_depth, count_by_status))

    def watch_triton_restarts(self, restarts: Callable[[], int]) -> None:
        self.registry.register(_TritonRestartsCollector(restarts))

    def observe_http(self, endpoint: str, method: str, slug: str, code: int, seconds: float) -> None:
        self.http_requests.labels(endpoint, method, slug, str(code)).inc()
        self.http_latency.labels(endpoint, method).observe(seconds)

    def job_completed(self, slug: str, queue_s: float, inference_s: float) -> None:
        self.jobs_finished.labels(slug, "COMPLETED").inc()
        self.job_queue_time.labels(slug).observe(queue_s)
        self.job_inference_time.labels(slug).observe(inference_s)

    def job_failed(self, slug: str, reason: str) -> None:
        self.jobs_finished.labels(slug, "FAILED").inc()
        self.job_failures.labels(slug, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
