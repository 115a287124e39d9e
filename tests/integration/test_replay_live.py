"""`lattice-embed replay` while processors ingest (live load at a quarter of the capacity
measured at the start of each test, with creates, updates and deletes): no old version
after a newer one, and a replay that survives a processor restart on an empty volume."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from schemas.embeddings import EmbeddingRecord
from schemas.routing import ReplayState
from stream.config import Config
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    assert_model_matches_atoms,
    drained,
)
from tests.integration.test_migration_load import quarter_load
from tests.support.kafka import create_topic, end_offsets, produce, read_all, unique
from tests.support.load import LiveLoad
from tests.support.processor import processor, wait_for_routing

pytestmark = [pytest.mark.anyio]

FROM_START = ["--from-offset", *(f"{p}:0" for p in range(PARTITIONS))]


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `lattice-embed ARGS` to completion."""
    return await anyio.run_process([sys.executable, "-m", "stream.ops.cli", *args], check=False)


def assert_no_old_version_after_a_newer_one(records: Iterable[Any]) -> int:
    """Per key, source offsets never go down in log order; returns the backfill records."""
    seen: dict[bytes, int] = {}
    replayed = 0
    for record in records:
        offset = int(dict(record.headers)["lattice.source-offset"].decode().rsplit("/", 1)[1])
        before = seen.get(record.key, -1)
        assert offset >= before, f"{record.key!r}: offset {offset} after {before}"
        seen[record.key] = offset
        if record.value is not None:
            replayed += msgspec.json.decode(record.value, type=EmbeddingRecord).path == "backfill"
    return replayed


@pytest.mark.timeout(300)
async def test_a_replay_under_live_load_leaves_every_key_at_its_latest_version(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, path = migration_config(atoms)
    history = History(seed=21)
    backlog = 900
    await produce(bootstrap, atoms, history.events(backlog, churn=0.4))
    async with processor(config) as running:
        load, capacity = await quarter_load(bootstrap, running, atoms, history, backlog)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            before = load.produced
            began = time.monotonic()
            done = await cli("replay", "--config", str(path), "--model", "tiny", *FROM_START)
            during = load.produced - before
            seconds = time.monotonic() - began
            load.stop()
        assert done.returncode == 0, done.stderr.decode()
        assert "completed" in done.stdout.decode()
        print(
            f"capacity {capacity:.0f} atoms/s, live load {load.rate:.0f}/s; replay took "
            f"{seconds:.1f}s with {during} live events meanwhile; {done.stdout.decode()}"
        )
        assert during > 0, "live events arrived while the replay ran"
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))
    records = await read_all(bootstrap, config.topics.embeddings("tiny"))
    assert assert_no_old_version_after_a_newer_one(records) > 0, "the replay wrote records"
    await assert_model_matches_atoms(bootstrap, config, atoms, "tiny")


def fresh_volume(config: Config, directory: Path) -> Config:
    """The same processor on an empty state directory (a new pod)."""
    state = msgspec.structs.replace(config.state, dir=str(directory))
    return msgspec.structs.replace(config, state=state)


@pytest.mark.timeout(300)
async def test_a_replay_survives_a_processor_restart_and_completes(
    bootstrap: str, migration_config: Any, tmp_path: Path
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, path = migration_config(atoms)
    history = History(seed=22)
    backlog = 3000
    await produce(bootstrap, atoms, history.events(backlog, churn=0.2))
    async with processor(config) as running:
        load, capacity = await quarter_load(bootstrap, running, atoms, history, backlog)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            requested = await cli(
                "replay",
                "--config",
                str(path),
                "--model",
                "tiny",
                "--replay-id",
                "r1",
                "--detach",
                *FROM_START,
            )
            assert requested.returncode == 0, requested.stderr.decode()
            assert "replay r1 requested" in requested.stdout.decode()
            state = await wait_for_routing(
                config,
                lambda s: "r1" in s.replays and s.replays["r1"].progress.processed > 0,
                within=120,
            )
            load.stop()
    mid = state.replays["r1"]
    assert mid.state is ReplayState.IN_PROGRESS, "the processor stops in the middle"
    print(f"capacity {capacity:.0f} atoms/s; stopped at {mid.progress}")

    restarted = fresh_volume(config, tmp_path / "new-volume")
    async with processor(restarted) as running:
        load = LiveLoad(bootstrap, atoms, lambda n: history.events(n, churn=0.4), load.rate)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            followed = await cli(
                "replay", "--config", str(path), "--model", "tiny", "--replay-id", "r1", *FROM_START
            )
            load.stop()
        assert followed.returncode == 0, followed.stderr.decode()
        assert "replay r1 completed" in followed.stdout.decode()
        await drained(bootstrap, running, atoms)
    final = (await wait_for_routing(config, lambda s: True, within=30)).replays["r1"]
    assert final.state is ReplayState.COMPLETED
    assert final.progress.total is not None
    assert final.progress.processed == final.progress.total >= mid.progress.processed
    records = await read_all(bootstrap, config.topics.embeddings("tiny"))
    assert assert_no_old_version_after_a_newer_one(records) > 0
    await assert_model_matches_atoms(bootstrap, config, atoms, "tiny")
