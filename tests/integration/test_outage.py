"""A broker outage during a migration under live load: the processor keeps running, /readyz
says 503 while Kafka is away and 200 once it is back, and nothing is lost (issue 11)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest

from schemas.routing import RoutingPhase
from stream.config import Config, load_config
from stream.ops.operator import send_command
from tests.integration.conftest import write_config
from tests.integration.test_lifecycle import processor_process
from tests.integration.test_metrics import get
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    assert_model_matches_atoms,
    phase_is,
    start,
)
from tests.integration.test_migration_load import quarter_load
from tests.support.kafka import (
    OwnBroker,
    atom_value,
    collect,
    create_topic,
    end_offsets,
    produce,
    unique,
)
from tests.support.processor import processor, wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.slow]

BACKLOG = 600
# The outage: two minutes. LATTICE_TEST_OUTAGE_SECS shortens it for a quick look.
OUTAGE_SECS = float(os.environ.get("LATTICE_TEST_OUTAGE_SECS", "120"))


async def readiness(port: int) -> int:
    status, _ = await get(port, "/readyz")
    return status


async def until_ready_is(port: int, wanted: int, *, within: float) -> float:
    """Poll /readyz (what a kubelet does) until it answers `wanted`; returns the wait."""
    began = time.monotonic()
    with anyio.fail_after(within):
        while True:
            if await readiness(port) == wanted:
                break
            await anyio.sleep(0.5)  # the probe's period: readiness has no event to await
    return time.monotonic() - began


async def ready_answers_until(port: int, deadline: float) -> int:
    """Probe /readyz at the kubelet's period until `deadline`; how many probes said 200."""
    answered_ready = 0
    while time.monotonic() < deadline:
        answered_ready += await readiness(port) == 200
        await anyio.sleep(0.5)  # the probe's period
    return answered_ready


@pytest.mark.timeout(600)
async def test_a_two_minute_outage_during_a_migration_loses_nothing(
    tmp_path: Path, tiny_model: Path, tiny_model_b: Path
) -> None:
    broker = OwnBroker(tmp_path / "kafka")
    await broker.start()
    try:
        atoms = unique("atoms")
        await create_topic(broker.bootstrap, atoms, partitions=PARTITIONS)
        path = write_config(
            tmp_path,
            broker.bootstrap,
            models={"tiny": tiny_model, "tinyb": tiny_model_b},
            stable="tiny",
            atoms=atoms,
            extra="[batching]\nwindow_atoms = 32\nmicro_batch_atoms = 16\n",
        )
        config: Config = load_config(path, {})
        history = History(seed=31)
        await produce(broker.bootstrap, atoms, history.events(BACKLOG, churn=0.3))
        async with processor(config) as running:
            load, capacity = await quarter_load(
                broker.bootstrap, running, atoms, history, BACKLOG, ride_outages=True
            )
            await produce(broker.bootstrap, atoms, history.events(4 * BACKLOG, churn=0.3))
            assert running.metrics_port is not None
            port = running.metrics_port
            assert await readiness(port) == 200
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(load.run)
                accepted, _ = await send_command(config, start("m1", rollback_window_secs=3600))
                assert accepted
                mid = await wait_for_routing(
                    config,
                    lambda s: s.migration is not None and s.migration.progress.processed > 0,
                    within=120,
                )
                await broker.stop()
                down = time.monotonic()
                went_down = await until_ready_is(port, 503, within=OUTAGE_SECS)
                # The outage's length is the fault itself; meanwhile readiness must hold 503.
                flaps = await ready_answers_until(port, down + OUTAGE_SECS)
                assert flaps == 0, f"/readyz said 200 {flaps} times with the broker down"
                await broker.start()
                came_back = await until_ready_is(port, 200, within=120)
                state = await wait_for_routing(
                    config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=240
                )
                load.stop()
            await running.drained(
                await end_offsets(broker.bootstrap, atoms, PARTITIONS), within=120
            )
        assert state.migration is not None and state.migration.progress.total
        for model in ("tiny", "tinyb"):
            await assert_model_matches_atoms(broker.bootstrap, config, atoms, model)
        print(
            f"\noutage: capacity {capacity:.0f} atoms/s, load {load.rate:.0f}/s "
            f"({load.produced} events, {load.refused} bursts refused), broker down "
            f"{OUTAGE_SECS:.0f}s at backfill {mid.migration.progress if mid.migration else None}; "
            f"/readyz 503 after {went_down:.1f}s, 200 {came_back:.1f}s after the restart"
        )
    finally:
        await broker.stop()


@pytest.mark.timeout(300)
async def test_a_processor_that_starts_while_kafka_is_down_waits_for_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The 4.x fault run's failure: a processor started as the broker went down exited 1."""
    broker = OwnBroker(tmp_path / "kafka")
    atoms = unique("atoms")
    path = write_config(
        tmp_path, broker.bootstrap, models={"tiny": tiny_model}, stable="tiny", atoms=atoms
    )
    config = load_config(path, {})
    with processor_process(path) as child:
        with anyio.fail_after(120):
            while "Kafka unreachable during the start" not in _log_of(path):
                assert child.poll() is None, _log_of(path)[-3000:]
                await anyio.sleep(0.2)  # polls the child's log: nothing to await across processes
        await broker.start()
        try:
            await create_topic(broker.bootstrap, atoms, partitions=1)
            await produce(
                broker.bootstrap,
                atoms,
                [(f"d-{i}".encode(), atom_value(f"d-{i}", f"atom {i}")) for i in range(50)],
            )
            out = await collect(
                broker.bootstrap,
                config.topics.embeddings("tiny"),
                lambda records: len({r.key for r in records}) >= 50,
                within=120,
                alive=lambda: child.poll() is None,
            )
            assert {r.key for r in out} == {f"d-{i}".encode() for i in range(50)}
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=60) == 0
        finally:
            await broker.stop()


def _log_of(config_path: Path) -> str:
    """The log of the processor started on `config_path` (`processor_process` names it)."""
    logs = sorted(config_path.parent.glob(f"{config_path.stem}.*.log"))
    return logs[-1].read_text(errors="replace") if logs else ""
