"""Operator actions on the control log: send a command and wait for its outcome, watch status."""

from __future__ import annotations

import sys
import time
import uuid
from datetime import UTC, datetime

import anyio
import msgspec

from schemas.control import ControlCommand
from schemas.routing import RoutingStatus
from stream.app import prepare_topics
from stream.config import Config
from stream.control import ControlPlane
from stream.progress import progress_line


async def send_command(config: Config, command: ControlCommand) -> tuple[bool, RoutingStatus]:
    """Append `command` (with a fresh command_id) and replay the log up to it.

    Returns whether it was accepted and the routing right after it. Every instance computes
    the same outcome from the log, so no running processor is needed to know it.
    """
    if command.command_id is None:
        command = msgspec.structs.replace(command, command_id=f"cli-{uuid.uuid4().hex[:12]}")
    await prepare_topics(config)
    async with ControlPlane(config) as control:
        offset = await control.append(command)
        await control.replay()
        while control.state.control_offset is None or control.state.control_offset < offset:
            await control.replay()
        state = control.state
    rejection = state.last_rejection
    rejected = rejection is not None and rejection.command_id == command.command_id
    return not rejected, state.status()


async def watch_status(config: Config, *, interval: float = 1.0) -> None:
    """Print phase, models and a live backfill progress bar until interrupted."""
    async with ControlPlane(config) as control:
        await control.replay()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(control.tail)
            first: tuple[float, int] | None = None
            while True:
                status = control.state.status()
                processed = status.progress.processed if status.progress else 0
                now = time.monotonic()
                if first is None or (status.progress and processed < first[1]):
                    first = (now, processed)
                line = _status_line(status, processed - first[1], now - first[0])
                sys.stdout.write("\r\x1b[K" + line)
                sys.stdout.flush()
                await anyio.sleep(interval)


def _status_line(status: RoutingStatus, done_since: int, seconds: float) -> str:
    head = f"{status.phase} query={status.query_model} write={','.join(status.write_models)}"
    if status.migration_id is None:
        return head
    head += f" {status.migration_id}:{status.state}"
    progress = status.progress
    if progress is not None:
        bar = progress_line(progress.processed, progress.total, 1.0)
        rate = done_since / seconds if seconds > 0 else 0.0
        head += f" {bar.rsplit(' ', 3)[0]} backfill {rate:.1f}/s"
        if progress.total and rate > 0 and progress.processed < progress.total:
            head += f" ETA {(progress.total - progress.processed) / rate:.0f}s"
    if status.rollback_window_ends_at is not None:
        left = (status.rollback_window_ends_at - datetime.now(UTC)).total_seconds()
        if left > 0:
            head += f" rollback window closes in {left:.0f}s"
    return head
