"""Operator actions on the control log: send a command and wait for its outcome, watch status."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import msgspec

from schemas.atoms import AtomCreated, InvalidAtom, decode_atom
from schemas.control import ControlCommand
from schemas.routing import RoutingStatus
from stream.config import Config
from stream.core.records import SourceRecord
from stream.embed.pool import ModelPool
from stream.errors import ConfigError
from stream.kafka.admin import Admin
from stream.kafka.reader import PartitionReader
from stream.ops.progress import progress_line
from stream.processor.control import ControlPlane
from stream.processor.topics import prepare_topics


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
    await prepare_topics(config)
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
    for replay in status.replays or ():
        total = "?" if replay.progress.total is None else replay.progress.total
        head += f" replay {replay.replay_id}->{replay.model} {replay.progress.processed}/{total}"
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


@dataclass(frozen=True)
class DryRun:
    """What `start-migration --dry-run` found, without changing anything."""

    source: str
    target: str
    source_dim: int
    target_dim: int
    events: int
    sample: int
    target_atoms_per_sec: float

    @property
    def estimate_secs(self) -> float | None:
        """Backfill time at the sampled rate (model time only)."""
        if self.target_atoms_per_sec <= 0:
            return None
        return self.events / self.target_atoms_per_sec


async def dry_run(config: Config, source: str, target: str, *, sample: int = 64) -> DryRun:
    """Load both models, compare them, count the events to backfill, time a sample."""
    for name in (source, target):
        if name not in config.models:
            raise ConfigError(f"dry run: unknown model {name!r}")
    if source == target or config.models[source] == config.models[target]:
        raise ConfigError(f"dry run: {source} and {target} are the same model")
    models = ModelPool(config)
    source_model = await models.get(source)
    target_model = await models.get(target)
    async with Admin(config.kafka) as admin:
        partitions = list(range(await admin.partition_count(config.topics.atoms) or 0))
    texts: list[str] = []
    events = 0
    topic = config.topics.atoms
    async with PartitionReader(config.kafka) as reader:
        starts = await reader.beginning_offsets(topic, partitions)
        ends = await reader.end_offsets(topic, partitions)
        events = sum(ends[p] - starts[p] for p in partitions)
        with anyio.move_on_after(10):
            for partition in partitions:  # the newest events: what the log looks like now
                first = max(starts[partition], ends[partition] - sample)
                for record in await reader.read(topic, partition, first, ends[partition]):
                    texts.extend(_texts([record], config))
    texts = texts[:sample] or [f"a sample atom number {i} for timing" for i in range(sample)]
    began = time.perf_counter()
    await anyio.to_thread.run_sync(lambda: target_model.embed(texts))
    rate = len(texts) / (time.perf_counter() - began)
    return DryRun(
        source=source,
        target=target,
        source_dim=source_model.dim,
        target_dim=target_model.dim,
        events=events,
        sample=len(texts),
        target_atoms_per_sec=rate,
    )


def _texts(records: list[SourceRecord], config: Config) -> list[str]:
    texts = []
    for record in records:
        try:
            event = decode_atom(
                record.key, record.value, max_event_bytes=config.limits.max_event_bytes
            )
        except InvalidAtom:
            continue
        if isinstance(event, AtomCreated):
            texts.append(event.text)
    return texts
