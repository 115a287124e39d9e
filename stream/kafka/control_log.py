"""The control topic's one partition: read from the start (or a snapshot's offset), tail,
append; publish statuses and snapshots, read the latest snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.config import KafkaConfig
from stream.core.records import SourceRecord
from stream.kafka.clients import make_consumer, make_producer
from stream.kafka.errors import kafka_errors
from stream.kafka.records import to_source_record


class ControlLog:
    """A reader of the control partition from offset 0, and a producer for it."""

    def __init__(
        self, kafka: KafkaConfig, topic: str, *, offsets_timeout_ms: int | None = None
    ) -> None:
        """`offsets_timeout_ms`: how long an end-offset request waits for Kafka (the
        client's default, 40 s, if None)."""
        self._kafka = kafka
        self._tp = TopicPartition(topic, 0)
        self._consumer: AIOKafkaConsumer = make_consumer(kafka, group_id=None)
        # End offsets come from a client of their own: on the tailing consumer's connection a
        # ListOffsets request waits behind the fetch long-poll (fetch_max_wait_ms).
        timeout = {} if offsets_timeout_ms is None else {"request_timeout_ms": offsets_timeout_ms}
        self._offsets: AIOKafkaConsumer = make_consumer(kafka, group_id=None, **timeout)
        self._producer: AIOKafkaProducer = make_producer(kafka, linger_ms=0)

    async def __aenter__(self) -> ControlLog:
        async with kafka_errors("control plane", self._kafka.bootstrap_servers):
            await self._consumer.start()
            await self._offsets.start()
            await self._producer.start()
            self._consumer.assign([self._tp])
            await self._consumer.seek_to_beginning(self._tp)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()
        await self._offsets.stop()
        await self._producer.stop()

    async def fetch(self, *, timeout_ms: int, max_records: int = 500) -> list[SourceRecord]:
        """The next control records in offset order (empty after `timeout_ms`)."""
        async with kafka_errors("control plane", self._kafka.bootstrap_servers):
            fetched = await self._consumer.getmany(
                self._tp, timeout_ms=timeout_ms, max_records=max_records
            )
        return [to_source_record(m) for m in fetched.get(self._tp, [])]

    async def position(self) -> int:
        """The offset of the next control record to fetch (past markers and gaps)."""
        async with kafka_errors("control plane", self._kafka.bootstrap_servers):
            return int(await self._consumer.position(self._tp))

    async def end_offset(self) -> int:
        """The control log's end offset now."""
        async with kafka_errors("control plane", self._kafka.bootstrap_servers):
            ends = await self._offsets.end_offsets([self._tp])
        return int(ends[self._tp])

    async def seek(self, offset: int) -> None:
        """Read the control log on from `offset` (the next fetch starts there)."""
        async with kafka_errors("control plane", self._kafka.bootstrap_servers):
            self._consumer.seek(self._tp, offset)

    async def read_latest(self, topic: str, count: int) -> list[SourceRecord]:
        """The last `count` records (or fewer) of partition 0 of `topic`; none if it is missing.

        For the compacted snapshots topic: a reader of its own, so the control partition's
        position is untouched.
        """
        reader = make_consumer(self._kafka, group_id=None)
        tp = TopicPartition(topic, 0)
        records: list[SourceRecord] = []
        async with kafka_errors("routing snapshots", self._kafka.bootstrap_servers):
            await reader.start()
            try:
                if topic not in await reader.topics():
                    return []
                reader.assign([tp])
                start = (await reader.beginning_offsets([tp]))[tp]
                end = (await reader.end_offsets([tp]))[tp]
                reader.seek(tp, max(start, end - count))
                # Compaction leaves gaps: the position, not the last offset, says when it is done.
                while await reader.position(tp) < end:
                    fetched = await reader.getmany(tp, timeout_ms=1000)
                    records += [to_source_record(m) for m in fetched.get(tp, [])]
            finally:
                await reader.stop()
        return records[-count:]

    async def append_many(self, key: bytes, values: Sequence[bytes]) -> None:
        """Write many records in large batches, in order (simulated logs for benchmarks)."""
        pending: list[Any] = []
        async with kafka_errors("control append", self._kafka.bootstrap_servers):
            index = 0
            while index < len(values):
                batch = self._producer.create_batch()
                while index < len(values):
                    if batch.append(key=key, value=values[index], timestamp=None) is None:
                        break  # the batch is full
                    index += 1
                pending.append(await self._producer.send_batch(batch, self._tp.topic, partition=0))
                if len(pending) >= 8:  # bound the batches in flight
                    await pending.pop(0)
            for delivered in pending:
                await delivered

    async def append(
        self, key: bytes, value: bytes, *, headers: Sequence[tuple[str, bytes]] = ()
    ) -> int:
        """Write one record; returns its offset once acknowledged."""
        async with kafka_errors("control append", self._kafka.bootstrap_servers):
            sent = await self._producer.send(self._tp.topic, value, key, headers=list(headers))
            metadata = await sent
        return int(metadata.offset)

    async def publish(self, topic: str, key: bytes, value: bytes, *, acked: bool = False) -> None:
        """Send a record to another topic (routing status, snapshots); `acked` waits for the
        broker's acknowledgement, otherwise it is only queued."""
        async with kafka_errors("routing status", self._kafka.bootstrap_servers):
            delivered = await self._producer.send(topic, value, key)
            if acked:
                await delivered
