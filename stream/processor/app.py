"""Wires the processor together: config -> models -> topics -> clients -> live path."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from schemas.routing import RoutingStatus
from stream.config import Config
from stream.core.routing import RoutingState
from stream.embed.embedder import check_model_source
from stream.embed.pool import ModelPool
from stream.kafka.admin import Admin, TopicSpec, event_log_configs, output_configs
from stream.kafka.clients import kafka_errors, make_consumer, make_producer
from stream.processor.backfill import MigrationWorker
from stream.processor.control import ControlPlane
from stream.processor.live import CommitHook, LiveConsumer
from stream.processor.metrics import Health, Metrics, Sources
from stream.processor.window import LiveStats, WindowProcessor

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECS = 30


def owned_topics(config: Config, partitions: int) -> list[TopicSpec]:
    """Every topic the processor creates when missing: outputs, dead letters, control, routing."""
    topics = config.topics
    replicas = topics.replication_factor
    specs = [
        TopicSpec(topics.embeddings(name), partitions, replicas, output_configs())
        for name in sorted(config.models)
    ]
    specs.append(TopicSpec(topics.dlq, partitions, replicas, output_configs()))
    specs.append(TopicSpec(topics.control, 1, replicas, event_log_configs()))
    specs.append(TopicSpec(topics.routing, 1, replicas, {"cleanup.policy": "compact"}))
    return specs


async def prepare_topics(config: Config) -> int | None:
    """Create the owned topics that are missing, sized like `atoms` unless configured.

    Returns the partition count of `atoms` (None while it does not exist).

    This is the processor's first contact with Kafka: an unreachable broker surfaces here
    as one `BrokerUnavailable` line (aiokafka's own connection log is held back meanwhile).
    """
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        return await _ensure_owned_topics(config)
    finally:
        client_log.setLevel(level)


async def _ensure_owned_topics(config: Config) -> int | None:
    async with Admin(config.kafka) as admin:
        atoms_partitions = await admin.partition_count(config.topics.atoms)
        partitions = config.topics.partitions or atoms_partitions or 1
        await admin.ensure_topics(owned_topics(config, partitions))
    return atoms_partitions


async def run_processor(
    config: Config,
    *,
    role: str = "all",
    stop: anyio.Event | None = None,
    on_commit: CommitHook | None = None,
    on_assigned: Callable[[], None] | None = None,
    models: ModelPool | None = None,
    on_metrics: Callable[[int | None], None] | None = None,
) -> LiveStats:
    """Run the processor until `stop` is set (or SIGTERM/SIGINT when `stop` is None).

    Start-up order matters: topics, then the whole control log replayed, then the models
    the routing needs, and only then the first atom. `on_metrics` gets the metrics
    endpoint's bound port once it listens (None if it could not bind).
    """
    stop = stop or anyio.Event()
    stats = LiveStats()
    health = Health()
    sources = Sources(stats=stats, health=health)
    check_model_source(config.routing.stable_model, config.models[config.routing.stable_model])

    def assigned() -> None:
        health.assigned = True
        if on_assigned is not None:
            on_assigned()

    # First contact with Kafka before anything else starts: a bad broker address or bad
    # credentials end the start with one line.
    if await prepare_topics(config) is None:
        log.warning("input topic %s does not exist yet; waiting for it", config.topics.atoms)
    try:
        async with anyio.create_task_group() as server:
            if config.metrics.enabled:
                port = await server.start(_serve_metrics, Metrics(sources), config)
                if on_metrics is not None:
                    on_metrics(port)
            try:
                await _start_and_consume(
                    config, role, stop, models or ModelPool(config), sources, on_commit, assigned
                )
            finally:
                health.stopping = True
                server.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _sole_error(group) from None
    log.info(
        "stopped: atoms in %s, outputs %s, dead letters %s",
        dict(stats.atoms_in),
        {f"{model}/{path}": n for (model, path), n in stats.outputs.items()},
        dict(stats.dead_letters),
    )
    return stats


async def _start_and_consume(
    config: Config,
    role: str,
    stop: anyio.Event,
    models: ModelPool,
    sources: Sources,
    on_commit: CommitHook | None,
    on_assigned: Callable[[], None],
) -> None:
    """The whole control log, then the models the routing needs, then atoms."""
    async with ControlPlane(config, publish_status=True) as control:
        state = await control.replay()
        sources.routing = lambda: control.state
        sources.health.control_replayed = True
        log.info("control log replayed to offset %s: %s", state.control_offset, state.status())
        for model in _needed_models(state):
            await models.get(model)
        sources.health.models_loaded = True
        async with MigrationWorker(config, control, backfill=role != "live") as migration:
            sources.backfilled = lambda: migration.backfilled_events
            await _consume(
                config,
                control,
                migration,
                models,
                sources.stats,
                stop,
                on_commit,
                on_assigned,
                sources,
            )


async def _serve_metrics(
    metrics: Metrics, config: Config, *, task_status: TaskStatus[int | None] = TASK_STATUS_IGNORED
) -> None:
    """The metrics endpoint; a port that cannot be bound is logged, not fatal."""
    try:
        await metrics.serve(config.metrics.host, config.metrics.port, task_status=task_status)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d: %s", config.metrics.host, config.metrics.port, exc
        )
        task_status.started(None)


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A task group's one real failure, so callers see `BrokerUnavailable`, not a group."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    real = [e for e in leaves if not isinstance(e, anyio.get_cancelled_exc_class())]
    return real[0] if len(real) == 1 else group


def _needed_models(state: RoutingState) -> list[str]:
    models = list(state.routing_config().write_models)
    if state.active is not None and state.active.target not in models:
        models.append(state.active.target)
    return models


async def _consume(
    config: Config,
    control: ControlPlane,
    migration: MigrationWorker,
    models: ModelPool,
    stats: LiveStats,
    stop: anyio.Event,
    on_commit: CommitHook | None,
    on_assigned: Callable[[], None] | None,
    sources: Sources,
) -> None:
    producer = make_producer(config.kafka)
    consumer = make_consumer(config.kafka, group_id=config.kafka.group_id)
    try:
        async with kafka_errors("producer", config.kafka.bootstrap_servers):
            await producer.start()
        async with kafka_errors("consumer", config.kafka.bootstrap_servers):
            await consumer.start()

        async def send(topic, key, value, headers, timestamp_ms):  # type: ignore[no-untyped-def]
            return await producer.send(
                topic, value=value, key=key, headers=headers, timestamp_ms=timestamp_ms
            )

        processor = WindowProcessor(config, models, send, stats)
        live = LiveConsumer(
            config,
            consumer,
            processor,
            control,
            migration,
            on_commit=on_commit,
            on_assigned=on_assigned,
        )
        sources.lag = live.lag
        consumer.subscribe([config.topics.atoms], listener=live)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_stop_on_signals, stop)
            tasks.start_soon(control.tail)
            await live.run(stop)
            tasks.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE_SECS):
            await consumer.stop()
            await producer.stop()


async def _stop_on_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: draining the window in flight", signal.Signals(signum).name)
            stop.set()


async def read_status(config: Config) -> RoutingStatus:
    """The routing rebuilt from the whole control log (what every instance computes)."""
    await prepare_topics(config)
    async with ControlPlane(config) as control:
        return (await control.replay()).status()
