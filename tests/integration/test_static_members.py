"""Static group members (KIP-345, `[kafka] group_instance_id`): a processor SIGKILLed during
backfill and restarted under its own instance id, with its state directory, takes its own
partitions back at once (no wait for its session to time out, no rebalance moving them to
the other instance) and resumes from its key store instead of rebuilding it. Live creates,
updates and deletes run throughout at a quarter of the capacity measured at the start."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas.routing import RoutingPhase
from stream.ops.operator import send_command
from tests.integration.test_lifecycle import log_of, processor_process
from tests.integration.test_lifecycle_migration import converged
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    expected_final,
    highest_offset_final,
    live_only,
    mid_backfill,
    phase_is,
    start,
)
from tests.support.kafka import create_topic, produce, read_all, unique
from tests.support.load import LiveLoad
from tests.support.processor import wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.slow]

BACKLOG = 1500  # atoms drained at the start: the capacity measurement
SESSION_TIMEOUT_MS = 60_000  # longer than the test waits for the partitions to come back


def assigned(child: subprocess.Popen[bytes]) -> list[int] | None:
    """The partitions a child logged as assigned last (None before its first assignment)."""
    found = re.findall(r"assigned partitions: \[([\d, ]*)\]", log_of(child))
    return [int(p) for p in found[-1].split(",") if p.strip()] if found else None


async def until_assigned(child: subprocess.Popen[bytes], *, within: float) -> list[int]:
    """Poll a child's log until it logs an assignment (nothing to await across processes)."""
    with anyio.fail_after(within):
        while (partitions := assigned(child)) is None:
            assert child.poll() is None, log_of(child)[-3000:]
            await anyio.sleep(0.2)  # polls the child's log: nothing to await across processes
    return partitions


@pytest.mark.timeout(360)
async def test_a_static_member_restarted_after_sigkill_takes_its_partitions_back(
    bootstrap: str, migration_config: Any, tmp_path: Path
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, path = migration_config(atoms)
    history = History(seed=37)
    await produce(bootstrap, atoms, history.events(BACKLOG, churn=0.3))

    def member(name: str) -> dict[str, str]:
        return {
            "LATTICE_KAFKA_GROUP_INSTANCE_ID": f"{atoms}-{name}",
            "LATTICE_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
            "LATTICE_STATE_DIR": str(tmp_path / f"state-{name}"),
        }

    with processor_process(path, env=member("a")) as first:
        with processor_process(path, env=member("b")) as second:
            for child in (first, second):  # both members in the group before the backlog
                await until_assigned(child, within=120)
            with anyio.fail_after(60):  # the rebalance that splits the partitions
                while not (assigned(first) and assigned(second)):
                    assert first.poll() is None and second.poll() is None
                    await anyio.sleep(0.2)  # polls the children's logs: nothing to await
            began = time.monotonic()
            await converged(bootstrap, atoms, config.topics.embeddings("tiny"), within=120)
            capacity = BACKLOG / (time.monotonic() - began)
            load = LiveLoad(bootstrap, atoms, lambda n: history.events(n, churn=0.4), capacity / 4)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(load.run)
                command = start("m1", batch_size=20, rollback_window_secs=3600)
                assert (await send_command(config, command))[0]
                await wait_for_routing(config, mid_backfill, within=120)
                owned = assigned(second)
                assert owned, "both members hold partitions before the kill"
                second.send_signal(signal.SIGKILL)
                second.wait(timeout=30)
                killed_at = time.monotonic()
                with processor_process(path, env=member("b")) as restarted:
                    back = await until_assigned(restarted, within=45)
                    back_after = time.monotonic() - killed_at
                    assert back == owned, "its own partitions, not a new split"
                    await wait_for_routing(
                        config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=240
                    )
                    load.stop()
                    log = log_of(restarted)
                    # (Its partitions' backfill may have finished before the kill: then it
                    # opens no backfill at all; one it opens must come from its store.)
                    assert "no key state" not in log, "nothing rebuilt from the log"
                    target = await converged(
                        bootstrap, atoms, config.topics.embeddings("tinyb"), within=120
                    )
                    expected = live_only(expected_final(await read_all(bootstrap, atoms)))
                    assert live_only(highest_offset_final(target)) == expected, "G4"
                    restarted.send_signal(signal.SIGTERM)
                    assert restarted.wait(timeout=60) == 0
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    print(
        f"static members: capacity {capacity:.0f} atoms/s, load {load.rate:.0f}/s, "
        f"{load.produced} live events; partitions {owned} back {back_after:.1f}s after the "
        f"kill (session timeout {SESSION_TIMEOUT_MS / 1000:.0f}s)"
    )
