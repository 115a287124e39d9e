"""The live path: consume -> route -> embed -> produce -> commit, with migration work between.

One window at a time: a window is closed by size (`batching.window_atoms`) or
`batching.max_wait_ms` after its first atom arrived (`core.windows.window_deadline`). Its
routing is the control plane's state synced *after* the fetch, so a command appended
during the fetch already applies to it. Offsets are committed (`offset + 1`) only after
every output and dead letter of the window is acknowledged (`Offsets`). Between windows
the migration worker records handoffs and runs backfill batches. While a window runs, the
next one is fetched, decoded and tokenized beside it (`Lookahead`; at-least-once mode, when
backfill has no work); it is written only in its own turn.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import anyio
from anyio.abc import TaskGroup

from schemas.routing import MigrationState
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import RoutingState
from stream.core.scheduler import RateEstimate, ShareScheduler, Step, chunk_atoms
from stream.core.windows import partition_write_models
from stream.errors import (
    BrokerUnavailable,
    CommitFailed,
    ProducerFencedError,
    TargetFailing,
)
from stream.kafka.consumer import GroupConsumer
from stream.processor.backfill import MigrationWorker
from stream.processor.commits import Offsets
from stream.processor.control import ControlPlane
from stream.processor.fetching import WindowFetch
from stream.processor.lookahead import Ahead, Lookahead
from stream.processor.prepared import PreparedWindow
from stream.processor.rebalance import Rebalance
from stream.processor.sensors import Sensor
from stream.processor.stages import wall
from stream.processor.transactions import PartitionTransactions
from stream.processor.window import RetryWindow, WindowProcessor
from stream.processor.window_transactions import WindowTransactions

log = logging.getLogger(__name__)

INITIAL_BACKOFF_SECS = 0.5
MAX_RETRY_BACKOFF_SECS = 30.0
MIN_WINDOW_ATOMS = 16  # a live window bounded for backfill's share still batches this many
INITIAL_LIVE_SECS_PER_ATOM = 0.005


class LiveConsumer:
    """The consumer-group loop around `WindowProcessor`."""

    def __init__(
        self,
        config: Config,
        consumer: GroupConsumer,
        processor: WindowProcessor,
        control: ControlPlane,
        migration: MigrationWorker,
        sensor: Sensor,
        *,
        transactions: PartitionTransactions | None = None,
    ) -> None:
        """`transactions` (exactly-once mode): each window's outputs, dead letters and input
        offsets are committed in one transaction per input partition."""
        self._config = config
        self._transactions = transactions
        self._consumer = consumer
        self._processor = processor
        self._control = control
        self._migration = migration
        self._sensor = sensor
        self.offsets = Offsets(consumer, sensor)
        self._eos = WindowTransactions(transactions, consumer, self.offsets)
        self.rebalance = Rebalance(
            migration,
            self.offsets,
            sensor,
            max_wait=config.kafka.max_poll_interval_ms / 2000,
            transactions=transactions,
            consumer=consumer,
        )
        self._fetch = WindowFetch(consumer, config.batching, processor.stats.stages)
        self._max_wait_secs = config.batching.max_wait_ms / 1000
        self._scheduler = ShareScheduler(
            config.backfill.min_share, config.batching.backfill_chunk_ms / 1000
        )
        self._live_rate = RateEstimate(INITIAL_LIVE_SECS_PER_ATOM)
        self._backoff = INITIAL_BACKOFF_SECS
        self._window_generation = 0  # the rebalance generation of the window's fetch
        # Why every partition must be read again from the committed offsets before the next
        # fetch (a window that failed spanned a rebalance, see `_rewind`; or one did during
        # the fetch or the lookahead), or None.
        self._resume_needed: str | None = None
        # The next window, fetched and prepared beside this one (at-least-once, no backfill
        # work: see `stream.processor.lookahead`).
        self.ahead = Lookahead(consumer)
        self._overlap = config.batching.overlap_windows and transactions is None

    async def run(self, stop: anyio.Event) -> None:
        """Process windows until `stop` is set; the window in flight is finished first.

        Each turn, the scheduler picks a live window or a backfill step: while both have
        work they alternate (a live window waits at most one chunk, a long one after a chunk
        is followed by one more, and live is capped so that backfill gets at least
        `[backfill] min_share` of model time).
        """
        self._consumer.subscribe(self.rebalance)
        async with anyio.create_task_group() as tasks:
            await self._loop(stop, tasks)

    async def _loop(self, stop: anyio.Event, tasks: TaskGroup) -> None:
        fetched_nothing = False
        while not stop.is_set():
            # Before anything reads the positions (a fetch, a handoff, a backfill step).
            if self._resume_needed is not None and not await self._resume_from_committed():
                continue
            pending = self._migration.pending(self._control.state, self._consumer)
            # Backfill reads the positions: the window held ahead is given back first.
            if (
                pending
                and self.ahead.held
                and not self.ahead.give_back(await self.rebalance.settled())
            ):
                self._resume_needed = "a rebalance ran since the lookahead"
                continue
            # A live turn that found nothing buffered lets backfill run before the next look;
            # and live looks at least every `max_wait_ms` whatever the high-water marks say
            # (they come with background fetches and can lag behind the log).
            overdue = time.monotonic() - self._fetch.fetched_at > self._max_wait_secs
            waiting = (
                self.ahead.held
                or overdue
                or (not fetched_nothing and await self.offsets.live_waiting())
            )
            decision = self._scheduler.next_step(live_waiting=waiting, backfill_pending=pending)
            if decision.step is Step.BACKFILL and decision.budget_secs is not None:
                await self._backfill_step(decision.budget_secs)
                fetched_nothing = False  # records may have arrived during the step: look again
                continue
            window_atoms = self._config.batching.window_atoms
            if decision.budget_secs is not None:  # leave backfill its share: bound the window
                window_atoms = chunk_atoms(
                    decision.budget_secs,
                    self._live_rate.secs_per_unit,
                    min_atoms=min(MIN_WINDOW_ATOMS, window_atoms),
                    max_atoms=window_atoms,
                )
            generation = await self.rebalance.settled()
            self._window_generation = generation
            ahead = self.ahead.take()
            prepared: PreparedWindow | None = None
            if ahead is None:
                records = await self._fetch.window(stop, window_atoms, wait=not pending)
                fetched_in = generation
            else:
                records, fetched_in, prepared = ahead.records, ahead.generation, ahead.prepared
            if self.rebalance.generation != fetched_in:
                # A rebalance ran during the fetch: some records may belong to partitions
                # now owned elsewhere (their new owner writes newer versions meanwhile), and
                # the rest may predate the committed offsets it repositioned to. Drop them
                # and read again from what is committed now (none of them was processed),
                # once the rebalance is done: in exactly-once mode `on_assigned` first waits
                # for the previous owners' transactions, and a committed offset read before
                # that can be one window old (EndTxn returns before its markers are written).
                self._resume_needed = f"a rebalance ran during the fetch ({len(records)} records)"
                continue
            records = self.offsets.drop_done(records)
            fetched_nothing = pending and not records
            overlap = self._overlap and not pending and not stop.is_set()
            with self.rebalance.window():
                try:
                    await self._live_window(
                        records, prepared, lookahead=(tasks, stop) if overlap else None
                    )
                except CommitFailed as exc:
                    # Uncommitted: the partition's new owner processes these records again.
                    log.warning("a partition moved during the window: %s", exc)
                except BrokerUnavailable as exc:
                    # An outage: the window is redone once Kafka answers.
                    log.warning("Kafka unreachable during a window (%s); redone", exc)
                    await self._eos.abort(records)
                    self._rewind(records)
                    await self._back_off()
                except ProducerFencedError as exc:
                    # A zombie: the partitions' new owner fenced this instance's producers.
                    log.error("exactly-once: %s; this instance no longer owns them", exc)
                    await self._eos.fenced({r.partition for r in records})
                    self._rewind(records)
                    await self._back_off()  # until the group rejoins and says who owns what

    async def _live_window(
        self,
        records: Sequence[SourceRecord],
        prepared: PreparedWindow | None,
        *,
        lookahead: tuple[TaskGroup, anyio.Event] | None,
    ) -> None:
        """One window, with the next one fetched and prepared beside it (`lookahead`: the
        task group it runs in, and the stop event)."""
        state = await self._control.sync()
        state = await self._migration.before_window(state, self._consumer, records)
        if not records:
            return
        state = await self._migration.check_target(state, self._processor)
        started = False
        if lookahead is not None:
            tasks, stop = lookahead
            started = await self.ahead.start(
                tasks, self.rebalance.generation, lambda: self._fetch_ahead(stop)
            )
        try:
            try:
                await self._embed_and_commit(state, records, prepared)
            except BaseException:
                if started:
                    with anyio.CancelScope(shield=True):
                        if not await self.ahead.abandon(self.rebalance.generation):
                            self._resume_needed = "a rebalance ran since the lookahead"
                raise
            await self.ahead.finish()
        except RetryWindow as exc:
            log.error("%s; retrying the window in %.1fs", exc, self._backoff)
            await self._eos.abort(records)
            self._rewind(records)
            await self._back_off()

    async def _fetch_ahead(self, stop: anyio.Event) -> Ahead | None:
        """The next window (by the usual rules: full, or `max_wait_ms` after its first
        record, without waiting for a first one), decoded and tokenized."""
        generation = self.rebalance.generation
        records = await self._fetch.window(stop, self._config.batching.window_atoms, wait=False)
        if not records:
            return None
        writes = self._control.state.routing_config().write_models
        prepared = await self._processor.prepare(records, writes)
        return Ahead(records=records, generation=generation, prepared=prepared)

    async def _resume_from_committed(self) -> bool:
        """Read every owned partition again from the committed offsets (`_resume_needed`
        says why), once the rebalance is done; any window held ahead is dropped (its records
        come again). False while Kafka is unreachable: the caller backs off and asks again,
        and nothing reads the stale positions meanwhile."""
        await self.rebalance.settled()
        self.ahead.drop()
        try:
            found = await self.offsets.resume_from_committed(self._consumer.assignment())
        except BrokerUnavailable as exc:
            log.warning(
                "%s; reading from the committed offsets waits for Kafka: %s",
                self._resume_needed,
                exc,
            )
            await self._back_off()
            return False
        log.info("%s: reading again from the committed offsets %s", self._resume_needed, found)
        self._resume_needed = None
        return True

    async def _embed_and_commit(
        self, state: RoutingState, records: Sequence[SourceRecord], prepared: PreparedWindow | None
    ) -> None:
        began = time.perf_counter()
        try:
            await self._process(state, records, prepared=prepared)
        except TargetFailing as exc:
            # The target fails the migration, not the fleet: the window again, without it
            # (outputs the source already published are written once more: at-least-once;
            # in exactly-once mode they are aborted first).
            state = await self._migration.fail_target(state, str(exc))
            await self._eos.abort(records)
            await self._process(state, records, fail_fast=False, prepared=prepared)
        self._backoff = INITIAL_BACKOFF_SECS
        if self._transactions is None:
            with wall(self._processor.stats.stages, "commit"):
                await self.offsets.commit(records)
        else:
            with wall(self._processor.stats.stages, "commit"):
                self._rewind(await self._eos.commit(records))
        await self._migration.after_window(state, records)
        seconds = time.perf_counter() - began
        log.debug("live window: %d records in %.3fs", len(records), seconds)
        self._sensor.on_window(seconds)
        self._scheduler.record_live(seconds, time.monotonic())
        self._live_rate.observe(len(records), seconds)

    def _rewind(self, records: Sequence[SourceRecord]) -> None:
        """Read a failed window's records again. If a rebalance ran since they were fetched,
        the rebalance reset the positions and another owner may have committed past them
        meanwhile (a zombie's window): reading resumes from the committed offsets instead,
        before the next fetch."""
        if self.rebalance.generation != self._window_generation:
            self._resume_needed = "a window that failed spanned a rebalance"
            return
        self.offsets.rewind(records)

    async def _back_off(self) -> None:
        """Wait before redoing a window; the wait doubles until a window succeeds."""
        await anyio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, MAX_RETRY_BACKOFF_SECS)

    async def _process(
        self,
        state: RoutingState,
        records: Sequence[SourceRecord],
        *,
        fail_fast: bool = True,
        prepared: PreparedWindow | None = None,
    ) -> None:
        """Embed each partition's records with that partition's write models.

        With `fail_fast`, a migration target in progress that keeps failing raises
        `TargetFailing`; otherwise its failures are dead letters for it alone.
        """
        migration = state.active
        routing = state.routing_config()
        writes = routing.write_models
        groups: dict[tuple[str, ...], list[SourceRecord]] = defaultdict(list)
        for record in records:
            groups[partition_write_models(writes, migration, record.partition)].append(record)
        migration_id = migration.migration_id if migration else None
        target = None
        if (
            fail_fast
            and migration is not None
            and migration.state is MigrationState.IN_PROGRESS
            and migration.target != migration.source
        ):
            target = migration.target
        producer_for = None
        if self._transactions is not None:
            transactions = self._transactions
            producers = {
                p: await transactions.begin(p) for p in sorted({r.partition for r in records})
            }
            producer_for = producers.__getitem__
        if len(groups) > 1:  # prepared for the whole window, not for a part of it
            prepared = None
        for models, group in groups.items():
            await self._processor.process(
                group,
                models,
                migration_id,
                target=target,
                first=routing.query_model,
                producer_for=producer_for,
                prepared=prepared,
            )

    async def _backfill_step(self, budget_secs: float) -> None:
        """One bounded backfill step; it counts as in flight for a rebalance like a window.

        Never between a revocation and the next assignment: the client still reports the
        revoked partitions as assigned then, and a step on one of them would write backfill
        beside its new owner's live writes (an older version last in the log).
        """
        began = time.perf_counter()
        generation = await self.rebalance.settled()
        try:
            # Outside the window: a rejoin that this refusal starts must not wait for it.
            # (Exactly-once needs no such check: a zombie's producer is fenced instead.)
            if self._transactions is None:
                await self.offsets.confirm_membership()
        except CommitFailed as exc:
            log.warning("not a group member any more; backfill waits for the rejoin: %s", exc)
            await anyio.sleep(self._backoff)  # the rejoin runs meanwhile (in the client)
            return
        with self.rebalance.window():
            if self.rebalance.generation != generation:
                return  # a rebalance started meanwhile: the next turn looks again
            state = await self._control.sync()
            try:
                await self._migration.step(state, self._consumer, self._processor, budget_secs)
            except CommitFailed as exc:  # its new owner resumes from the checkpoint
                log.info("a partition moved during a backfill step: %s", exc)
            except ProducerFencedError as exc:  # exactly-once: the chunk's producer was fenced
                log.error("exactly-once: backfill step: %s; this instance no longer owns it", exc)
                await self._eos.fenced(list(self._consumer.assignment()))
        seconds = time.perf_counter() - began
        log.debug("backfill step: %.3fs (budget %.3fs)", seconds, budget_secs)
        self._sensor.on_backfill_step(seconds)
        self._scheduler.record_backfill(seconds, time.monotonic())
