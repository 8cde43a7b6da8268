"""Prometheus metrics: HTTP traffic, uploads, and job counts by status read from the database at scrape time
(so they are right whichever process changed a job)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class JobsCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("sstmerge_jobs", "merge jobs by status", labels=["status"])
        try:
            counts = self.counts()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            counts = {}
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            family.add_metric([status], counts.get(status, 0))
        yield family


class Metrics:
    """The service's metrics, in their own registry (one per app instance)."""

    def __init__(self, job_counts: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sstmerge_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "sstmerge_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.uploads = Counter("sstmerge_uploads", "stored uploads", ["kind"], registry=self.registry)
        self.jobs_submitted = Counter("sstmerge_jobs_submitted", "jobs created", registry=self.registry)
        self.jobs = JobsCollector(job_counts)
        self.registry.register(self.jobs)

    def exposition(self) -> bytes:
        """The text exposition of every metric. When the API runs as several processes (`sstmerge serve
        --workers N` sets PROMETHEUS_MULTIPROC_DIR) the counters are the sums over all of them."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.jobs)
        return generate_latest(registry)


class MetricsMiddleware:
    """Counts requests by route template (not raw path, to keep label cardinality bounded)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
