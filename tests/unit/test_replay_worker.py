"""Replays run by the live owner on fakes of the Kafka boundary (and a real key store): while
live updates and deletes keep arriving, no old version is produced after a newer one."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import msgspec
import pytest

from schemas.control import StartReplay
from schemas.routing import ReplayState
from stream.config import Config, ModelConfig
from stream.embed.pool import ModelPool
from stream.processor.backfill import MigrationWorker
from stream.processor.control import ControlPlane
from stream.processor.inference import Inference
from stream.processor.live import LiveConsumer
from stream.processor.sensors import ProcessorStats
from stream.processor.window import WindowProcessor
from stream.state.keystore import KeyStore
from tests.support.fakes import (
    FakeControlLog,
    FakeGroupConsumer,
    FakeLog,
    FakeProducer,
    FakeReader,
)
from tests.unit.test_live_consumer import Heard

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

KEYS = 60


def event(rng: random.Random, atom_id: str, serial: int) -> bytes:
    if rng.random() < 0.15:
        return msgspec.json.encode({"type": "atom.deleted", "atom_id": atom_id})
    text = f"version {serial} of {atom_id}"
    return msgspec.json.encode({"type": "atom.created", "atom_id": atom_id, "text": text})


def append_events(log: FakeLog, rng: random.Random, count: int, serial: int) -> int:
    for _ in range(count):
        atom_id = f"k{rng.randrange(KEYS)}"
        partition = int(atom_id[1:]) % len(log.partitions)
        log.append(partition, atom_id.encode(), event(rng, atom_id, serial))
        serial += 1
    return serial


def source_offset(headers: list[tuple[str, bytes]]) -> tuple[int, int]:
    value = dict(headers)["lattice.source-offset"].decode()
    _, partition, offset = value.rsplit("/", 2)
    return int(partition), int(offset)


async def test_a_replay_under_live_updates_never_lands_an_old_version_last(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = Config(models={"tiny": ModelConfig(path=str(tiny_model))})
    config = msgspec.structs.replace(
        config,
        routing=msgspec.structs.replace(config.routing, stable_model="tiny"),
        batching=msgspec.structs.replace(
            config.batching, window_atoms=8, max_wait_ms=5, backfill_chunk_ms=5
        ),
    )
    rng = random.Random(7)
    log = FakeLog("atoms", 2)
    serial = append_events(log, rng, 400, 0)
    history_ends = {p: len(records) for p, records in enumerate(log.partitions)}
    consumer = FakeGroupConsumer(log, [0, 1])
    consumer.positions = dict(history_ends)  # the history went through the live path before
    consumer.committed = dict(history_ends)
    producer = FakeProducer()
    heard = Heard()
    stats = ProcessorStats()
    processor = WindowProcessor(
        config,
        ModelPool(config),
        producer,  # type: ignore[arg-type]
        Inference(config.batching, stats, heard),
        stats,
    )
    store = await anyio.to_thread.run_sync(KeyStore.open, tmp_path / "state")
    stop = anyio.Event()
    async with ControlPlane(config, log=FakeControlLog()) as control:  # type: ignore[arg-type]
        await control.replay()
        migration = MigrationWorker(config, control, stats, reader=FakeReader(log), store=store)  # type: ignore[arg-type]
        live = LiveConsumer(config, consumer, processor, control, migration, heard)  # type: ignore[arg-type]
        async with migration, anyio.create_task_group() as tasks:
            tasks.start_soon(control.tail)
            tasks.start_soon(live.run, stop)
            serial = append_events(log, rng, 20, serial)  # live traffic before the request
            await control.append(
                StartReplay(
                    replay_id="r1",
                    model="tiny",
                    partitions=2,
                    from_offsets={0: 0, 1: 0},
                    to_offsets=history_ends,
                )
            )
            with anyio.fail_after(90):
                while control.state.replays.get("r1") is None or (
                    control.state.replays["r1"].state is ReplayState.IN_PROGRESS
                ):
                    serial = append_events(log, rng, 2, serial)  # updates keep arriving
                    await anyio.sleep(0.02)  # pacing of the offered load (100 events/s)
                ends = {p: len(records) for p, records in enumerate(log.partitions)}
                await heard.until_committed(ends)
            stop.set()
            tasks.cancel_scope.cancel()
    replay = control.state.replays["r1"]
    assert replay.state is ReplayState.COMPLETED
    progress = replay.progress
    assert progress.total is not None and progress.processed == progress.total

    sent = [(r, source_offset(r.headers)) for t, r in producer.sent if t == "embeddings.tiny"]
    replayed = [
        (r, src) for r, src in sent if r.value is not None and b'"path":"backfill"' in r.value
    ]
    assert replayed, "the replay embedded history"
    assert len({r.key for r, _ in replayed}) == len(replayed), "each key at most once"
    seen: dict[bytes | None, tuple[int, int]] = {}
    for record, src in sent:
        assert src >= seen.get(record.key, src), f"{record.key!r}: {src} after {seen[record.key]}"
        seen[record.key] = src
    # The last record of every key is its latest event: a vector, or a tombstone if deleted.
    latest: dict[bytes | None, tuple[tuple[int, int], bool]] = {}
    for partition, records in enumerate(log.partitions):
        for source in records:
            deleted = b"atom.deleted" in (source.value or b"")
            latest[source.key] = ((partition, source.offset), deleted)
    last = {record.key: (src, record.value is None) for record, src in sent}
    for key, (src, deleted) in latest.items():
        if key in last:
            assert last[key] == (src, deleted), key
        else:  # never written: its only events were deletes in the history, left as they were
            assert deleted and src[1] < history_ends[src[0]], key
    handoffs = replay.handoffs
    assert all(handoffs[p] >= history_ends[p] for p in (0, 1))
    assert any(src[1] >= handoffs[src[0]] for _, src in sent), "live writes after the handoff"
