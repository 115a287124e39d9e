"""Partition range reads without a consumer group: backfill, replay, dry runs and tools.

One reader serves one range at a time (it re-assigns itself for each read). Reads are
streamed in chunks, so a long range is never held in memory whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.config import KafkaConfig
from stream.core.records import SourceRecord
from stream.kafka.clients import make_consumer
from stream.kafka.errors import kafka_errors
from stream.kafka.records import to_source_record

FETCH_TIMEOUT_MS = 1000
READ_FETCH_BYTES = 1024 * 1024
METADATA_RETRY_SECS = 0.2


class PartitionReader:
    """Reads [start, end) of a partition, and the offsets that bound partitions."""

    def __init__(self, kafka: KafkaConfig, *, fetch_max_wait_ms: int = 10) -> None:
        # Range reads: a long-poll at the log end would only delay the next seek.
        self._kafka = kafka
        self._consumer: AIOKafkaConsumer = make_consumer(
            kafka,
            group_id=None,
            fetch_max_wait_ms=fetch_max_wait_ms,
            # A range read takes a chunk at a time: a fetch need not be bigger than a chunk
            # (Kafka still returns a larger first batch whole).
            max_partition_fetch_bytes=READ_FETCH_BYTES,
            fetch_max_bytes=READ_FETCH_BYTES,
        )

    async def __aenter__(self) -> PartitionReader:
        async with kafka_errors("reader", self._kafka.bootstrap_servers):
            await self._consumer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def beginning_offsets(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """The first offset still in the log, per partition."""
        tps = [TopicPartition(topic, p) for p in partitions]
        async with kafka_errors("reader", self._kafka.bootstrap_servers):
            found = await self._consumer.beginning_offsets(tps)
        return {tp.partition: int(offset) for tp, offset in found.items()}

    async def end_offsets(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """The offset the next record will get (the high-water mark), per partition."""
        tps = [TopicPartition(topic, p) for p in partitions]
        async with kafka_errors("reader", self._kafka.bootstrap_servers):
            found = await self._consumer.end_offsets(tps)
        return {tp.partition: int(offset) for tp, offset in found.items()}

    async def offsets_for_time(
        self, topic: str, partitions: Sequence[int], timestamp_ms: int
    ) -> dict[int, int | None]:
        """The first offset at or after `timestamp_ms` per partition (None: none that late)."""
        query = {TopicPartition(topic, p): timestamp_ms for p in partitions}
        async with kafka_errors("reader", self._kafka.bootstrap_servers):
            found = await self._consumer.offsets_for_times(query)
        return {tp.partition: None if at is None else int(at.offset) for tp, at in found.items()}

    async def chunks(
        self, topic: str, partition: int, start: int, end: int, *, max_records: int = 500
    ) -> AsyncIterator[list[SourceRecord]]:
        """The records of [start, end) in offset order, a fetch at a time."""
        if start >= end:
            return
        tp = TopicPartition(topic, partition)
        async with kafka_errors("reader", self._kafka.bootstrap_servers):
            # A read that goes on where the last one ended keeps what the client has
            # fetched ahead (a new assignment or a seek would throw it away).
            if self._consumer.assignment() != {tp}:
                self._consumer.assign([tp])
                self._consumer.seek(tp, start)
            elif await self._consumer.position(tp) != start:
                self._consumer.seek(tp, start)
            while (position := await self._consumer.position(tp)) < end:
                # Never past `end`: the position stays where the next read may begin.
                fetched = await self._consumer.getmany(
                    tp, timeout_ms=FETCH_TIMEOUT_MS, max_records=min(max_records, end - position)
                )
                chunk = [to_source_record(m) for m in fetched.get(tp, []) if m.offset < end]
                if chunk:
                    yield chunk

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[SourceRecord]:
        """The records of [start, end): for ranges known to be small (a batch)."""
        return [r async for chunk in self.chunks(topic, partition, start, end) for r in chunk]

    async def follow(self, topic: str) -> AsyncIterator[list[SourceRecord]]:
        """Every record of every partition of `topic` from the beginning, then as it arrives."""
        async with kafka_errors("reader", self._kafka.bootstrap_servers):
            partitions = self._consumer.partitions_for_topic(topic)
            while not partitions:  # the topic may be created after the reader started
                await self._consumer._client.force_metadata_update()
                partitions = self._consumer.partitions_for_topic(topic)
                if not partitions:
                    await asyncio.sleep(METADATA_RETRY_SECS)
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            self._consumer.assign(tps)
            await self._consumer.seek_to_beginning(*tps)
            while True:
                fetched = await self._consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS)
                yield [to_source_record(m) for messages in fetched.values() for m in messages]
