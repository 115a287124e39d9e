"""The live loop on fakes of the Kafka boundary: commits after acks, retries, rebalances."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import pytest

from stream.config import Config, ModelConfig
from stream.core.routing import RoutingState
from stream.embed.pool import ModelPool
from stream.errors import BrokerUnavailable, SendFailed
from stream.processor.backfill import MigrationWorker
from stream.processor.control import ControlPlane
from stream.processor.inference import Inference
from stream.processor.live import LiveConsumer
from stream.processor.sensors import ProcessorStats, Sensor
from stream.processor.window import WindowProcessor
from stream.state.keystore import KeyStore
from tests.support.fakes import (
    FakeControlLog,
    FakeGroupConsumer,
    FakeLog,
    FakeProducer,
    FakeReader,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@dataclass
class Heard(Sensor):
    commits: list[dict[int, int]] = field(default_factory=list)
    assigned: list[list[int]] = field(default_factory=list)
    windows: int = 0
    changed: anyio.Event = field(default_factory=anyio.Event)
    window_done: anyio.Event = field(default_factory=anyio.Event)
    control: ControlPlane | None = None  # the loop's control plane, while it runs
    live: LiveConsumer | None = None  # the loop itself, while it runs

    def on_commit(self, offsets: Mapping[int, int]) -> None:
        self.commits.append(dict(offsets))
        changed, self.changed = self.changed, anyio.Event()
        changed.set()

    def on_assigned(self, partitions: Sequence[int]) -> None:
        self.assigned.append(list(partitions))

    def on_window(self, seconds: float) -> None:
        self.windows += 1
        self.window_done.set()

    async def until_routing(self, done: Callable[[RoutingState], bool]) -> RoutingState:
        """Until the loop's routing state satisfies `done`."""
        assert self.control is not None
        while not done(self.control.state):
            last = self.control.state.control_offset
            await self.control.wait_applied(0 if last is None else last + 1)
        return self.control.state

    def committed(self) -> dict[int, int]:
        merged: dict[int, int] = {}
        for offsets in self.commits:
            merged.update(offsets)
        return merged

    async def until_committed(self, ends: dict[int, int]) -> None:
        while any(self.committed().get(p, 0) < end for p, end in ends.items()):
            await self.changed.wait()


def atoms(log: FakeLog, partition: int, count: int, prefix: str = "a") -> None:
    for i in range(count):
        atom_id = f"{prefix}{partition}-{i}"
        event = {"type": "atom.created", "atom_id": atom_id, "text": f"text number {i}"}
        log.append(partition, atom_id.encode(), msgspec.json.encode(event))


@asynccontextmanager
async def live_loop(
    tiny_model: Path,
    log: FakeLog,
    consumer: FakeGroupConsumer,
    producer: FakeProducer,
    *,
    config: Config | None = None,
    models: ModelPool | None = None,
    control_log: FakeControlLog | None = None,
    store: KeyStore | None = None,
    backfill: bool = True,
) -> AsyncIterator[Heard]:
    """The live path on fakes, running until the block ends (`config` and its `models`:
    more models than `tiny`, the stable one)."""
    config = config or Config(models={"tiny": ModelConfig(path=str(tiny_model))})
    config = msgspec.structs.replace(
        config,
        routing=msgspec.structs.replace(config.routing, stable_model="tiny"),
        batching=msgspec.structs.replace(
            config.batching, window_atoms=8, max_wait_ms=5, overlap_windows=True
        ),
    )
    heard = Heard()
    stats = ProcessorStats()
    models = models or ModelPool(config)
    inference = Inference(config.batching, stats, heard)
    processor = WindowProcessor(config, models, producer, inference, stats)  # type: ignore[arg-type]
    stop = anyio.Event()
    control_log = control_log or FakeControlLog()
    async with ControlPlane(config, log=control_log) as control:  # type: ignore[arg-type]
        await control.replay()
        heard.control = control
        reader = FakeReader(log)
        migration = MigrationWorker(
            config,
            control,
            stats,
            reader=reader,  # type: ignore[arg-type]
            store=store,
            backfill=backfill,
        )
        live = LiveConsumer(config, consumer, processor, control, migration, heard)  # type: ignore[arg-type]
        heard.live = live
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(control.tail)
            async with anyio.create_task_group() as loop:
                loop.start_soon(live.run, stop)
                try:
                    yield heard
                finally:
                    stop.set()  # the loop finishes its window and returns
            tasks.cancel_scope.cancel()


async def test_offsets_are_committed_per_partition_after_every_output(tiny_model: Path) -> None:
    log = FakeLog("atoms", 2)
    atoms(log, 0, 11)
    atoms(log, 1, 5)
    log.append(1, b"bad", b"not json")
    consumer = FakeGroupConsumer(log, [0, 1])
    producer = FakeProducer()
    async with live_loop(tiny_model, log, consumer, producer) as heard:
        with anyio.fail_after(30):
            await heard.until_committed({0: 11, 1: 6})
    assert heard.assigned == [[0, 1]]
    assert heard.committed() == {0: 11, 1: 6}
    assert len(producer.keys("embeddings.tiny")) == 16
    assert producer.keys("embed.dlq") == [b"bad"]
    assert heard.windows >= 2  # windows of at most 8 atoms


async def test_a_failed_ack_rewinds_and_redoes_the_window(tiny_model: Path) -> None:
    log = FakeLog("atoms", 1)
    atoms(log, 0, 4)
    consumer = FakeGroupConsumer(log, [0])
    producer = FakeProducer(fail_ack={"embeddings.tiny": [SendFailed("no leader (fake)")]})
    async with live_loop(tiny_model, log, consumer, producer) as heard:
        with anyio.fail_after(30):
            await heard.until_committed({0: 4})
    keys = producer.keys("embeddings.tiny")
    assert set(keys) == {f"a0-{i}".encode() for i in range(4)}
    assert len(keys) == 8, "the window was produced twice: at-least-once"
    assert heard.commits == [{0: 4}]


async def test_the_next_window_is_fetched_and_prepared_beside_this_one(tiny_model: Path) -> None:
    log = FakeLog("atoms", 1)
    atoms(log, 0, 40)  # five windows of 8
    consumer = FakeGroupConsumer(log, [0])
    producer = FakeProducer()
    async with live_loop(tiny_model, log, consumer, producer) as heard:
        with anyio.fail_after(30):
            await heard.until_committed({0: 40})
    assert heard.live is not None and heard.live.ahead.used >= 3
    assert producer.keys("embeddings.tiny") == [f"a0-{i}".encode() for i in range(40)]
    ends = [offsets[0] for offsets in heard.commits]
    assert ends == sorted(ends) and ends[-1] == 40


async def test_a_failed_window_gives_back_the_window_fetched_beside_it(tiny_model: Path) -> None:
    """The lookahead fetched past the failed window, into a partition the window did not
    touch: that partition reads again from before the lookahead, so nothing is skipped."""
    log = FakeLog("atoms", 2)
    atoms(log, 0, 10)  # the first window: 8 of partition 0
    atoms(log, 1, 6)  # the lookahead: the last 2 of partition 0 and these 6
    consumer = FakeGroupConsumer(log, [0, 1])
    producer = FakeProducer(fail_ack={"embeddings.tiny": [SendFailed("no leader (fake)")]})
    async with live_loop(tiny_model, log, consumer, producer) as heard:
        with anyio.fail_after(30):
            await heard.until_committed({0: 10, 1: 6})
    assert heard.live is not None and heard.live.ahead.given_back >= 1
    keys = producer.keys("embeddings.tiny")
    expected = {f"a{p}-{i}".encode() for p, n in ((0, 10), (1, 6)) for i in range(n)}
    assert set(keys) == expected
    assert heard.committed() == {0: 10, 1: 6}


async def test_a_commit_refused_by_a_rebalance_is_not_counted(tiny_model: Path) -> None:
    log = FakeLog("atoms", 1)
    atoms(log, 0, 3)
    consumer = FakeGroupConsumer(log, [0])
    consumer.commit_fails = 1
    producer = FakeProducer()
    async with live_loop(tiny_model, log, consumer, producer) as heard:
        with anyio.fail_after(30):
            await heard.window_done.wait()
            assert heard.commits == [] and len(producer.keys("embeddings.tiny")) == 3
            atoms(log, 0, 2, prefix="b")  # the next window commits, and covers the first
            await heard.until_committed({0: 5})
    assert heard.commits == [{0: 5}]
    assert consumer.committed == {0: 5}


async def test_kafka_away_while_reading_from_the_committed_offsets_is_waited_out(
    tiny_model: Path,
) -> None:
    """A rebalance during a fetch means reading again from the committed offsets; Kafka
    unreachable at that moment is waited out (the loop backs off and asks again), not a
    crash of the live loop, and nothing is skipped."""
    log = FakeLog("atoms", 1)
    atoms(log, 0, 20)
    consumer = FakeGroupConsumer(log, [0])
    consumer.rebalance_at_fetch = 2
    consumer.read_committed_fails = [BrokerUnavailable("coordinator away (fake)")] * 2
    producer = FakeProducer()
    async with live_loop(tiny_model, log, consumer, producer) as heard:
        with anyio.fail_after(30):
            await heard.until_committed({0: 20})
    assert consumer.read_committed_fails == [], "the reads that failed were retried"
    assert set(producer.keys("embeddings.tiny")) == {f"a0-{i}".encode() for i in range(20)}
    assert heard.committed() == {0: 20}
