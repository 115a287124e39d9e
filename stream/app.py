"""Wires the processor together: config -> models -> topics -> clients -> live path."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import anyio
import msgspec
from aiokafka import TopicPartition

from schemas.routing import RoutingPhase, RoutingStatus
from stream.config import Config
from stream.embedder import check_model_source
from stream.kafka.admin import Admin, TopicSpec, event_log_configs, output_configs
from stream.kafka.clients import kafka_errors, make_consumer, make_producer
from stream.live import LiveConsumer, LiveStats, StaticRouting, WindowProcessor
from stream.models import ModelPool
from stream.routing import stable_snapshot

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


async def prepare_topics(config: Config) -> None:
    """Create the owned topics that are missing, sized like `atoms` unless configured.

    This is the processor's first contact with Kafka: an unreachable broker surfaces here
    as one `BrokerUnavailable` line (aiokafka's own connection log is held back meanwhile).
    """
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        await _ensure_owned_topics(config)
    finally:
        client_log.setLevel(level)


async def _ensure_owned_topics(config: Config) -> None:
    async with Admin(config.kafka) as admin:
        atoms_partitions = await admin.partition_count(config.topics.atoms)
        if atoms_partitions is None:
            log.warning("input topic %s does not exist yet; waiting for it", config.topics.atoms)
        partitions = config.topics.partitions or atoms_partitions or 1
        await admin.ensure_topics(owned_topics(config, partitions))


async def run_processor(
    config: Config,
    *,
    stop: anyio.Event | None = None,
    on_assigned: Callable[[], None] | None = None,
    models: ModelPool | None = None,
) -> LiveStats:
    """Run the live path until `stop` is set (or SIGTERM/SIGINT when `stop` is None)."""
    stop = stop or anyio.Event()
    stats = LiveStats()
    routing = StaticRouting(stable_snapshot(config.routing.stable_model))
    for model in (await routing.current()).write_models:
        check_model_source(model, config.models[model])
    await prepare_topics(config)
    models = models or ModelPool(config)
    for model in (await routing.current()).write_models:
        await models.get(model)
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
        live = LiveConsumer(config, consumer, processor, routing)
        consumer.subscribe([config.topics.atoms], listener=live)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_stop_on_signals, stop)
            if on_assigned is not None:
                tasks.start_soon(_call_when_set, live.assigned, on_assigned)
            await live.run(stop)
            tasks.cancel_scope.cancel()
        log.info(
            "stopped: %d atoms in, outputs %s, dead letters %s",
            stats.atoms_in,
            dict(stats.outputs),
            dict(stats.dead_letters),
        )
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE_SECS):
            await consumer.stop()
            await producer.stop()
    return stats


async def _stop_on_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: draining the window in flight", signal.Signals(signum).name)
            stop.set()


async def _call_when_set(event: anyio.Event, callback: Callable[[], None]) -> None:
    await event.wait()
    callback()


async def read_status(config: Config) -> RoutingStatus:
    """The latest RoutingStatus on the routing topic, or the stable routing from config."""
    consumer = make_consumer(config.kafka, group_id=None, isolation_level="read_uncommitted")
    latest: RoutingStatus | None = None
    async with kafka_errors("status", config.kafka.bootstrap_servers):
        await consumer.start()
        try:
            tp = TopicPartition(config.topics.routing, 0)
            if config.topics.routing in await consumer.topics():
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                end = (await consumer.end_offsets([tp]))[tp]
                while await consumer.position(tp) < end:
                    for messages in (await consumer.getmany(tp, timeout_ms=1000)).values():
                        for message in messages:
                            if message.value is not None:
                                latest = msgspec.json.decode(message.value, type=RoutingStatus)
        finally:
            await consumer.stop()
    if latest is not None:
        return latest
    model = config.routing.stable_model
    return RoutingStatus(query_model=model, write_models=[model], phase=RoutingPhase.STABLE)
