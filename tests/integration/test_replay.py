"""`lattice-embed replay` on the real broker: ranges, timestamps, and no stale versions."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import msgspec
import pytest

from schemas.embeddings import EmbeddingRecord
from tests.support.kafka import atom_value, create_topic, delete_value, produce, read_all, unique
from tests.support.processor import processor

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


async def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run `lattice-embed ARGS` to completion."""
    return await anyio.run_process([sys.executable, "-m", "stream.ops.cli", *args], check=False)


@pytest.mark.timeout(180)
async def test_replay_range_skips_keys_with_newer_versions(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=1)
    config, path = migration_config(atoms)
    await produce(
        bootstrap,
        atoms,
        [
            (b"a", atom_value("a", "first a")),  # 0
            (b"b", atom_value("b", "only b")),  # 1
            (b"c", b"not json"),  # 2: invalid, skipped
            (b"d", atom_value("d", "d before delete")),  # 3
            (b"a", atom_value("a", "second a")),  # 4: newer than the range
            (b"d", delete_value("d")),  # 5
            (b"e", atom_value("e", "after the range")),  # 6
        ],
    )
    topic = config.topics.embeddings("tiny")

    def replayed(records: list[Any]) -> list[tuple[bytes, int]]:
        out = []
        for record in records:
            if record.value is not None:
                decoded = msgspec.json.decode(record.value, type=EmbeddingRecord)
                if decoded.path == "backfill":
                    out.append((record.key, decoded.source.offset))
        return out

    async with processor(config) as running:
        await running.drained({0: 7})
        done = await cli(
            "replay",
            "--config",
            str(path),
            "--model",
            "tiny",
            "--from-offset",
            "0:0",
            "--to",
            "0:4",
        )
        assert done.returncode == 0, done.stderr.decode()
        out = done.stdout.decode()
        assert "completed: 4 events into" in out and "1 embedded" in out, out
        assert replayed(await read_all(bootstrap, topic)) == [(b"b", 1)]

        again = await cli(
            "replay", "--config", str(path), "--model", "tiny", "--from-offset", "0:6"
        )
        assert again.returncode == 0, again.stderr.decode()
        assert replayed(await read_all(bootstrap, topic)) == [(b"b", 1), (b"e", 6)]
    bad = await cli("replay", "--config", str(path), "--model", "nope", "--from-offset", "0:0")
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr.decode()
    unwritten = await cli(
        "replay", "--config", str(path), "--model", "tinyb", "--from-offset", "0:0"
    )
    assert unwritten.returncode == 1
    assert "model tinyb is not in the current write set (tiny)" in unwritten.stderr.decode()


@pytest.mark.timeout(120)
async def test_control_cli_reports_acceptance_and_rejection(migration_config: Any) -> None:
    _, path = migration_config(unique("atoms"))
    config = ("--config", str(path))
    rejected = await cli("control", "finalize", *config, "--migration-id", "m9")
    assert rejected.returncode == 1
    assert rejected.stderr.decode() == "lattice-embed: control: rejected: no migration m9\n"
    accepted = await cli(
        "control",
        "start-migration",
        *config,
        "--migration-id",
        "m1",
        "--target",
        "tinyb",
        "--threshold",
        "0.5",
    )
    assert accepted.returncode == 0, accepted.stderr.decode()
    expected = "phase=migrating state=in_progress query=tiny write=tiny,tinyb"
    assert expected in accepted.stdout.decode()
    status = await cli("status", "--json", *config)
    assert status.returncode == 0
    decoded = msgspec.json.decode(status.stdout)
    assert decoded["migration_id"] == "m1" and decoded["progress"]["total"] is None
    assert decoded["last_rejection"]["reason"] == "no migration m9"


@pytest.mark.timeout(120)
async def test_dry_run_counts_and_estimates_without_changing_anything(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=2)
    _, path = migration_config(atoms)
    await produce(
        bootstrap, atoms, [(f"k{i}".encode(), atom_value(f"k{i}", f"text {i}")) for i in range(50)]
    )
    start = ("control", "start-migration", "--config", str(path), "--migration-id", "m1")
    done = await cli(*start, "--target", "tinyb", "--dry-run")
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "source tiny: dim 32" in out and "target tinyb: dim 48" in out
    assert "events to backfill: 50" in out and "estimated backfill time:" in out
    assert "nothing was changed" in out
    status = await cli("status", "--json", "--config", str(path))
    assert msgspec.json.decode(status.stdout)["migration_id"] is None
    same = await cli(*start, "--target", "tiny", "--dry-run")
    assert same.returncode == 2 and "are the same model" in same.stderr.decode()


@pytest.mark.timeout(60)
async def test_status_watch_shows_phase_and_models(migration_config: Any) -> None:
    _, path = migration_config(unique("atoms"))
    command = [sys.executable, "-m", "stream.ops.cli", "status", "--watch", "--config", str(path)]
    async with await anyio.open_process(command) as watch:
        assert watch.stdout is not None
        seen = b""
        with anyio.fail_after(45):
            while b"stable query=tiny write=tiny" not in seen:
                seen += await watch.stdout.receive()
        watch.terminate()
