"""The control plane: replay the control log at start-up, tail it, append to it, publish status.

Every instance (and every CLI call) rebuilds the routing from the log, so all of them agree
(G5). The log's record times are the broker's (LogAppendTime). A start-up folds on from the
latest usable routing snapshot (`stream/core/snapshot.py` says why and when one is usable)
and replays only the records after it; processors write a snapshot every
`[control] snapshot_every` records. Without a usable snapshot the whole log is replayed, as
before snapshots existed, to the same state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import anyio
import msgspec

from schemas.control import ControlEvent, InternalEvent, ModelFingerprint, WindowClosed
from schemas.routing import MigrationState, RoutingStatus
from schemas.snapshot import RoutingSnapshot
from stream.config import Config
from stream.core.records import OutRecord, SourceRecord
from stream.core.routing import (
    RoutingState,
    apply,
    initial_state,
    reject,
    reject_malformed,
)
from stream.core.signing import Signer, TrustPolicy
from stream.core.snapshot import (
    FoldBasis,
    FoldPoint,
    latest_usable,
    snapshot_due,
    snapshot_of,
    state_of,
)
from stream.errors import BrokerUnavailable, LatticeError
from stream.kafka.control_log import ControlLog
from stream.kafka.producer import TransactionalProducer
from stream.processor.sensors import Sensor
from stream.processor.trust import load_trust

log = logging.getLogger(__name__)

ROUTING_KEY = b"routing"
# Snapshots read at start-up: several instances write them, so the newest record is not
# always the furthest; any usable one is exact, the furthest leaves the shortest tail.
SNAPSHOTS_READ = 16
_decoder = msgspec.json.Decoder(ControlEvent)
_snapshot_decoder = msgspec.json.Decoder(RoutingSnapshot)
_encoder = msgspec.json.Encoder()
OUTAGE_BACKOFF_SECS = 0.5  # first wait after a failed call while Kafka is unreachable
MAX_OUTAGE_BACKOFF_SECS = 10.0
# The offsets client answers "unreachable" after this long, not after the 40 s default, so
# readiness says so early in an outage.
OFFSETS_TIMEOUT_MS = 10_000
BROKER_CHECK_SECS = 5.0  # a tailing processor's reachability probe
# A tail's fetch returns after this long without records: it then moves past transaction
# markers (which are not records), so `sync` waits at most this long behind one.
TAIL_FETCH_MS = 200
T = TypeVar("T")


def record_time(timestamp_ms: int) -> datetime:
    """A Kafka record timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)


class ControlPlane:
    """The routing state, kept current from the control topic."""

    def __init__(
        self,
        config: Config,
        *,
        publish_status: bool = False,
        write_snapshots: bool | None = None,
        ride_outages: bool | None = None,
        sensor: Sensor | None = None,
        log: ControlLog | None = None,
    ) -> None:
        """`publish_status` and `write_snapshots` (default: as `publish_status`) are for
        processors; read-only users (CLI, serve) still start from snapshots.

        `ride_outages` (default: as `publish_status`; `serve` sets it too): while Kafka is
        unreachable, calls are retried with backoff instead of raising `BrokerUnavailable`,
        and `sensor` hears `on_broker(False)` then `on_broker(True)`. A CLI call raises.
        """
        self._config = config
        self._publish = publish_status
        self._write_snapshots = publish_status if write_snapshots is None else write_snapshots
        self._ride_outages = publish_status if ride_outages is None else ride_outages
        self._sensor = sensor or Sensor()
        self._down_since: float | None = None
        self._log = log or ControlLog(
            config.kafka, config.topics.control, offsets_timeout_ms=OFFSETS_TIMEOUT_MS
        )
        # The keys are read from their files on entering (off the event loop).
        self._signer: Signer | None = None
        self._trust = TrustPolicy()
        self._basis = FoldBasis(config.routing.stable_model, frozenset(config.models))
        self.state: RoutingState = initial_state(config.routing.stable_model, set(config.models))
        self._next_offset = 0
        self._last: tuple[int, int] | None = None  # offset and timestamp of the last record
        self._snapshot_offset = 0  # the offset the latest snapshot known covers up to
        self._changed = anyio.Event()
        self._published: RoutingStatus | None = None
        self.replayed = anyio.Event()
        self.folded_records = 0  # control records this instance folded (not from a snapshot)
        self.resumed_from: int | None = None  # the snapshot's offset a replay started from

    async def __aenter__(self) -> ControlPlane:
        self._signer, self._trust = await anyio.to_thread.run_sync(load_trust, self._config.control)
        self._basis = FoldBasis(
            self._basis.stable_model, self._basis.models, trust=self._trust.basis()
        )
        await self._log.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._log.__aexit__(*exc_info)

    async def replay(self) -> RoutingState:
        """Apply the log up to its end offset taken now (an empty fetch is not the end).

        A first replay starts from the latest usable snapshot when there is one.
        """
        end = await self._log.end_offset()
        if self._next_offset == 0 and self._config.control.snapshot_every > 0:
            await self._resume_from_snapshot(end)
        while self._next_offset < end:
            await self._fetch_and_apply(timeout_ms=1000)
        self.replayed.set()
        await self._snapshot_if_due()
        await self._publish_status()
        return self.state

    async def tail(self, *, close_windows: bool | None = None) -> None:
        """Apply records as they arrive, forever; a processor (`publish_status`) also closes
        the rollback window when it is due.

        Only processors append `window_closed`: a read-only follower (`status --watch`,
        `serve`, a test waiting for a phase) with a fast clock must not end the window early.
        """
        if close_windows is None:
            close_windows = self._publish
        async with anyio.create_task_group() as tasks:
            if close_windows:
                tasks.start_soon(self._close_window_when_due)
            if self._ride_outages:
                tasks.start_soon(self._watch_broker)
            while True:
                await self._ride(
                    "tail",
                    lambda: self._fetch_and_apply(timeout_ms=TAIL_FETCH_MS),
                    proves_reachable=False,
                )

    async def sync(self) -> RoutingState:
        """The state after every control record appended before this call was applied."""
        end = await self._ride("end offset", self._log.end_offset)
        while self._next_offset < end:
            await self._changed.wait()
        return self.state

    async def append(
        self, event: ControlEvent, *, producer: TransactionalProducer | None = None
    ) -> int:
        """Write an event to the control log; returns its offset once acknowledged.

        Retried through an outage (processors): every internal event folds the same when
        applied twice (a handoff or a checkpoint already recorded changes nothing, a
        second `migration_failed` is refused), so a retry after a lost acknowledgement is
        harmless. With `producer` (exactly-once backfill), the record goes in that
        producer's open transaction, seen once it commits.
        """
        value = _encoder.encode(event)
        headers = self._signer.headers(ROUTING_KEY, value) if self._signer else []
        if producer is not None:  # inside the caller's transaction: no retry here
            record = OutRecord(key=ROUTING_KEY, value=value, headers=headers)
            return await (await producer.send(self._config.topics.control, record, partition=0))
        return await self._ride(
            "append", lambda: self._log.append(ROUTING_KEY, value, headers=headers)
        )

    @property
    def broker_reachable(self) -> bool:
        """False while calls to Kafka are failing and being retried."""
        return self._down_since is None

    async def _watch_broker(self) -> None:
        """Ask for the log's end every `BROKER_CHECK_SECS`: whatever else blocks in an
        outage (a commit waits for the coordinator without a timeout), readiness follows."""
        while True:
            await self._ride("end offset", self._log.end_offset)
            await anyio.sleep(BROKER_CHECK_SECS)

    async def _ride(
        self, what: str, call: Callable[[], Awaitable[T]], *, proves_reachable: bool = True
    ) -> T:
        """`call()`, retried with backoff while Kafka is unreachable (if riding outages).

        `proves_reachable=False` for the tail's fetch: the client answers an empty fetch
        while the broker is down, so its success says nothing, and readiness would flap
        between the probe's failures (seen as /readyz 503 for moments only in an outage).
        """
        backoff = OUTAGE_BACKOFF_SECS
        while True:
            try:
                result = await call()
            except BrokerUnavailable as exc:
                if not self._ride_outages:
                    raise
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self._sensor.on_broker(False)
                    log.warning(
                        "control plane: %s failed, retrying until Kafka is back: %s", what, exc
                    )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, MAX_OUTAGE_BACKOFF_SECS)
                continue
            if proves_reachable and self._down_since is not None:
                log.info(
                    "control plane: Kafka reachable again after %.0fs",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
                self._sensor.on_broker(True)
            return result

    async def wait_applied(self, offset: int) -> RoutingState:
        """The state once the record at `offset`, or a later one, was applied (while tailing).

        `offset` may be no record at all (a transaction marker, or a record of an aborted
        transaction, in the exactly-once mode): then this waits for the next record, as a
        caller waiting for "whatever comes after offset N" expects.
        """
        while self.state.control_offset is None or self.state.control_offset < offset:
            await self._changed.wait()
        return self.state

    async def _fetch_and_apply(self, *, timeout_ms: int) -> None:
        await self._apply_records(await self._log.fetch(timeout_ms=timeout_ms))

    async def _apply_records(self, messages: list[SourceRecord]) -> None:
        for message in messages:
            self.state = self._fold(self.state, message)
            self._next_offset = message.offset + 1
            self._last = (message.offset, message.timestamp_ms or 0)
        self.folded_records += len(messages)
        if messages:
            # Past a transaction's marker too (exactly-once backfill writes its progress in
            # a transaction): otherwise `sync` would wait for the next, empty, fetch.
            self._next_offset = max(self._next_offset, await self._log.position())
            rejection = self.state.last_rejection
            last_at = record_time(messages[-1].timestamp_ms or 0)
            if rejection is not None and rejection.at == last_at:
                log.info("control: rejected %s: %s", rejection.command, rejection.reason)
            changed, self._changed = self._changed, anyio.Event()
            changed.set()
            if self.replayed.is_set():
                await self._snapshot_if_due()
                await self._publish_status()
        else:
            position = await self._log.position()
            if position > self._next_offset:  # transaction markers or compacted gaps
                self._next_offset = position
                changed, self._changed = self._changed, anyio.Event()
                changed.set()

    def _fold(self, state: RoutingState, message: SourceRecord) -> RoutingState:
        """One record applied: malformed or (with signatures required) untrusted records
        are rejections that change nothing else."""
        at = record_time(message.timestamp_ms or 0)
        value = message.value or b""
        try:
            value.decode("utf-8")  # msgspec skips unknown fields without checking them
            event = _decoder.decode(value)
        except UnicodeDecodeError as exc:
            return reject_malformed(state, message.offset, at, f"not UTF-8 (byte {exc.start})")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return reject_malformed(state, message.offset, at, str(exc))
        except RecursionError as exc:  # deep nesting, even in an ignored field
            return reject_malformed(state, message.offset, at, f"nests too deeply: {exc}")
        untrusted = self._trust.check(
            message.offset,
            message.key,
            message.value or b"",
            message.headers,
            internal=isinstance(event, InternalEvent | ModelFingerprint),
        )
        if untrusted is not None:
            return reject(state, event, message.offset, at, untrusted)
        return apply(state, event, message.offset, at)

    async def _resume_from_snapshot(self, end: int) -> None:
        """Start from the latest usable snapshot, once the log is seen to hold its last record.

        Any doubt (nothing usable, a record that differs: a recreated topic) leaves the fold
        at offset 0, so the whole log is replayed.
        """
        topic = self._config.topics.snapshots()
        try:
            records = await self._log.read_latest(topic, SNAPSHOTS_READ)
        except LatticeError as exc:  # an optimisation: never a reason not to start
            log.warning("routing snapshots on %s unreadable (%s); replaying the log", topic, exc)
            return
        snapshots: list[RoutingSnapshot] = []
        for record in records:
            try:
                snapshots.append(_snapshot_decoder.decode(record.value or b""))
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                log.warning("routing snapshot at offset %d ignored: %s", record.offset, exc)
        snapshot, skipped = latest_usable(
            snapshots, self._basis, control_topic=self._config.topics.control, end_offset=end
        )
        for reason in skipped:
            log.info("routing %s (ignored)", reason)
        if snapshot is None:
            return
        await self._log.seek(snapshot.last_offset)
        messages: list[SourceRecord] = []
        while not messages:  # the first fetch after a seek can come back empty
            messages = await self._log.fetch(timeout_ms=1000)
        first = messages[0]
        if (first.offset, first.timestamp_ms) != (snapshot.last_offset, snapshot.last_timestamp_ms):
            log.warning(
                "routing snapshot to offset %d does not match the control log (record %d at "
                "%s ms); replaying the whole log",
                snapshot.next_offset,
                first.offset,
                first.timestamp_ms,
            )
            await self._log.seek(0)
            return
        self.state = state_of(snapshot)
        self._next_offset = snapshot.next_offset
        self._last = (snapshot.last_offset, snapshot.last_timestamp_ms)
        self._snapshot_offset = snapshot.next_offset
        self.resumed_from = snapshot.next_offset
        await self._apply_records([m for m in messages if m.offset >= snapshot.next_offset])

    async def _snapshot_if_due(self) -> None:
        """A processor writes the fold every `[control] snapshot_every` records."""
        every = self._config.control.snapshot_every
        if self._write_snapshots and snapshot_due(self._next_offset, self._snapshot_offset, every):
            try:
                await self.write_snapshot()
            except LatticeError as exc:  # the log stays the truth; the next start folds more
                self._snapshot_offset = self._next_offset  # retried `every` records later
                log.warning("routing snapshot not written (%s)", exc)

    async def write_snapshot(self) -> int | None:
        """Write the current fold to the snapshots topic; returns the offset it covers up to
        (None before any record was folded: there is nothing to snapshot)."""
        if self._last is None:
            return None
        point = FoldPoint(self._next_offset, *self._last)
        snapshot = snapshot_of(
            self.state, self._basis, point, control_topic=self._config.topics.control
        )
        # Acknowledged: a snapshot every `snapshot_every` records can afford the round trip,
        # and a caller that stops next (or measures a restart) finds it on the topic.
        await self._log.publish(
            self._config.topics.snapshots(), ROUTING_KEY, _encoder.encode(snapshot), acked=True
        )
        self._snapshot_offset = self._next_offset
        log.debug("routing snapshot written to offset %d", self._next_offset)
        return self._next_offset

    async def _publish_status(self) -> None:
        if not self._publish:
            return
        status = self.state.status()
        comparable = msgspec.structs.replace(status, updated_at=None, control_offset=None)
        if comparable == self._published:
            return
        await self._log.publish(self._config.topics.routing, ROUTING_KEY, _encoder.encode(status))
        self._published = comparable  # after the send: a status lost to an outage goes again
        log.info(
            "routing: phase=%s query=%s write=%s state=%s progress=%s",
            status.phase,
            status.query_model,
            status.write_models,
            status.state,
            status.progress,
        )

    async def _close_window_when_due(self) -> None:
        """The first instance whose clock passes the window's end appends `window_closed`."""
        appended_for: str | None = None
        while True:
            migration = self.state.migration
            if (
                migration is not None
                and migration.state is MigrationState.COMPLETED
                and not migration.window_closed
                and migration.window_ends_at is not None
                and appended_for != migration.migration_id
            ):
                remaining = (migration.window_ends_at - datetime.now(UTC)).total_seconds()
                if remaining <= 0:
                    await self.append(WindowClosed(migration_id=migration.migration_id))
                    appended_for = migration.migration_id
                    continue
                with anyio.move_on_after(min(remaining, 5.0)):
                    await self._changed.wait()
            else:
                await self._changed.wait()
