"""Start-up against the control log's fingerprints, on a fake control log and tiny models."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec
import pytest

from schemas.control import ModelFingerprint
from stream.config import Config, ModelConfig
from stream.embed.fingerprint import model_fingerprint
from stream.embed.pool import ModelPool
from stream.errors import FingerprintMismatch
from stream.processor.context import record_fingerprints
from stream.processor.control import ROUTING_KEY, ControlPlane
from tests.support.fakes import FakeControlLog

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

OLD = "sha256:" + "0" * 64


def config(models: dict[str, Path]) -> Config:
    made = Config(models={name: ModelConfig(path=str(path)) for name, path in models.items()})
    return msgspec.structs.replace(
        made, routing=msgspec.structs.replace(made.routing, stable_model="a")
    )


async def fingerprint_of(path: Path) -> str:
    return await anyio.to_thread.run_sync(model_fingerprint, path, ModelConfig(path=str(path)))


def recorded(log: FakeControlLog) -> list[ModelFingerprint]:
    return [msgspec.json.decode(r.value or b"", type=ModelFingerprint) for r in log.records]


async def test_every_configured_model_is_recorded_once(
    tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    settings = config({"a": tiny_model, "b": tiny_model_b, "c": tmp_path / "not-installed"})
    log = FakeControlLog()
    for _ in range(2):  # a restart with the same weights appends nothing more
        restarted = FakeControlLog()
        restarted.records = log.records  # the same log, read from its start again
        async with ControlPlane(settings, log=restarted) as control:  # type: ignore[arg-type]
            await control.replay()
            state = await record_fingerprints(control, ModelPool(settings), settings)
    expected = {"a": await fingerprint_of(tiny_model), "b": await fingerprint_of(tiny_model_b)}
    assert state.fingerprints == expected
    assert recorded(log) == [
        ModelFingerprint(model="a", fingerprint=expected["a"]),
        ModelFingerprint(model="b", fingerprint=expected["b"]),
    ], "c has no weights yet: recorded at a later start"


async def test_changed_weights_of_a_written_model_refuse_the_start(tiny_model: Path) -> None:
    settings = config({"a": tiny_model})
    log = FakeControlLog()
    await log.append(ROUTING_KEY, msgspec.json.encode(ModelFingerprint(model="a", fingerprint=OLD)))
    async with ControlPlane(settings, log=log) as control:  # type: ignore[arg-type]
        await control.replay()
        with pytest.raises(FingerprintMismatch) as refused:
            await record_fingerprints(control, ModelPool(settings), settings)
    assert str(refused.value) == (
        f"model a: its weights/settings changed (fingerprint {await fingerprint_of(tiny_model)}, "
        f"the control log has {OLD}); new weights under an old name need a migration to a new "
        "model name, not a restart"
    )
    assert len(log.records) == 1, "nothing appended"


async def test_a_changed_model_that_is_not_written_is_refused_when_it_loads(
    tiny_model: Path, tiny_model_b: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = config({"a": tiny_model, "b": tiny_model_b})
    log = FakeControlLog()
    await log.append(ROUTING_KEY, msgspec.json.encode(ModelFingerprint(model="b", fingerprint=OLD)))
    models = ModelPool(settings)
    async with ControlPlane(settings, log=log) as control:  # type: ignore[arg-type]
        await control.replay()
        with caplog.at_level(logging.WARNING):
            state = await record_fingerprints(control, models, settings)
        assert state.fingerprints["b"] == OLD
        assert "model b: its weights/settings changed" in caplog.text
        with pytest.raises(FingerprintMismatch, match="model b: its weights/settings changed"):
            await models.get("b")
    assert [r.model for r in recorded(log)] == ["b", "a"]


class RacingControlLog(FakeControlLog):
    """Another instance, with other weights, appends its fingerprint just before ours."""

    async def append(
        self, key: bytes, value: bytes, *, headers: Sequence[tuple[str, bytes]] = ()
    ) -> int:
        ours = msgspec.json.decode(value, type=ModelFingerprint)
        theirs = ModelFingerprint(model=ours.model, fingerprint=OLD)
        await super().append(key, msgspec.json.encode(theirs))
        return await super().append(key, value, headers=headers)


async def test_the_loser_of_a_race_with_other_weights_refuses_to_start(tiny_model: Path) -> None:
    settings = config({"a": tiny_model})
    log = RacingControlLog()
    async with ControlPlane(settings, log=log) as control:  # type: ignore[arg-type]
        await control.replay()
        with pytest.raises(FingerprintMismatch, match=f"the control log has {OLD}"):
            await record_fingerprints(control, ModelPool(settings), settings)
        assert control.state.fingerprints == {"a": OLD}
        assert control.state.last_rejection is not None
        assert control.state.last_rejection.command == "model_fingerprint"
