"""Model migration on the real broker: dual-write, backfill, cutover, rollback, finalize."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import msgspec
import pytest

from schemas.control import (
    BackfillConfig,
    CancelMigration,
    Finalize,
    PauseMigration,
    ResumeMigration,
    Rollback,
    StartMigration,
)
from schemas.embeddings import EmbeddingRecord
from schemas.routing import MigrationState, RoutingPhase
from stream.config import Config
from stream.core.routing import RoutingState
from stream.ops.operator import send_command
from tests.support.kafka import (
    atom_value,
    create_topic,
    delete_value,
    end_offsets,
    produce,
    read_all,
    unique,
)
from tests.support.processor import Running, processor, wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

PARTITIONS = 3


def start(migration_id: str, **backfill: Any) -> StartMigration:
    return StartMigration(
        migration_id=migration_id,
        source_model="tiny",
        target_model="tinyb",
        backfill=msgspec.convert({"batch_size": 40, **backfill}, type=BackfillConfig),
    )


class History:
    """A deterministic stream of creates, updates and deletes, and what it should leave."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.next_id = 0
        self.live: set[str] = set()

    def events(self, count: int, *, churn: float) -> list[tuple[bytes, bytes]]:
        out = []
        for _ in range(count):
            roll = self.rng.random()
            if self.live and roll < churn / 2:
                atom_id = self.rng.choice(sorted(self.live))
                out.append((atom_id.encode(), delete_value(atom_id)))
                self.live.discard(atom_id)
            elif self.live and roll < churn:
                atom_id = self.rng.choice(sorted(self.live))
                text = f"update {self.rng.randint(0, 10**6)} of {atom_id}"
                out.append((atom_id.encode(), atom_value(atom_id, text)))
            else:
                atom_id = f"a-{self.next_id}"
                self.next_id += 1
                self.live.add(atom_id)
                text = f"atom {atom_id} says {self.rng.randint(0, 10**6)}"
                out.append((atom_id.encode(), atom_value(atom_id, text)))
        return out


def expected_final(atoms_records: Iterable[Any]) -> dict[str, tuple[int, int] | None]:
    """From-scratch replay of atoms: per key, the (partition, offset) of its last event, or
    None when the atom is deleted."""
    final: dict[str, tuple[int, int] | None] = {}
    for record in atoms_records:
        key = record.key.decode()
        value = record.value
        deleted = value is None or b'"atom.deleted"' in value
        final[key] = None if deleted else (record.partition, record.offset)
    return final


def model_final(records: Iterable[Any]) -> dict[str, tuple[int, int] | None]:
    """Per key, the last record in log order: (partition, source offset), or None."""
    final: dict[str, tuple[int, int] | None] = {}
    for record in records:
        key = record.key.decode()
        if record.value is None:
            final[key] = None
        else:
            source = msgspec.json.decode(record.value, type=EmbeddingRecord).source
            final[key] = (source.partition, source.offset)
    return final


def highest_offset_final(records: Iterable[Any]) -> dict[str, tuple[int, int] | None]:
    """Per key, the record with the highest source offset (a last-writer-wins sink)."""
    best: dict[str, tuple[int, Any]] = {}
    for record in records:
        source = dict(record.headers)["lattice.source-offset"].decode().rsplit("/", 1)
        offset = int(source[1])
        key = record.key.decode()
        if key not in best or offset >= best[key][0]:
            best[key] = (offset, record)
    return model_final(record for _, record in best.values())


def live_only(final: dict[str, tuple[int, int] | None]) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in final.items() if v is not None}


async def drained(bootstrap: str, running: Running, atoms: str) -> None:
    """Wait until the processor has committed every atom produced so far."""
    await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))


def phase_is(phase: RoutingPhase) -> Any:
    return lambda state: state.routing_config().phase is phase


def mid_backfill(state: Any) -> bool:
    """Backfill has a known total and is part way through it (a point to inject a fault)."""
    migration = state.migration
    if migration is None or migration.progress.total is None:
        return False
    return bool(0 < migration.progress.processed < migration.progress.total)


@pytest.mark.timeout(240)
async def test_migration_then_rollback_keeps_every_atom(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    history = History(seed=3)
    await produce(bootstrap, atoms, history.events(400, churn=0.3))
    live_at_start = len(history.live)
    async with processor(config) as running:
        await drained(bootstrap, running, atoms)
        accepted, status = await send_command(config, start("m1", rollback_window_secs=3600))
        assert accepted and status.phase is RoutingPhase.MIGRATING
        assert status.write_models == ["tiny", "tinyb"] and status.query_model == "tiny"
        for _ in range(5):
            await produce(bootstrap, atoms, history.events(40, churn=0.5))
        state = await wait_for_routing(config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=120)
        assert state.migration is not None and state.migration.state is MigrationState.COMPLETED
        # Backfill embeds each atom live below the handoff once (latest version only): at
        # most the atoms live when the migration started, fewer the more were updated live.
        progress = state.migration.progress
        assert progress.total is not None and 0 < progress.total <= live_at_start
        assert progress.processed == progress.total
        assert state.route_query() == "tinyb"
        await produce(bootstrap, atoms, history.events(60, churn=0.5))
        await drained(bootstrap, running, atoms)
        expected = live_only(expected_final(await read_all(bootstrap, atoms)))
        target = await read_all(bootstrap, config.topics.embeddings("tinyb"))
        assert live_only(model_final(target)) == expected, "G2/G4: target complete and fresh"
        assert live_only(highest_offset_final(target)) == expected, "G4: by source offset"

        accepted, status = await send_command(config, Rollback(migration_id="m1"))
        assert accepted and status.state is MigrationState.ROLLED_BACK
        assert status.write_models == ["tiny"] and status.query_model == "tiny"
        await produce(bootstrap, atoms, history.events(60, churn=0.5))
        await drained(bootstrap, running, atoms)
    expected = live_only(expected_final(await read_all(bootstrap, atoms)))
    source = await read_all(bootstrap, config.topics.embeddings("tiny"))
    assert live_only(model_final(source)) == expected, "G3: source holds every live atom"


async def migrate_under_load(
    bootstrap: str,
    config: Config,
    atoms: str,
    running: Running,
    history: History,
    command: StartMigration | None,
) -> RoutingState:
    """Start m1 (unless started) once the history is live, keep ingesting, wait for cutover."""
    if command is not None:
        await drained(bootstrap, running, atoms)
        accepted, _ = await send_command(config, command)
        assert accepted
    for _ in range(4):
        await produce(bootstrap, atoms, history.events(40, churn=0.5))
    return await wait_for_routing(config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=120)


async def assert_model_matches_atoms(
    bootstrap: str, config: Config, atoms: str, model: str
) -> None:
    expected = live_only(expected_final(await read_all(bootstrap, atoms)))
    records = await read_all(bootstrap, config.topics.embeddings(model))
    assert live_only(model_final(records)) == expected
    assert live_only(highest_offset_final(records)) == expected


@pytest.mark.timeout(240)
@pytest.mark.parametrize("eos", [False, True], ids=["at-least-once", "exactly-once"])
async def test_no_dual_write_backfill_chases_the_live_head(
    bootstrap: str, migration_config: Any, eos: bool
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    if eos:  # chase steps commit with their progress, in the partition's transaction
        kafka = msgspec.structs.replace(config.kafka, exactly_once=True)
        config = msgspec.structs.replace(config, kafka=kafka)
    history = History(seed=5)
    await produce(bootstrap, atoms, history.events(300, churn=0.3))
    async with processor(config) as running:
        await drained(bootstrap, running, atoms)
        accepted, status = await send_command(config, start("m1", dual_write=False))
        assert accepted and status.write_models == ["tiny"]
        state = await migrate_under_load(bootstrap, config, atoms, running, history, None)
        assert state.routing_config().write_models == ("tiny", "tinyb")
        await produce(bootstrap, atoms, history.events(40, churn=0.5))
        await drained(bootstrap, running, atoms)
        await assert_model_matches_atoms(bootstrap, config, atoms, "tinyb")
    if eos:
        target = await read_all(bootstrap, config.topics.embeddings("tinyb"))
        offsets = [dict(r.headers)["lattice.source-offset"] for r in target]
        assert len(offsets) == len(set(offsets)), "exactly-once: each input once on the target"


@pytest.mark.timeout(240)
async def test_pause_stops_backfill_but_not_dual_write_then_finalize(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    history = History(seed=7)
    await produce(bootstrap, atoms, history.events(300, churn=0.2))
    async with processor(config) as running:
        await drained(bootstrap, running, atoms)
        assert (await send_command(config, start("m1", batch_size=10)))[0]
        accepted, status = await send_command(
            config, PauseMigration(migration_id="m1", reason="test")
        )
        assert accepted and status.state is MigrationState.PAUSED
        assert status.write_models == ["tiny", "tinyb"], "dual-write continues while paused"
        frozen = status.progress.processed if status.progress else None
        fresh = history.events(30, churn=0.0)
        await produce(bootstrap, atoms, fresh)
        await drained(bootstrap, running, atoms)
        target = await read_all(bootstrap, config.topics.embeddings("tinyb"))
        assert {k for k, _ in fresh} <= {r.key for r in target}, "new atoms dual-written"
        paused = await wait_for_routing(config, lambda s: True, within=10)
        progress = paused.status().progress
        assert progress is not None and progress.processed == frozen, "backfill is paused"
        assert (await send_command(config, ResumeMigration(migration_id="m1")))[0]
        await wait_for_routing(config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=120)
        accepted, status = await send_command(config, Finalize(migration_id="m1"))
        assert accepted and status.state is MigrationState.FINALIZED
        assert status.write_models == ["tinyb"] and status.query_model == "tinyb"
        after = history.events(20, churn=0.0)
        await produce(bootstrap, atoms, after)
        await drained(bootstrap, running, atoms)
    source = await read_all(bootstrap, config.topics.embeddings("tiny"))
    assert not {k for k, _ in after} & {r.key for r in source}, "finalized: target alone"
    await assert_model_matches_atoms(bootstrap, config, atoms, "tinyb")


@pytest.mark.timeout(240)
async def test_rollback_window_closes_by_itself_and_survives_restart(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    history = History(seed=11)
    await produce(bootstrap, atoms, history.events(100, churn=0.2))
    async with processor(config) as running:
        state = await migrate_under_load(
            bootstrap, config, atoms, running, history, start("m1", rollback_window_secs=8)
        )
        ends = state.status().rollback_window_ends_at
    # Every instance is down; the window's end comes from the cutover record, not a clock.
    assert (
        await wait_for_routing(config, lambda s: True, within=10)
    ).status().rollback_window_ends_at == ends
    async with processor(config) as running:
        closed = await wait_for_routing(config, phase_is(RoutingPhase.STABLE), within=60)
        assert closed.routing_config().write_models == ("tinyb",)
        assert closed.stable_model == "tinyb"
        accepted, status = await send_command(config, Rollback(migration_id="m1"))
        assert not accepted and status.last_rejection is not None
        assert "rollback window open" in status.last_rejection.reason
        await produce(bootstrap, atoms, history.events(20, churn=0.3))
        await drained(bootstrap, running, atoms)
    await assert_model_matches_atoms(bootstrap, config, atoms, "tinyb")


@pytest.mark.timeout(120)
async def test_cancel_returns_to_the_source_alone(bootstrap: str, migration_config: Any) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    accepted, status = await send_command(config, start("m1"))
    assert accepted
    accepted, status = await send_command(config, CancelMigration(migration_id="m1"))
    assert accepted and status.state is MigrationState.CANCELLED
    assert status.write_models == ["tiny"] and status.phase is RoutingPhase.STABLE
    accepted, status = await send_command(config, start("m1"))
    assert not accepted and status.last_rejection is not None
    assert status.last_rejection.reason == "migration id m1 was used before"
    accepted, status = await send_command(config, start("m2"))
    assert accepted and status.migration_id == "m2"
