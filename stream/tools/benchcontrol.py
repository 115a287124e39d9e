"""`lattice-embed bench --control-log`: what a start-up replay of the control log costs.

It writes a simulated day-long migration into real Kafka control topics and times cold
`ControlPlane` replays, all in one run:

- **before**: checkpoints once a second per partition (the v1 rate), no snapshot: the whole
  log is folded;
- **coarser rate**: the same day at `[backfill] checkpoint_interval_secs`, no snapshot;
- **snapshot**, for both logs: a processor's snapshot of the folded log followed by a tail
  of `snapshot_every - 1` records (the most a tailing processor leaves unsnapshotted), so a
  start-up reads one snapshot and folds the tail.

Each snapshot replay is checked against the full fold of the same log (the first replay,
folded on through the tail): the routing states must be identical. Record times are the
broker's (LogAppendTime), so the simulated day is compressed into the minutes it takes to
write; the replay cost depends on the records, not on their times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from schemas.control import (
    BackfillConfig,
    BackfillProgress,
    ControlEvent,
    HandoffRecorded,
    ModelFingerprint,
    PauseMigration,
    ResumeMigration,
    StartMigration,
    WindowClosed,
)
from stream.config import Config, ModelConfig, with_run_topics
from stream.errors import LatticeError
from stream.kafka.admin import Admin
from stream.kafka.control_log import ControlLog
from stream.processor.control import ROUTING_KEY, ControlPlane
from stream.processor.topics import owned_topics

log = logging.getLogger(__name__)

TARGET = "sim-target"
MIGRATION = "sim-day"
HANDOFF = 5_000_000  # events per partition below the handoff
TOTAL = 1_000_000  # latest versions per partition that backfill embeds
WRITE_CHUNK = 50_000  # records encoded and written at a time (bounded memory)


@dataclass
class ReplayTiming:
    """One cold start: a new control plane, connected, replayed to the end."""

    records_in_log: int
    records_folded: int
    seconds: float
    from_snapshot: int | None  # the offset the snapshot covered, None for a full replay


def simulated_day(
    source: str, partitions: int, hours: float, checkpoint_secs: float
) -> Iterator[ControlEvent]:
    """The control events of one migration over `partitions` that backfills for `hours`.

    Fingerprints, the start, one handoff per partition, one progress checkpoint per partition
    every `checkpoint_secs` (a pause and a resume a third of the way in), the final
    checkpoints that complete it, and the window closing.
    """
    yield ModelFingerprint(model=source, fingerprint="sha256:" + "1" * 64)
    yield ModelFingerprint(model=TARGET, fingerprint="sha256:" + "2" * 64)
    yield StartMigration(
        migration_id=MIGRATION,
        source_model=source,
        target_model=TARGET,
        backfill=BackfillConfig(rollback_window_secs=3600),
    )
    for partition in range(partitions):
        yield HandoffRecorded(
            migration_id=MIGRATION,
            partition=partition,
            offset=HANDOFF,
            log_start=0,
            partitions=partitions,
            counted=True,
        )
    ticks = max(1, int(hours * 3600 / checkpoint_secs))
    for tick in range(ticks):
        if tick == ticks // 3:
            yield PauseMigration(migration_id=MIGRATION, reason="simulated")
            yield ResumeMigration(migration_id=MIGRATION)
        share = (tick + 1) / (ticks + 1)  # below 1: complete only at the final checkpoints
        for partition in range(partitions):
            yield BackfillProgress(
                migration_id=MIGRATION,
                partition=partition,
                offset=int(HANDOFF * share),
                processed=int(TOTAL * share),
                total=TOTAL,
            )
    for partition in range(partitions):
        yield BackfillProgress(
            migration_id=MIGRATION,
            partition=partition,
            offset=HANDOFF,
            processed=TOTAL,
            total=TOTAL,
        )
    yield WindowClosed(migration_id=MIGRATION)


def tail_events(partitions: int, count: int) -> Iterator[ControlEvent]:
    """`count` late progress records (they lost the race with completion: no change)."""
    for index in range(count):
        yield BackfillProgress(
            migration_id=MIGRATION, partition=index % partitions, offset=HANDOFF, total=TOTAL
        )


async def control_log_replay(
    config: Config, *, partitions: int = 100, hours: float = 24.0
) -> dict[str, Any]:
    """Measure cold replays before and after; return figures for the report."""
    config = msgspec.structs.replace(
        config, models={**config.models, TARGET: ModelConfig(path="/simulated/not-loaded")}
    )
    every = config.control.snapshot_every or 10_000
    coarse = config.backfill.checkpoint_interval_secs
    report: dict[str, Any] = {
        "partitions": partitions,
        "hours": hours,
        "snapshot_every": every,
        "checkpoint_secs": {"before": 1.0, "after": coarse},
    }
    for name, checkpoint_secs in (("before", 1.0), ("after", coarse)):
        run = with_run_topics(config, f"bench-ctl-{name}-{time.time_ns() % 10**9}")
        run = _with_snapshots(run, every=every)
        source = run.routing.stable_model
        needed = (run.topics.control, run.topics.snapshots())
        async with Admin(run.kafka) as admin:
            await admin.ensure_topics([t for t in owned_topics(run, 1) if t.name in needed])
        began = time.perf_counter()
        written = await _write(run, simulated_day(source, partitions, hours, checkpoint_secs))
        write_secs = time.perf_counter() - began
        log.warning("bench control log %s: %d records written in %.0fs", name, written, write_secs)
        full_run = _with_snapshots(run, every=0)  # v1: neither reads nor writes snapshots
        began = time.perf_counter()
        async with ControlPlane(full_run) as folded:
            await folded.replay()
            full = ReplayTiming(written, folded.folded_records, time.perf_counter() - began, None)
            await folded.write_snapshot()  # what a processor writes as it folds the log
            tail = await _write(run, tail_events(partitions, every - 1))
            began = time.perf_counter()
            async with ControlPlane(run) as restarted:
                snap_state = await restarted.replay()
                snap = ReplayTiming(
                    written + tail,
                    restarted.folded_records,
                    time.perf_counter() - began,
                    restarted.resumed_from,
                )
            full_state = await folded.replay()  # the full fold, on through the tail
        if snap_state != full_state or snap.from_snapshot != written:
            raise LatticeError("bench: the replay from the snapshot differs from a full replay")
        report[name] = {
            "records": written,
            "write_secs": write_secs,
            "full_replay": asdict(full),
            "tail_records": tail,
            "snapshot_replay": asdict(snap),
            "identical": True,
        }
        log.warning(
            "bench control log %s: full replay %.1fs, snapshot + %d-record tail %.2fs",
            name,
            full.seconds,
            tail,
            snap.seconds,
        )
    return report


async def _write(config: Config, events: Iterator[ControlEvent]) -> int:
    encoder = msgspec.json.Encoder()
    written = 0
    async with ControlLog(config.kafka, config.topics.control) as control_log:
        chunk: list[bytes] = []
        for event in events:
            chunk.append(encoder.encode(event))
            if len(chunk) >= WRITE_CHUNK:
                await control_log.append_many(ROUTING_KEY, chunk)
                written, chunk = written + len(chunk), []
        await control_log.append_many(ROUTING_KEY, chunk)
    return written + len(chunk)


def _with_snapshots(config: Config, *, every: int) -> Config:
    control = msgspec.structs.replace(config.control, snapshot_every=every)
    return msgspec.structs.replace(config, control=control)
