"""Operator actions on the control log: send a command and wait for its outcome, watch status."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from aiokafka import TopicPartition

from schemas.atoms import AtomCreated, InvalidAtom, decode_atom
from schemas.control import ControlCommand
from schemas.routing import RoutingStatus
from stream.config import Config
from stream.embed.pool import ModelPool
from stream.errors import ConfigError
from stream.kafka.admin import Admin
from stream.kafka.clients import kafka_errors, make_consumer
from stream.ops.progress import progress_line
from stream.processor.app import prepare_topics
from stream.processor.control import ControlPlane


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
    reader = make_consumer(config.kafka, group_id=None)
    async with Admin(config.kafka) as admin:
        partitions = await admin.partition_count(config.topics.atoms) or 0
    texts: list[str] = []
    events = 0
    async with kafka_errors("dry run", config.kafka.bootstrap_servers):
        await reader.start()
    try:
        tps = [TopicPartition(config.topics.atoms, p) for p in range(partitions)]
        if tps:
            starts = await reader.beginning_offsets(tps)
            ends = await reader.end_offsets(tps)
            events = sum(int(ends[tp]) - int(starts[tp]) for tp in tps)
            reader.assign(tps)
            for tp in tps:
                reader.seek(tp, max(int(starts[tp]), int(ends[tp]) - sample))
            with anyio.move_on_after(10):
                while len(texts) < sample and any(
                    [await reader.position(tp) < int(ends[tp]) for tp in tps]
                ):
                    for messages in (await reader.getmany(timeout_ms=1000)).values():
                        texts.extend(_texts(messages, config))
    finally:
        await reader.stop()
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


def _texts(messages: list[Any], config: Config) -> list[str]:
    texts = []
    for message in messages:
        try:
            event = decode_atom(
                message.key, message.value, max_event_bytes=config.limits.max_event_bytes
            )
        except InvalidAtom:
            continue
        if isinstance(event, AtomCreated):
            texts.append(event.text)
    return texts
