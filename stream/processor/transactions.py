"""Exactly-once (`[kafka] exactly_once = true`): one transactional producer per input
partition, and one transaction per partition per window.

aiokafka 0.14 sends `TxnOffsetCommit` v0, without the group generation (KIP-447), so the
broker cannot fence a zombie by its group membership. The fencing comes from the
transactional id instead, as in Kafka Streams before KIP-447: partition `p` of `atoms` is
always written by the producer with id `<group>.<atoms>.<p>`. Whoever owns `p` now starts
that producer; `InitProducerId` bumps the id's epoch and aborts the zombie's open
transaction, and the zombie's next commit fails with `ProducerFencedError`. So a window's
outputs, dead letters and input offsets are committed together by at most one owner.

Costs: one producer (and its connections) per owned partition, and one commit round trip
per partition per window; `bench --exactly-once` measures the throughput ratio.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import anyio

from stream.config import Config
from stream.errors import ProducerFencedError
from stream.kafka.producer import TransactionalProducer

log = logging.getLogger(__name__)

CLOSE_SECS = 10


def transactional_id(group_id: str, topic: str, partition: int) -> str:
    """The stable id of the producer that writes for `partition` of `topic`."""
    return f"{group_id}.{topic}.{partition}"


class PartitionTransactions:
    """The transactional producers of the partitions this instance owns."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._producers: dict[int, TransactionalProducer] = {}
        # Fenced here: another instance owns them now. No producer is started for them
        # again until a rebalance assigns them here (a new producer would fence the owner).
        self._fenced: set[int] = set()
        # The rebalance listener (`acquire`) and the live loop (`begin`) both start
        # producers: two with one id in one process would fence each other.
        self._starting = anyio.Lock()

    async def __aenter__(self) -> PartitionTransactions:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release(list(self._producers))

    async def acquire(self, partitions: Iterable[int]) -> None:
        """Partitions assigned here: start their producers now, before their committed
        offsets are read. Starting one fences the previous owner's producer and aborts its
        open transaction, so a zombie cannot commit a window the new owner redoes."""
        for partition in partitions:
            self._fenced.discard(partition)
            await self._producer(partition)

    async def begin(self, partition: int) -> TransactionalProducer:
        """The partition's producer with a transaction open."""
        if partition in self._fenced:
            raise ProducerFencedError(
                f"partition {partition} was fenced here: waiting for the group to rejoin"
            )
        producer = await self._producer(partition)
        await producer.begin()
        return producer

    def fenced(self, partitions: Iterable[int]) -> None:
        """Another instance's producer fenced ours for these partitions."""
        self._fenced.update(partitions)

    async def _producer(self, partition: int) -> TransactionalProducer:
        """The partition's producer, started once."""
        async with self._starting:
            producer = self._producers.get(partition)
            return producer if producer is not None else await self._start(partition)

    async def _start(self, partition: int) -> TransactionalProducer:
        kafka = self._config.kafka
        producer = TransactionalProducer(
            kafka, transactional_id(kafka.group_id, self._config.topics.atoms, partition)
        )
        await producer.__aenter__()
        self._producers[partition] = producer
        log.info("exactly-once: producer %s started", producer.transactional_id)
        return producer

    async def commit(self, partition: int, next_offset: int) -> None:
        """Commit the partition's open transaction with its input offset."""
        await self._producers[partition].commit(
            self._config.topics.atoms, {partition: next_offset}, self._config.kafka.group_id
        )

    async def commit_outputs(self, partition: int) -> None:
        """Commit the partition's open transaction without input offsets (backfill: its
        progress record is among the sends)."""
        await self._producers[partition].commit(
            self._config.topics.atoms, {}, self._config.kafka.group_id
        )

    async def abort(self, partitions: Iterable[int]) -> list[int]:
        """Abort what is open on these partitions (their windows are redone).

        A producer that lost its sequence (`broken`: after a long outage the broker answers
        every send with `OutOfOrderSequenceNumber`) is stopped instead, so the partition's
        next transaction starts a new one: `InitProducerId` bumps the id's epoch, which
        resets the sequence. Returns those partitions: the caller confirms its membership
        first, since a new producer would fence the owner if this instance were a zombie.
        """
        renewed = []
        for partition in partitions:
            producer = self._producers.get(partition)
            if producer is None:
                continue
            if producer.broken:
                renewed.append(partition)
                continue
            await producer.abort()
        await self.release(renewed)
        return renewed

    async def release(self, partitions: Iterable[int]) -> None:
        """Partitions revoked (or this producer fenced): abort what is open and stop their
        producers; the next owner starts its own."""
        for partition in list(partitions):
            producer = self._producers.pop(partition, None)
            if producer is None:
                continue
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SECS):
                try:
                    await producer.abort()
                except Exception as exc:  # fenced or unreachable: nothing to keep
                    log.info("exactly-once: abort on %s: %s", producer.transactional_id, exc)
                await producer.__aexit__(None, None, None)

    def open_partitions(self) -> Mapping[int, TransactionalProducer]:
        """The producers started here, by partition."""
        return dict(self._producers)
