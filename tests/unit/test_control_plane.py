"""The control plane on a fake control log: replay, rejections, status, sync, snapshots."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from schemas.control import (
    BackfillConfig,
    BackfillProgress,
    ControlEvent,
    HandoffRecorded,
    StartMigration,
    WindowClosed,
)
from schemas.routing import MigrationState, RoutingStatus
from schemas.snapshot import MigrationSnapshot, RoutingSnapshot
from stream.config import Config, ModelConfig
from stream.core.records import SourceRecord
from stream.core.routing import RoutingState, apply, initial_state
from stream.core.snapshot import FoldBasis, FoldPoint, snapshot_of
from stream.errors import BrokerUnavailable, NotAuthorized
from stream.processor.control import ROUTING_KEY, ControlPlane, record_time
from stream.processor.sensors import Sensor
from tests.support.fakes import FakeControlLog

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

CONFIG = msgspec.structs.replace(
    Config(models={"a": ModelConfig(path="/m/a"), "b": ModelConfig(path="/m/b")}),
)
CONFIG = msgspec.structs.replace(
    CONFIG, routing=msgspec.structs.replace(CONFIG.routing, stable_model="a")
)


def start(migration_id: str, target: str) -> bytes:
    return msgspec.json.encode(
        StartMigration(migration_id=migration_id, source_model="a", target_model=target)
    )


async def test_replay_applies_the_log_and_rejects_what_is_illegal() -> None:
    log = FakeControlLog()
    await log.append(ROUTING_KEY, b"{not json")
    await log.append(ROUTING_KEY, start("m0", "nope"))
    await log.append(ROUTING_KEY, start("m1", "b"))
    async with ControlPlane(CONFIG, publish_status=True, log=log) as control:  # type: ignore[arg-type]
        state = await control.replay()
    status = state.status()
    assert status.control_offset == 2
    assert status.write_models == ["a", "b"] and status.query_model == "a"
    assert status.migration_id == "m1" and status.state == "in_progress"
    published = [msgspec.json.decode(value, type=RoutingStatus) for _, value in log.published]
    assert [p.migration_id for p in published] == ["m1"], "one status after the replay"


async def test_sync_returns_the_state_after_every_record_appended_before_it() -> None:
    log = FakeControlLog()
    async with ControlPlane(CONFIG, log=log) as control:  # type: ignore[arg-type]
        await control.replay()
        assert control.state.status().write_models == ["a"]
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(control.tail)
            await log.append(ROUTING_KEY, start("m1", "b"))
            with anyio.fail_after(5):
                state = await control.sync()
            tasks.cancel_scope.cancel()
    assert state.control_offset == 0
    assert state.status().write_models == ["a", "b"]


async def test_an_append_returns_its_offset_and_wait_applied_sees_it() -> None:
    log = FakeControlLog()
    async with ControlPlane(CONFIG, log=log) as control:  # type: ignore[arg-type]
        await control.replay()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(control.tail)
            offset = await control.append(
                StartMigration(migration_id="m1", source_model="a", target_model="a")
            )
            with anyio.fail_after(5):
                state = await control.wait_applied(offset)
            tasks.cancel_scope.cancel()
    assert offset == 0
    assert state.last_rejection is not None and state.last_rejection.migration_id == "m1"
    assert state.status().write_models == ["a"], "a rejected command changes nothing"


SNAPSHOTTED = msgspec.structs.replace(
    CONFIG, control=msgspec.structs.replace(CONFIG.control, snapshot_every=3)
)
NO_SNAPSHOTS = msgspec.structs.replace(
    CONFIG, control=msgspec.structs.replace(CONFIG.control, snapshot_every=0)
)
SNAPSHOTS_TOPIC = "embed.control.snapshots"


def migration_log(log: FakeControlLog) -> list[bytes]:
    events = [
        StartMigration(migration_id="m1", source_model="a", target_model="b"),
        HandoffRecorded(migration_id="m1", partition=0, offset=10, log_start=0, partitions=2),
        HandoffRecorded(migration_id="m1", partition=1, offset=10, log_start=0, partitions=2),
    ] + [BackfillProgress(migration_id="m1", partition=p % 2, offset=p) for p in range(1, 8)]
    return [msgspec.json.encode(e) for e in events]


def snapshots(log: FakeControlLog) -> list[RoutingSnapshot]:
    return [
        msgspec.json.decode(value, type=RoutingSnapshot)
        for topic, value in log.published
        if topic == SNAPSHOTS_TOPIC
    ]


def reopened(log: FakeControlLog) -> FakeControlLog:
    """The same log and topics as another client (an instance that starts) reads them."""
    fresh = FakeControlLog(now_ms=log.now_ms)
    fresh.records, fresh.published = log.records, log.published
    return fresh


async def full_replay(log: FakeControlLog) -> ControlPlane:
    async with ControlPlane(NO_SNAPSHOTS, log=reopened(log)) as control:  # type: ignore[arg-type]
        await control.replay()
    return control


async def test_a_restart_folds_the_latest_snapshot_and_only_the_records_after_it() -> None:
    log = FakeControlLog()
    for value in migration_log(log)[:8]:
        await log.append(ROUTING_KEY, value)
    async with ControlPlane(SNAPSHOTTED, publish_status=True, log=log) as processor:  # type: ignore[arg-type]
        await processor.replay()
    assert [(s.next_offset, s.last_offset) for s in snapshots(log)] == [(8, 7)]
    for value in migration_log(log)[8:]:
        await log.append(ROUTING_KEY, value)
    async with ControlPlane(SNAPSHOTTED, log=reopened(log)) as restarted:  # type: ignore[arg-type]
        state = await restarted.replay()
    full = await full_replay(log)
    assert state == full.state and state.control_offset == 9
    assert (restarted.resumed_from, restarted.folded_records) == (8, 2)
    assert (full.resumed_from, full.folded_records) == (None, 10)
    assert len(snapshots(log)) == 1, "a read-only control plane writes no snapshot"


async def test_a_tailing_processor_snapshots_every_snapshot_every_records() -> None:
    log = FakeControlLog()
    values = migration_log(log)
    for value in values[:8]:
        await log.append(ROUTING_KEY, value)
    async with ControlPlane(SNAPSHOTTED, publish_status=True, log=log) as processor:  # type: ignore[arg-type]
        await processor.replay()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(processor.tail)
            offsets = [await log.append(ROUTING_KEY, value) for value in values[8:]]
            offsets.append(await log.append(ROUTING_KEY, values[4]))
            with anyio.fail_after(5):
                await processor.wait_applied(offsets[-1])
            tasks.cancel_scope.cancel()
    assert [s.next_offset for s in snapshots(log)] == [8, 11]
    assert snapshots(log)[-1].migration == snapshot_migration((await full_replay(log)).state)


def snapshot_migration(state: RoutingState) -> MigrationSnapshot | None:
    basis = FoldBasis("a", frozenset({"a", "b"}))
    return snapshot_of(state, basis, FoldPoint(1, 0, 0), control_topic="c").migration


async def test_a_snapshot_of_another_log_is_ignored_and_the_whole_log_replayed() -> None:
    log = FakeControlLog()
    for value in migration_log(log)[:8]:
        await log.append(ROUTING_KEY, value)
    async with ControlPlane(SNAPSHOTTED, publish_status=True, log=log) as processor:  # type: ignore[arg-type]
        await processor.replay()
    recreated = FakeControlLog(now_ms=log.now_ms + 1)  # the topic deleted and written anew
    recreated.published = log.published
    for value in migration_log(recreated)[:9]:
        await recreated.append(ROUTING_KEY, value)
    async with ControlPlane(SNAPSHOTTED, log=recreated) as restarted:  # type: ignore[arg-type]
        state = await restarted.replay()
    assert (restarted.resumed_from, restarted.folded_records) == (None, 9)
    assert state == (await full_replay(recreated)).state


async def test_with_snapshots_off_none_is_written_or_read() -> None:
    log = FakeControlLog()
    for value in migration_log(log)[:8]:
        await log.append(ROUTING_KEY, value)
    async with ControlPlane(SNAPSHOTTED, publish_status=True, log=log) as processor:  # type: ignore[arg-type]
        await processor.replay()
    async with ControlPlane(NO_SNAPSHOTS, publish_status=True, log=reopened(log)) as control:  # type: ignore[arg-type]
        await control.replay()
    assert (control.resumed_from, control.folded_records) == (None, 8)
    assert len(snapshots(log)) == 1, "only the first processor wrote one"


V1_LOG = (
    Path(__file__).resolve().parents[1] / "samples" / "v1" / "control_commands.jsonl"
).read_bytes()


async def test_a_v1_log_without_snapshots_replays_as_the_pure_fold() -> None:
    config = Config(models={"minilm": ModelConfig(), "bge-small": ModelConfig(path="/m/bge")})
    log = FakeControlLog()
    expected = initial_state("minilm", {"minilm", "bge-small"})
    for line in V1_LOG.splitlines():
        offset = await log.append(ROUTING_KEY, line)
        event = msgspec.json.decode(line, type=ControlEvent)
        expected = apply(expected, event, offset, record_time(log.now_ms))
    async with ControlPlane(config, log=log) as control:  # type: ignore[arg-type]
        state = await control.replay()
    assert state == expected and control.resumed_from is None
    assert state.migration is not None and state.migration.state is MigrationState.CANCELLED


class LockedSnapshots(FakeControlLog):
    """A cluster whose ACLs deny this principal the snapshots topic."""

    async def read_latest(self, topic: str, count: int) -> list[SourceRecord]:
        raise NotAuthorized(f"not authorized to read {topic}")

    async def publish(self, topic: str, key: bytes, value: bytes, *, acked: bool = False) -> None:
        if topic == SNAPSHOTS_TOPIC:
            raise NotAuthorized(f"not authorized to write {topic}")
        await super().publish(topic, key, value, acked=acked)


async def test_a_snapshots_topic_it_may_not_use_only_costs_a_full_replay() -> None:
    log = LockedSnapshots()
    for value in migration_log(log)[:8]:
        await log.append(ROUTING_KEY, value)
    async with ControlPlane(SNAPSHOTTED, publish_status=True, log=log) as processor:  # type: ignore[arg-type]
        state = await processor.replay()
    assert (processor.resumed_from, processor.folded_records) == (None, 8)
    assert state == (await full_replay(log)).state
    assert [topic for topic, _ in log.published] == ["embed.routing"], "status still published"


def completed_with_a_past_window() -> list[bytes]:
    """A migration completed, its 1 s rollback window long over (the fake log's clock is
    in 2023)."""
    events: list[ControlEvent] = [
        StartMigration(
            migration_id="m1",
            source_model="a",
            target_model="b",
            backfill=BackfillConfig(rollback_window_secs=1),
        ),
        HandoffRecorded(migration_id="m1", partition=0, offset=0, log_start=0, partitions=1),
    ]
    return [msgspec.json.encode(e) for e in events]


async def test_only_a_processor_closes_a_rollback_window_that_is_due() -> None:
    log = FakeControlLog()
    for value in completed_with_a_past_window():
        await log.append(ROUTING_KEY, value)
    async with ControlPlane(CONFIG, log=log) as reader:  # type: ignore[arg-type]
        await reader.replay()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(reader.tail)  # what `status --watch` runs
            await log.append(ROUTING_KEY, start("m2", "b"))  # refused: m1's window is open
            with anyio.fail_after(5):
                state = await reader.wait_applied(2)
            tasks.cancel_scope.cancel()
    assert state.status().phase == "rollback_window"
    assert len(log.records) == 3, "a reader appended nothing"
    log = reopened(log)
    async with ControlPlane(CONFIG, publish_status=True, log=log) as processor:  # type: ignore[arg-type]
        await processor.replay()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(processor.tail)
            with anyio.fail_after(5):
                state = await processor.wait_applied(3)
            tasks.cancel_scope.cancel()
    closed = msgspec.json.decode(log.records[3].value or b"", type=ControlEvent)
    assert isinstance(closed, WindowClosed) and closed.migration_id == "m1"
    assert state.status().phase == "stable" and state.status().write_models == ["b"]


class UnreachableLog(FakeControlLog):
    """A control log whose broker can go away: then end offsets fail, as aiokafka's do,
    while a fetch still answers with no records."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.fetches_while_down = 0
        self._fetched = anyio.Event()

    async def fetch(self, *, timeout_ms: int, max_records: int = 500) -> list[SourceRecord]:
        records = await super().fetch(timeout_ms=timeout_ms, max_records=max_records)
        if self.down:
            self.fetches_while_down += 1
            fetched, self._fetched = self._fetched, anyio.Event()
            fetched.set()
        return records

    async def end_offset(self) -> int:
        if self.down:
            raise BrokerUnavailable("control plane: no answer from Kafka")
        return await super().end_offset()

    async def fetched_while_down(self, count: int) -> None:
        while self.fetches_while_down < count:
            await self._fetched.wait()


class BrokerSensor(Sensor):
    """Records what the control plane says of the broker's reachability."""

    def __init__(self) -> None:
        self.said: list[bool] = []
        self._heard = anyio.Event()

    def on_broker(self, reachable: bool) -> None:
        self.said.append(reachable)
        heard, self._heard = self._heard, anyio.Event()
        heard.set()

    async def heard(self, count: int) -> None:
        while len(self.said) < count:
            await self._heard.wait()


async def test_an_empty_fetch_in_an_outage_does_not_make_the_broker_reachable_again() -> None:
    log = UnreachableLog()
    sensor = BrokerSensor()
    async with ControlPlane(CONFIG, publish_status=True, sensor=sensor, log=log) as processor:  # type: ignore[arg-type]
        await processor.replay()
        log.down = True
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(processor.tail)  # its probe asks for the end offset at once
            with anyio.fail_after(10):
                await sensor.heard(1)
                await log.fetched_while_down(5)
            assert sensor.said == [False] and not processor.broker_reachable
            log.down = False
            with anyio.fail_after(20):  # the probe's backoff reaches 10 s at most
                await sensor.heard(2)
            tasks.cancel_scope.cancel()
    assert sensor.said == [False, True] and processor.broker_reachable
