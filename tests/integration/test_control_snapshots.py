"""Routing snapshots on the real broker: a processor that restarts after snapshotting folds the
latest snapshot plus the records after it, and recovers exactly the routing of a full replay."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import pytest

from schemas.control import Finalize, Rollback
from schemas.routing import MigrationState, RoutingStatus
from schemas.snapshot import RoutingSnapshot
from stream.config import Config
from stream.ops.operator import send_command
from stream.processor.control import ControlPlane
from tests.integration.test_migration import PARTITIONS, History, drained, migrate_under_load, start
from tests.support.kafka import create_topic, produce, read_all, unique
from tests.support.processor import processor

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def with_snapshots(config: Config, every: int) -> Config:
    control = msgspec.structs.replace(config.control, snapshot_every=every)
    # Checkpoints several times a second, so the migration writes records to snapshot.
    backfill = msgspec.structs.replace(config.backfill, checkpoint_interval_secs=0.2)
    return msgspec.structs.replace(config, control=control, backfill=backfill)


async def replayed(config: Config) -> ControlPlane:
    async with ControlPlane(config) as control:
        await control.replay()
    return control


@pytest.mark.timeout(240)
async def test_a_processor_restarted_after_snapshotting_recovers_the_full_replay_routing(
    bootstrap: str, migration_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config = with_snapshots(migration_config(atoms)[0], every=4)
    history = History(seed=31)
    await produce(bootstrap, atoms, history.events(300, churn=0.3))
    async with processor(config) as running:
        command = start("m1", rollback_window_secs=3600)
        await migrate_under_load(bootstrap, config, atoms, running, history, command)
        await drained(bootstrap, running, atoms)
    written = [
        msgspec.json.decode(r.value, type=RoutingSnapshot)
        for r in await read_all(bootstrap, config.topics.snapshots())
    ]
    assert written, "the processor wrote snapshots while it folded the migration"
    latest = max(s.next_offset for s in written)
    # A record after the last snapshot: the restart must fold it on top of the snapshot.
    accepted, _ = await send_command(config, Rollback(migration_id="m1"))
    assert accepted

    caplog.set_level(logging.INFO, logger="stream.processor.context")
    async with processor(config) as running:
        await produce(bootstrap, atoms, history.events(40, churn=0.5))
        await drained(bootstrap, running, atoms)
    lines = [r.getMessage() for r in caplog.records if "control log replayed" in r.getMessage()]
    assert len(lines) == 1 and f"from the snapshot to offset {latest}," in lines[0]
    statuses = await read_all(bootstrap, config.topics.routing)
    published = msgspec.json.decode(statuses[-1].value, type=RoutingStatus)
    at_restart = await replayed(with_snapshots(config, every=0))
    assert published == at_restart.state.status(), "the restarted processor's routing"
    # The restarted processor snapshots what it folded (when that was `every` records or
    # more); a rejected command after it leaves a tail again, a rejection included.
    accepted, _ = await send_command(config, Finalize(migration_id="m1"))
    assert not accepted
    latest = max(
        msgspec.json.decode(r.value, type=RoutingSnapshot).next_offset
        for r in await read_all(bootstrap, config.topics.snapshots())
    )

    full = await replayed(with_snapshots(config, every=0))
    restarted = await replayed(config)
    assert (full.resumed_from, restarted.resumed_from) == (None, latest)
    assert 0 < restarted.folded_records < full.folded_records
    assert restarted.state == full.state, "G5: the snapshot's fold equals the full replay"
    assert full.state.migration is not None
    assert full.state.migration.state is MigrationState.ROLLED_BACK
    assert full.state.last_rejection is not None
    assert full.state.last_rejection.command == "finalize"
