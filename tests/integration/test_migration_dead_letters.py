"""Dead letters per model and a target fixed after it failed, on the real broker, with live
ingestion throughout at a stated fraction of the capacity measured at the start.

- An input too long for the target's window only (`max_tokens = 16`, `on_overlong =
  "dead_letter"`) reaches the source and is one dead letter naming the target.
- A target that cannot load fails the migration; after the operator fixes its directory,
  `resume` backfills what it missed and the migration completes (G2/G4 on the target).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas.control import BackfillConfig, ResumeMigration, StartMigration
from schemas.deadletter import decode_dead_letter_headers
from schemas.routing import MigrationState, RoutingPhase
from stream.ops.operator import send_command
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    assert_model_matches_atoms,
    expected_final,
    live_only,
    model_final,
    phase_is,
)
from tests.integration.test_migration_load import quarter_load
from tests.support.kafka import atom_value, create_topic, end_offsets, produce, read_all, unique
from tests.support.processor import processor, wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

BACKLOG = 400
LONG_TEXT = "many words in this text " * 8  # 42 tokens: over the target's 16, not the source's


def migration(target: str) -> StartMigration:
    return StartMigration(
        migration_id="m1",
        source_model="tiny",
        target_model=target,
        backfill=BackfillConfig(batch_size=40, rollback_window_secs=3600),
    )


def long_atoms(prefix: str, count: int) -> list[tuple[bytes, bytes]]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    return [(a.encode(), atom_value(a, f"{LONG_TEXT} ({a})")) for a in ids]


@pytest.mark.timeout(300)
async def test_an_input_too_long_for_the_target_reaches_the_source_and_dies_for_the_target(
    bootstrap: str, make_config: Any, tiny_model: Path, tiny_model_b: Path
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = make_config(
        atoms,
        extra=(
            '[limits]\non_overlong = "dead_letter"\n'
            "[batching]\nwindow_atoms = 32\nmicro_batch_atoms = 16\n"
            f'[models.short]\npath = "{tiny_model_b}"\nmax_tokens = 16\n'
        ),
    )
    history = History(seed=7)
    await produce(bootstrap, atoms, [*history.events(BACKLOG, churn=0.3), *long_atoms("hist", 5)])
    async with processor(config) as running:
        load, capacity = await quarter_load(bootstrap, running, atoms, history, BACKLOG + 5)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            accepted, _ = await send_command(config, migration("short"))
            assert accepted
            await produce(bootstrap, atoms, long_atoms("live", 5))  # dual-written
            state = await wait_for_routing(
                config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=200
            )
            load.stop()
        print(f"capacity {capacity:.0f} atoms/s, live load {load.rate:.0f}/s, {load.produced}")
        assert state.migration is not None and state.migration.state is MigrationState.COMPLETED
        assert load.produced > 0
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))
    atom_records = await read_all(bootstrap, atoms)
    long_ids = {f"{p}-{i}" for p in ("hist", "live") for i in range(5)}
    long_offsets = {(r.partition, r.offset) for r in atom_records if r.key.decode() in long_ids}
    assert len(long_offsets) == 10
    # The source has every atom, the long ones included.
    await assert_model_matches_atoms(bootstrap, config, atoms, "tiny")
    # The target has every atom but the long ones.
    expected = live_only(expected_final(atom_records))
    target = live_only(model_final(await read_all(bootstrap, config.topics.embeddings("short"))))
    assert target == {k: v for k, v in expected.items() if k not in long_ids}
    # One dead letter per long input, naming the target; nothing else is dead.
    letters = [
        decode_dead_letter_headers(r.headers) for r in await read_all(bootstrap, config.topics.dlq)
    ]
    assert sorted((d.partition, d.offset) for d in letters) == sorted(long_offsets)
    assert {(d.model, d.stage, d.error_class) for d in letters} == {
        ("short", "validate", "OverlongInput")
    }
    assert all(d.topic == atoms for d in letters)


@pytest.mark.timeout(300)
async def test_resume_after_the_operator_fixes_a_broken_target_completes_the_migration(
    bootstrap: str, make_config: Any, tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    target_dir = tmp_path / "next-model"
    target_dir.mkdir()
    (target_dir / "config.json").write_text('{"model_type": "bert", "hidden_size": "x"}')
    config, _ = make_config(
        atoms,
        models={"tiny": tiny_model, "next": target_dir},
        extra="[batching]\nwindow_atoms = 32\nmicro_batch_atoms = 16\n",
    )
    history = History(seed=9)
    await produce(bootstrap, atoms, history.events(BACKLOG, churn=0.3))
    async with processor(config) as running:
        load, capacity = await quarter_load(bootstrap, running, atoms, history, BACKLOG)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            accepted, _ = await send_command(config, migration("next"))
            assert accepted
            failed = await wait_for_routing(
                config,
                lambda s: s.migration is not None and s.migration.state is MigrationState.FAILED,
                within=60,
            )
            assert failed.routing_config().write_models == ("tiny",)
            assert "next" not in failed.fingerprints

            def fix() -> None:  # the operator puts the right files in place
                shutil.copytree(tiny_model_b, target_dir, dirs_exist_ok=True)

            await anyio.to_thread.run_sync(fix)
            accepted, status = await send_command(config, ResumeMigration(migration_id="m1"))
            assert accepted and status.state is MigrationState.IN_PROGRESS
            assert status.write_models == ["tiny", "next"]
            state = await wait_for_routing(
                config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=200
            )
            load.stop()
        print(f"capacity {capacity:.0f} atoms/s, live load {load.rate:.0f}/s, {load.produced}")
        assert state.migration is not None and state.migration.state is MigrationState.COMPLETED
        assert state.fingerprints.get("next", "").startswith("sha256:"), "recorded on load"
        assert load.produced > 0
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))
    await assert_model_matches_atoms(bootstrap, config, atoms, "next")
    await assert_model_matches_atoms(bootstrap, config, atoms, "tiny")
    assert await read_all(bootstrap, config.topics.dlq) == []
