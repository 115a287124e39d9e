"""Prometheus metrics, /healthz and /readyz, served over HTTP (uvicorn) from the event loop.

Counters are read at scrape time from the processor's context: `ProcessorStats` and the
routing state (one source of truth, nothing counted twice). Histograms are observed as
batches and windows finish: `Metrics` is a `Sensor`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.routing import RoutingPhase
from stream.processor.context import ProcessorContext
from stream.processor.sensors import Sensor
from stream.serve.asgi import serve_asgi
from stream.serve.probes import probe_app

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ProcessorCollector(Collector):
    """Counters and gauges computed from the processor's state when Prometheus scrapes."""

    def __init__(
        self, context: ProcessorContext, now: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._context = context
        self._now = now

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family (prometheus_client calls this per scrape)."""
        stats = self._context.stats
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
        for_model = CounterMetricFamily(
            "lattice_model_dead_letters",
            "Dead letters for one write model (the others published the record)",
            labels=["model", "stage"],
        )
        for (model, stage), count in sorted(stats.model_dead_letters.items()):
            for_model.add_metric([model, stage], count)
        yield for_model
        yield CounterMetricFamily(
            "lattice_dead_letters_reduced",
            "Dead letters the broker refused, written again reduced (value cut, headers dropped)",
            value=stats.dead_letters_reduced,
        )
        yield CounterMetricFamily(
            "lattice_dead_letters_lost",
            "Dead letters refused even reduced: given up on so the partition moves on (logged)",
            value=stats.dead_letters_lost,
        )
        yield _by("lattice_truncated", "Texts cut to the model window", "model", stats.truncated)
        offsets = self._context.live.offsets if self._context.live is not None else None
        yield CounterMetricFamily(
            "lattice_stale_committed_reads",
            "Committed offsets read below this instance's own commits (read from its own)",
            value=offsets.stale_reads if offsets is not None else 0,
        )
        yield CounterMetricFamily(
            "lattice_records_below_commit",
            "Fetched records below this instance's own commits, dropped (processed already)",
            value=offsets.dropped_done if offsets is not None else 0,
        )
        yield CounterMetricFamily(
            "lattice_backfill_events", "Backfill events replayed", value=stats.backfilled_events
        )
        lag = GaugeMetricFamily(
            "lattice_consumer_lag", "Atoms not yet processed", labels=["topic", "partition"]
        )
        for (topic, partition), value in sorted(self._context.lag().items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield GaugeMetricFamily(
            "lattice_ready", "1 when ready", value=1.0 if self._context.health.ready else 0.0
        )
        yield from self._routing()

    def _routing(self) -> Iterator[Metric]:
        state = self._context.routing()
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
                remaining = max(0.0, (migration.window_ends_at - self._now()).total_seconds())
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


class Metrics(Sensor):
    """A registry for one processor, with its histograms and its HTTP endpoints."""

    def __init__(self, context: ProcessorContext) -> None:
        self._context = context
        self.registry = CollectorRegistry()
        self.registry.register(ProcessorCollector(context))
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
        self._backfill_step_seconds = Histogram(
            "lattice_backfill_step_seconds",
            "Seconds of one backfill or replay step (a live window waits at most one)",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )

    def on_batch(self, model: str, atoms: int, seconds: float) -> None:
        """Observe one model call."""
        self._batch_atoms.labels(model).observe(atoms)
        self._embed_seconds.labels(model).observe(seconds)

    def on_window(self, seconds: float) -> None:
        """Observe one live window."""
        self._window_seconds.observe(seconds)

    def on_backfill_step(self, seconds: float) -> None:
        """Observe one backfill step."""
        self._backfill_step_seconds.observe(seconds)

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
        """Whether the processor is ready, and why not."""
        health = self._context.health
        detail = (
            f"models_loaded={health.models_loaded} "
            f"control_replayed={health.control_replayed} assigned={health.assigned} "
            f"broker_reachable={health.broker_reachable}"
        )
        return health.ready, detail
