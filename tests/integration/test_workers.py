"""`lattice-embed run --workers 2`: two processes of one group on this machine split the
partitions, a migration completes under live load while one worker is SIGKILLed (the
supervisor restarts it), and SIGTERM drains both and exits 0 (issue 12)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas.control import PauseMigration, ResumeMigration
from schemas.routing import RoutingPhase
from stream.config import Config
from stream.ops.operator import send_command
from tests.integration.test_lifecycle import processor_process
from tests.integration.test_migration import (
    History,
    assert_model_matches_atoms,
    phase_is,
    start,
)
from tests.support.kafka import create_topic, end_offsets, produce, unique, until_committed
from tests.support.load import LiveLoad
from tests.support.processor import wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 4
WARMUP = 100
BACKLOG = 600
HISTORY = 3000  # events before the migration: its backfill outlasts a worker's restart


@contextmanager
def supervisor_process(config_path: Path, workers: int) -> Iterator[subprocess.Popen[bytes]]:
    """`lattice-embed run --workers N` as a child (its log, every worker's, beside the
    config); killed with its workers if the test leaves it running."""
    with processor_process(config_path, "--workers", str(workers)) as supervisor:
        try:
            yield supervisor
        finally:
            for pid in worker_pids(supervisor.pid):
                os.kill(pid, signal.SIGKILL)


def worker_pids(parent: int) -> set[int]:
    """The live child processes of `parent` (from /proc)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # exited meanwhile
        ppid = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
        state = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
        if ppid and int(ppid.group(1)) == parent and state and state.group(1) != "Z":
            pids.add(int(entry.name))
    return pids


async def until(condition: Any, *, within: float, every: float = 0.2) -> Any:
    """Poll `condition()` (a process table or a group's offsets: nothing to await) until
    it returns something true."""
    with anyio.fail_after(within):
        while True:
            found = await condition()
            if found:
                return found
            await anyio.sleep(every)


async def drained(config: Config, atoms: str, *, within: float) -> None:
    """Wait until the group committed every partition's end."""
    bootstrap, group = config.kafka.bootstrap_servers, config.kafka.group_id
    ends = await end_offsets(bootstrap, atoms, PARTITIONS)
    await until_committed(bootstrap, group, atoms, ends, within=within)


@pytest.mark.timeout(420)
async def test_two_workers_migrate_under_load_through_a_worker_kill_and_drain_on_sigterm(
    migration_config: Any,
) -> None:
    atoms = unique("atoms")
    config, path = migration_config(atoms)
    bootstrap = config.kafka.bootstrap_servers
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    history = History(seed=41)
    await produce(bootstrap, atoms, history.events(WARMUP, churn=0.3))
    with supervisor_process(path, 2) as supervisor:
        await drained(config, atoms, within=120)  # both workers started and loaded
        workers = await until(lambda: _pids(supervisor.pid, 2), within=30)
        began = time.monotonic()
        await produce(bootstrap, atoms, history.events(BACKLOG, churn=0.3))
        await drained(config, atoms, within=120)
        capacity = BACKLOG / (time.monotonic() - began)
        await produce(bootstrap, atoms, history.events(HISTORY, churn=0.3))
        await drained(config, atoms, within=120)
        load = LiveLoad(bootstrap, atoms, lambda n: history.events(n, churn=0.4), capacity / 4)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            accepted, _ = await send_command(config, start("m1", rollback_window_secs=3600))
            assert accepted
            await wait_for_routing(
                config,
                lambda s: s.migration is not None and s.migration.progress.processed > 0,
                within=120,
            )
            killed = min(workers)
            os.kill(killed, signal.SIGKILL)
            # Paused (dual-write goes on) until the restarted worker has partitions: with the
            # tiny models the backfill would otherwise finish before a restart loads them.
            paused = PauseMigration(migration_id="m1", reason="a worker restarts")
            assert (await send_command(config, paused))[0]
            restarted = await until(
                lambda: _replaced(supervisor.pid, workers - {killed}), within=60
            )
            await until(lambda: _assigned(path, restarted), within=120, every=0.5)
            mid = await wait_for_routing(config, lambda s: True, within=10)
            assert (await send_command(config, ResumeMigration(migration_id="m1")))[0]
            state = await wait_for_routing(
                config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=240
            )
            load.stop()
        await drained(config, atoms, within=120)
        supervisor.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: supervisor.wait(timeout=60)) == 0
        assert not worker_pids(supervisor.pid)
    assert workers | restarted <= await _assigned(path, workers | restarted)
    assert "exited with status 137 unasked: restarting it" in _log_text(path)
    assert mid.migration is not None and mid.status().state == "paused"
    assert mid.migration.progress.processed < (mid.migration.progress.total or 0), (
        "the backfill had work left when the restarted worker joined"
    )
    assert state.migration is not None and state.migration.progress.total
    for model in ("tiny", "tinyb"):
        await assert_model_matches_atoms(bootstrap, config, atoms, model)
    print(
        f"\nworkers: capacity {capacity:.0f} atoms/s with 2 workers, load {load.rate:.0f}/s "
        f"({load.produced} events); worker {killed} killed, replaced by {restarted}, which "
        f"had partitions at backfill {mid.migration.progress}"
    )


def _log_text(config_path: Path) -> str:
    """Everything the supervisor and its workers logged."""
    logs = config_path.parent.glob(f"{config_path.stem}.*.log")
    return "\n".join(p.read_text(errors="replace") for p in logs)


async def _assigned(config_path: Path, pids: set[int]) -> set[int] | None:
    """`pids` once each has logged a non-empty assignment (else None)."""
    found = re.findall(r"\[(\d+)\] INFO \S+: assigned partitions: \[\d", _log_text(config_path))
    return pids if pids <= {int(pid) for pid in found} else None


async def _pids(parent: int, count: int) -> set[int] | None:
    pids = worker_pids(parent)
    return pids if len(pids) == count else None


async def _replaced(parent: int, survivors: set[int]) -> set[int] | None:
    """The new worker's pid once the supervisor has started one beside `survivors`."""
    new = worker_pids(parent) - survivors
    return new if new and survivors <= worker_pids(parent) else None
