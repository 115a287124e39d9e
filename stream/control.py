"""The control plane: replay the control log at start-up, tail it, append to it, publish status.

Every instance (and every CLI call) rebuilds the routing from the whole log, so all of them
agree (G5). The log's record times are the broker's (LogAppendTime).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import anyio
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.control import ControlEvent, WindowClosed
from schemas.routing import MigrationState, RoutingStatus
from stream.config import Config
from stream.kafka.clients import kafka_errors, make_consumer, make_producer
from stream.routing import RoutingState, apply, initial_state, reject_malformed

log = logging.getLogger(__name__)

ROUTING_KEY = b"routing"
_decoder = msgspec.json.Decoder(ControlEvent)
_encoder = msgspec.json.Encoder()


def record_time(timestamp_ms: int) -> datetime:
    """A Kafka record timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)


class ControlPlane:
    """The routing state, kept current from the control topic."""

    def __init__(self, config: Config, *, publish_status: bool = False) -> None:
        self._config = config
        self._publish = publish_status
        self._tp = TopicPartition(config.topics.control, 0)
        self._consumer: AIOKafkaConsumer = make_consumer(config.kafka, group_id=None)
        # End offsets come from a client of their own: on the tailing consumer's connection a
        # ListOffsets request waits behind the fetch long-poll (fetch_max_wait_ms).
        self._offsets: AIOKafkaConsumer = make_consumer(config.kafka, group_id=None)
        self._producer: AIOKafkaProducer = make_producer(config.kafka, linger_ms=0)
        self.state: RoutingState = initial_state(config.routing.stable_model, set(config.models))
        self._next_offset = 0
        self._changed = anyio.Event()
        self._published: RoutingStatus | None = None
        self.replayed = anyio.Event()

    async def __aenter__(self) -> ControlPlane:
        async with kafka_errors("control plane", self._config.kafka.bootstrap_servers):
            await self._consumer.start()
            await self._offsets.start()
            await self._producer.start()
        self._consumer.assign([self._tp])
        await self._consumer.seek_to_beginning(self._tp)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._consumer.stop()
            await self._offsets.stop()
            await self._producer.stop()

    async def replay(self) -> RoutingState:
        """Apply the log up to its end offset taken now (an empty fetch is not the end)."""
        end = await self._end_offset()
        while self._next_offset < end:
            await self._fetch_and_apply(timeout_ms=1000)
        self.replayed.set()
        await self._publish_status()
        return self.state

    async def tail(self, *, close_windows: bool = True) -> None:
        """Apply records as they arrive, forever; close the rollback window when it is due.

        Read-only followers (`serve`) pass `close_windows=False`: only processors append.
        """
        async with anyio.create_task_group() as tasks:
            if close_windows:
                tasks.start_soon(self._close_window_when_due)
            while True:
                await self._fetch_and_apply(timeout_ms=1000)

    async def sync(self) -> RoutingState:
        """The state after every control record appended before this call was applied."""
        end = await self._end_offset()
        while self._next_offset < end:
            await self._changed.wait()
        return self.state

    async def append(self, event: ControlEvent) -> int:
        """Write an event to the control log; returns its offset once acknowledged."""
        async with kafka_errors("control append", self._config.kafka.bootstrap_servers):
            metadata = await (
                await self._producer.send(self._tp.topic, _encoder.encode(event), ROUTING_KEY)
            )
        return int(metadata.offset)

    async def wait_applied(self, offset: int) -> RoutingState:
        """The state right after the record at `offset` was applied (while tailing)."""
        while self._next_offset <= offset:
            await self._changed.wait()
        return self.state

    async def _end_offset(self) -> int:
        async with kafka_errors("control plane", self._config.kafka.bootstrap_servers):
            ends = await self._offsets.end_offsets([self._tp])
        return int(ends[self._tp])

    async def _fetch_and_apply(self, *, timeout_ms: int) -> None:
        fetched = await self._consumer.getmany(self._tp, timeout_ms=timeout_ms, max_records=500)
        messages = fetched.get(self._tp, [])
        for message in messages:
            at = record_time(message.timestamp)
            try:
                event = _decoder.decode(message.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.state = reject_malformed(self.state, message.offset, at, str(exc))
            else:
                self.state = apply(self.state, event, message.offset, at)
            self._next_offset = message.offset + 1
        if messages:
            rejection = self.state.last_rejection
            if rejection is not None and rejection.at == record_time(messages[-1].timestamp):
                log.info("control: rejected %s: %s", rejection.command, rejection.reason)
            changed, self._changed = self._changed, anyio.Event()
            changed.set()
            if self.replayed.is_set():
                await self._publish_status()
        else:
            position = await self._consumer.position(self._tp)
            if position > self._next_offset:  # transaction markers or compacted gaps
                self._next_offset = position
                changed, self._changed = self._changed, anyio.Event()
                changed.set()

    async def _publish_status(self) -> None:
        if not self._publish:
            return
        status = self.state.status()
        comparable = msgspec.structs.replace(status, updated_at=None, control_offset=None)
        if comparable == self._published:
            return
        self._published = comparable
        await self._producer.send(self._config.topics.routing, _encoder.encode(status), ROUTING_KEY)
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
