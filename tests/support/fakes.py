"""Fakes of the Kafka boundary (`stream.kafka`) for unit tests of the business code.

Each fake implements the public interface of one boundary class, in memory; a unit test
(`tests/unit/test_fakes.py`) holds their method signatures equal to the real ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from stream.core.records import OutRecord, SourceRecord
from stream.errors import CommitFailed, LatticeError, RecordRejected
from stream.kafka.consumer import PartitionListener


class FakeAck:
    """An acknowledgement that resolves at once, to an offset or an error."""

    def __init__(self, offset: int, error: LatticeError | None = None) -> None:
        self._offset = offset
        self._error = error

    def __await__(self) -> Generator[None, None, int]:
        return self._resolve().__await__()

    async def _resolve(self) -> int:
        if self._error is not None:
            raise self._error
        return self._offset

    async def outcome(self) -> bool:
        return self._error is None


@dataclass
class FakeProducer:
    """Records every send in order; `fail` (at send) and `fail_ack` (at the ack) by topic."""

    sent: list[tuple[str, OutRecord]] = field(default_factory=list)
    fail: dict[str, LatticeError] = field(default_factory=dict)  # at every send
    fail_ack: dict[str, list[LatticeError]] = field(default_factory=dict)  # one per ack
    # Records to a topic over its size (key + value + headers) are refused at the ack, as a
    # broker refuses one over the topic's max.message.bytes.
    max_bytes: dict[str, int] = field(default_factory=dict)
    batches: int = 0  # calls of `send_batches`

    async def __aenter__(self) -> FakeProducer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def send(self, topic: str, record: OutRecord, *, partition: int | None = None) -> FakeAck:
        if topic in self.fail:
            raise self.fail[topic]
        limit = self.max_bytes.get(topic)
        if limit is not None and record_bytes(record) > limit:
            too_large = RecordRejected(f"send to {topic}: the broker refused the record (fake)")
            return FakeAck(-1, too_large)
        self.sent.append((topic, record))
        errors = self.fail_ack.get(topic)
        return FakeAck(len(self.sent) - 1, errors.pop(0) if errors else None)

    async def send_batches(
        self, topic: str, records: Sequence[OutRecord]
    ) -> list[tuple[FakeAck, list[int]]]:
        """One batch for all of `records` (one partition): a record over `max_bytes`
        fails the whole batch at its ack, and none of it is written, as a broker does."""
        if topic in self.fail:
            raise self.fail[topic]
        self.batches += 1
        limit = self.max_bytes.get(topic)
        if limit is not None and any(record_bytes(r) > limit for r in records):
            too_large = RecordRejected(f"send to {topic}: the broker refused the batch (fake)")
            return [(FakeAck(-1, too_large), list(range(len(records))))]
        self.sent.extend((topic, record) for record in records)
        errors = self.fail_ack.get(topic)
        ack = FakeAck(len(self.sent) - len(records), errors.pop(0) if errors else None)
        return [(ack, list(range(len(records))))]

    async def flush(self) -> None:
        return None

    def keys(self, topic: str) -> list[bytes | None]:
        """Keys sent to `topic`, in order."""
        return [record.key for sent_to, record in self.sent if sent_to == topic]


def record_bytes(record: OutRecord) -> int:
    """A record's size as a broker limit counts it, near enough: key, value and headers."""
    headers = sum(len(name) + len(value) for name, value in record.headers)
    return len(record.key or b"") + len(record.value or b"") + headers


def source(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    *,
    headers: Sequence[tuple[str, bytes]] = (),
) -> SourceRecord:
    """A SourceRecord with a broker-like timestamp."""
    return SourceRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        headers=tuple(headers),
        timestamp_ms=1_700_000_000_000 + offset,
    )


class FakeLog:
    """The records of a topic's partitions, appended in order."""

    def __init__(self, topic: str, partitions: int) -> None:
        self.topic = topic
        self.partitions: list[list[SourceRecord]] = [[] for _ in range(partitions)]
        self.appended = anyio.Event()

    def append(self, partition: int, key: bytes | None, value: bytes | None) -> SourceRecord:
        log = self.partitions[partition]
        record = source(self.topic, partition, len(log), key, value)
        log.append(record)
        appended, self.appended = self.appended, anyio.Event()
        appended.set()
        return record

    async def wait(self, timeout_ms: int) -> None:
        """Until the next append, at most `timeout_ms` (a fetch's long poll)."""
        with anyio.move_on_after(timeout_ms / 1000):
            await self.appended.wait()


class FakeGroupConsumer:
    """One group member that owns `assigned` partitions of a `FakeLog`."""

    def __init__(self, log: FakeLog, assigned: Sequence[int]) -> None:
        self.topic = log.topic
        self.log = log
        self.assigned = list(assigned)
        self.positions = {p: 0 for p in assigned}
        self.committed: dict[int, int] = {}
        self.commit_fails = 0  # the next N commits raise CommitFailed
        self.stale_committed: dict[int, int | None] = {}  # read_committed answers this
        self.listener: PartitionListener | None = None
        self._told = False
        self.rebalance_at_fetch = 0  # the Nth fetch (from 1) runs a rebalance first
        self.read_committed_fails: list[LatticeError] = []  # raised by the next reads
        self._fetches = 0

    async def __aenter__(self) -> FakeGroupConsumer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def subscribe(self, listener: PartitionListener) -> None:
        self.listener = listener

    async def fetch(self, *, timeout_ms: int, max_records: int) -> list[SourceRecord]:
        if self.listener is not None and not self._told:
            self._told = True
            await self.listener.on_assigned(self.assigned)
        self._fetches += 1
        if self.listener is not None and self._fetches == self.rebalance_at_fetch:
            await self.listener.on_revoked(self.assigned)  # the same partitions come back
            await self.listener.on_assigned(self.assigned)
        if all(self.positions[p] >= len(self.log.partitions[p]) for p in self.assigned):
            await self.log.wait(timeout_ms)
        records: list[SourceRecord] = []
        for partition in self.assigned:
            log = self.log.partitions[partition]
            take = log[self.positions[partition] : self.positions[partition] + max_records]
            take = take[: max_records - len(records)]
            self.positions[partition] += len(take)
            records.extend(take)
        return records

    async def commit(self, offsets: Mapping[int, int]) -> None:
        if self.commit_fails:
            self.commit_fails -= 1
            raise CommitFailed("commit: the group rebalanced (fake)")
        self.committed.update(offsets)

    def seek(self, partition: int, offset: int) -> None:
        if partition in self.positions:
            self.positions[partition] = offset

    async def read_committed(self, partitions: Sequence[int]) -> dict[int, int | None]:
        if self.read_committed_fails:
            raise self.read_committed_fails.pop(0)
        if self.stale_committed:  # as right after a transactional commit: the one before
            return dict(self.stale_committed)
        return {p: self.committed.get(p) for p in partitions}

    async def seek_committed(self, partition: int, offset: int | None) -> None:
        if partition in self.positions:  # nothing committed: the beginning, as the real one
            self.positions[partition] = 0 if offset is None else offset

    def assignment(self) -> list[int]:
        return list(self.assigned)

    def highwater(self, partition: int) -> int | None:
        return len(self.log.partitions[partition])

    async def position(self, partition: int) -> int:
        return self.positions[partition]

    async def beginning_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        return {p: 0 for p in partitions}

    def partition_count(self) -> int | None:
        return len(self.log.partitions)


class FakeReader:
    """Range reads of a `FakeLog`."""

    def __init__(self, log: FakeLog) -> None:
        self.log = log

    async def __aenter__(self) -> FakeReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def beginning_offsets(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        return {p: 0 for p in partitions}

    async def end_offsets(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        return {p: len(self.log.partitions[p]) for p in partitions}

    async def offsets_for_time(
        self, topic: str, partitions: Sequence[int], timestamp_ms: int
    ) -> dict[int, int | None]:
        found: dict[int, int | None] = {}
        for p in partitions:
            later = [
                r.offset for r in self.log.partitions[p] if (r.timestamp_ms or 0) >= timestamp_ms
            ]
            found[p] = later[0] if later else None
        return found

    async def chunks(
        self, topic: str, partition: int, start: int, end: int, *, max_records: int = 500
    ) -> AsyncIterator[list[SourceRecord]]:
        records = self.log.partitions[partition][start:end]
        for i in range(0, len(records), max_records):
            yield records[i : i + max_records]

    async def read(self, topic: str, partition: int, start: int, end: int) -> list[SourceRecord]:
        return self.log.partitions[partition][start:end]

    async def follow(self, topic: str) -> AsyncIterator[list[SourceRecord]]:
        for records in self.log.partitions:
            yield list(records)


class FakeControlLog:
    """The control partition in memory; appends get the next offset and a clock's time."""

    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.records: list[SourceRecord] = []
        self.published: list[tuple[str, bytes]] = []
        self.now_ms = now_ms
        self._position = 0
        self._appended = anyio.Event()

    async def __aenter__(self) -> FakeControlLog:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def fetch(self, *, timeout_ms: int, max_records: int = 500) -> list[SourceRecord]:
        if self._position >= len(self.records):
            with anyio.move_on_after(timeout_ms / 1000):
                await self._appended.wait()
        records = self.records[self._position : self._position + max_records]
        self._position += len(records)
        return records

    async def position(self) -> int:
        return self._position

    async def end_offset(self) -> int:
        return len(self.records)

    async def append(
        self, key: bytes, value: bytes, *, headers: Sequence[tuple[str, bytes]] = ()
    ) -> int:
        offset = len(self.records)
        self.records.append(
            SourceRecord(
                topic="control",
                partition=0,
                offset=offset,
                key=key,
                value=value,
                headers=tuple(headers),
                timestamp_ms=self.now_ms,
            )
        )
        appended, self._appended = self._appended, anyio.Event()
        appended.set()
        return offset

    async def seek(self, offset: int) -> None:
        self._position = offset

    async def read_latest(self, topic: str, count: int) -> list[SourceRecord]:
        values = [value for name, value in self.published if name == topic]
        records = [
            SourceRecord(topic, 0, offset, b"routing", value, (), self.now_ms)
            for offset, value in enumerate(values)
        ]
        return records[-count:]

    async def append_many(self, key: bytes, values: Sequence[bytes]) -> None:
        for value in values:
            await self.append(key, value)

    async def publish(self, topic: str, key: bytes, value: bytes, *, acked: bool = False) -> None:
        self.published.append((topic, value))
