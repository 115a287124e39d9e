"""The fault suite, modeled on Kafka's `transactions_test`: a migration runs with live
creates, updates and deletes and a `read_committed` reader throughout, while processors are
scaled 1 -> 3 -> 1, one of them becomes a zombie (SIGSTOPped past its session timeout, then
SIGCONTed), rounds of SIGKILL or SIGTERM hit random instances among three, and the broker
restarts.

It asserts, for exactly-once and (full set) at-least-once:
- the source model's outputs cover every valid input offset, and nothing else (G1); with
  `exactly_once = true` each exactly once, and exactly one dead letter per bad input;
  at-least-once reports its duplicates;
- G2/G4: at the rollback window the target's record with the highest source offset per
  key equals a from-scratch replay of `atoms`, and so does the last in log order with
  exactly-once (at-least-once reports the keys where a zombie's late write is last);
- G3: after `rollback`, with atoms created after cutover, the source holds every live atom;
- G5: every instance published the same routing for the same control offset;
- the reader that followed the outputs through every fault saw exactly what a final read
  sees.

CI runs a short round (3 kill rounds, one short broker restart, exactly-once). The full set
(`LATTICE_TEST_FAULTS=full`): 10 rounds, two broker restarts of which one is longer than a
minute, for both modes. Each round waits until every partition commits again: the time the
group takes to recover is printed, with the figures of the run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from schemas.control import Rollback
from schemas.deadletter import decode_dead_letter_headers
from schemas.routing import MigrationState, RoutingPhase, RoutingStatus
from stream.config import Config, load_config
from stream.ops.operator import send_command
from tests.integration.conftest import write_config
from tests.integration.test_exactly_once import BAD, SESSION_SECS, exactly_once, source_offset
from tests.integration.test_lifecycle import processor_process
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    expected_final,
    highest_offset_final,
    live_only,
    model_final,
    phase_is,
    start,
)
from tests.support.kafka import (
    OwnBroker,
    committed,
    create_topic,
    end_offsets,
    produce,
    read_all,
    unique,
)
from tests.support.load import LiveLoad
from tests.support.processor import wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.slow]

FULL = os.environ.get("LATTICE_TEST_FAULTS") == "full"
ROUNDS = 10 if FULL else 3
# Broker restarts: (before kill round, seconds down).
RESTARTS = [(1, 5.0), (ROUNDS // 2, 65.0)] if FULL else [(1, 5.0)]
MODES = [True, False] if FULL else [True]
HISTORY = 1_500
BACKLOG = 600
RECOVER_SECS = 180  # a round fails if some partition commits nothing for this long


@dataclass
class Fleet:
    """The processor instances of one test, as child processes."""

    path: Path
    stack: ExitStack
    rng: random.Random
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def add(self) -> subprocess.Popen[bytes]:
        child = self.stack.enter_context(processor_process(self.path))
        self.running.append(child)
        return child

    async def stop(self, child: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        """Signal one instance and wait for its exit (SIGTERM drains: exit 0)."""
        child.send_signal(signum)
        code = await anyio.to_thread.run_sync(lambda: child.wait(timeout=90))
        if signum is signal.SIGTERM:
            # 0 once it runs; -SIGTERM if it was still importing torch (no handler yet)
            assert code in (0, -signal.SIGTERM), f"SIGTERM exit {code}"
        self.running.remove(child)
        self.events.append(signum.name)

    def check(self) -> None:
        """Every instance the test did not stop is still running."""
        dead = [(child.pid, child.returncode) for child in self.running if child.poll() is not None]
        assert not dead, f"processors exited on their own: {dead}"


@dataclass
class Follower:
    """A `read_committed` reader of the outputs for the whole test, through every fault."""

    bootstrap: str
    topics: list[str]
    records: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    _grew: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            metadata_max_age_ms=1000,
        )
        await consumer.start()
        try:
            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=500)
                except KafkaError:  # the broker is restarting; the consumer reconnects
                    await anyio.sleep(1.0)
                    continue
                for messages in batches.values():
                    for message in messages:
                        self.records[message.topic].append(message)
                if batches:
                    grew, self._grew = self._grew, anyio.Event()
                    grew.set()
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()

    def count(self) -> int:
        return sum(len(records) for records in self.records.values())

    async def reach(self, count: int) -> None:
        """Wait until it has read `count` records."""
        while self.count() < count:
            await self._grew.wait()


async def group_offsets(config: Config) -> dict[int, int]:
    """The group's committed offsets; -1 each while the coordinator does not answer."""
    try:
        return await committed(
            config.kafka.bootstrap_servers, config.kafka.group_id, config.topics.atoms, PARTITIONS
        )
    except KafkaError:  # a fresh or restarting broker: no coordinator yet
        return dict.fromkeys(range(PARTITIONS), -1)


async def every_partition_commits(
    config: Config, fleet: Fleet, *, within: float = RECOVER_SECS
) -> float:
    """Wait until every partition commits past where it was now; the seconds it took."""
    began = time.monotonic()
    with anyio.fail_after(within):
        before = await group_offsets(config)
        while min(before.values()) < 0:  # a restarted broker's coordinator is loading
            await anyio.sleep(0.5)  # polled: the broker's state, nothing to await
            before = await group_offsets(config)
        while True:
            fleet.check()
            now = await group_offsets(config)
            if all(now[p] > before[p] for p in before):
                return time.monotonic() - began
            await anyio.sleep(0.5)  # another process's progress: polled, nothing to await


async def until_drained(config: Config, fleet: Fleet, *, within: float) -> None:
    """Wait until the group committed the end of `atoms` on every partition."""
    ends = await end_offsets(config.kafka.bootstrap_servers, config.topics.atoms, PARTITIONS)
    with anyio.fail_after(within):
        while True:
            fleet.check()
            now = await group_offsets(config)
            if all(now[p] >= end for p, end in ends.items() if end > 0):
                return
            await anyio.sleep(0.5)  # another process's progress: polled, nothing to await


async def measure_capacity(config: Config, fleet: Fleet, history: History) -> float:
    """Atoms/s the fleet of one drains a backlog at (the start of the test)."""
    await until_drained(config, fleet, within=180)
    await produce(
        config.kafka.bootstrap_servers, config.topics.atoms, history.events(BACKLOG, churn=0.3)
    )
    began = time.monotonic()
    await until_drained(config, fleet, within=180)
    return BACKLOG / (time.monotonic() - began)


def out_of_order(records: list[Any], expected: dict[str, tuple[int, int]], eos: bool) -> int:
    """G4 in log order: the keys whose last record is not the replay's. Exactly-once: none
    (asserted). At-least-once, a zombie (paused past its session timeout with records
    buffered) can write an older version after its partitions' new owner wrote a newer one;
    a sink that keeps the highest source offset is right whatever the order (checked by the
    caller), and the count is reported."""
    final = live_only(model_final(records))
    stale = sum(1 for key in final.keys() | expected.keys() if final.get(key) != expected.get(key))
    if eos:
        assert stale == 0, f"exactly-once: {stale} keys whose last record is not the replay's"
    return stale


def valid_atoms(records: list[Any]) -> list[Any]:
    """The input records without the bad ones (dead letters, no atom)."""
    bad_keys = {key for key, _ in BAD}
    return [record for record in records if record.key not in bad_keys]


def statuses_agree(records: list[Any]) -> int:
    """G5: every routing status published for one control offset says the same; returns
    how many control offsets were published by more than one instance."""
    seen: dict[int, set[tuple[Any, ...]]] = defaultdict(set)
    publishers: dict[int, int] = Counter()
    for record in records:
        status = msgspec.json.decode(record.value, type=RoutingStatus)
        if status.control_offset is None:
            continue
        seen[status.control_offset].add(
            (status.query_model, tuple(status.write_models), status.phase, status.state)
        )
        publishers[status.control_offset] += 1
    disagree = {offset: views for offset, views in seen.items() if len(views) > 1}
    assert not disagree, f"G5: instances disagree on the routing: {disagree}"
    return sum(1 for n in publishers.values() if n > 1)


def fault_config(
    tmp_path: Path, broker: OwnBroker, tiny_model: Path, tiny_model_b: Path, atoms: str, eos: bool
) -> tuple[Config, Path]:
    path = write_config(
        tmp_path,
        broker.bootstrap,
        models={"tiny": tiny_model, "tinyb": tiny_model_b},
        stable="tiny",
        atoms=atoms,
        extra="[batching]\nwindow_atoms = 32\nmicro_batch_atoms = 16\n",
    )
    return (exactly_once(path) if eos else load_config(path, {})), path


@pytest.mark.timeout(1500 if FULL else 600)
@pytest.mark.parametrize("eos", MODES, ids=lambda eos: "exactly-once" if eos else "at-least-once")
async def test_migration_survives_kills_zombie_scaling_and_broker_restarts(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path, eos: bool
) -> None:
    broker = OwnBroker(tmp_path / "kafka")
    await broker.start()
    try:
        await fault_round(broker, tiny_model, tiny_model_b, tmp_path, eos)
    finally:
        await broker.stop()


async def fault_round(
    broker: OwnBroker, tiny_model: Path, tiny_model_b: Path, tmp_path: Path, eos: bool
) -> None:
    began = time.monotonic()
    atoms = unique("atoms")
    bootstrap = broker.bootstrap
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, path = fault_config(tmp_path, broker, tiny_model, tiny_model_b, atoms, eos)
    source, target = config.topics.embeddings("tiny"), config.topics.embeddings("tinyb")
    history = History(seed=71)
    await produce(bootstrap, atoms, history.events(HISTORY, churn=0.3) + BAD)
    rng = random.Random(73)
    recoveries: dict[str, float] = {}
    stale: dict[str, int] = {}
    with ExitStack() as stack:
        fleet = Fleet(path, stack, rng)
        fleet.add()  # scale 1
        capacity = await measure_capacity(config, fleet, history)
        load = LiveLoad(
            bootstrap,
            atoms,
            lambda n: history.events(n, churn=0.4),
            capacity / 4,
            ride_outages=True,
        )
        follower = Follower(bootstrap, [source, target, config.topics.dlq])
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            tasks.start_soon(follower.run)
            command = start("faults", batch_size=20, rollback_window_secs=3600)
            assert (await send_command(config, command))[0]
            fleet.add()  # scale 1 -> 3
            fleet.add()
            recoveries["scale 1->3"] = await every_partition_commits(config, fleet)
            zombie = rng.choice(fleet.running)
            zombie.send_signal(signal.SIGSTOP)  # its session expires, its partitions move
            await anyio.sleep(SESSION_SECS + 8)  # the fault's length
            zombie.send_signal(signal.SIGCONT)  # it wakes mid-window, transactions open
            recoveries["zombie"] = await every_partition_commits(config, fleet)
            for round_ in range(ROUNDS):
                for before_round, down_secs in RESTARTS:
                    if before_round == round_:
                        await broker.stop()
                        await anyio.sleep(down_secs)  # the outage's length
                        await broker.start()
                        key = f"broker down {down_secs:.0f}s"
                        recoveries[key] = await every_partition_commits(config, fleet)
                victim = rng.choice(fleet.running)
                signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
                await fleet.stop(victim, signum)
                fleet.add()
                recoveries[f"round {round_ + 1} {signum.name}"] = await every_partition_commits(
                    config, fleet
                )
            await wait_for_routing(config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=300)
            for child in fleet.running[1:]:  # scale 3 -> 1
                await fleet.stop(child, signal.SIGTERM)
            load.stop()
            await until_drained(config, fleet, within=300)
            # G2/G4: the target at the rollback window, ingestion over and drained.
            expected_at_window = live_only(
                expected_final(valid_atoms(await read_all(bootstrap, atoms)))
            )
            at_window = await read_all(bootstrap, target)
            assert live_only(highest_offset_final(at_window)) == expected_at_window, "G2/G4"
            stale["target"] = out_of_order(at_window, expected_at_window, eos)
            # G3: rolled back, and atoms created after cutover reach the source.
            assert (await send_command(config, Rollback(migration_id="faults")))[0]
            rolled = await wait_for_routing(
                config,
                lambda s: (
                    s.migration is not None and s.migration.state is MigrationState.ROLLED_BACK
                ),
                within=60,
            )
            assert rolled.routing_config().write_models == ("tiny",)
            await produce(bootstrap, atoms, history.events(200, churn=0.4))
            await until_drained(config, fleet, within=120)
            await fleet.stop(fleet.running[0], signal.SIGTERM)
            final = {topic: await read_all(bootstrap, topic) for topic in follower.topics}
            expected_records = sum(len(records) for records in final.values())
            with anyio.fail_after(60):
                await follower.reach(expected_records)
            tasks.cancel_scope.cancel()

    inputs = await read_all(bootstrap, atoms)
    bad_keys = {key for key, _ in BAD}
    bad = {(r.partition, r.offset) for r in inputs if r.key in bad_keys}
    valid = {(r.partition, r.offset) for r in inputs} - bad
    source_counts = Counter(source_offset(r) for r in final[source])
    assert set(source_counts) == valid, "G1: every valid input reaches the source, nothing else"
    target_counts = Counter(source_offset(r) for r in final[target])
    duplicates = sum(n - 1 for n in source_counts.values()) + sum(
        n - 1 for n in target_counts.values()
    )
    letters = Counter(
        (info.partition, info.offset)
        for info in (decode_dead_letter_headers(r.headers) for r in final[config.topics.dlq])
    )
    assert set(letters) == bad, "a dead letter for each bad input, for nothing else"
    if eos:
        assert duplicates == 0, f"exactly-once: {duplicates} duplicate outputs"
        assert max(letters.values()) == 1, "exactly-once: one dead letter per bad input"
    expected = live_only(expected_final(valid_atoms(inputs)))
    assert live_only(highest_offset_final(final[source])) == expected, "G3: every atom"
    stale["source"] = out_of_order(final[source], expected, eos)
    shared = statuses_agree(await read_all(bootstrap, config.topics.routing))
    assert follower.count() == expected_records
    print(
        f"\nfault suite ({'exactly-once' if eos else 'at-least-once'}, Kafka "
        f"{os.environ.get('KAFKA_VERSION', '3.9.x')}): {ROUNDS} kill rounds "
        f"({', '.join(fleet.events)}), broker restarts {[s for _, s in RESTARTS]}; "
        f"{len(valid)} valid inputs, {len(bad)} bad; source {sum(source_counts.values())} "
        f"outputs, target {sum(target_counts.values())}; duplicates {duplicates}; dead letters "
        f"{sum(letters.values())}; keys stale in log order {stale}; "
        f"capacity {capacity:.0f}/s, load {load.rate:.0f}/s; "
        f"control offsets published by several instances {shared}; recovery (s) "
        + ", ".join(f"{k} {v:.1f}" for k, v in recoveries.items())
        + f"; total {time.monotonic() - began:.0f}s"
    )
