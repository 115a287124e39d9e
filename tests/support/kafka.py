"""Real-broker helpers: unique names, topic creation, producing atoms, reading topics."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

REPO = Path(__file__).resolve().parents[2]
LOCAL_KAFKA = REPO / "deploy" / "kafka" / "local-kafka"
_counter = itertools.count()


def unique(prefix: str) -> str:
    """A fresh topic or group name for one test."""
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Broker:
    """A running broker the tests may use."""

    bootstrap: str
    started_here: bool


def start_local_broker() -> Broker:
    """Use $KAFKA_TEST_BOOTSTRAP, else start (idempotently) the repo's local broker."""
    given = os.environ.get("KAFKA_TEST_BOOTSTRAP")
    if given:
        return Broker(given, started_here=False)
    env = test_broker_env()
    running = subprocess.run([str(LOCAL_KAFKA), "status"], env=env, capture_output=True)
    if running.returncode != 0:
        subprocess.run([str(LOCAL_KAFKA), "start"], env=env, check=True)
    return Broker(f"127.0.0.1:{env['KAFKA_PORT']}", started_here=running.returncode != 0)


def stop_local_broker() -> None:
    """Stop the broker `start_local_broker` started."""
    subprocess.run([str(LOCAL_KAFKA), "stop"], env=test_broker_env(), check=True)


class OwnBroker:
    """A broker of one test's own (its port, its data directory), for tests that stop and
    start it; the session's broker stays up for every other test."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.env = {**test_broker_env(), "KAFKA_PORT": str(port), "KAFKA_DIR": str(directory)}
        self.bootstrap = f"127.0.0.1:{port}"

    async def _local_kafka(self, command: str) -> None:
        await anyio.run_process([str(LOCAL_KAFKA), command], env=self.env, stdout=None)

    async def start(self) -> None:
        """Start it (returns once it answers metadata requests)."""
        await self._local_kafka("start")

    async def stop(self) -> None:
        """Stop it; no process is left behind."""
        await self._local_kafka("stop")


@contextmanager
def local_kafka(**settings: str) -> Iterator[None]:
    """A broker of a module's own for the block: `local-kafka` with these environment
    settings (KAFKA_PORT, KAFKA_DIR, listeners, properties, format arguments); stopped after."""
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_CONTROLLER_PORT"}
    env.update(settings)
    try:
        started = subprocess.run(
            [str(LOCAL_KAFKA), "start"], env=env, capture_output=True, text=True, timeout=300
        )
        assert started.returncode == 0, (
            f"local-kafka start failed:\n{started.stdout}{started.stderr}"
        )
        yield
    finally:
        subprocess.run([str(LOCAL_KAFKA), "stop"], env=env, capture_output=True, timeout=120)


def test_broker_env() -> dict[str, str]:
    """The test broker gets its own port and data directory, apart from the demo's."""
    env = dict(os.environ)
    env.setdefault("KAFKA_PORT", "19092")
    env.setdefault(
        "KAFKA_DIR", str(REPO / ".kafka" / f"test-{env.get('KAFKA_VERSION', 'default')}")
    )
    return env


async def create_topic(bootstrap: str, name: str, partitions: int = 1, **configs: str) -> None:
    """Create one topic and wait for the broker to confirm it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, topic_configs=configs)]
        )
    finally:
        await admin.close()


def atom_value(atom_id: str, text: str, **extra: object) -> bytes:
    """The JSON of an atom.created event."""
    return msgspec.json.encode({"type": "atom.created", "atom_id": atom_id, "text": text, **extra})


def delete_value(atom_id: str) -> bytes:
    """The JSON of an atom.deleted event."""
    return msgspec.json.encode({"type": "atom.deleted", "atom_id": atom_id})


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None]],
    *,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> int:
    """Send (key, value) records in order and wait for all acknowledgements."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 * 1024 * 1024
    )
    count = 0
    try:
        await producer.start()  # inside: a start that fails (broker down) still closes it
        futures = []
        try:
            for key, value in records:
                futures.append(
                    await producer.send(
                        topic, value=value, key=key, headers=headers, partition=partition
                    )
                )
                count += 1
        finally:
            # Every acknowledgement is awaited, also after a failure: an unretrieved error
            # (a burst refused in a broker restart) would fail the test at teardown.
            results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            raise errors[0]
    finally:
        await producer.stop()
    return count


async def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record currently in `topic` (all partitions), up to the end offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[Any] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for messages in (await consumer.getmany(timeout_ms=1000)).values():
                records.extend(
                    m for m in messages if m.offset < ends[TopicPartition(m.topic, m.partition)]
                )
        return records
    finally:
        await consumer.stop()


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (-1 where none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
        return {tp.partition: (offsets[tp].offset if tp in offsets else -1) for tp in tps}
    finally:
        await admin.close()


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The log-end offset of each partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: ends[tp] for tp in tps}
    finally:
        await consumer.stop()


async def until_committed(
    bootstrap: str, group: str, topic: str, ends: dict[int, int], *, within: float
) -> dict[int, int]:
    """Wait until `group` has committed at least `ends` on every non-empty partition of
    `topic`; the committed offsets. Polled: the consumers are other processes (or another
    task's), and a fresh broker may not have a group coordinator yet."""
    with anyio.fail_after(within):
        while True:
            try:
                done = await committed(bootstrap, group, topic, len(ends))
            except KafkaError:  # no group coordinator yet
                done = dict.fromkeys(ends, -1)
            if all(done[p] >= end for p, end in ends.items() if end > 0):
                return done
            await anyio.sleep(0.5)  # another process's progress: nothing to await


async def collect(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Any]], bool],
    *,
    within: float,
    alive: Callable[[], bool] = lambda: True,
    client: dict[str, Any] | None = None,
) -> list[Any]:
    """Read `topic` from the beginning, as records arrive, until `done(records)` holds.

    `client` replaces the plain bootstrap with connection options (e.g. SASL/TLS).
    """
    consumer = AIOKafkaConsumer(
        **(client or {"bootstrap_servers": bootstrap}),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        metadata_max_age_ms=500,
    )
    await consumer.start()
    # A pattern waits quietly for a topic the processor has not created yet.
    consumer.subscribe(pattern=f"^{re.escape(topic)}$")
    records: list[Any] = []
    try:
        with anyio.fail_after(within):
            while not done(records):
                if not alive():
                    raise AssertionError(f"the processor exited before {topic} was complete")
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(messages)
    finally:
        await consumer.stop()
    return records


def latest_by_key(records: Iterable[Any]) -> dict[str, Any]:
    """The last record per key in log order, as compaction keeps it."""
    latest: dict[str, Any] = {}
    for record in records:
        latest[record.key.decode()] = record
    return latest
