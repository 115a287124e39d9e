"""The live path: consume -> route -> embed -> produce -> commit, with migration work between.

One window at a time: a window is closed by size (`batching.window_atoms`) or
`batching.max_wait_ms` after its first atom arrived. Its routing is the control plane's
state synced *after* the fetch, so a command appended during the fetch already applies to
it. Offsets are committed (`offset + 1`) only after every output and dead letter of the
window is acknowledged. Between windows the migration worker records handoffs and runs
backfill batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from stream.config import Config
from stream.core.deadletter import SourceRecord
from stream.core.routing import RoutingState
from stream.processor.backfill import MigrationWorker
from stream.processor.control import ControlPlane
from stream.processor.window import RetryWindow, WindowProcessor, to_source_record

log = logging.getLogger(__name__)

CommitHook = Callable[[Mapping[int, int]], None]
"""Called with {partition: committed offset} after each successful commit (tests, metrics)."""


class LiveConsumer(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer-group loop around `WindowProcessor`, with commits and rebalances."""

    def __init__(
        self,
        config: Config,
        consumer: AIOKafkaConsumer,
        processor: WindowProcessor,
        control: ControlPlane,
        migration: MigrationWorker,
        *,
        on_commit: CommitHook | None = None,
        on_assigned: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._consumer = consumer
        self._processor = processor
        self._control = control
        self._migration = migration
        self._idle = anyio.Event()
        self._idle.set()
        self._busy = False
        self._on_commit = on_commit
        self._on_assigned = on_assigned
        self._processed: dict[TopicPartition, int] = {}
        self._fetched_at = time.monotonic()  # when the last window's fetch ended

    async def run(self, stop: anyio.Event) -> None:
        """Process windows until `stop` is set; the window in flight is finished first."""
        backoff = 0.5
        while not stop.is_set():
            records = await self._fetch_window(stop)
            self._busy, self._idle = True, anyio.Event()
            try:
                state = await self._control.sync()
                state = await self._migration.before_window(state, self._consumer, records)
                if records:
                    began = time.monotonic()
                    try:
                        await self._process(state, records)
                    except RetryWindow as exc:
                        log.error("%s; retrying the window in %.1fs", exc, backoff)
                        self._rewind(records)
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, 30.0)
                        continue
                    backoff = 0.5
                    await self._commit(records)
                    if self._processor.stats.on_window is not None:
                        self._processor.stats.on_window(time.monotonic() - began)
                    self._migration.after_window(state, records)
                if not stop.is_set():
                    await self._backfill_step()
            finally:
                self._busy = False
                self._idle.set()

    async def _process(self, state: RoutingState, records: Sequence[SourceRecord]) -> None:
        """Embed with the write models; per partition while a no-dual-write backfill chases."""
        migration = state.active
        writes = state.routing_config().write_models
        if migration is None or migration.backfill.dual_write or migration.target in writes:
            migration_id = migration.migration_id if migration else None
            await self._processor.process(records, writes, migration_id)
            return
        joined = [r for r in records if migration.writes_target(r.partition)]
        others = [r for r in records if not migration.writes_target(r.partition)]
        for group, models in ((joined, (*writes, migration.target)), (others, writes)):
            if group:
                await self._processor.process(group, models, migration.migration_id)

    def lag(self) -> dict[tuple[str, int], int]:
        """Atoms in the log past what this instance processed, per owned partition."""
        lags = {}
        for tp, processed in self._processed.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                lags[tp.topic, tp.partition] = max(0, highwater - processed)
        return lags

    def _live_waiting(self) -> bool:
        """Live atoms are in the log past what this instance has processed (no I/O: the
        high-water marks come with the consumer's background fetches)."""
        for tp, processed in self._processed.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None and highwater > processed:
                return True
        return False

    async def _backfill_step(self) -> None:
        try:
            await self._migration.step(
                await self._control.sync(), self._consumer, self._processor, self._live_waiting
            )
        except RetryWindow as exc:
            log.error("backfill batch failed (%s); it is redone from its checkpoint", exc)
            self._migration.forget(tp.partition for tp in self._consumer.assignment())

    async def _fetch_window(self, stop: anyio.Event) -> list[SourceRecord]:
        """Fetch until the window is full or `max_wait_ms` passed since its first record."""
        batching = self._config.batching
        records: list[SourceRecord] = []
        deadline: float | None = None
        while len(records) < batching.window_atoms and not stop.is_set():
            if deadline is None:
                timeout_ms = 500 if not self._migration.has_pending_backfill else 0
            else:  # past the deadline: only what is already buffered (timeout 0)
                timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            fetched = await self._consumer.getmany(
                timeout_ms=timeout_ms, max_records=batching.window_atoms - len(records)
            )
            before = len(records)
            for messages in fetched.values():
                records.extend(to_source_record(m) for m in messages)
            if records and deadline is None:
                deadline = self._window_deadline(records)
            elif timeout_ms == 0 and len(records) == before:
                break  # the deadline has passed and the buffer is drained
            if not records:
                break
        self._fetched_at = time.monotonic()
        return records

    def _window_deadline(self, records: Sequence[SourceRecord]) -> float:
        """`max_wait_ms` after the window's first atom arrived, not after it was fetched.

        Atoms that waited in the consumer's buffer while the previous window was processed
        count that time (by record timestamp, capped by the time since the last fetch ended,
        which bounds what a producer clock that runs behind can claim): under load a window
        closes as soon as the buffer is drained instead of adding a full wait to every atom.
        """
        now = time.monotonic()
        stamps = [
            r.timestamp_ms for r in records if r.timestamp_ms is not None and r.timestamp_ms > 0
        ]
        age = time.time() - min(stamps) / 1000 if stamps else 0.0
        age = min(max(age, 0.0), now - self._fetched_at)
        return now + max(0.0, self._config.batching.max_wait_ms / 1000 - age)

    async def _commit(self, records: Sequence[SourceRecord]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("commit after a rebalance failed (the new owner redoes it): %r", exc)
            return
        self._processed.update(offsets)
        if self._on_commit is not None:
            self._on_commit({tp.partition: offset for tp, offset in offsets.items()})

    def _rewind(self, records: Sequence[SourceRecord]) -> None:
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        assigned = self._consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        """Eager rebalance: let the window in flight finish and commit before giving up."""
        if self._busy:
            log.info("rebalance: waiting for the window in flight before revoking %s", revoked)
            with anyio.move_on_after(self._config.kafka.max_poll_interval_ms / 2000):
                await self._idle.wait()
        self._migration.forget(tp.partition for tp in revoked)
        for tp in revoked:
            self._processed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        """Log the new assignment."""
        log.info("assigned partitions: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        if assigned and self._on_assigned is not None:
            self._on_assigned()
