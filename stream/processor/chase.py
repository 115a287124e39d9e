"""`dual_write = false`: backfill chases the live head, then the partition joins the target.

The live path of the partition runs in this same task, so the head does not move between
the check and the handoff: no atom falls between backfill and live writes. Every version is
replayed in log order (nothing is written live to the target before the handoff, so order
alone keeps G4). In exactly-once mode each step's outputs commit with its progress record
in the partition's transaction, as backfill chunks do.
"""

from __future__ import annotations

import time

import anyio

from schemas.control import BackfillProgress
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import Migration
from stream.kafka.consumer import GroupConsumer
from stream.kafka.producer import OutputProducer
from stream.kafka.reader import PartitionReader
from stream.processor.control import ControlPlane
from stream.processor.handoffs import Handoffs
from stream.processor.sensors import ProcessorStats
from stream.processor.transactions import PartitionTransactions
from stream.processor.window import WindowProcessor


class Chase:
    """One partition chasing the live head for a `dual_write = false` migration."""

    def __init__(
        self,
        config: Config,
        migration: Migration,
        partition: int,
        *,
        log_start: int,
        reader: PartitionReader,
        control: ControlPlane,
        handoffs: Handoffs,
        stats: ProcessorStats,
        transactions: PartitionTransactions | None = None,
    ) -> None:
        self._config = config
        self._migration = migration
        self.partition = partition
        self._log_start = log_start
        self.next_offset = max(migration.backfilled.get(partition, 0), log_start)
        self._reader = reader
        self._control = control
        self._handoffs = handoffs
        self._stats = stats
        self._transactions = transactions
        self._checkpointed_at = 0.0
        self.joined = False

    async def step(
        self, consumer: GroupConsumer, processor: WindowProcessor, max_records: int
    ) -> None:
        """Replay up to `max_records` toward the head, or record the handoff at the head."""
        head = await consumer.position(self.partition)
        if self.next_offset >= head:
            await self._checkpoint(head, force=True)
            partitions = consumer.partition_count() or 0
            last = await self._handoffs.record(
                self._migration, self.partition, head, self._log_start, partitions, counted=False
            )
            self.joined = True
            await self._control.wait_applied(last)
            return
        end = min(self.next_offset + max_records, head)
        topic = self._config.topics.atoms
        records = await self._reader.read(topic, self.partition, self.next_offset, end)
        if records and self._transactions is not None:
            await self._emit_transaction(processor, records, end)
        else:
            if records:
                await self._emit(processor, records)
            await self._checkpoint(end)
        self._stats.backfilled_events += end - self.next_offset
        self.next_offset = end

    async def _emit(
        self,
        processor: WindowProcessor,
        records: list[SourceRecord],
        producer: OutputProducer | None = None,
    ) -> None:
        migration = self._migration
        await processor.process(
            records,
            (migration.target,),
            migration.migration_id,
            path="backfill",
            target=migration.target,
            producer_for=None if producer is None else (lambda _: producer),
        )

    async def _emit_transaction(
        self, processor: WindowProcessor, records: list[SourceRecord], end: int
    ) -> None:
        """Exactly-once: the step's outputs and its progress record in one transaction."""
        assert self._transactions is not None
        producer = await self._transactions.begin(self.partition)
        try:
            await self._emit(processor, records, producer)
            await self._control.append(self._progress(end), producer=producer)
            await self._transactions.commit_outputs(self.partition)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._transactions.abort([self.partition])
            raise
        self._checkpointed_at = time.monotonic()

    def _progress(self, offset: int) -> BackfillProgress:
        return BackfillProgress(
            migration_id=self._migration.migration_id,
            epoch=self._migration.epoch,
            partition=self.partition,
            offset=offset,
        )

    async def _checkpoint(self, offset: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if (
            not force
            and now - self._checkpointed_at < self._config.backfill.checkpoint_interval_secs
        ):
            return
        await self._control.append(self._progress(offset))
        self._checkpointed_at = now
