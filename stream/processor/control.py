"""The control plane: replay the control log at start-up, tail it, append to it, publish status.

Every instance (and every CLI call) rebuilds the routing from the whole log, so all of them
agree (G5). The log's record times are the broker's (LogAppendTime).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import anyio
import msgspec

from schemas.control import ControlEvent, WindowClosed
from schemas.routing import MigrationState, RoutingStatus
from stream.config import Config
from stream.core.routing import RoutingState, apply, initial_state, reject_malformed
from stream.kafka.control_log import ControlLog

log = logging.getLogger(__name__)

ROUTING_KEY = b"routing"
_decoder = msgspec.json.Decoder(ControlEvent)
_encoder = msgspec.json.Encoder()


def record_time(timestamp_ms: int) -> datetime:
    """A Kafka record timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)


class ControlPlane:
    """The routing state, kept current from the control topic."""

    def __init__(
        self, config: Config, *, publish_status: bool = False, log: ControlLog | None = None
    ) -> None:
        self._config = config
        self._publish = publish_status
        self._log = log or ControlLog(config.kafka, config.topics.control)
        self.state: RoutingState = initial_state(config.routing.stable_model, set(config.models))
        self._next_offset = 0
        self._changed = anyio.Event()
        self._published: RoutingStatus | None = None
        self.replayed = anyio.Event()

    async def __aenter__(self) -> ControlPlane:
        await self._log.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._log.__aexit__(*exc_info)

    async def replay(self) -> RoutingState:
        """Apply the log up to its end offset taken now (an empty fetch is not the end)."""
        end = await self._log.end_offset()
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
        end = await self._log.end_offset()
        while self._next_offset < end:
            await self._changed.wait()
        return self.state

    async def append(self, event: ControlEvent) -> int:
        """Write an event to the control log; returns its offset once acknowledged."""
        return await self._log.append(ROUTING_KEY, _encoder.encode(event))

    async def wait_applied(self, offset: int) -> RoutingState:
        """The state right after the record at `offset` was applied (while tailing)."""
        while self._next_offset <= offset:
            await self._changed.wait()
        return self.state

    async def _fetch_and_apply(self, *, timeout_ms: int) -> None:
        messages = await self._log.fetch(timeout_ms=timeout_ms)
        for message in messages:
            at = record_time(message.timestamp_ms or 0)
            try:
                event = _decoder.decode(message.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.state = reject_malformed(self.state, message.offset, at, str(exc))
            else:
                self.state = apply(self.state, event, message.offset, at)
            self._next_offset = message.offset + 1
        if messages:
            rejection = self.state.last_rejection
            last_at = record_time(messages[-1].timestamp_ms or 0)
            if rejection is not None and rejection.at == last_at:
                log.info("control: rejected %s: %s", rejection.command, rejection.reason)
            changed, self._changed = self._changed, anyio.Event()
            changed.set()
            if self.replayed.is_set():
                await self._publish_status()
        else:
            position = await self._log.position()
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
        await self._log.publish(self._config.topics.routing, ROUTING_KEY, _encoder.encode(status))
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
