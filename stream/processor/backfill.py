"""Migration work done by the live owner of each partition: handoffs and backfill.

The instance that owns a partition in the consumer group records its handoff (the first
offset processed under dual-write), and replays [log_start, handoff) with the target model
in batches interleaved between its live windows. Because one task emits both the live and
the backfill records of a partition, the skip rule is exact: a backfill record is never
written for a key that the live path already wrote since the handoff, so an update or
delete during the migration is never staled or resurrected (G4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import anyio

from schemas.atoms import InvalidAtom, decode_atom
from schemas.control import BackfillProgress, HandoffRecorded
from schemas.routing import MigrationState
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import Migration, RoutingState
from stream.kafka.consumer import GroupConsumer
from stream.kafka.reader import PartitionReader
from stream.processor.control import ControlPlane
from stream.processor.sensors import ProcessorStats
from stream.processor.window import WindowProcessor

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL_SECS = 1.0


@dataclass
class _Partition:
    """What this instance knows about one owned partition for the current migration."""

    handoff: int
    next_offset: int
    live_keys: set[str]
    checkpointed_at: float = 0.0
    log_start: int = 0


class MigrationWorker:
    """Handoffs, the live-key skip set, and backfill batches for the partitions owned here."""

    def __init__(
        self,
        config: Config,
        control: ControlPlane,
        stats: ProcessorStats,
        *,
        backfill: bool = True,
        reader: PartitionReader | None = None,
    ) -> None:
        self._config = config
        self._control = control
        self._stats = stats
        self._backfill_enabled = backfill
        self._reader = reader or PartitionReader(config.kafka)
        self._key: tuple[str, int] | None = None
        self._partitions: dict[int, _Partition] = {}
        self._chasing: dict[int, _Partition] = {}
        self.has_pending_backfill = False
        self._bytes_per_sec = 20_000.0
        self._live_waiting: Callable[[], bool] = lambda: False

    async def __aenter__(self) -> MigrationWorker:
        await self._reader.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._reader.__aexit__(*exc_info)

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: their next owner rebuilds what it needs from the log."""
        for partition in partitions:
            self._partitions.pop(partition, None)
            self._chasing.pop(partition, None)

    async def before_window(
        self,
        state: RoutingState,
        consumer: GroupConsumer,
        records: Sequence[SourceRecord],
    ) -> RoutingState:
        """Record handoffs for owned partitions that dual-write without one; return the state."""
        migration = state.active
        if migration is None or not migration.dual_writing:
            return state
        assigned = consumer.assignment()
        missing = [p for p in assigned if p not in migration.handoffs]
        if not missing:
            return state
        first_in_window: dict[int, int] = {}
        for record in records:
            first_in_window[record.partition] = min(
                first_in_window.get(record.partition, record.offset), record.offset
            )
        starts = await consumer.beginning_offsets(missing)
        partitions = consumer.partition_count() or len(assigned)
        last = -1
        for partition in missing:
            offset = first_in_window.get(partition)
            if offset is None:
                offset = await consumer.position(partition)
            last = await self._record_handoff(
                migration, partition, offset, starts[partition], partitions
            )
        return await self._control.wait_applied(last)

    async def _record_handoff(
        self, migration: Migration, partition: int, offset: int, log_start: int, partitions: int
    ) -> int:
        """Append the handoff of one partition; returns its control-log offset."""
        log.info("handoff %s partition %d at offset %d", migration.migration_id, partition, offset)
        return await self._control.append(
            HandoffRecorded(
                migration_id=migration.migration_id,
                epoch=migration.epoch,
                partition=partition,
                offset=offset,
                log_start=min(log_start, offset),
                partitions=partitions,
            )
        )

    def after_window(self, state: RoutingState, records: Sequence[SourceRecord]) -> None:
        """Remember the keys written live at or after each owned partition's handoff."""
        migration = state.active
        if migration is None:
            return
        for record in records:
            entry = self._partitions.get(record.partition)
            if entry is not None and record.offset >= entry.handoff:
                atom_id = _atom_id(record, self._config.limits.max_event_bytes)
                if atom_id is not None:
                    entry.live_keys.add(atom_id)

    async def step(
        self,
        state: RoutingState,
        consumer: GroupConsumer,
        processor: WindowProcessor,
        live_waiting: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Run up to `max_concurrent` backfill batches for owned partitions; True if it did work."""
        migration = state.active
        if (
            not self._backfill_enabled
            or migration is None
            or migration.state is not MigrationState.IN_PROGRESS
        ):
            self.has_pending_backfill = False
            return False
        self._reset_if_new(migration)
        pending: list[int] = []
        for partition in consumer.assignment():
            if partition not in migration.handoffs:
                if not migration.backfill.dual_write:
                    pending.append(partition)  # chasing the live head
                continue
            if migration.backfilled.get(partition, 0) >= migration.handoffs[partition]:
                continue
            entry = await self._entry(migration, partition, consumer)
            if entry.next_offset < entry.handoff:
                pending.append(partition)
        self.has_pending_backfill = bool(pending)
        if not pending:
            return False
        deadline = time.monotonic() + self._config.batching.backfill_slice_ms / 1000
        self._live_waiting = live_waiting
        for partition in pending[: migration.backfill.max_concurrent]:
            if time.monotonic() >= deadline or live_waiting():
                break
            if partition in migration.handoffs:
                await self._batch(migration, partition, processor, deadline)
            else:
                await self._chase(migration, partition, consumer, processor, deadline)
        return True

    async def _chase(
        self,
        migration: Migration,
        partition: int,
        consumer: GroupConsumer,
        processor: WindowProcessor,
        deadline: float,
    ) -> None:
        """`dual_write = false`: backfill up to the live head, then record the handoff there.

        The live path of this partition runs in this same task, so the head does not move
        between the check and the handoff: no atom falls between backfill and live writes.
        """
        chase = self._chasing.get(partition)
        if chase is None:
            log_start = (await consumer.beginning_offsets([partition]))[partition]
            start = max(migration.backfilled.get(partition, 0), log_start)
            chase = _Partition(
                handoff=-1,
                next_offset=start,
                live_keys=set(),
                log_start=log_start,
            )
            self._chasing[partition] = chase
        head = await consumer.position(partition)
        if chase.next_offset >= head:
            await self._checkpoint(migration, partition, chase, head, force=True)
            partitions = consumer.partition_count() or 0
            last = await self._record_handoff(
                migration, partition, head, chase.log_start, partitions
            )
            self._chasing.pop(partition)
            await self._control.wait_applied(last)
            return
        end = min(chase.next_offset + migration.backfill.batch_size, head)
        records = await self._read(partition, chase.next_offset, end)
        reached = await self._emit(migration, records, end, set(), processor, deadline)
        self._stats.backfilled_events += reached - chase.next_offset
        chase.next_offset = reached
        await self._checkpoint(migration, partition, chase, reached)

    async def _checkpoint(
        self,
        migration: Migration,
        partition: int,
        entry: _Partition,
        offset: int,
        *,
        force: bool = False,
    ) -> None:
        """Record progress in the control log, at most once a second per partition."""
        now = time.monotonic()
        if not force and now - entry.checkpointed_at < CHECKPOINT_INTERVAL_SECS:
            return
        await self._control.append(
            BackfillProgress(
                migration_id=migration.migration_id,
                epoch=migration.epoch,
                partition=partition,
                offset=offset,
            )
        )
        entry.checkpointed_at = now

    async def _entry(
        self, migration: Migration, partition: int, consumer: GroupConsumer
    ) -> _Partition:
        entry = self._partitions.get(partition)
        if entry is None:
            handoff = migration.handoffs[partition]
            start = max(migration.backfilled.get(partition, 0), migration.log_starts[partition])
            position = await consumer.position(partition)
            # Keys written live since the handoff by earlier owners: the tail [handoff, position).
            tail = await self._read(partition, handoff, position)
            keys = {
                atom_id
                for record in tail
                if (atom_id := _atom_id(record, self._config.limits.max_event_bytes)) is not None
            }
            entry = _Partition(handoff=handoff, next_offset=start, live_keys=keys)
            self._partitions[partition] = entry
        return entry

    async def _batch(
        self, migration: Migration, partition: int, processor: WindowProcessor, deadline: float
    ) -> None:
        entry = self._partitions[partition]
        end = min(entry.next_offset + migration.backfill.batch_size, entry.handoff)
        records = await self._read(partition, entry.next_offset, end)
        reached = await self._emit(migration, records, end, entry.live_keys, processor, deadline)
        self._stats.backfilled_events += reached - entry.next_offset
        entry.next_offset = reached
        await self._checkpoint(migration, partition, entry, reached, force=reached >= entry.handoff)

    async def _emit(
        self,
        migration: Migration,
        records: Sequence[SourceRecord],
        end: int,
        skip: set[str],
        processor: WindowProcessor,
        deadline: float,
    ) -> int:
        """Embed and produce `records` (all before `end`) in chunks until done, the slice is
        spent or live atoms are waiting, so a live window never waits long; returns the
        offset reached."""
        limit = self._config.limits.max_event_bytes
        chunk_secs = self._config.batching.backfill_chunk_ms / 1000
        done = 0
        while done < len(records):
            # A chunk holds about `chunk_secs` of model time, sized by text bytes (a better
            # proxy for tokens than a count of atoms when lengths are heavy-tailed).
            budget, size, count = self._bytes_per_sec * chunk_secs, 0, 0
            while done + count < len(records) and (count == 0 or size < budget):
                size += len(records[done + count].value or b"")
                count += 1
            part = records[done : done + count]
            keep = [r for r in part if _wanted(r, limit, skip)]
            began = time.monotonic()
            if keep:
                await processor.process(
                    keep, (migration.target,), migration.migration_id, path="backfill"
                )
                spent = max(time.monotonic() - began, 1e-3)
                measured = sum(len(r.value or b"") for r in keep) / spent
                self._bytes_per_sec = 0.5 * self._bytes_per_sec + 0.5 * measured
            done += count
            if done < len(records) and (time.monotonic() >= deadline or self._live_waiting()):
                return records[done].offset
        return end

    async def _read(self, partition: int, start: int, end: int) -> list[SourceRecord]:
        """Records of one atoms partition in [start, end)."""
        return await self._reader.read(self._config.topics.atoms, partition, start, end)

    def _reset_if_new(self, migration: Migration) -> None:
        key = (migration.migration_id, migration.epoch)
        if key != self._key:
            self._key = key
            self._partitions.clear()
            self._chasing.clear()


def _wanted(record: SourceRecord, max_event_bytes: int, skip: set[str]) -> bool:
    """Backfill emits valid events whose key the live path has not written since handoff."""
    atom_id = _atom_id(record, max_event_bytes)
    return atom_id is not None and atom_id not in skip


def _atom_id(record: SourceRecord, max_event_bytes: int) -> str | None:
    """The atom a record is about, or None when it is invalid (skipped by backfill)."""
    try:
        return decode_atom(record.key, record.value, max_event_bytes=max_event_bytes).atom_id
    except InvalidAtom:
        return None
