"""Prometheus metrics of the embeddings API: requests, batches, queue depth, routing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from stream.serve.service import EmbeddingService

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _StateCollector(Collector):
    """Gauges read from the service when Prometheus scrapes."""

    def __init__(self, service: EmbeddingService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        """Readiness, the routing the service follows, and each model's queue."""
        service = self._service
        yield GaugeMetricFamily(
            "lattice_serve_ready", "1 when ready", value=1.0 if service.ready else 0.0
        )
        state = service.state
        yield GaugeMetricFamily(
            "lattice_serve_control_offset",
            "Offset of the last control record applied",
            value=-1 if state.control_offset is None else state.control_offset,
        )
        query = GaugeMetricFamily(
            "lattice_serve_query_model", "1 for the model answering queries", labels=["model"]
        )
        current = state.route_query()
        for name in sorted(service.config.models):
            query.add_metric([name], 1.0 if name == current else 0.0)
        yield query
        queued = GaugeMetricFamily(
            "lattice_serve_queued_inputs", "Texts waiting for the model", labels=["model"]
        )
        for name, batcher in sorted(service.batchers.items()):
            queued.add_metric([name], batcher.queued_inputs)
        yield queued


class ServeMetrics:
    """A registry for one API process."""

    def __init__(self, service: EmbeddingService) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(service))
        self.requests = Counter(
            "lattice_serve_requests",
            "HTTP requests answered",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.inputs = Counter(
            "lattice_serve_inputs",
            "Texts embedded",
            ["model", "input_type"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "lattice_serve_request_seconds",
            "Seconds per embeddings request",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._batch_inputs = Histogram(
            "lattice_serve_batch_inputs",
            "Texts per model call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._batch_requests = Histogram(
            "lattice_serve_batch_requests",
            "Requests per model call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._batch_seconds = Histogram(
            "lattice_serve_batch_seconds",
            "Seconds per model call",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )

    def observe_batch(self, model: str, requests: int, texts: int, seconds: float) -> None:
        """One model call finished."""
        self._batch_inputs.labels(model).observe(texts)
        self._batch_requests.labels(model).observe(requests)
        self._batch_seconds.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
