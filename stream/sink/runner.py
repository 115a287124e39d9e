"""The sink loop: consume `embeddings.<model>`, apply to the store, then commit offsets.

Steps per batch: fetch, apply every change in one database transaction, wait for its
commit, and only then commit the Kafka offsets (`offset + 1`). A crash between the two
redelivers the batch; applying it again changes nothing (last writer wins by source offset,
equal offsets rewrite the same row), so the store converges on the last record per key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from stream.config import Config
from stream.errors import ConfigError
from stream.kafka.clients import kafka_errors, make_consumer
from stream.sink.rows import BadRecord, Change, Delete, to_change
from stream.sink.store import open_store

log = logging.getLogger(__name__)

SinkCommitHook = Callable[[Mapping[tuple[str, int], int]], None]
"""Called with {(topic, partition): committed offset} after each commit (tests, metrics)."""


@dataclass
class SinkStats:
    """What the sink applied so far."""

    upserts: int = 0
    deletes: int = 0
    skipped: int = 0
    batches: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)


async def run_sink(
    config: Config,
    *,
    stop: anyio.Event | None = None,
    on_commit: SinkCommitHook | None = None,
    task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
) -> SinkStats:
    """Keep one table per model current until `stop` is set (or cancelled)."""
    stop = stop or anyio.Event()
    settings = config.sink
    models = settings.models if settings.models is not None else sorted(config.models)
    unknown = set(models) - set(config.models)
    if unknown:
        raise ConfigError(f"config: sink.models: unknown model(s) {sorted(unknown)}")
    topic_model = {config.topics.embeddings(model): model for model in models}
    stats = SinkStats()
    async with open_store(config) as store:
        await store.ensure_tables(models)
        # A pattern picks up output topics the processor creates later.
        consumer = make_consumer(config.kafka, group_id=settings.group_id, metadata_max_age_ms=5000)
        async with kafka_errors("sink consumer", config.kafka.bootstrap_servers):
            await consumer.start()
        try:
            pattern = "^(" + "|".join(re.escape(topic) for topic in topic_model) + ")$"
            consumer.subscribe(pattern=pattern)
            log.info("sink: %s -> tables %s*", ", ".join(topic_model), settings.table_prefix)
            task_status.started()
            while not stop.is_set():
                fetched = await consumer.getmany(
                    timeout_ms=500, max_records=settings.max_batch_records
                )
                if not fetched:
                    continue
                changes: list[tuple[str, Change]] = []
                offsets: dict[TopicPartition, int] = {}
                for tp, messages in fetched.items():
                    model = topic_model[tp.topic]
                    for message in messages:
                        try:
                            change = to_change(message.key, message.value, message.headers)
                        except BadRecord as exc:
                            stats.skipped += 1
                            log.warning(
                                "sink: skipped %s/%d/%d: %s",
                                tp.topic,
                                tp.partition,
                                message.offset,
                                exc,
                            )
                            continue
                        changes.append((model, change))
                    offsets[tp] = messages[-1].offset + 1
                await store.apply(changes)  # 1. the store has committed the batch
                await _commit(consumer, offsets, stats)  # 2. only then the offsets
                stats.batches += 1
                stats.deletes += sum(isinstance(change, Delete) for _, change in changes)
                stats.upserts += sum(not isinstance(change, Delete) for _, change in changes)
                if on_commit is not None:
                    on_commit({(tp.topic, tp.partition): offset for tp, offset in offsets.items()})
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await consumer.stop()
    return stats


async def _commit(consumer: object, offsets: dict[TopicPartition, int], stats: SinkStats) -> None:
    try:
        await consumer.commit(offsets)  # type: ignore[attr-defined]
    except (CommitFailedError, IllegalStateError) as exc:
        # A rebalance took the partitions; their new owner applies the batch again.
        log.warning("sink: commit after a rebalance failed (the new owner redoes it): %r", exc)
        return
    stats.committed.update({(tp.topic, tp.partition): offset for tp, offset in offsets.items()})
