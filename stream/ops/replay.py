"""`lattice-embed replay`: re-embed a range of the atoms topic into one model's topic.

The command does no embedding itself. It resolves the range to offsets per partition,
appends a `start_replay` request to the control log and follows the log until the replay is
over. The partition owners run it between their live windows with the backfill machinery
(`stream/processor/replays.py`): per key only its latest version below the owner's handoff,
and only if no live write followed, so no old version ever lands after a newer one while
processors ingest. Progress lives in the control log: a processor restart or a rebalance
resumes the replay, and a follower that was interrupted attaches again with the same
`--replay-id`.

Why not embed in the command, as before: its "newer version" snapshot was taken once, at
start, so an update that arrived while it ran could be followed by the replay's older
version (the race `migration.md` describes for a separate backfill worker). Only the live
owner of a partition knows exactly which keys it has written since.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import anyio

from schemas.control import StartReplay
from schemas.routing import ReplayState
from stream.config import Config
from stream.core.replays import Replay
from stream.errors import ConfigError, LatticeError
from stream.kafka.admin import Admin
from stream.kafka.reader import PartitionReader
from stream.ops.progress import progress_line
from stream.processor.control import ControlPlane
from stream.processor.topics import prepare_topics

REFRESH_SECS = 0.5


class ReplayRefused(LatticeError):
    """The replay cannot be requested, or the control log rejected the request."""


@dataclass(frozen=True)
class ReplayResult:
    """Where a replay stands when the command returns (over, or detached)."""

    replay: Replay
    topic: str

    @property
    def succeeded(self) -> bool:
        """Completed, or still in progress for a detached request."""
        return self.replay.state in (ReplayState.COMPLETED, ReplayState.IN_PROGRESS)


def parse_offsets(values: list[str]) -> dict[int, int]:
    """`P:O` pairs -> {partition: offset}."""
    offsets: dict[int, int] = {}
    for value in values:
        partition, sep, offset = value.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ConfigError(f"replay: {value!r} is not PARTITION:OFFSET")
        offsets[int(partition)] = int(offset)
    return offsets


def new_replay_id() -> str:
    """A fresh, sortable replay id."""
    return f"replay-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


async def replay(
    config: Config,
    model: str,
    *,
    from_offsets: dict[int, int] | None = None,
    from_time: datetime | None = None,
    to_offsets: dict[int, int] | None = None,
    to_time: datetime | None = None,
    replay_id: str | None = None,
    detach: bool = False,
    show_progress: bool = True,
) -> ReplayResult:
    """Request a replay of [from, to) of every partition of `atoms` into `model` and follow
    it until it is over (or, with `detach`, until the request is accepted).

    The range defaults: partitions without a `from` offset start at their log start; `to`
    defaults to each partition's log end now. An existing `replay_id` with the same model is
    followed again instead of requested twice.
    """
    if model not in config.models:
        raise ConfigError(
            f"replay: unknown model {model!r} (configured: {', '.join(config.models)})"
        )
    await prepare_topics(config)
    async with Admin(config.kafka) as admin:
        count = await admin.partition_count(config.topics.atoms)
    if count is None:
        raise ConfigError(f"replay: topic {config.topics.atoms} does not exist")
    topic = config.topics.embeddings(model)
    async with ControlPlane(config) as control:
        state = await control.replay()
        known = state.replays.get(replay_id) if replay_id is not None else None
        if known is not None:
            if known.model != model:
                raise ReplayRefused(f"replay: id {replay_id} is a replay into {known.model}")
        else:
            writes = state.routing_config().write_models
            if model not in writes:
                raise ReplayRefused(
                    f"replay: model {model} is not in the current write set "
                    f"({', '.join(writes)}); a replay writes only a model the processors write"
                )
            starts, ends = await _ranges(
                config, count, from_offsets, from_time, to_offsets, to_time
            )
            replay_id = replay_id or new_replay_id()
            request = StartReplay(
                replay_id=replay_id,
                model=model,
                partitions=count,
                from_offsets=starts,
                to_offsets=ends,
                command_id=f"cli-{uuid.uuid4().hex[:12]}",
                issued_by=os.environ.get("USER"),
            )
            offset = await control.append(request)
            while control.state.control_offset is None or control.state.control_offset < offset:
                await control.replay()
            rejection = control.state.last_rejection
            if rejection is not None and rejection.command_id == request.command_id:
                raise ReplayRefused(f"replay: rejected: {rejection.reason}")
        assert replay_id is not None
        if show_progress:
            print(f"replay {replay_id}: into {topic}", file=sys.stderr)
        if detach:
            return ReplayResult(control.state.replays[replay_id], topic)
        return ReplayResult(await _follow(control, replay_id, show_progress), topic)


async def _follow(control: ControlPlane, replay_id: str, show_progress: bool) -> Replay:
    """Tail the control log until the replay is over, drawing its progress on stderr."""
    began = time.monotonic()
    first_processed: int | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(partial(control.tail, close_windows=False))  # read-only: no appends
        while True:
            current = control.state.replays[replay_id]
            if show_progress:
                processed = current.progress.processed
                if first_processed is None:
                    first_processed = processed
                sys.stderr.write("\r\x1b[K" + _line(current, began, first_processed))
                sys.stderr.flush()
            if current.state is not ReplayState.IN_PROGRESS:
                break
            last = control.state.control_offset
            with anyio.move_on_after(REFRESH_SECS):
                await control.wait_applied(0 if last is None else last + 1)
        tasks.cancel_scope.cancel()
    if show_progress:
        sys.stderr.write("\n")
    return control.state.replays[replay_id]


def _line(replay: Replay, began: float, first_processed: int) -> str:
    """One progress line: handoffs while owners have not all seen it, then a bar."""
    waiting = [
        p for p in range(replay.partitions) if replay.has_range(p) and p not in replay.handoffs
    ]
    progress = replay.progress
    elapsed = time.monotonic() - began
    line = progress_line(progress.processed - first_processed, None, elapsed)
    if progress.total is not None:
        line = progress_line(progress.processed, progress.total, elapsed)
    if waiting:
        line += f" (waiting for the owners of partitions {waiting})"
    return f"replay {replay.replay_id} {replay.state}: {line}"


async def _ranges(
    config: Config,
    count: int,
    from_offsets: dict[int, int] | None,
    from_time: datetime | None,
    to_offsets: dict[int, int] | None,
    to_time: datetime | None,
) -> tuple[dict[int, int], dict[int, int]]:
    """The [from, to) offsets of every partition, resolved now."""
    topic = config.topics.atoms
    partitions = list(range(count))
    async with PartitionReader(config.kafka) as reader:
        log_starts = await reader.beginning_offsets(topic, partitions)
        log_ends = await reader.end_offsets(topic, partitions)
        starts = await _resolve(reader, config, from_offsets, from_time, log_starts, log_ends)
        ends = await _resolve(reader, config, to_offsets, to_time, log_ends, log_ends)
    return starts, ends


async def _resolve(
    reader: PartitionReader,
    config: Config,
    offsets: dict[int, int] | None,
    at: datetime | None,
    default: dict[int, int],
    log_ends: dict[int, int],
) -> dict[int, int]:
    """Offsets per partition from P:O pairs, a timestamp, or the default."""
    if offsets is not None:
        unknown = set(offsets) - set(default)
        if unknown:
            raise ConfigError(f"replay: no partition {sorted(unknown)} in {config.topics.atoms}")
        return {p: offsets.get(p, default[p]) for p in default}
    if at is not None:
        topic, partitions = config.topics.atoms, list(default)
        found = await reader.offsets_for_time(topic, partitions, int(at.timestamp() * 1000))
        resolved = {}
        for partition in partitions:
            offset = found.get(partition)
            resolved[partition] = log_ends[partition] if offset is None else offset
        return resolved
    return dict(default)
