"""The whole migration under fire: 3 partitions, 2 processes, creates/updates/deletes all the
time, one process SIGKILLed during backfill. Asserts G2, G3, G4 and G5 exactly."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from typing import Any

import anyio
import msgspec
import pytest

from schemas.control import Rollback
from schemas.routing import RoutingPhase, RoutingStatus
from stream.ops.operator import send_command
from tests.integration.test_lifecycle import processor_process
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    expected_final,
    highest_offset_final,
    live_only,
    mid_backfill,
    model_final,
    phase_is,
    start,
)
from tests.support.kafka import collect, create_topic, produce, read_all, unique
from tests.support.processor import wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.slow]


async def converged(bootstrap: str, atoms: str, topic: str, *, within: float) -> list[Any]:
    """Read `topic` until its last record per key equals a from-scratch replay of `atoms`."""
    expected = live_only(expected_final(await read_all(bootstrap, atoms)))
    return await collect(
        bootstrap, topic, lambda records: live_only(model_final(records)) == expected, within=within
    )


@pytest.mark.timeout(420)
async def test_full_lifecycle_two_instances_with_a_kill(
    bootstrap: str, migration_config: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, path = migration_config(atoms)
    history = History(seed=23)
    await produce(bootstrap, atoms, history.events(1500, churn=0.3))
    stop_ingest = anyio.Event()

    async def ingest() -> None:
        while not stop_ingest.is_set():
            await produce(bootstrap, atoms, history.events(20, churn=0.5))
            await anyio.sleep(0.1)  # pacing of the load generator, not a wait for a condition

    with processor_process(path) as first, processor_process(path) as second:
        await converged(bootstrap, atoms, config.topics.embeddings("tiny"), within=120)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(ingest)
            command = start("m1", batch_size=20, max_concurrent=1, rollback_window_secs=3600)
            assert (await send_command(config, command))[0]
            mid = await wait_for_routing(
                config,
                mid_backfill,
                within=120,
            )
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
            with processor_process(path) as restarted:
                state = await wait_for_routing(
                    config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=240
                )
                stop_ingest.set()
                target = await converged(
                    bootstrap, atoms, config.topics.embeddings("tinyb"), within=120
                )
                expected = live_only(expected_final(await read_all(bootstrap, atoms)))
                assert live_only(highest_offset_final(target)) == expected, "G4 by source offset"

                assert (await send_command(config, Rollback(migration_id="m1")))[0]
                await produce(bootstrap, atoms, history.events(100, churn=0.5))
                await converged(bootstrap, atoms, config.topics.embeddings("tiny"), within=120)

                statuses: dict[int, set[bytes]] = defaultdict(set)
                switched = 0
                for record in await read_all(bootstrap, config.topics.routing):
                    status = msgspec.json.decode(record.value, type=RoutingStatus)
                    if status.control_offset is not None:
                        statuses[status.control_offset].add(record.value)
                    if status.phase is RoutingPhase.MIGRATING and status.query_model == "tinyb":
                        progress = status.progress
                        assert progress is not None and progress.total, "never before it is known"
                        assert progress.processed / progress.total >= 0.8, "not before threshold"
                        switched += 1
                assert statuses and all(len(v) == 1 for v in statuses.values()), "G5"
                for child in (second, restarted):
                    child.send_signal(signal.SIGTERM)
                assert second.wait(timeout=60) == 0 and restarted.wait(timeout=60) == 0
    progress = mid.migration.progress if mid.migration else None
    with capsys.disabled():
        print(
            f"\nlifecycle: killed at backfill {progress}, cutover at control offset "
            f"{state.control_offset}, {len(statuses)} statuses agreed, {switched} with the "
            f"query on the target before cutover (all at >= 80 %), "
            f"{time.monotonic() - began:.1f}s"
        )
