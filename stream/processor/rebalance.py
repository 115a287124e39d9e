"""Eager rebalances: the window in flight finishes and commits before partitions go."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import anyio

from stream.kafka.consumer import GroupConsumer
from stream.processor.backfill import MigrationWorker
from stream.processor.commits import Offsets
from stream.processor.sensors import Sensor
from stream.processor.transactions import PartitionTransactions

log = logging.getLogger(__name__)


class Rebalance:
    """The consumer group's `PartitionListener` for the live path."""

    def __init__(
        self,
        migration: MigrationWorker,
        offsets: Offsets,
        sensor: Sensor,
        *,
        max_wait: float,
        transactions: PartitionTransactions | None = None,
        consumer: GroupConsumer | None = None,
    ) -> None:
        """`transactions` and `consumer` (exactly-once): producers of assigned partitions
        start first, then reading resumes from the offsets committed as of then."""
        self._consumer = consumer
        self._migration = migration
        self._transactions = transactions
        self._offsets = offsets
        self._sensor = sensor
        self._max_wait = max_wait
        self._idle = anyio.Event()
        self._idle.set()
        self._busy = False
        # Bumped when an assignment is taken away and when a new one is ready: records
        # fetched across a change may come from positions that `on_assigned` then reset.
        self.generation = 0
        self._settled = anyio.Event()
        self._settled.set()

    @contextmanager
    def window(self) -> Iterator[None]:
        """Mark a window in flight (fetched, not yet committed) for the duration."""
        self._busy, self._idle = True, anyio.Event()
        try:
            yield
        finally:
            self._busy = False
            self._idle.set()

    async def settled(self) -> int:
        """Wait until no rebalance is half done; returns the generation."""
        await self._settled.wait()
        return self.generation

    async def on_revoked(self, partitions: Sequence[int]) -> None:
        """Let the window in flight finish and commit (bounded by half the poll interval)."""
        self.generation += 1
        if self._settled.is_set():
            self._settled = anyio.Event()
        if self._busy:
            log.info("rebalance: waiting for the window in flight before revoking %s", partitions)
            with anyio.move_on_after(self._max_wait):
                await self._idle.wait()
        self._migration.forget(partitions)
        self._offsets.forget(partitions)
        if self._transactions is not None:  # the next owner starts (and fences with) its own
            await self._transactions.release(partitions)

    async def on_assigned(self, partitions: Sequence[int]) -> None:
        """Log the new assignment and tell the sensor."""
        log.info("assigned partitions: %s", partitions)
        self._migration.retain(partitions)  # state of anything else is its new owner's
        if self._transactions is not None and self._consumer is not None:
            # Fence the previous owners and wait until their transactions are complete; an
            # offset fetched before that can be one window old (a pending transactional
            # commit is not visible yet): that window would be processed twice.
            await self._transactions.acquire(partitions)
            found = await self._offsets.resume_from_committed(partitions)
            log.info("exactly-once: reading from the committed offsets %s", found)
        self.generation += 1
        self._settled.set()
        if partitions:
            self._sensor.on_assigned(partitions)
