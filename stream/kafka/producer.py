"""The output producer: `send(topic, record) -> Ack`, with typed errors.

aiokafka batches sends per partition (`linger_ms`, `max_batch_size`); `send` only enqueues,
and the returned `Ack` resolves when the broker acknowledged. Both raise `RecordRejected`
(this record can never be written), `SendFailed` (a retry may succeed), `NotAuthorized` or
`FatalKafkaError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from stream.config import KafkaConfig
from stream.core.records import OutRecord
from stream.errors import ProducerFencedError
from stream.kafka.clients import make_producer
from stream.kafka.errors import is_client_error, kafka_errors, needs_new_producer, send_error

log = logging.getLogger(__name__)

REPLACED_STOP_SECS = 30


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Ack:
    """The broker's acknowledgement of one send; `await ack` returns the record's offset."""

    __slots__ = ("_future", "_generation", "_owner", "_topic")

    def __init__(
        self, future: asyncio.Future[Any], topic: str, owner: OutputProducer, generation: int
    ) -> None:
        self._future = future
        self._topic = topic
        self._owner = owner
        self._generation = generation

    def __await__(self) -> Generator[Any, None, int]:
        return self._wait().__await__()

    async def outcome(self) -> bool:
        """Wait for the broker's answer without raising: whether the record was written."""
        try:
            await asyncio.shield(self._future)
        except Exception:
            return False
        return True

    async def _wait(self) -> int:
        try:
            metadata = await self._future
        except Exception as exc:
            if is_client_error(exc):
                await self._owner._replace_if_broken(exc, self._generation)
                raise send_error(exc, self._topic, self._owner.bootstrap) from exc
            raise
        return int(metadata.offset)


class OutputProducer:
    """One aiokafka producer for the lifetime of an `async with` block."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        linger_ms: int = 5,
        idempotent: bool | None = None,
        transactional_id: str | None = None,
    ):
        self._kafka = kafka
        self.bootstrap = kafka.bootstrap_servers
        self._linger_ms = linger_ms
        self._idempotent = idempotent
        self._transactional_id = transactional_id
        self._producer: AIOKafkaProducer = self._make()
        self._generation = 0  # bumped by every replacement of the client
        # A transactional producer whose sequence numbers the broker no longer accepts (a
        # long outage): every transaction fails until its owner starts a new one.
        self.broken = False
        self._replacing = asyncio.Lock()

    def _make(self) -> AIOKafkaProducer:
        return make_producer(
            self._kafka,
            linger_ms=self._linger_ms,
            idempotent=self._idempotent,
            transactional_id=self._transactional_id,
        )

    async def __aenter__(self) -> OutputProducer:
        async with kafka_errors("producer", self._kafka.bootstrap_servers):
            await self._producer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._producer.stop()

    async def _replace_if_broken(self, exc: BaseException, generation: int) -> None:
        """After an error only a new producer id cures (a sequence broken by a long
        outage), replace the client once: the failed window is retried on the new one.
        Records the old client still holds fail; their windows are retried too."""
        if not needs_new_producer(exc):
            return
        if self._transactional_id is not None:
            # A transactional producer is never replaced behind the caller's back: a new
            # one with the same id would fence the partition's current owner. Its owner
            # replaces it once the transaction is aborted (`broken`).
            if not self.broken:
                log.warning(
                    "producer %s: %r; it needs a new producer id", self._transactional_id, exc
                )
            self.broken = True
            return
        async with self._replacing:
            if generation != self._generation:
                return  # another failed ack replaced it already
            log.warning("producer: %r; replacing it with a new producer id", exc)
            fresh = self._make()
            async with kafka_errors("producer", self._kafka.bootstrap_servers):
                await fresh.start()
            old, self._producer = self._producer, fresh
            self._generation += 1
        try:  # what the old client still holds fails (its windows are retried)
            await asyncio.wait_for(old.stop(), REPLACED_STOP_SECS)
        except TimeoutError:
            log.warning("producer: the replaced client did not stop in %ds", REPLACED_STOP_SECS)

    async def send(self, topic: str, record: OutRecord, *, partition: int | None = None) -> Ack:
        """Enqueue `record` for `topic`; the `Ack` resolves once the broker has it."""
        try:
            future = await self._producer.send(
                topic,
                value=record.value,
                key=record.key,
                headers=record.headers,
                timestamp_ms=record.timestamp_ms,
                partition=partition,
            )
        except Exception as exc:
            if is_client_error(exc):
                await self._replace_if_broken(exc, self._generation)
                raise send_error(exc, topic, self._kafka.bootstrap_servers) from exc
            raise
        # A window abandoned at its first failed ack leaves the others unawaited: their
        # errors are expected, so mark them retrieved (no "exception never retrieved").
        future.add_done_callback(_retrieve)
        return Ack(future, topic, self, self._generation)

    async def send_batches(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[Ack, list[int]]]:
        """Enqueue `records` for `topic` as one batch per partition (more when a batch
        fills), each on the partition `send` would choose for its key, in order. Each `Ack`
        covers the indexes into `records` listed with it: one future per batch, not per
        record. A batch the broker refuses (`RecordRejected`) does not say which record
        it was; send those records one by one to find out."""
        try:
            await self._producer.partitions_for(topic)  # metadata, for the partitioner
            by_partition: dict[int, list[int]] = {}
            for index, record in enumerate(records):
                # The producer's own partitioner, as `send` uses it (Java-compatible murmur2).
                partition = self._producer._partition(
                    topic, None, record.key, record.value, record.key, record.value
                )
                by_partition.setdefault(partition, []).append(index)
            acks: list[tuple[Ack, list[int]]] = []
            for partition, indexes in by_partition.items():
                batch, held = self._producer.create_batch(), list[int]()
                for index in indexes:
                    record = records[index]
                    while not self._append(batch, record):  # full: send it, start another
                        acks.append(await self._submit(batch, topic, partition, held))
                        batch, held = self._producer.create_batch(), []
                    held.append(index)
                acks.append(await self._submit(batch, topic, partition, held))
        except Exception as exc:
            if is_client_error(exc):
                await self._replace_if_broken(exc, self._generation)
                raise send_error(exc, topic, self._kafka.bootstrap_servers) from exc
            raise
        return acks

    @staticmethod
    def _append(batch: Any, record: OutRecord) -> bool:
        """Add `record` to `batch`; False when the batch is full (its first record always
        fits, whatever its size: the broker judges that one)."""
        appended = batch.append(
            key=record.key,
            value=record.value,
            timestamp=record.timestamp_ms,
            headers=record.headers,
        )
        return appended is not None

    async def _submit(
        self, batch: Any, topic: str, partition: int, indexes: list[int]
    ) -> tuple[Ack, list[int]]:
        batch.close()  # nothing of `send` joins it: its records are exactly `indexes`
        future = await self._producer.send_batch(batch, topic, partition=partition)
        future.add_done_callback(_retrieve)
        return Ack(future, topic, self, self._generation), indexes

    async def flush(self) -> None:
        """Wait until every record sent so far has been delivered (or failed)."""
        async with kafka_errors("producer flush", self._kafka.bootstrap_servers):
            await self._producer.flush()


class TransactionalProducer(OutputProducer):
    """An `OutputProducer` with one stable transactional id: `begin`, send, then `commit`
    with the input offsets (or `abort`). Starting it fences any other producer with the
    same id (a zombie's): that one's next transactional call raises `ProducerFencedError`."""

    def __init__(self, kafka: KafkaConfig, transactional_id: str, *, linger_ms: int = 5):
        super().__init__(kafka, linger_ms=linger_ms, transactional_id=transactional_id)
        self.transactional_id = transactional_id
        self.in_transaction = False

    async def __aenter__(self) -> TransactionalProducer:
        """Start, and wait for the producer id: the broker hands it out only once every
        earlier transaction of this id is complete (committed or aborted everywhere)."""
        await super().__aenter__()
        await self.begin()
        await self.abort()  # an empty transaction: nothing is sent
        return self

    def _refuse_if_fatal(self, what: str) -> None:
        """A producer that met a fatal error (fenced by a newer producer with its id, the
        usual case) serves no transactional call again; aiokafka's own answer is an
        AssertionError on the state transition, raised here as `ProducerFencedError`."""
        manager = self._producer._txn_manager  # aiokafka keeps the state nowhere public
        if manager is not None and manager.is_fatal_error():
            self.in_transaction = False
            raise ProducerFencedError(
                f"{what} {self.transactional_id}: the producer met a fatal error (fenced by a "
                "newer producer with this id) and cannot be used again"
            )

    async def begin(self) -> None:
        """Open a transaction: every send until `commit` or `abort` belongs to it."""
        self._refuse_if_fatal("begin")
        async with kafka_errors(f"begin {self.transactional_id}", self.bootstrap):
            await self._producer.begin_transaction()
        self.in_transaction = True

    async def commit(self, topic: str, offsets: Mapping[int, int], group_id: str) -> None:
        """Commit the sends with the consumer offsets {partition: next offset} of `topic`,
        in one transaction (what `read_committed` readers and the group then see)."""
        self._refuse_if_fatal("commit")
        async with kafka_errors(f"commit {self.transactional_id}", self.bootstrap):
            if offsets:
                await self._producer.send_offsets_to_transaction(
                    {TopicPartition(topic, p): o for p, o in offsets.items()}, group_id
                )
            await self._producer.commit_transaction()
        self.in_transaction = False

    async def abort(self) -> None:
        """Abort the open transaction, if any: its sends are never seen by `read_committed`."""
        if not self.in_transaction:
            return
        self._refuse_if_fatal("abort")
        self.in_transaction = False
        async with kafka_errors(f"abort {self.transactional_id}", self.bootstrap):
            await self._producer.abort_transaction()
