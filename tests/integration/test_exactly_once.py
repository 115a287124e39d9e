"""Exactly-once (`[kafka] exactly_once = true`) on the real broker, as Kafka's own
`transactions_test` checks it: a `read_committed` reader sees every input offset's output
once, across a zombie (an instance SIGSTOPped past its session timeout, whose partitions
moved, then SIGCONTed) and a SIGKILL, with live creates, updates and deletes throughout."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas.deadletter import decode_dead_letter_headers
from schemas.routing import RoutingPhase
from stream.config import Config, load_config
from stream.core.records import OutRecord
from stream.kafka.clients import make_consumer
from stream.ops.operator import send_command
from stream.processor.topics import prepare_topics
from stream.processor.transactions import PartitionTransactions
from tests.integration.test_lifecycle import processor_process
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    expected_final,
    live_only,
    mid_backfill,
    model_final,
    phase_is,
    start,
)
from tests.support.kafka import create_topic, end_offsets, produce, read_all, unique
from tests.support.kafka import until_committed as committed_to
from tests.support.load import LiveLoad
from tests.support.processor import wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.slow]

BACKLOG = 600
SESSION_SECS = 10  # the test config's session timeout
STORM_ROUNDS = 12  # rebalance pairs of the storm test
BAD = [(b"bad-1", b"{not json"), (b"bad-2", b'{"type": "atom.created", "atom_id": "bad-2"}')]


async def until_committed(config: Any, ends: dict[int, int], *, within: float) -> None:
    """Wait until the processors (other processes) have committed `ends` on `atoms`."""
    kafka = config.kafka
    await committed_to(
        kafka.bootstrap_servers, kafka.group_id, config.topics.atoms, ends, within=within
    )


def source_offset(record: Any) -> tuple[int, int]:
    value = dict(record.headers)["lattice.source-offset"].decode()
    _, partition, offset = value.rsplit("/", 2)
    return int(partition), int(offset)


def exactly_once(path: Path) -> Config:
    """Turn `[kafka] exactly_once` on in a test config written by `make_config`."""
    session = "session_timeout_ms = 10000\n"
    path.write_text(path.read_text().replace(session, session + "exactly_once = true\n"))
    config = load_config(path, {})
    assert config.kafka.exactly_once
    return config


async def seeded(bootstrap: str, atoms: str, path: Path, *, seed: int) -> tuple[Config, History]:
    """Exactly-once on for the test config at `path`, and a first few atoms on every
    partition of `atoms` (the processors' first commits mark them started)."""
    config = exactly_once(path)
    history = History(seed=seed)
    await produce(bootstrap, atoms, history.events(3 * PARTITIONS, churn=0.0))
    return config, history


async def quarter_load(config: Config, history: History) -> tuple[LiveLoad, float]:
    """With the processors started (their first atoms committed), measure capacity as the
    time to drain a backlog, and return a live load at a quarter of it."""
    bootstrap, atoms = config.kafka.bootstrap_servers, config.topics.atoms
    await until_committed(config, await end_offsets(bootstrap, atoms, PARTITIONS), within=120)
    await produce(bootstrap, atoms, history.events(BACKLOG, churn=0.3))
    began = time.monotonic()
    await until_committed(config, await end_offsets(bootstrap, atoms, PARTITIONS), within=120)
    capacity = BACKLOG / (time.monotonic() - began)
    return LiveLoad(
        bootstrap, atoms, lambda n: history.events(n, churn=0.4), capacity / 4
    ), capacity


@pytest.mark.timeout(420)
async def test_a_zombie_and_a_kill_leave_every_output_exactly_once(
    bootstrap: str, make_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    _, path = make_config(atoms, extra="[batching]\nwindow_atoms = 32\n")
    config = exactly_once(path)
    history = History(seed=53)
    await produce(bootstrap, atoms, history.events(3 * PARTITIONS, churn=0.0) + BAD)
    with processor_process(path) as first, processor_process(path) as second:
        load, capacity = await quarter_load(config, history)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            await anyio.sleep(3)  # live traffic before the fault (pacing, not a condition)
            first.send_signal(signal.SIGSTOP)  # a zombie: its session expires, its partitions move
            await anyio.sleep(SESSION_SECS + 8)  # the fault's length
            first.send_signal(signal.SIGCONT)  # it wakes mid-window, with transactions open
            await anyio.sleep(5)
            second.send_signal(signal.SIGKILL)  # a crash with a transaction open
            second.wait(timeout=30)
            with processor_process(path) as restarted:
                await anyio.sleep(5)
                load.stop()
                ends = await end_offsets(bootstrap, atoms, PARTITIONS)
                await until_committed(config, ends, within=180)
                restarted.send_signal(signal.SIGTERM)
                # 0 once it runs; -SIGTERM if still importing torch (no handler yet)
                assert restarted.wait(timeout=60) in (0, -signal.SIGTERM)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0

    inputs = await read_all(bootstrap, atoms)
    bad = {(r.partition, r.offset) for r in inputs if r.key in {k for k, _ in BAD}}
    valid = {(r.partition, r.offset) for r in inputs} - bad
    outputs = Counter(
        source_offset(r) for r in await read_all(bootstrap, config.topics.embeddings("tiny"))
    )
    duplicates = {k: n for k, n in outputs.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} inputs output more than once: {list(duplicates)[:5]}"
    assert set(outputs) == valid, "every valid input once, nothing else"
    letters = Counter(
        (info.partition, info.offset)
        for info in (
            decode_dead_letter_headers(r.headers)
            for r in await read_all(bootstrap, config.topics.dlq)
        )
    )
    assert letters == Counter({offset: 1 for offset in bad}), (
        "exactly one dead letter per bad input"
    )
    print(
        f"\nexactly-once: {len(valid)} inputs, {sum(outputs.values())} outputs read committed, "
        f"0 duplicates, {len(bad)} dead letters; capacity {capacity:.0f}/s, load {load.rate:.0f}/s"
    )


@pytest.mark.timeout(420)
async def test_a_migration_killed_mid_backfill_writes_each_input_once_to_the_target(
    bootstrap: str, migration_config: Any
) -> None:
    """Backfill chunks commit with their progress: a SIGKILL mid-backfill neither repeats
    nor skips a chunk, and the target ends equal to a from-scratch replay (G4)."""
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    _, path = migration_config(atoms)
    config, history = await seeded(bootstrap, atoms, path, seed=59)
    with processor_process(path) as first, processor_process(path) as second:
        load, capacity = await quarter_load(config, history)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            command = start("m1", batch_size=20, rollback_window_secs=3600)
            assert (await send_command(config, command))[0]
            mid = await wait_for_routing(
                config,
                mid_backfill,
                within=120,
            )
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
            with processor_process(path) as restarted:
                await wait_for_routing(config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=240)
                load.stop()
                await until_committed(
                    config, await end_offsets(bootstrap, atoms, PARTITIONS), within=180
                )
                for child in (second, restarted):
                    child.send_signal(signal.SIGTERM)
                assert second.wait(timeout=60) == 0
                assert restarted.wait(timeout=60) in (0, -signal.SIGTERM)

    target = await read_all(bootstrap, config.topics.embeddings("tinyb"))
    counts = Counter(source_offset(r) for r in target)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} inputs written twice to the target"
    expected = live_only(expected_final(await read_all(bootstrap, atoms)))
    assert live_only(model_final(target)) == expected, "G4: last per key = a fresh replay"
    source = Counter(
        source_offset(r) for r in await read_all(bootstrap, config.topics.embeddings("tiny"))
    )
    assert max(source.values()) == 1, "the source too, live, once per input"
    print(
        f"\nexactly-once migration: killed at {mid.migration.progress if mid.migration else None}; "
        f"{len(counts)} target records read committed, 0 duplicates; capacity {capacity:.0f}/s, "
        f"load {load.rate:.0f}/s"
    )


@pytest.mark.timeout(120)
async def test_a_producer_whose_sequence_broke_is_replaced_once_its_transaction_aborts(
    bootstrap: str, make_config: Any
) -> None:
    """After a long outage the broker can answer every send of a transactional producer with
    OutOfOrderSequenceNumber (seen in the fault suite: a partition stalled for minutes).
    Aborting stops such a producer, and the next transaction gets a new one, whose epoch
    (InitProducerId) starts the sequence again; its transaction commits."""
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=1)
    _, path = make_config(atoms)
    config = exactly_once(path)
    await prepare_topics(config)
    output = OutRecord(key=b"a-1", value=b"{}", headers=[])
    async with PartitionTransactions(config) as transactions:
        broken = await transactions.begin(0)
        await (await broken.send(config.topics.dlq, output))
        broken.broken = True  # what an OutOfOrderSequenceNumber acknowledgement marks
        assert await transactions.abort([0]) == [0]
        fresh = await transactions.begin(0)
        assert fresh is not broken and not fresh.broken
        await (await fresh.send(config.topics.dlq, output))
        await transactions.commit_outputs(0)
        assert await transactions.abort([0]) == [], "a sound producer is kept"
    seen = [r for r in await read_all(bootstrap, config.topics.dlq) if r.key == b"a-1"]
    assert len(seen) == 1, "the aborted transaction's record is not seen, the committed one is"


async def join_and_leave(config: Config, *, holds: float) -> None:
    """A plain member joins the processors' group (an eager rebalance takes every partition
    away and hands them out again), holds its share without processing, and leaves (a
    second rebalance gives the processors their partitions back)."""
    member = make_consumer(config.kafka, group_id=config.kafka.group_id)
    await member.start()
    try:
        member.subscribe([config.topics.atoms])
        with anyio.fail_after(60):
            while not member.assignment():
                await member.getmany(timeout_ms=200, max_records=1)  # records are dropped
        member.pause(*member.assignment())
        with anyio.move_on_after(holds):
            while True:
                await member.getmany(timeout_ms=200)  # heartbeats ride on the polls
    finally:
        await member.stop()  # leaves the group: no commit, its share is redone


@pytest.mark.timeout(420)
async def test_a_rebalance_storm_leaves_every_output_exactly_once(
    bootstrap: str, make_config: Any
) -> None:
    """Rebalances that keep partitions where they were: the processor's own last commits
    must not be read back stale and redone (the duplicate window of a fault run)."""
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    _, path = make_config(atoms, extra="[batching]\nwindow_atoms = 32\n")
    config, history = await seeded(bootstrap, atoms, path, seed=61)
    with processor_process(path) as first, processor_process(path) as second:
        load, capacity = await quarter_load(config, history)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            for round_ in range(STORM_ROUNDS):
                await join_and_leave(config, holds=1.0 + round_ % 3)
            load.stop()
        ends = await end_offsets(bootstrap, atoms, PARTITIONS)
        await until_committed(config, ends, within=180)
        for child in (first, second):
            child.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0

    inputs = {(r.partition, r.offset) for r in await read_all(bootstrap, atoms)}
    outputs = Counter(
        source_offset(r) for r in await read_all(bootstrap, config.topics.embeddings("tiny"))
    )
    duplicates = {k: n for k, n in outputs.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} inputs output more than once: {list(duplicates)[:5]}"
    assert set(outputs) == inputs, "every input once"
    print(
        f"\nrebalance storm: {STORM_ROUNDS} joins and leaves, {len(inputs)} inputs, 0 "
        f"duplicates; capacity {capacity:.0f}/s, load {load.rate:.0f}/s"
    )
