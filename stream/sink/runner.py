"""The sink loop: consume `embeddings.<model>`, apply to the store, then commit offsets.

Steps per batch: fetch, apply every change in one database transaction, wait for its
commit, and only then commit the Kafka offsets (`offset + 1`). A crash between the two
redelivers the batch; applying it again changes nothing (last writer wins by source offset,
equal offsets rewrite the same row), so the store converges on the last record per key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from stream.config import Config
from stream.errors import CommitFailed, ConfigError
from stream.kafka.consumer import MultiTopicConsumer
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
        async with MultiTopicConsumer(
            config.kafka, list(topic_model), group_id=settings.group_id
        ) as consumer:
            log.info("sink: %s -> tables %s*", ", ".join(topic_model), settings.table_prefix)
            task_status.started()
            while not stop.is_set():
                records = await consumer.fetch(
                    timeout_ms=500, max_records=settings.max_batch_records
                )
                if not records:
                    continue
                changes: list[tuple[str, Change]] = []
                offsets: dict[tuple[str, int], int] = {}
                for record in records:
                    offsets[record.topic, record.partition] = record.offset + 1
                    try:
                        change = to_change(record.key, record.value, record.headers)
                    except BadRecord as exc:
                        stats.skipped += 1
                        log.warning(
                            "sink: skipped %s/%d/%d: %s",
                            record.topic,
                            record.partition,
                            record.offset,
                            exc,
                        )
                        continue
                    changes.append((topic_model[record.topic], change))
                await store.apply(changes)  # 1. the store has committed the batch
                if not await _commit(consumer, offsets, stats):  # 2. only then the offsets
                    continue
                stats.batches += 1
                stats.deletes += sum(isinstance(change, Delete) for _, change in changes)
                stats.upserts += sum(not isinstance(change, Delete) for _, change in changes)
                if on_commit is not None:
                    on_commit(offsets)
    return stats


async def _commit(
    consumer: MultiTopicConsumer, offsets: dict[tuple[str, int], int], stats: SinkStats
) -> bool:
    try:
        await consumer.commit(offsets)
    except CommitFailed as exc:
        # A rebalance took the partitions; their new owner applies the batch again.
        log.warning("sink: commit after a rebalance failed (the new owner redoes it): %s", exc)
        return False
    stats.committed.update(offsets)
    return True
