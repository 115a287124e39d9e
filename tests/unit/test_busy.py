"""A partition whose state another local worker holds is skipped, retried, and warned about."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import anyio
import msgspec
import pytest

from schemas.control import StartMigration
from schemas.routing import MigrationState, RoutingPhase
from stream.config import Config, ModelConfig
from stream.processor.busy import RETRY_SECS, WARN_SECS, BusyPartitions
from stream.state.keystore import KeyStore
from stream.state.rocks import StateBusy
from tests.support.fakes import FakeControlLog, FakeGroupConsumer, FakeLog, FakeProducer
from tests.unit.test_live_consumer import atoms, live_loop

pytestmark = pytest.mark.timeout(90)


def test_a_busy_partition_is_skipped_until_its_retry_time() -> None:
    busy = BusyPartitions()
    busy.held(2, StateBusy("locked"), now=100.0)
    assert busy.waiting(100.0) == {2}
    assert busy.waiting(100.0 + RETRY_SECS - 0.01) == {2}
    assert busy.waiting(100.0 + RETRY_SECS) == set()
    busy.held(2, StateBusy("locked"), now=101.5)
    busy.cleared(2)
    assert busy.waiting(101.5) == set()


def test_a_long_hold_warns_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    busy = BusyPartitions()
    with caplog.at_level(logging.INFO, logger="stream.processor.busy"):
        for tick in range(int(2.5 * WARN_SECS)):
            busy.held(("r1", 0), StateBusy("locked"), now=float(tick))
    levels = [record.levelno for record in caplog.records]
    assert levels.count(logging.INFO) == 1, "the first hold is news, the retries are not"
    assert levels.count(logging.WARNING) == 2, "at WARN_SECS and at 2 * WARN_SECS"
    busy.cleared(("r1", 0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stream.processor.busy"):
        busy.held(("r1", 0), StateBusy("locked"), now=500.0)
    assert [r.levelno for r in caplog.records] == [logging.INFO], "a new hold starts over"


def two_models(tiny_model: Path, tiny_model_b: Path) -> Config:
    """The stable `tiny` and a migration target `next`."""
    return Config(
        models={
            "tiny": ModelConfig(path=str(tiny_model)),
            "next": ModelConfig(path=str(tiny_model_b)),
        }
    )


@pytest.mark.anyio
async def test_a_partition_held_by_another_local_worker_waits_and_then_backfills(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = two_models(tiny_model, tiny_model_b)
    log = FakeLog("atoms", 2)
    atoms(log, 0, 5)
    atoms(log, 1, 5)
    consumer = FakeGroupConsumer(log, [0, 1])
    producer = FakeProducer()
    store = await anyio.to_thread.run_sync(KeyStore.open, tmp_path / "state")
    # Another worker of the group on this machine still holds partition 0's state: its
    # revocation has not run yet.
    other = await anyio.to_thread.run_sync(KeyStore.open, tmp_path / "state")
    await anyio.to_thread.run_sync(other.partition, "m1", 0, 0)
    control_log = FakeControlLog()
    async with live_loop(
        tiny_model, log, consumer, producer, config=config, control_log=control_log, store=store
    ) as heard:
        with anyio.fail_after(60), caplog.at_level(logging.INFO, "stream.processor.busy"):
            await heard.until_committed({0: 5, 1: 5})
            start = StartMigration(migration_id="m1", source_model="tiny", target_model="next")
            await control_log.append(b"routing", msgspec.json.encode(start))
            while not any("held by another local worker" in r.message for r in caplog.records):
                await heard.until_committed({0: len(log.partitions[0])})
                atoms(log, 0, 1, prefix=f"live{len(log.partitions[0])}-")
            # Live keeps going while partition 0 waits, and partition 1 backfills.
            atoms(log, 1, 3, prefix="b")
            await heard.until_committed({0: len(log.partitions[0]), 1: 8})
            assert heard.control is not None
            assert heard.control.state.routing_config().phase is RoutingPhase.MIGRATING
            await anyio.to_thread.run_sync(other.release, "m1", 0, 0)  # revoked there at last
            done = await heard.until_routing(
                lambda s: s.routing_config().phase is RoutingPhase.ROLLBACK_WINDOW
            )
    assert done.active is not None and done.active.state is MigrationState.COMPLETED
    history = {f"a{p}-{i}".encode() for p in (0, 1) for i in range(5)}
    assert history <= set(producer.keys("embeddings.next")), "both partitions backfilled"
    await anyio.to_thread.run_sync(other.close)
    await anyio.to_thread.run_sync(store.close)


class RefusingConsumer(FakeGroupConsumer):
    """Counts refused commits (set `commit_fails`), and says when three were refused."""

    def __init__(self, log: FakeLog, assigned: list[int]) -> None:
        super().__init__(log, assigned)
        self.refused = 0
        self.refused_three_times = anyio.Event()

    async def commit(self, offsets: Mapping[int, int]) -> None:
        refusing = self.commit_fails > 0
        try:
            await super().commit(offsets)
        finally:
            if refusing:
                self.refused += 1
                if self.refused >= 3:
                    self.refused_three_times.set()


@pytest.mark.anyio
async def test_a_member_whose_commits_are_refused_writes_no_backfill(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A zombie (its session expired, its partitions moved) must not write backfill records
    over what the new owner writes live: a refused commit stops backfill until it rejoins."""
    config = two_models(tiny_model, tiny_model_b)
    log = FakeLog("atoms", 1)
    atoms(log, 0, 6)
    consumer = RefusingConsumer(log, [0])
    producer = FakeProducer()
    store = await anyio.to_thread.run_sync(KeyStore.open, tmp_path / "state")
    control_log = FakeControlLog()
    async with live_loop(
        tiny_model, log, consumer, producer, config=config, control_log=control_log, store=store
    ) as heard:
        with anyio.fail_after(60), caplog.at_level(logging.WARNING, "stream.processor.live"):
            await heard.until_committed({0: 6})
            consumer.commit_fails = 1_000_000  # the coordinator no longer knows this member
            start = StartMigration(migration_id="m1", source_model="tiny", target_model="next")
            await control_log.append(b"routing", msgspec.json.encode(start))
            await consumer.refused_three_times.wait()
            assert producer.keys("embeddings.next") == [], "no backfill while refused"
            consumer.commit_fails = 0  # rejoined (here: the same partitions came back)
            await heard.until_routing(
                lambda s: s.routing_config().phase is RoutingPhase.ROLLBACK_WINDOW
            )
    assert set(producer.keys("embeddings.next")) == {f"a0-{i}".encode() for i in range(6)}
    assert any("not a group member" in r.message for r in caplog.records)
    await anyio.to_thread.run_sync(store.close)
