"""A migration target whose batches keep failing fails the migration, not the fleet: the
window is published to the source, `resume` after the fix backfills what the target
missed, and nothing is dead-lettered for a model that was simply down."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import msgspec
import pytest

from schemas.control import ControlEvent, MigrationFailed, ResumeMigration, StartMigration
from schemas.routing import MigrationState, RoutingPhase
from stream.config import Config, ModelConfig
from stream.embed.pool import ModelPool
from stream.state.keystore import KeyStore
from tests.support.fakes import FakeControlLog, FakeGroupConsumer, FakeLog, FakeProducer
from tests.unit.test_live_consumer import atoms, live_loop
from tests.unit.test_model_dead_letters import fail_on

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


def control_events(log: FakeControlLog) -> list[ControlEvent]:
    return [msgspec.json.decode(r.value or b"", type=ControlEvent) for r in log.records]


async def test_a_failing_target_fails_the_migration_and_resume_after_the_fix_backfills(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    config = Config(
        models={
            "tiny": ModelConfig(path=str(tiny_model)),
            "next": ModelConfig(path=str(tiny_model_b)),
        }
    )
    models = ModelPool(config)
    target = await models.get("next")
    working = target.embed_batch
    await fail_on(target, None)
    control_log = FakeControlLog()
    log = FakeLog("atoms", 1)
    atoms(log, 0, 6)  # history: the backfill's
    consumer = FakeGroupConsumer(log, [0])
    producer = FakeProducer()
    store = await anyio.to_thread.run_sync(KeyStore.open, tmp_path / "state")
    async with live_loop(
        tiny_model,
        log,
        consumer,
        producer,
        config=config,
        models=models,
        control_log=control_log,
        store=store,
    ) as heard:
        with anyio.fail_after(60):
            await heard.until_committed({0: 6})
            start = StartMigration(migration_id="m1", source_model="tiny", target_model="next")
            await control_log.append(b"routing", msgspec.json.encode(start))
            atoms(log, 0, 4, prefix="b")  # live, dual-written
            failed = await heard.until_routing(
                lambda s: s.active is not None and s.active.state is MigrationState.FAILED
            )
            assert failed.routing_config().write_models == ("tiny",)
            await heard.until_committed({0: 10})
            source = [f"a0-{i}".encode() for i in range(6)] + [f"b0-{i}".encode() for i in range(4)]
            assert set(producer.keys("embeddings.tiny")) == set(source)
            assert producer.keys("embeddings.next") == []
            assert producer.keys("embed.dlq") == [], "a broken model is not bad input"
            target.embed_batch = working  # type: ignore[method-assign]  # the operator's fix
            await control_log.append(
                b"routing", msgspec.json.encode(ResumeMigration(migration_id="m1"))
            )
            atoms(log, 0, 2, prefix="c")
            done = await heard.until_routing(
                lambda s: s.routing_config().phase is RoutingPhase.ROLLBACK_WINDOW
            )
            await heard.until_committed({0: 12})
    assert done.active is not None and done.active.epoch == 1
    assert set(producer.keys("embeddings.next")) == {*source, b"c0-0", b"c0-1"}
    assert producer.keys("embed.dlq") == []
    [failure] = [e for e in control_events(control_log) if isinstance(e, MigrationFailed)]
    assert re.match(r"model next failed \d+ inputs in a row, each alone", failure.reason)
    await anyio.to_thread.run_sync(store.close)


async def test_a_live_window_the_target_fails_is_published_to_the_source_alone(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    config = Config(
        models={
            "tiny": ModelConfig(path=str(tiny_model)),
            "next": ModelConfig(path=str(tiny_model_b)),
        }
    )
    models = ModelPool(config)
    await fail_on(await models.get("next"), None)
    control_log = FakeControlLog()
    log = FakeLog("atoms", 1)
    atoms(log, 0, 2, prefix="h")  # history, so that the migration stays in progress
    consumer = FakeGroupConsumer(log, [0])
    producer = FakeProducer()
    store = await anyio.to_thread.run_sync(KeyStore.open, tmp_path / "state")
    async with live_loop(
        tiny_model,
        log,
        consumer,
        producer,
        config=config,
        models=models,
        control_log=control_log,
        store=store,
        backfill=False,  # no backfill step: the live window meets the failing target first
    ) as heard:
        with anyio.fail_after(60):
            await heard.until_committed({0: 2})
            start = StartMigration(migration_id="m1", source_model="tiny", target_model="next")
            await control_log.append(b"routing", msgspec.json.encode(start))
            await heard.until_routing(lambda s: s.active is not None)
            log.append(0, b"old", msgspec.json.encode({"type": "atom.deleted", "atom_id": "old"}))
            atoms(log, 0, 5)
            await heard.until_committed({0: 8})
    assert heard.commits[-1] == {0: 8}
    source = {f"a0-{i}".encode() for i in range(5)}
    assert set(producer.keys("embeddings.tiny")) == {*source, b"old", b"h0-0", b"h0-1"}
    assert producer.keys("embeddings.next") == [b"old"], "the tombstone went before the failure"
    assert producer.keys("embed.dlq") == []
    [failure] = [e for e in control_events(control_log) if isinstance(e, MigrationFailed)]
    assert failure.reason.startswith("model next failed 5 inputs in a row, each alone")
    await anyio.to_thread.run_sync(store.close)
