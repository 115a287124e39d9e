"""Migration work done by the live owner of each partition: handoffs and backfill.

The instance that owns a partition in the consumer group records its handoff (the first
offset processed under dual-write) and backfills [log start, handoff) with the target
model in bounded steps between its live windows (`PartitionBackfill`; `Chase` for
`dual_write = false`). The live loop decides when a step runs (`core.scheduler`). What the
skip rule needs lives in an on-disk key store under `[state] dir`, rebuilt from `atoms` when
it is lost; nothing in memory grows with the number of keys.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio

from schemas.control import MigrationFailed, ModelFingerprint
from schemas.routing import MigrationState
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import Migration, RoutingState
from stream.core.scheduler import RateEstimate, chunk_atoms
from stream.core.windows import partitions_to_backfill
from stream.errors import BrokerUnavailable, ModelLoadError, TargetFailing
from stream.kafka.consumer import GroupConsumer
from stream.kafka.reader import PartitionReader
from stream.processor.busy import BusyPartitions
from stream.processor.chase import Chase
from stream.processor.control import ControlPlane
from stream.processor.handoffs import Handoffs
from stream.processor.partition_backfill import (
    INITIAL_SECS_PER_BYTE,
    PartitionBackfill,
    Phase,
    atom_id_of,
    migration_range,
)
from stream.processor.replays import ReplayWorker
from stream.processor.sensors import ProcessorStats
from stream.processor.transactions import PartitionTransactions
from stream.processor.window import RetryWindow, WindowProcessor
from stream.state.keystore import KeyStore
from stream.state.rocks import StateBusy

log = logging.getLogger(__name__)

# Consecutive failed backfill steps after which the target is declared failing.
MAX_FAILED_STEPS = 5


class MigrationWorker:
    """Handoffs, live-key marks and backfill steps for the partitions owned here."""

    def __init__(
        self,
        config: Config,
        control: ControlPlane,
        stats: ProcessorStats,
        *,
        backfill: bool = True,
        reader: PartitionReader | None = None,
        store: KeyStore | None = None,
        transactions: PartitionTransactions | None = None,
    ) -> None:
        """`transactions` (exactly-once mode): backfill chunks commit with their progress."""
        self._config = config
        self._transactions = transactions
        self._control = control
        self._stats = stats
        self._backfill_enabled = backfill
        self._reader = reader or PartitionReader(config.kafka)
        self._store = store
        self.handoffs = Handoffs(control)
        self._key: tuple[str, int] | None = None
        self._partitions: dict[int, PartitionBackfill] = {}
        self._chasing: dict[int, Chase] = {}
        self._rate = RateEstimate(INITIAL_SECS_PER_BYTE)
        self._next = 0  # round-robin over partitions with work
        self._failed_steps = 0
        self._busy = BusyPartitions()
        self.replays = ReplayWorker(
            config,
            control,
            stats,
            reader=self._reader,
            rate=self._rate,
            transactions=transactions,
        )
        self._replay_turn = False  # migration and replay steps alternate when both have work

    async def __aenter__(self) -> MigrationWorker:
        await self._reader.__aenter__()
        if self._store is None:
            self._store = await anyio.to_thread.run_sync(open_key_store, self._config)
        self.replays.store = self._store
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._reader.__aexit__(*exc_info)
        if self._store is not None:
            await anyio.to_thread.run_sync(self._store.close)

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: their next owner resumes from the log and its own state."""
        partitions = list(partitions)
        self.replays.forget(partitions)
        for partition in partitions:
            self._partitions.pop(partition, None)
            self._chasing.pop(partition, None)
            self._busy.cleared(partition)
            if self._key is not None and self._store is not None:
                self._store.release(self._key[0], self._key[1], partition)

    def retain(self, assigned: Iterable[int]) -> None:
        """A new assignment: forget every partition outside it (one it still held)."""
        kept = set(assigned)
        held = set(self._partitions) | set(self._chasing)
        self.forget(sorted(held - kept))

    async def before_window(
        self, state: RoutingState, consumer: GroupConsumer, records: Sequence[SourceRecord]
    ) -> RoutingState:
        """Record missing handoffs (migration and replays) before the window is routed."""
        state = await self.handoffs.before_window(state, consumer, records)
        if not self._backfill_enabled:
            return state
        return await self.replays.before_window(state, consumer, records)

    async def after_window(self, state: RoutingState, records: Sequence[SourceRecord]) -> None:
        """Mark the keys the live path wrote at or after each backfilling partition's handoff."""
        await self.replays.after_window(state, records)
        if state.active is None or not self._partitions:
            return
        by_partition: dict[int, list[str]] = {}
        ends: dict[int, int] = {}
        for record in records:
            entry = self._partitions.get(record.partition)
            if entry is None or record.offset < entry.handoff:
                continue
            ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
            atom_id = atom_id_of(record, self._config)
            if atom_id is not None:
                by_partition.setdefault(record.partition, []).append(atom_id)
        for partition, end in ends.items():
            await self._partitions[partition].mark_live(by_partition.get(partition, []), end)

    def pending(self, state: RoutingState, consumer: GroupConsumer) -> bool:
        """Whether an owned partition has backfill or replay work (no I/O)."""
        if not self._backfill_enabled:
            return False
        return bool(self._work(state, consumer)) or self.replays.pending(state, consumer)

    def _work(self, state: RoutingState, consumer: GroupConsumer) -> list[int]:
        if not self._backfill_enabled:
            return []
        done = {p for p, entry in self._partitions.items() if entry.phase is Phase.DONE}
        busy = self._busy.waiting(time.monotonic())
        work = partitions_to_backfill(state.active, consumer.assignment(), done)
        return [p for p in work if p not in busy]

    async def step(
        self,
        state: RoutingState,
        consumer: GroupConsumer,
        processor: WindowProcessor,
        budget_secs: float,
    ) -> None:
        """One bounded step of one partition's backfill (round-robin over those with work), or
        of a replay (`ReplayWorker`): the two alternate while both have work.

        A target that cannot load, or whose steps keep failing, fails the migration (an
        internal `migration_failed` event): the source keeps ingesting, `resume` retries.
        """
        migration = state.active
        work = self._work(state, consumer)
        replay_work = self._backfill_enabled and self.replays.pending(state, consumer)
        if replay_work and (migration is None or not work or self._replay_turn):
            self._replay_turn = False
            await self.replays.step(state, consumer, processor, budget_secs)
            return
        self._replay_turn = True
        if migration is None or not work:
            return
        self._reset_if_new(migration)
        partition = work[self._next % len(work)]
        self._next += 1
        try:
            await self._step(migration, partition, consumer, processor, budget_secs)
        except (ModelLoadError, TargetFailing) as exc:
            self.forget([partition])  # redone from its checkpoint on `resume`
            await self._fail(migration, str(exc))
        except StateBusy as exc:
            self._busy.held(partition, exc, time.monotonic())
        except BrokerUnavailable as exc:  # an outage is not the target's fault: not counted
            log.warning("backfill step stopped, Kafka unreachable (%s); redone later", exc)
            self.forget([partition])
        except RetryWindow as exc:
            self._failed_steps += 1
            log.error("backfill step failed (%s); it is redone from its checkpoint", exc)
            self.forget([partition])
            if self._failed_steps >= MAX_FAILED_STEPS:
                await self._fail(migration, f"{self._failed_steps} backfill steps failed: {exc}")
        else:
            self._failed_steps = 0

    async def _step(
        self,
        migration: Migration,
        partition: int,
        consumer: GroupConsumer,
        processor: WindowProcessor,
        budget_secs: float,
    ) -> None:
        if partition not in migration.handoffs:
            chase = self._chasing.get(partition) or await self._new_chase(
                migration, partition, consumer
            )
            secs_per_atom = self._rate.secs_per_unit * 200  # bytes of a typical atom
            records = chunk_atoms(
                budget_secs, secs_per_atom, max_atoms=migration.backfill.batch_size
            )
            await chase.step(consumer, processor, records)
            if chase.joined:
                self._chasing.pop(partition, None)
            return
        entry = self._partitions.get(partition)
        if entry is None:
            assert self._store is not None
            keys = await anyio.to_thread.run_sync(
                self._store.partition, migration.migration_id, migration.epoch, partition
            )
            self._busy.cleared(partition)
            if partition not in consumer.assignment():
                # Revoked while the state was opening (`forget` already ran): let it go.
                self._store.release(migration.migration_id, migration.epoch, partition)
                return
            entry = PartitionBackfill(
                self._config,
                migration_range(migration, partition),
                keys,
                position=await consumer.position(partition),
                reader=self._reader,
                control=self._control,
                stats=self._stats,
                rate=self._rate,
                transactions=self._transactions,
            )
            self._partitions[partition] = entry
        await entry.step(processor, budget_secs)

    async def check_target(self, state: RoutingState, processor: WindowProcessor) -> RoutingState:
        """The state with the migration failed if its target cannot be loaded for live
        writes: the source keeps ingesting instead of the whole fleet crash-looping."""
        migration = state.active
        if migration is None or migration.state is not MigrationState.IN_PROGRESS:
            return state
        try:
            embedder = await processor.models.get(migration.target)
        except ModelLoadError as exc:
            return await self._fail(migration, str(exc))
        if embedder.fingerprint is not None and migration.target not in state.fingerprints:
            # A target that first loads now (fixed after a failure, say): the log records
            # its weights before its first output, as it does at start-up.
            offset = await self._control.append(
                ModelFingerprint(model=migration.target, fingerprint=embedder.fingerprint)
            )
            state = await self._control.wait_applied(offset)
        return state

    async def fail_target(self, state: RoutingState, reason: str) -> RoutingState:
        """The state with the active migration failed (its target keeps failing), when that
        is still a legal transition; the state unchanged otherwise (e.g. paused)."""
        migration = state.active
        if migration is None or migration.state is not MigrationState.IN_PROGRESS:
            return state
        return await self._fail(migration, reason)

    async def _new_chase(
        self, migration: Migration, partition: int, consumer: GroupConsumer
    ) -> Chase:
        log_start = (await consumer.beginning_offsets([partition]))[partition]
        chase = Chase(
            self._config,
            migration,
            partition,
            log_start=log_start,
            reader=self._reader,
            control=self._control,
            handoffs=self.handoffs,
            stats=self._stats,
            transactions=self._transactions,
        )
        self._chasing[partition] = chase
        return chase

    async def _fail(self, migration: Migration, reason: str) -> RoutingState:
        log.error("migration %s failed: %s", migration.migration_id, reason)
        offset = await self._control.append(
            MigrationFailed(migration_id=migration.migration_id, reason=reason)
        )
        self._failed_steps = 0
        return await self._control.wait_applied(offset)

    def _reset_if_new(self, migration: Migration) -> None:
        key = (migration.migration_id, migration.epoch)
        if key == self._key:
            return
        if self._key is not None and self._store is not None:
            for partition in list(self._partitions):
                self._store.release(self._key[0], self._key[1], partition)
            if self._key[0] != migration.migration_id:
                self._store.drop_migration(self._key[0])
        self._key = key
        self._partitions.clear()
        self._chasing.clear()


def open_key_store(config: Config) -> KeyStore:
    """This process's key store: the group's directory under `[state] dir`.

    Every worker of the group on this machine shares it, so a partition that moves
    between them keeps its state; each partition's database is locked by its holder, and
    a worker that finds one still held skips it until it is released (`StateBusy`).
    """
    group = re.sub(r"[^A-Za-z0-9._-]", "_", config.kafka.group_id)
    root = Path(config.state.dir) / group
    log.info("state: key store in %s", root)
    return KeyStore.open(root)
