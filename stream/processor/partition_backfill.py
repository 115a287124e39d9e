"""One owned partition's backfill of one range, in bounded steps: a migration epoch's
history, or a replay (`BackfillRange` says which).

Phases, each resumable from the partition's key store (`stream/state`):
1. **keys**: a keys-only pass over [start, end) records each key's latest version and
   whether it is a delete (no model time);
2. **tail**: marks the keys written in [end, position) as live: what earlier owners (or
   this one before a restart) wrote live since the handoff, and for a replay whose range
   ends before its handoff, the events between the two, which the live path wrote already
   (streamed, never loaded whole);
3. **emit**: [cursor, end) is read in order; only each key's latest version that no live
   write followed is embedded (deletes become tombstones, superseded versions cost nothing).
For a migration `end` is the handoff; for a replay `min(to, handoff)`.
The live owner runs these steps between its live windows, in the same task that marks the
keys it writes live, so a backfill record is never produced after a live record of the
same key (G4).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio

from schemas.atoms import InvalidAtom, decode_atom
from schemas.control import BackfillProgress, ControlEvent
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import Migration
from stream.core.scheduler import RateEstimate, chunk_prefix
from stream.kafka.reader import PartitionReader
from stream.processor.control import ControlPlane
from stream.processor.sensors import ProcessorStats
from stream.processor.transactions import PartitionTransactions
from stream.processor.window import WindowProcessor
from stream.state.keypass import key_events
from stream.state.keystore import KEYS, LIVE, PartitionKeys, Verdict

log = logging.getLogger(__name__)

# Records read per step of the model-free phases (keys pass, tail): one bounded fetch-sized
# read, so a live window waits at most milliseconds behind one.
SCAN_RECORDS = 2000
# Records read per emission step; the model budget then decides how many are embedded.
EMIT_READ_RECORDS = 500
INITIAL_SECS_PER_BYTE = 1 / 20_000
# A chunk embeds at least this many atoms, whatever its budget: at 10 ms an atom (MiniLM on
# 2 cores) a 100 ms chunk would hold 8, passes too small to batch well (as MIN_WINDOW_ATOMS
# does for a live window capped for backfill's share).
MIN_CHUNK_ATOMS = 16


class Phase(enum.Enum):
    """Where a partition's backfill stands."""

    KEYS = "keys"
    TAIL = "tail"
    EMIT = "emit"
    DONE = "done"


# (offset, processed, total) -> the control event that checkpoints them.
ProgressEvent = Callable[[int, int | None, int | None], ControlEvent]


@dataclass(frozen=True, slots=True)
class BackfillRange:
    """What one partition's backfill covers and where its progress goes."""

    name: str
    """For log lines: `migration m1`, `replay r1`."""
    model: str
    """The model whose topic gets the records."""
    migration_id: str | None
    """On the output records (None for a replay)."""
    partition: int
    start: int
    """The first offset read (the log start, or a replay's range start)."""
    end: int
    """Keys pass and emission stop here (exclusive)."""
    handoff: int
    """The live path writes the model from here on; its writes win."""
    reached: int
    """Emission progress the control log recorded (a new owner resumes there)."""
    emitted: int
    """Atoms the control log says were embedded."""
    progress: ProgressEvent


def migration_range(migration: Migration, partition: int) -> BackfillRange:
    """The backfill of `partition` for the migration's current epoch: [log start, handoff)."""
    log_start = migration.log_starts[partition]
    counts = migration.counts.get(partition)

    def progress(offset: int, processed: int | None, total: int | None) -> ControlEvent:
        return BackfillProgress(
            migration_id=migration.migration_id,
            epoch=migration.epoch,
            partition=partition,
            offset=offset,
            processed=processed,
            total=total,
        )

    return BackfillRange(
        name=f"migration {migration.migration_id}",
        model=migration.target,
        migration_id=migration.migration_id,
        partition=partition,
        start=log_start,
        end=migration.handoffs[partition],
        handoff=migration.handoffs[partition],
        reached=migration.backfilled.get(partition, log_start),
        emitted=counts[0] if counts else 0,
        progress=progress,
    )


class PartitionBackfill:
    """The backfill of one partition this instance owns."""

    def __init__(
        self,
        config: Config,
        work: BackfillRange,
        keys: PartitionKeys,
        *,
        position: int,
        reader: PartitionReader,
        control: ControlPlane,
        stats: ProcessorStats,
        rate: RateEstimate,
        transactions: PartitionTransactions | None = None,
    ) -> None:
        """`transactions` (exactly-once mode): each emission chunk and its progress record
        commit in one transaction, so a crash neither skips nor repeats a chunk."""
        self._config = config
        self._transactions = transactions
        self._work = work
        self.partition = work.partition
        self._keys = keys
        self._reader = reader
        self._control = control
        self._stats = stats
        self._rate = rate
        self.handoff = work.handoff
        self._log_start = work.start
        self._end = work.end
        self._tail_end = max(position, self.handoff)  # earlier owners wrote [handoff, here)
        self._checkpointed_at = 0.0
        self._ahead: list[SourceRecord] = []
        if keys.checkpoint(KEYS) is None and work.reached > self._log_start:
            # An empty state (a new volume): what the control log says was done stays done.
            keys.restore_emitted(min(work.reached, self._end), work.emitted)
        elif transactions is not None and work.reached > keys.counts().cursor:
            # Exactly-once: a chunk committed with its progress, then a crash before the
            # store moved on. The committed progress is the truth: never emit it twice.
            counts = keys.counts()
            keys.advance_emitted(
                min(work.reached, self._end), max(0, work.emitted - counts.emitted)
            )
        log.info(
            "backfill %s partition %d: %s; keys pass at %d of [%d, %d), emission at %d",
            work.name,
            self.partition,
            "resuming from the key store" if keys.checkpoint(KEYS) is not None else "no key state",
            self._keys_reached(),
            self._log_start,
            self._end,
            self._cursor(),
        )

    @property
    def phase(self) -> Phase:
        """The next kind of step this partition needs."""
        if self._keys_reached() < self._end:
            return Phase.KEYS
        if self._tail_reached() < self._tail_end:
            return Phase.TAIL
        if self._cursor() < self._end:
            return Phase.EMIT
        return Phase.DONE

    async def step(self, processor: WindowProcessor, budget_secs: float) -> None:
        """One bounded unit of work: a keys-pass or tail read, or one emission chunk."""
        phase = self.phase
        if phase is Phase.KEYS:
            await self._keys_step()
        elif phase is Phase.TAIL:
            await self._tail_step()
        elif phase is Phase.EMIT:
            await self._emit_step(processor, budget_secs)
        if phase is not Phase.DONE and self.phase is Phase.DONE:
            await self._checkpoint(force=True)

    async def mark_live(self, atom_ids: Iterable[str], window_end: int) -> None:
        """Keys the live path wrote at or after the handoff (before the next backfill step)."""
        ids = list(atom_ids)
        # The LIVE checkpoint means "every live key below it is marked": only once the tail
        # of earlier owners is marked too.
        checkpoint = window_end if self._tail_reached() >= self._tail_end else None
        await anyio.to_thread.run_sync(lambda: self._keys.mark_live(ids, checkpoint=checkpoint))

    def _keys_reached(self) -> int:
        return max(self._keys.checkpoint(KEYS) or self._log_start, self._log_start)

    def _tail_reached(self) -> int:
        return max(self._keys.checkpoint(LIVE) or self._end, self._end)

    def _cursor(self) -> int:
        return max(self._keys.counts().cursor, self._log_start)

    async def _keys_step(self) -> None:
        start = self._keys_reached()
        end = min(start + SCAN_RECORDS, self._end)
        records = await self._read(start, end)
        limit = self._config.limits.max_event_bytes
        await anyio.to_thread.run_sync(
            lambda: self._keys.record_history(
                key_events(records, max_event_bytes=limit), checkpoint=end
            )
        )
        if end >= self._end:
            counts = self._keys.counts()
            log.info(
                "backfill %s partition %d: keys pass done, %d keys, %d to embed",
                self._work.name,
                self.partition,
                counts.keys,
                counts.total,
            )
            await self._checkpoint(force=True)

    async def _tail_step(self) -> None:
        start = self._tail_reached()
        end = min(start + SCAN_RECORDS, self._tail_end)
        records = await self._read(start, end)
        ids = [a for r in records if (a := atom_id_of(r, self._config)) is not None]

        def mark() -> None:
            self._keys.mark_live(ids)
            self._keys.set_checkpoint(LIVE, end)

        await anyio.to_thread.run_sync(mark)

    async def _emit_step(self, processor: WindowProcessor, budget_secs: float) -> None:
        began = time.perf_counter()
        start = self._cursor()
        # Read ahead once, embed as much as the budget allows, keep the rest for the next
        # step (verdicts are taken anew each step: a live write in between wins).
        ahead = [r for r in self._ahead if r.offset >= start]
        end = ahead[-1].offset + 1 if ahead else start
        # Top the read-ahead up when what is left of it would not fill the budget: a chunk
        # cut short by the end of a read pays a step's fixed costs for a few atoms.
        buffered = sum(len(r.value or b"") for r in ahead) * self._rate.secs_per_unit
        if end < self._end and (not ahead or buffered < budget_secs):
            more = min(end + EMIT_READ_RECORDS, self._end)
            ahead += await self._read(end, more)
            end = more
        records = ahead
        decoded = [(r, atom_id_of(r, self._config)) for r in records]
        valid = [(r, atom_id) for r, atom_id in decoded if atom_id is not None]
        verdicts = await anyio.to_thread.run_sync(
            lambda: self._keys.verdicts([(atom_id, r.offset) for r, atom_id in valid])
        )
        chosen = [
            (r, v) for (r, _), v in zip(valid, verdicts, strict=True) if v is not Verdict.SKIP
        ]
        embeds = [r for r, v in chosen if v is Verdict.EMBED]
        fits = chunk_prefix(
            [len(r.value or b"") for r in embeds],
            budget_secs,
            secs_per_byte=self._rate.secs_per_unit,
            min_atoms=min(MIN_CHUNK_ATOMS, self._config.batching.window_atoms),
            max_atoms=self._config.batching.window_atoms,
        )
        reached = end if fits == len(embeds) else embeds[fits].offset
        batch = [r for r, _ in chosen if r.offset < reached]
        embedded_count = sum(1 for r in embeds if r.offset < reached)
        committed = False
        if batch:
            target = self._work.model
            model_secs = self._stats.embed_seconds[target]
            # Only a migration's target can fail its migration (a replay's model has none).
            failing = target if self._work.migration_id is not None else None
            if self._transactions is None:
                await processor.process(
                    batch, (target,), self._work.migration_id, path="backfill", target=failing
                )
            else:
                await self._emit_transaction(processor, batch, failing, reached, embedded_count)
                committed = True
            # The rate is the step's wall time so far (read, verdicts, tokenize, model,
            # encode, produce and acks), not the model's alone: a live window waits for the
            # whole step, so a budget buys the atoms a whole step can take in it.
            elapsed = time.perf_counter() - began
            spent = self._stats.embed_seconds[target] - model_secs
            embedded = [r for r in embeds if r.offset < reached]
            estimate = self._rate.secs_per_unit
            self._rate.observe(sum(len(r.value or b"") for r in embedded), elapsed)
            log.debug(
                "backfill step %s/%d: %d records read, %d to embed, %d embedded in %.3fs "
                "(%.3fs of model time; budget %.3fs at %.2e s/byte)",
                self._work.name,
                self.partition,
                len(records),
                len(embeds),
                embedded_count,
                elapsed,
                spent,
                budget_secs,
                estimate,
            )
        await anyio.to_thread.run_sync(lambda: self._keys.advance_emitted(reached, embedded_count))
        self._ahead = [r for r in records if r.offset >= reached]
        self._stats.backfilled_events += sum(1 for r in records if r.offset < reached)
        if committed:  # its progress went with its outputs
            self._checkpointed_at = time.monotonic()
            if reached < self._end:
                return
        await self._checkpoint(force=reached >= self._end)

    async def _emit_transaction(
        self,
        processor: WindowProcessor,
        batch: list[SourceRecord],
        failing: str | None,
        reached: int,
        embedded: int,
    ) -> None:
        """Exactly-once: the chunk's outputs and its progress record in one transaction."""
        assert self._transactions is not None
        producer = await self._transactions.begin(self.partition)
        try:
            await processor.process(
                batch,
                (self._work.model,),
                self._work.migration_id,
                path="backfill",
                target=failing,
                producer_for=lambda _: producer,
            )
            progress = self._progress(reached, self._keys.counts().emitted + embedded)
            await self._control.append(progress, producer=producer)
            await self._transactions.commit_outputs(self.partition)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._transactions.abort([self.partition])
            raise

    async def _checkpoint(self, *, force: bool = False) -> None:
        """Progress in the control log: at most once per `[backfill] checkpoint_interval_secs`,
        always at phase ends."""
        now = time.monotonic()
        if (
            not force
            and now - self._checkpointed_at < self._config.backfill.checkpoint_interval_secs
        ):
            return
        await self._control.append(self._progress(self._cursor(), self._keys.counts().emitted))
        self._checkpointed_at = now

    def _progress(self, cursor: int, emitted: int) -> ControlEvent:
        """The progress record for the cursor (processed and total once the keys are
        counted, unknown before)."""
        counted = self._keys_reached() >= self._end
        total = self._keys.counts().total if counted else None
        return self._work.progress(cursor, emitted if counted else None, total)

    async def _read(self, start: int, end: int) -> list[SourceRecord]:
        return await self._reader.read(self._config.topics.atoms, self.partition, start, end)


def atom_id_of(record: SourceRecord, config: Config) -> str | None:
    """The atom a record is about, or None when it is invalid (skipped by backfill)."""
    try:
        limit = config.limits.max_event_bytes
        return decode_atom(record.key, record.value, max_event_bytes=limit).atom_id
    except InvalidAtom:
        return None
