"""The group consumer of the atoms topic, as the live path sees it.

Partitions are plain ints of the one subscribed topic; records are `SourceRecord`s; a
rebalance reaches a `PartitionListener`; a commit refused by a rebalance raises
`CommitFailed`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from stream.config import KafkaConfig
from stream.core.records import SourceRecord
from stream.kafka.clients import make_consumer
from stream.kafka.errors import kafka_errors
from stream.kafka.records import to_source_record


class PartitionListener(Protocol):
    """What a consumer-group member does when partitions move (eager rebalances)."""

    async def on_revoked(self, partitions: Sequence[int]) -> None:
        """Before `partitions` are given up: finish and commit what is in flight."""

    async def on_assigned(self, partitions: Sequence[int]) -> None:
        """After `partitions` were assigned to this member."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, topic: str, listener: PartitionListener) -> None:
        self._topic = topic
        self._listener = listener

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._listener.on_revoked(_partitions(revoked, self._topic))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._listener.on_assigned(_partitions(assigned, self._topic))


def _partitions(tps: Any, topic: str) -> list[int]:
    return sorted(tp.partition for tp in tps if tp.topic == topic)


class GroupConsumer:
    """A consumer-group member of one topic, with manual commits, read_committed."""

    def __init__(self, kafka: KafkaConfig, topic: str, *, group_id: str) -> None:
        self.topic = topic
        self._kafka = kafka
        self._consumer: AIOKafkaConsumer = make_consumer(
            kafka, group_id=group_id, group_instance_id=kafka.group_instance_id
        )

    async def __aenter__(self) -> GroupConsumer:
        async with kafka_errors("consumer", self._kafka.bootstrap_servers):
            await self._consumer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    def subscribe(self, listener: PartitionListener) -> None:
        """Join the group for the topic; `listener` hears of every rebalance."""
        self._consumer.subscribe([self.topic], listener=_Listener(self.topic, listener))

    async def fetch(self, *, timeout_ms: int, max_records: int) -> list[SourceRecord]:
        """Records of the assigned partitions, up to `max_records` (empty after `timeout_ms`)."""
        async with kafka_errors("consumer", self._kafka.bootstrap_servers):
            fetched = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return [to_source_record(m) for messages in fetched.values() for m in messages]

    async def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit {partition: next offset}; `CommitFailed` if a rebalance took them away."""
        tps = {TopicPartition(self.topic, p): offset for p, offset in offsets.items()}
        async with kafka_errors("commit", self._kafka.bootstrap_servers):  # or CommitFailed
            await self._consumer.commit(tps)

    def seek(self, partition: int, offset: int) -> None:
        """Read `partition` from `offset` next (ignored when it is no longer assigned)."""
        tp = TopicPartition(self.topic, partition)
        if tp in self._consumer.assignment():
            self._consumer.seek(tp, offset)

    async def read_committed(self, partitions: Sequence[int]) -> dict[int, int | None]:
        """The group's committed offset of each partition still assigned, as the broker has
        it now (None: none). A transactional commit shows only once the group coordinator
        has applied its marker: right after the commit it can still read the offset before."""
        found: dict[int, int | None] = {}
        async with kafka_errors("consumer", self._kafka.bootstrap_servers):
            for partition in partitions:
                tp = TopicPartition(self.topic, partition)
                offset = await self._consumer.committed(tp)
                if tp in self._consumer.assignment():
                    found[partition] = offset
        return found

    async def seek_committed(self, partition: int, offset: int | None) -> None:
        """Read `partition` from `offset`, or from its first offset when None (a new group
        starts from the earliest offset); ignored when it is no longer assigned."""
        tp = TopicPartition(self.topic, partition)
        if tp not in self._consumer.assignment():
            return
        if offset is None:
            await self._consumer.seek_to_beginning(tp)
        else:
            self._consumer.seek(tp, offset)

    def assignment(self) -> list[int]:
        """The partitions this member owns now."""
        return _partitions(self._consumer.assignment(), self.topic)

    def highwater(self, partition: int) -> int | None:
        """The last known log end of `partition` (no I/O: it comes with fetches)."""
        value = self._consumer.highwater(TopicPartition(self.topic, partition))
        return None if value is None else int(value)

    async def position(self, partition: int) -> int:
        """The offset of the next record this member will fetch from `partition`."""
        async with kafka_errors("consumer", self._kafka.bootstrap_servers):
            return int(await self._consumer.position(TopicPartition(self.topic, partition)))

    async def beginning_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        """The first offset still in the log, per partition."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        async with kafka_errors("consumer", self._kafka.bootstrap_servers):
            found = await self._consumer.beginning_offsets(tps)
        return {tp.partition: int(offset) for tp, offset in found.items()}

    def partition_count(self) -> int | None:
        """Partitions of the topic, from the last metadata (None: not known yet)."""
        partitions = self._consumer.partitions_for_topic(self.topic)
        return len(partitions) if partitions else None


async def commit_group_offsets(
    kafka: KafkaConfig, topic: str, group_id: str, offsets: Mapping[int, int]
) -> None:
    """Commit {partition: next offset} for a group with no running member (tools and
    benches: a history that counts as processed already)."""
    consumer = make_consumer(kafka, group_id=group_id)
    tps = {TopicPartition(topic, p): offset for p, offset in offsets.items()}
    async with kafka_errors("commit", kafka.bootstrap_servers):
        await consumer.start()
        try:
            consumer.assign(list(tps))
            await consumer.commit(tps)
        finally:
            await consumer.stop()


class MultiTopicConsumer:
    """A consumer-group member of several topics (by exact names), manual commits."""

    def __init__(self, kafka: KafkaConfig, topics: Sequence[str], *, group_id: str) -> None:
        self._kafka = kafka
        self._topics = list(topics)
        # A short metadata age picks up topics that are created after the member joined.
        self._consumer: AIOKafkaConsumer = make_consumer(
            kafka, group_id=group_id, metadata_max_age_ms=5000
        )

    async def __aenter__(self) -> MultiTopicConsumer:
        async with kafka_errors("consumer", self._kafka.bootstrap_servers):
            await self._consumer.start()
            pattern = "^(" + "|".join(re.escape(topic) for topic in self._topics) + ")$"
            self._consumer.subscribe(pattern=pattern)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def fetch(self, *, timeout_ms: int, max_records: int) -> list[SourceRecord]:
        """Records of the assigned partitions of every topic (empty after `timeout_ms`)."""
        async with kafka_errors("consumer", self._kafka.bootstrap_servers):
            fetched = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return [to_source_record(m) for messages in fetched.values() for m in messages]

    async def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit {(topic, partition): next offset}; `CommitFailed` after a rebalance."""
        tps = {TopicPartition(topic, p): offset for (topic, p), offset in offsets.items()}
        async with kafka_errors("commit", self._kafka.bootstrap_servers):
            await self._consumer.commit(tps)
