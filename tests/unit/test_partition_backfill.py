"""One partition's backfill on fakes of the Kafka boundary and a real key store:
latest versions only, deletes as tombstones, live writes win, counted progress."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import msgspec
import pytest

from schemas.control import BackfillConfig, BackfillProgress
from stream.config import Config, ModelConfig
from stream.core.routing import Migration
from stream.core.scheduler import RateEstimate
from stream.embed.pool import ModelPool
from stream.processor.control import ControlPlane
from stream.processor.inference import Inference
from stream.processor.partition_backfill import PartitionBackfill, Phase, migration_range
from stream.processor.sensors import ProcessorStats, Sensor
from stream.processor.window import WindowProcessor
from stream.state.keystore import KeyStore
from tests.support.fakes import FakeControlLog, FakeLog, FakeProducer, FakeReader

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def config_for(tiny_model: Path) -> Config:
    config = Config(
        models={"a": ModelConfig(path=str(tiny_model)), "b": ModelConfig(path=str(tiny_model))}
    )
    return msgspec.structs.replace(
        config, routing=msgspec.structs.replace(config.routing, stable_model="a")
    )


def update_heavy_log(
    events: int, keys: int, seed: int = 3
) -> tuple[FakeLog, dict[str, int | None]]:
    """Creates, updates and deletes (10%); returns the log and each key's final offset
    (None: deleted last)."""
    rng = random.Random(seed)
    log = FakeLog("atoms", 1)
    latest: dict[str, int | None] = {}
    for i in range(events):
        atom_id = f"k{rng.randrange(keys)}"
        if atom_id in latest and rng.random() < 0.1:
            value = msgspec.json.encode({"type": "atom.deleted", "atom_id": atom_id})
            log.append(0, atom_id.encode(), value)
            latest[atom_id] = None
        else:
            value = msgspec.json.encode(
                {"type": "atom.created", "atom_id": atom_id, "text": f"version {i} of {atom_id}"}
            )
            record = log.append(0, atom_id.encode(), value)
            latest[atom_id] = record.offset
    return log, latest


async def test_backfill_embeds_each_live_atom_once_at_its_latest_version(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = config_for(tiny_model)
    log, latest = update_heavy_log(events=300, keys=60)
    handoff = len(log.partitions[0])
    migration = Migration(
        migration_id="m1",
        source="a",
        target="b",
        backfill=BackfillConfig(),
        partitions=1,
        handoffs={0: handoff},
        log_starts={0: 0},
        counted=frozenset({0}),
    )
    control_log = FakeControlLog()
    producer = FakeProducer()
    stats = ProcessorStats()
    inference = Inference(config.batching, stats, Sensor())
    processor = WindowProcessor(config, ModelPool(config), producer, inference, stats)  # type: ignore[arg-type]
    live_written = "k7"  # written live after the handoff: backfill must leave it alone
    store = await anyio.to_thread.run_sync(KeyStore.open, tmp_path / "state")
    try:
        keys = await anyio.to_thread.run_sync(store.partition, "m1", 0, 0)
        async with ControlPlane(config, log=control_log) as control:  # type: ignore[arg-type]
            backfill = PartitionBackfill(
                config,
                migration_range(migration, 0),
                keys,
                position=handoff,
                reader=FakeReader(log),  # type: ignore[arg-type]
                control=control,
                stats=stats,
                rate=RateEstimate(1e-5),
            )
            phases: list[Phase] = [backfill.phase]
            while Phase.EMIT not in phases:
                await backfill.step(processor, 0.01)
                phases.append(backfill.phase)
            await backfill.mark_live([live_written], handoff + 1)
            while Phase.DONE not in phases:
                await backfill.step(processor, 0.001)  # a budget of about one atom at first
                phases.append(backfill.phase)
    finally:
        await anyio.to_thread.run_sync(store.close)
    live_atoms = {k for k, offset in latest.items() if offset is not None}
    embedded = [r for topic, r in producer.sent if topic == "embeddings.b" and r.value is not None]
    tombstones = [r for topic, r in producer.sent if topic == "embeddings.b" and r.value is None]
    expected = sorted(k.encode() for k in live_atoms - {live_written})
    assert sorted(r.key or b"" for r in embedded) == expected
    for record in embedded:
        offset = msgspec.json.decode(record.value or b"")["source"]["offset"]
        assert offset == latest[(record.key or b"").decode()], (
            "the latest version, not an older one"
        )
    assert {r.key for r in tombstones} == {k.encode() for k, o in latest.items() if o is None}
    progress = [
        msgspec.json.decode(r.value or b"", type=BackfillProgress) for r in control_log.records
    ]
    counted = [p for p in progress if p.total is not None]
    assert counted, "a total is reported as soon as the keys pass is done"
    assert counted[0].processed == 0
    assert counted[-1].offset == handoff and counted[-1].processed == len(embedded)
    assert counted[-1].total == len(embedded) <= len(live_atoms)
    assert phases.count(Phase.EMIT) >= 3, "emission ran in bounded steps, not at once"
