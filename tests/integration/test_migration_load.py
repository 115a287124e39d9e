"""Migrations under steady live load (a stated fraction of the capacity measured at the
start of each test): backfill still finishes, and a broken target fails only itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas.control import CancelMigration, StartMigration
from schemas.routing import MigrationState, RoutingPhase
from stream.ops.operator import send_command
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    assert_model_matches_atoms,
    drained,
    phase_is,
    start,
)
from tests.support.kafka import create_topic, end_offsets, produce, unique
from tests.support.load import LiveLoad
from tests.support.processor import Running, processor, wait_for_routing

pytestmark = [pytest.mark.anyio]

BACKLOG = 600  # atoms drained at the start: the capacity measurement


async def quarter_load(
    bootstrap: str,
    running: Running,
    atoms: str,
    history: History,
    backlog: int,
    *,
    ride_outages: bool = False,
) -> tuple[LiveLoad, float]:
    """Measure capacity by draining the `backlog` already produced (one model), and return
    a load of creates, updates and deletes at a quarter of it: dual-written, half the model
    time."""
    began = time.monotonic()
    await drained(bootstrap, running, atoms)
    capacity = backlog / (time.monotonic() - began)
    events = lambda n: history.events(n, churn=0.4)  # noqa: E731
    return LiveLoad(bootstrap, atoms, events, capacity / 4, ride_outages=ride_outages), capacity


@pytest.mark.timeout(300)
async def test_backfill_finishes_while_live_load_uses_half_the_capacity(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    history = History(seed=11)
    await produce(bootstrap, atoms, history.events(BACKLOG, churn=0.3))
    async with processor(config) as running:
        load, capacity = await quarter_load(bootstrap, running, atoms, history, BACKLOG)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            accepted, _ = await send_command(config, start("m1", rollback_window_secs=3600))
            assert accepted
            state = await wait_for_routing(
                config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=200
            )
            load.stop()
        print(
            f"capacity {capacity:.0f} atoms/s, live load {load.rate:.0f}/s, {load.produced} events"
        )
        assert state.migration is not None and state.migration.state is MigrationState.COMPLETED
        assert load.produced > 0
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))
    await assert_model_matches_atoms(bootstrap, config, atoms, "tinyb")


@pytest.mark.timeout(240)
async def test_a_broken_target_fails_the_migration_and_the_source_keeps_ingesting(
    bootstrap: str, make_config: Any, tiny_model: Path, tmp_path: Path
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": "not a number"}')
    config, _ = make_config(atoms, models={"tiny": tiny_model, "broken": broken})
    history = History(seed=5)
    await produce(bootstrap, atoms, history.events(200, churn=0.3))
    async with processor(config) as running:
        load, _ = await quarter_load(bootstrap, running, atoms, history, 200)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            command = StartMigration(migration_id="m1", source_model="tiny", target_model="broken")
            accepted, _ = await send_command(config, command)
            assert accepted
            state = await wait_for_routing(
                config,
                lambda s: s.migration is not None and s.migration.state is MigrationState.FAILED,
                within=60,
            )
            assert state.routing_config().write_models == ("tiny",)
            accepted, status = await send_command(config, CancelMigration(migration_id="m1"))
            assert accepted and status.state is MigrationState.CANCELLED
            load.stop()
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))
    await assert_model_matches_atoms(bootstrap, config, atoms, "tiny")
