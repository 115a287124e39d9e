"""The live path: consume -> route -> embed -> produce -> commit, with migration work between.

One window at a time: a window is closed by size (`batching.window_atoms`) or
`batching.max_wait_ms` after its first atom arrived (`core.windows.window_deadline`). Its
routing is the control plane's state synced *after* the fetch, so a command appended
during the fetch already applies to it. Offsets are committed (`offset + 1`) only after
every output and dead letter of the window is acknowledged (`Offsets`). Between windows
the migration worker records handoffs and runs backfill batches.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import anyio

from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import RoutingState
from stream.core.windows import partition_write_models, window_deadline
from stream.kafka.consumer import GroupConsumer
from stream.processor.backfill import MigrationWorker
from stream.processor.commits import Offsets
from stream.processor.control import ControlPlane
from stream.processor.rebalance import Rebalance
from stream.processor.sensors import Sensor
from stream.processor.window import RetryWindow, WindowProcessor

log = logging.getLogger(__name__)

MAX_RETRY_BACKOFF_SECS = 30.0


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
    ) -> None:
        self._config = config
        self._consumer = consumer
        self._processor = processor
        self._control = control
        self._migration = migration
        self._sensor = sensor
        self.offsets = Offsets(consumer, sensor)
        self.rebalance = Rebalance(
            migration, self.offsets, sensor, max_wait=config.kafka.max_poll_interval_ms / 2000
        )
        self._fetched_at = time.monotonic()  # when the last window's fetch ended

    async def run(self, stop: anyio.Event) -> None:
        """Process windows until `stop` is set; the window in flight is finished first."""
        self._consumer.subscribe(self.rebalance)
        backoff = 0.5
        while not stop.is_set():
            records = await self._fetch_window(stop)
            with self.rebalance.window():
                state = await self._control.sync()
                state = await self._migration.before_window(state, self._consumer, records)
                if records:
                    began = time.monotonic()
                    try:
                        await self._process(state, records)
                    except RetryWindow as exc:
                        log.error("%s; retrying the window in %.1fs", exc, backoff)
                        self.offsets.rewind(records)
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, MAX_RETRY_BACKOFF_SECS)
                        continue
                    backoff = 0.5
                    await self.offsets.commit(records)
                    self._sensor.on_window(time.monotonic() - began)
                    self._migration.after_window(state, records)
                if not stop.is_set():
                    await self._backfill_step()

    async def _process(self, state: RoutingState, records: Sequence[SourceRecord]) -> None:
        """Embed each partition's records with that partition's write models."""
        migration = state.active
        writes = state.routing_config().write_models
        groups: dict[tuple[str, ...], list[SourceRecord]] = defaultdict(list)
        for record in records:
            groups[partition_write_models(writes, migration, record.partition)].append(record)
        migration_id = migration.migration_id if migration else None
        for models, group in groups.items():
            await self._processor.process(group, models, migration_id)

    async def _backfill_step(self) -> None:
        try:
            await self._migration.step(
                await self._control.sync(),
                self._consumer,
                self._processor,
                self.offsets.live_waiting,
            )
        except RetryWindow as exc:
            log.error("backfill batch failed (%s); it is redone from its checkpoint", exc)
            self._migration.forget(self._consumer.assignment())

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
            before = len(records)
            records.extend(
                await self._consumer.fetch(
                    timeout_ms=timeout_ms, max_records=batching.window_atoms - len(records)
                )
            )
            if records and deadline is None:
                now = time.monotonic()
                deadline = window_deadline(
                    now=now,
                    wall_now=time.time(),
                    stamps_ms=[r.timestamp_ms for r in records],
                    since_last_fetch=now - self._fetched_at,
                    max_wait_secs=batching.max_wait_ms / 1000,
                )
            elif timeout_ms == 0 and len(records) == before:
                break  # the deadline has passed and the buffer is drained
            if not records:
                break
        self._fetched_at = time.monotonic()
        return records
