"""Replays (`start_replay`) run by each partition's live owner with the backfill machinery.

`lattice-embed replay` only appends a request to the control log; the owners do the work,
between their live windows and in the same task, exactly as for a migration's backfill:

1. **Handoff.** The first live window of an owned partition that sees the replay in progress
   records `replay_handoff` at its first offset (the position of an idle partition). The
   replay emits only below `end = min(to, handoff)`; the live path writes the model from the
   handoff on (the model is in the write set, or the replay is abandoned).
2. **Keys pass, tail, emission** (`PartitionBackfill`, a RocksDB key store per partition
   under `[state] dir`): each key's latest version in [start, end) is embedded once, only if
   no event of it follows in [end, handoff) (the live path wrote that one already) and no
   live write of it followed the handoff; deletes as latest version become tombstones. So
   no old version ever lands after a newer one, whatever the processors ingest meanwhile.
3. **Progress** goes to the control log (`replay_progress`, at most once a second): a
   restart or a rebalance resumes from it, and the replay completes when the record that
   finishes its last partition is applied (`stream.core.replays`).

The share scheduler gives replay steps the same model time as backfill steps
(`[backfill] min_share`, plus all spare capacity).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import anyio

from schemas.control import ControlEvent, ReplayHandoff, ReplayProgress
from schemas.routing import ReplayState
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.replays import Replay, replay_partitions_with_work
from stream.core.routing import RoutingState
from stream.core.scheduler import RateEstimate
from stream.errors import BrokerUnavailable, CommitFailed, ModelLoadError
from stream.kafka.consumer import GroupConsumer
from stream.kafka.reader import PartitionReader
from stream.processor.busy import BusyPartitions
from stream.processor.control import ControlPlane
from stream.processor.partition_backfill import (
    BackfillRange,
    PartitionBackfill,
    Phase,
    atom_id_of,
)
from stream.processor.sensors import ProcessorStats
from stream.processor.transactions import PartitionTransactions
from stream.processor.window import RetryWindow, WindowProcessor
from stream.state.keystore import KeyStore
from stream.state.rocks import StateBusy

log = logging.getLogger(__name__)


# The key store's epoch for replays: migration epochs start at 0, so a replay's state never
# passes for a migration's (the store checks each partition's identity when opening it).
STATE_EPOCH = -1


def state_name(replay_id: str) -> str:
    """The replay's name in the key store."""
    return f"replay:{replay_id}"


def replay_range(replay: Replay, partition: int) -> BackfillRange:
    """What the replay covers on `partition` (its handoff must be recorded)."""
    end = replay.end(partition)
    if end is None:
        raise ValueError(f"replay {replay.replay_id} has no handoff on partition {partition}")
    start = replay.start(partition)
    counts = replay.counts.get(partition)

    def progress(offset: int, processed: int | None, total: int | None) -> ControlEvent:
        return ReplayProgress(
            replay_id=replay.replay_id,
            partition=partition,
            offset=offset,
            processed=processed,
            total=total,
        )

    return BackfillRange(
        name=f"replay {replay.replay_id}",
        model=replay.model,
        migration_id=None,
        partition=partition,
        start=start,
        end=max(end, start),
        handoff=replay.handoffs[partition],
        reached=replay.reached.get(partition, start),
        emitted=counts[0] if counts else 0,
        progress=progress,
    )


class ReplayWorker:
    """Replay handoffs, live-key marks and steps for the partitions owned here."""

    def __init__(
        self,
        config: Config,
        control: ControlPlane,
        stats: ProcessorStats,
        *,
        reader: PartitionReader,
        rate: RateEstimate,
        transactions: PartitionTransactions | None = None,
    ) -> None:
        self._config = config
        self._transactions = transactions
        self._control = control
        self._stats = stats
        self._reader = reader
        self._rate = rate
        self.store: KeyStore | None = None  # the migration worker's, set once it is open
        self._entries: dict[tuple[str, int], PartitionBackfill] = {}
        self._done: set[tuple[str, int]] = set()  # finished here; the log may not say so yet
        self._holding: set[str] = set()  # replays whose state this process may have on disk
        self._swept = False
        self._next = 0  # round-robin over (replay, partition) with work
        self._busy = BusyPartitions()

    async def before_window(
        self, state: RoutingState, consumer: GroupConsumer, records: Sequence[SourceRecord]
    ) -> RoutingState:
        """Record the missing handoffs of owned partitions (at the window's first offset, or
        the position of an idle partition); return the state once they are applied."""
        await self._drop_finished(state)
        assigned = consumer.assignment()
        missing = [
            (replay, partition)
            for replay in state.replays.values()
            for partition in assigned
            if partition < replay.partitions and replay.needs_handoff(partition)
        ]
        if not missing:
            return state
        first_in_window: dict[int, int] = {}
        for record in records:
            first_in_window[record.partition] = min(
                first_in_window.get(record.partition, record.offset), record.offset
            )
        starts = await consumer.beginning_offsets(sorted({p for _, p in missing}))
        last = -1
        for replay, partition in missing:
            offset = first_in_window.get(partition)
            if offset is None:
                offset = await consumer.position(partition)
            log.info(
                "replay %s partition %d: handoff at offset %d", replay.replay_id, partition, offset
            )
            last = await self._control.append(
                ReplayHandoff(
                    replay_id=replay.replay_id,
                    partition=partition,
                    offset=offset,
                    log_start=starts[partition],
                )
            )
        return await self._control.wait_applied(last)

    async def after_window(self, state: RoutingState, records: Sequence[SourceRecord]) -> None:
        """Mark the keys the live path wrote at or after each running replay's handoff."""
        if not self._entries:
            return
        by_entry: dict[tuple[str, int], tuple[list[str], int]] = {}
        for (replay_id, partition), entry in self._entries.items():
            ids: list[str] = []
            end = 0
            for record in records:
                if record.partition != partition or record.offset < entry.handoff:
                    continue
                end = max(end, record.offset + 1)
                atom_id = atom_id_of(record, self._config)
                if atom_id is not None:
                    ids.append(atom_id)
            if end:
                by_entry[replay_id, partition] = (ids, end)
        for ident, (ids, end) in by_entry.items():
            await self._entries[ident].mark_live(ids, end)

    def pending(self, state: RoutingState, consumer: GroupConsumer) -> bool:
        """Whether an owned partition has replay work (no I/O)."""
        return bool(self._work(state, consumer))

    def _work(self, state: RoutingState, consumer: GroupConsumer) -> list[tuple[Replay, int]]:
        assigned = consumer.assignment()
        done_here = self._done
        busy = self._busy.waiting(time.monotonic())
        return [
            (replay, partition)
            for replay in state.replays.values()
            for partition in replay_partitions_with_work(
                replay, assigned, {p for r, p in done_here if r == replay.replay_id}
            )
            if (replay.replay_id, partition) not in busy
        ]

    async def step(
        self,
        state: RoutingState,
        consumer: GroupConsumer,
        processor: WindowProcessor,
        budget_secs: float,
    ) -> None:
        """One bounded step of one (replay, partition), round-robin over those with work."""
        work = self._work(state, consumer)
        if not work:
            return
        replay, partition = work[self._next % len(work)]
        self._next += 1
        ident = (replay.replay_id, partition)
        try:
            entry = self._entries.get(ident) or await self._open(replay, partition, consumer)
            await entry.step(processor, budget_secs)
        except StateBusy as exc:
            self._busy.held(ident, exc, time.monotonic())
            return
        except BrokerUnavailable as exc:
            log.warning("replay step stopped, Kafka unreachable (%s); redone later", exc)
            await self._release([ident])
            return
        except RetryWindow as exc:
            log.error("replay step failed (%s); it is redone from its checkpoint", exc)
            await self._release([ident])
            return
        except ModelLoadError as exc:
            # Only a migration target can fail to load here; the live path fails that
            # migration, the model leaves the write set and the replay is abandoned.
            log.error("replay %s: %s", replay.replay_id, exc)
            return
        if entry.phase is Phase.DONE:
            log.info("replay %s partition %d: done", replay.replay_id, partition)
            self._done.add(ident)
            self._entries.pop(ident, None)
            store = self.store
            if store is not None:
                name = state_name(replay.replay_id)
                await anyio.to_thread.run_sync(
                    lambda: store.partition(name, STATE_EPOCH, partition).drop()
                )

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: their next owner resumes from the log and its own state."""
        revoked = set(partitions)
        for ident in [i for i in self._entries if i[1] in revoked]:
            self._entries.pop(ident)
            self._busy.cleared(ident)
            if self.store is not None:
                self.store.release(state_name(ident[0]), STATE_EPOCH, ident[1])
        self._done = {i for i in self._done if i[1] not in revoked}

    async def _open(
        self, replay: Replay, partition: int, consumer: GroupConsumer
    ) -> PartitionBackfill:
        store = self.store
        if store is None:
            raise RuntimeError("the replay worker has no key store yet")
        name = state_name(replay.replay_id)
        keys = await anyio.to_thread.run_sync(store.partition, name, STATE_EPOCH, partition)
        self._busy.cleared((replay.replay_id, partition))
        if partition not in consumer.assignment():
            # Revoked while the state was opening (`forget` already ran): let it go.
            store.release(name, STATE_EPOCH, partition)
            raise CommitFailed(f"partition {partition} was revoked while its state opened")
        self._holding.add(replay.replay_id)
        entry = PartitionBackfill(
            self._config,
            replay_range(replay, partition),
            keys,
            position=await consumer.position(partition),
            reader=self._reader,
            control=self._control,
            stats=self._stats,
            rate=self._rate,
            transactions=self._transactions,
        )
        self._entries[replay.replay_id, partition] = entry
        return entry

    async def _release(self, idents: Iterable[tuple[str, int]]) -> None:
        store = self.store
        for replay_id, partition in list(idents):
            self._entries.pop((replay_id, partition), None)
            if store is not None:
                name = state_name(replay_id)
                await anyio.to_thread.run_sync(store.release, name, STATE_EPOCH, partition)

    async def _drop_finished(self, state: RoutingState) -> None:
        """Delete the on-disk state of replays that are over (once at start: all of them)."""
        store = self.store
        if store is None:
            return
        over = {
            replay_id
            for replay_id, replay in state.replays.items()
            if replay.state is not ReplayState.IN_PROGRESS
        }
        candidates = over if not self._swept else over & self._holding
        self._swept = True
        for replay_id in candidates:
            await self._release([i for i in self._entries if i[0] == replay_id])
            await anyio.to_thread.run_sync(store.drop_migration, state_name(replay_id))
            self._holding.discard(replay_id)
            self._done = {i for i in self._done if i[0] != replay_id}
