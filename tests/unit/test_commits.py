"""The live path's offsets: a committed offset read below this instance's own commits is
stale (a transactional commit not applied yet), and reading never goes back past them."""

from __future__ import annotations

import pytest

from stream.processor.commits import Offsets
from stream.processor.sensors import Sensor
from tests.support.fakes import FakeGroupConsumer, FakeLog

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


def owner() -> tuple[FakeLog, FakeGroupConsumer, Offsets]:
    log = FakeLog("atoms", 2)
    for i in range(100):
        log.append(i % 2, f"k{i}".encode(), b"{}")
    consumer = FakeGroupConsumer(log, [0, 1])
    return log, consumer, Offsets(consumer, Sensor())  # type: ignore[arg-type]


async def test_a_stale_committed_offset_resumes_from_this_instances_own_commit() -> None:
    _, consumer, offsets = owner()
    offsets.committed({0: 32, 1: 20})  # what its transactions committed
    consumer.stale_committed = {0: 0, 1: 20}  # partition 0 read before its marker applied
    resumed = await offsets.resume_from_committed([0, 1])
    assert resumed == {0: 32, 1: 20}
    assert consumer.positions == {0: 32, 1: 20}
    assert offsets.stale_reads == 1


async def test_nothing_committed_anywhere_reads_from_the_first_offset() -> None:
    _, consumer, offsets = owner()
    consumer.positions = {0: 7, 1: 9}
    assert await offsets.resume_from_committed([0, 1]) == {0: None, 1: None}
    assert consumer.positions == {0: 0, 1: 0}
    assert offsets.stale_reads == 0


async def test_a_committed_offset_past_its_own_is_another_owners_progress() -> None:
    _, consumer, offsets = owner()
    offsets.committed({0: 10})
    offsets.forget([0])  # revoked; another instance went on meanwhile
    consumer.committed = {0: 40}
    assert await offsets.resume_from_committed([0]) == {0: 40}
    assert offsets.stale_reads == 0


async def test_fetched_records_below_its_own_commits_are_dropped_and_counted() -> None:
    log, _, offsets = owner()
    offsets.committed({0: 10})
    records = log.partitions[0][5:15] + log.partitions[1][0:3]
    kept = offsets.drop_done(records)
    assert [(r.partition, r.offset) for r in kept] == [(0, o) for o in range(10, 15)] + [
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert offsets.dropped_done == 5
