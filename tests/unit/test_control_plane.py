"""The control plane on a fake control log: replay, rejections, status, sync."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from schemas.control import StartMigration
from schemas.routing import RoutingStatus
from stream.config import Config, ModelConfig
from stream.processor.control import ROUTING_KEY, ControlPlane
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
