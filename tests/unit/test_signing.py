"""Signed control records: who may append what, once signatures are required."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from schemas.control import BackfillProgress, ControlEvent, HandoffRecorded, StartMigration
from stream.config import Config, ModelConfig, load_config
from stream.core.signing import KEY_HEADER, SIGNATURE_HEADER, Signer, TrustPolicy
from stream.errors import ConfigError
from stream.processor.control import ROUTING_KEY, ControlPlane
from tests.support.fakes import FakeControlLog

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

PROCESSOR = Signer("proc-1", b"p" * 32)
OPERATOR = Signer("ops-1", b"o" * 32)
POLICY = TrustPolicy(
    processor_keys={"proc-1": PROCESSOR.secret},
    operator_keys={"ops-1": OPERATOR.secret},
    required=True,
)
VALUE = b'{"command":"rollback","migration_id":"m1"}'


def test_a_signed_record_is_trusted_only_for_its_role() -> None:
    signed = OPERATOR.headers(ROUTING_KEY, VALUE)
    assert POLICY.check(5, ROUTING_KEY, VALUE, signed, internal=False) is None
    assert "not an accepted processor key" in (
        POLICY.check(5, ROUTING_KEY, VALUE, signed, internal=True) or ""
    ), "an operator key cannot sign internal events (forged progress)"
    by_processor = PROCESSOR.headers(ROUTING_KEY, VALUE)
    assert POLICY.check(5, ROUTING_KEY, VALUE, by_processor, internal=True) is None
    assert "not an accepted operator key" in (
        POLICY.check(5, ROUTING_KEY, VALUE, by_processor, internal=False) or ""
    )


def test_unsigned_altered_and_unknown_records_are_refused_with_a_reason() -> None:
    assert POLICY.check(0, ROUTING_KEY, VALUE, [], internal=False) == (
        "unsigned (signatures are required)"
    )
    signed = OPERATOR.headers(ROUTING_KEY, VALUE)
    altered = VALUE.replace(b"m1", b"m2")
    assert "bad signature" in (POLICY.check(0, ROUTING_KEY, altered, signed, internal=False) or "")
    assert "bad signature" in (POLICY.check(0, b"other", VALUE, signed, internal=False) or "")
    stranger = Signer("ops-9", b"s" * 32).headers(ROUTING_KEY, VALUE)
    assert "'ops-9'" in (POLICY.check(0, ROUTING_KEY, VALUE, stranger, internal=False) or "")
    forged = [(KEY_HEADER, b"ops-1"), (SIGNATURE_HEADER, b"00" * 32)]
    assert "bad signature" in (POLICY.check(0, ROUTING_KEY, VALUE, forged, internal=False) or "")


def test_records_before_signed_from_offset_and_an_unrequired_policy_pass() -> None:
    later = TrustPolicy(
        processor_keys=POLICY.processor_keys,
        operator_keys=POLICY.operator_keys,
        required=True,
        from_offset=10,
    )
    assert later.check(9, ROUTING_KEY, VALUE, [], internal=True) is None
    assert later.check(10, ROUTING_KEY, VALUE, [], internal=True) is not None
    assert TrustPolicy().check(0, ROUTING_KEY, VALUE, [], internal=True) is None
    assert TrustPolicy().basis() == "" and "proc-1" in later.basis() and "p" * 32 not in repr(later)


def signed_config(tmp_path: Path, signing_key: str) -> Config:
    """Configs of an operator and of a processor: the same keys, each signing with its own."""
    for key_id, secret in (("proc-1", PROCESSOR.secret), ("ops-1", OPERATOR.secret)):
        (tmp_path / key_id).write_bytes(secret + b"\n")
    path = tmp_path / f"{signing_key}.toml"
    path.write_text(
        f"""
[routing]
stable_model = "a"
[models.a]
path = "/m/a"
[models.b]
path = "/m/b"
[control]
require_signatures = true
signing_key = "{signing_key}"
processor_keys = ["proc-1"]
operator_keys = ["ops-1"]
[control.key_files]
proc-1 = "{tmp_path / "proc-1"}"
ops-1 = "{tmp_path / "ops-1"}"
"""
    )
    return load_config(path, {})


async def test_a_forged_progress_record_is_rejected_and_changes_nothing(tmp_path: Path) -> None:
    log = FakeControlLog()
    operator = signed_config(tmp_path, "ops-1")
    processor = signed_config(tmp_path, "proc-1")
    async with ControlPlane(operator, log=log) as cli:  # type: ignore[arg-type]
        await cli.append(StartMigration(migration_id="m1", source_model="a", target_model="b"))
    async with ControlPlane(processor, publish_status=True, log=log) as control:  # type: ignore[arg-type]
        await control.replay()
        await control.append(
            HandoffRecorded(migration_id="m1", partition=0, offset=100, log_start=0, partitions=1)
        )
        # Someone with write access to the topic but no key: "backfill is done".
        forged = BackfillProgress(migration_id="m1", partition=0, offset=100)
        await log.append(ROUTING_KEY, msgspec.json.encode(forged))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(control.tail)
            with anyio.fail_after(5):
                state = await control.wait_applied(2)
            tasks.cancel_scope.cancel()
    status = state.status()
    assert status.phase == "migrating" and status.query_model == "a", "no cutover"
    assert status.last_rejection is not None
    assert status.last_rejection.command == "backfill_progress"
    assert status.last_rejection.reason == "unsigned (signatures are required)"
    events = [msgspec.json.decode(r.value or b"", type=ControlEvent) for r in log.records]
    assert [type(e).__name__ for e in events] == [
        "StartMigration",
        "HandoffRecorded",
        "BackfillProgress",
    ]
    assert [dict(r.headers).get(KEY_HEADER) for r in log.records] == [b"ops-1", b"proc-1", None]


async def test_key_files_are_checked_at_start_up(tmp_path: Path) -> None:
    config = signed_config(tmp_path, "ops-1")
    (tmp_path / "ops-1").write_bytes(b"short")
    with pytest.raises(ConfigError, match=r"'ops-1'.*under 16 bytes"):
        async with ControlPlane(config, log=FakeControlLog()):  # type: ignore[arg-type]
            pass
    (tmp_path / "ops-1").unlink()
    with pytest.raises(ConfigError, match="'ops-1': cannot read"):
        async with ControlPlane(config, log=FakeControlLog()):  # type: ignore[arg-type]
            pass
    bare = Config(models={"a": ModelConfig(path="/m/a")})
    with pytest.raises(msgspec.ValidationError, match="not in `key_files`"):
        msgspec.structs.replace(
            bare.control, processor_keys=["nope"]
        ).__post_init__()  # what load_config runs on a [control] table
