"""Prometheus metrics, /healthz and /readyz, served over HTTP (uvicorn) from the event loop.

Counters are read at scrape time from `LiveStats` and the routing state (one source of
truth, nothing counted twice); histograms are observed as batches and windows finish.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.routing import RoutingPhase
from stream.pipeline import LiveStats
from stream.routing import RoutingState
from stream.serve.asgi import serve_asgi
from stream.serve.probes import probe_app

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class Health:
    """What readiness means: models loaded, control log replayed, partitions assigned."""

    models_loaded: bool = False
    control_replayed: bool = False
    assigned: bool = False
    stopping: bool = False

    @property
    def ready(self) -> bool:
        """Ready to take traffic (and to count in a rollout)."""
        return self.models_loaded and self.control_replayed and self.assigned and not self.stopping


@dataclass
class Sources:
    """Where the collector reads from at scrape time."""

    stats: LiveStats
    health: Health
    routing: Callable[[], RoutingState | None] = lambda: None
    lag: Callable[[], Mapping[tuple[str, int], int]] = dict
    backfilled: Callable[[], int] = lambda: 0
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


class ProcessorCollector(Collector):
    """Counters and gauges computed from the processor's state when Prometheus scrapes."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (prometheus_client calls this per scrape)."""
        stats = self._sources.stats
        atoms = CounterMetricFamily("lattice_atoms_in", "Atom events read", labels=["path"])
        for path in ("live", "backfill"):
            atoms.add_metric([path], stats.atoms_in[path])
        yield atoms
        outputs = CounterMetricFamily(
            "lattice_embeddings_out", "Embeddings produced", labels=["model", "path"]
        )
        for (model, path), count in sorted(stats.outputs.items()):
            outputs.add_metric([model, path], count)
        yield outputs
        yield _by("lattice_tombstones_out", "Tombstones produced", "model", stats.tombstones)
        dead = CounterMetricFamily("lattice_dead_letters", "Dead letters", labels=["stage"])
        for stage in ("decode", "validate", "embed", "produce"):
            dead.add_metric([stage], stats.dead_letters[stage])
        yield dead
        yield _by("lattice_truncated", "Texts cut to the model window", "model", stats.truncated)
        yield CounterMetricFamily(
            "lattice_backfill_events", "Backfill events replayed", value=self._sources.backfilled()
        )
        lag = GaugeMetricFamily(
            "lattice_consumer_lag", "Atoms not yet processed", labels=["topic", "partition"]
        )
        for (topic, partition), value in sorted(self._sources.lag().items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield GaugeMetricFamily(
            "lattice_ready", "1 when ready", value=1.0 if self._sources.health.ready else 0.0
        )
        yield from self._routing()

    def _routing(self) -> Iterator[Metric]:
        state = self._sources.routing()
        if state is None:
            return
        config = state.routing_config()
        phase = GaugeMetricFamily("lattice_routing_phase", "Current phase", labels=["phase"])
        for value in RoutingPhase:
            phase.add_metric([value.value], 1.0 if config.phase is value else 0.0)
        yield phase
        yield GaugeMetricFamily(
            "lattice_control_offset",
            "Offset of the last control record applied",
            value=-1 if state.control_offset is None else state.control_offset,
        )
        migration = state.active
        ratio = math.nan
        remaining = 0.0
        if migration is not None:
            progress = migration.progress
            if progress.total is not None:
                ratio = 1.0 if progress.total == 0 else progress.processed / progress.total
            if migration.window_ends_at is not None and not migration.window_closed:
                remaining = max(
                    0.0, (migration.window_ends_at - self._sources.now()).total_seconds()
                )
        yield GaugeMetricFamily(
            "lattice_migration_progress_ratio", "Backfill progress (NaN: unknown)", value=ratio
        )
        yield GaugeMetricFamily(
            "lattice_rollback_window_remaining_seconds",
            "Seconds until the rollback window closes (0: none open)",
            value=remaining,
        )


def _by(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([key], count)
    return family


class Metrics:
    """A registry for one processor, with its histograms and its HTTP endpoints."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry()
        self.registry.register(ProcessorCollector(sources))
        self._batch_atoms = Histogram(
            "lattice_batch_atoms",
            "Atoms per model call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._embed_seconds = Histogram(
            "lattice_embed_seconds",
            "Seconds per model call",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._window_seconds = Histogram(
            "lattice_window_seconds",
            "Seconds to process one live window",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        sources.stats.on_batch = self._observe_batch
        sources.stats.on_window = self._window_seconds.observe

    def _observe_batch(self, model: str, atoms: int, seconds: float) -> None:
        self._batch_atoms.labels(model).observe(atoms)
        self._embed_seconds.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    async def serve(
        self, host: str, port: int, *, task_status: TaskStatus[int | None] = TASK_STATUS_IGNORED
    ) -> None:
        """Serve /metrics, /healthz and /readyz until cancelled (uvicorn, on this loop)."""
        await serve_asgi(
            probe_app(self.exposition, self._readiness),
            host,
            port,
            name="metrics",
            task_status=task_status,
        )

    def _readiness(self) -> tuple[bool, str]:
        health = self.sources.health
        detail = (
            f"models_loaded={health.models_loaded} "
            f"control_replayed={health.control_replayed} assigned={health.assigned}"
        )
        return health.ready, detail
