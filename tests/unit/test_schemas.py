"""Schemas: v1 and v2 samples decode, round trips, and every validation rule with its message."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import pytest

from schemas import (
    AtomCreated,
    AtomDeleted,
    BackfillConfig,
    ControlCommand,
    EmbeddingRecord,
    InvalidAtom,
    RoutingPhase,
    RoutingStatus,
    SourceRef,
    StartMigration,
    decode_atom,
    decode_embedding,
)
from schemas.control import (
    CancelReplay,
    ControlEvent,
    ModelFingerprint,
    ReplayHandoff,
    ReplayProgress,
    StartReplay,
)
from schemas.deadletter import (
    DeadLetterHeaders,
    decode_dead_letter_headers,
    encode_dead_letter_headers,
)
from schemas.snapshot import RoutingSnapshot
from stream.core.output import embedding_output
from stream.core.snapshot import state_of

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "v1"
SAMPLES_V2 = SAMPLES.parent / "v2"


def decode(value: bytes | None, key: bytes | None = b"a", limit: int = 4096) -> object:
    return decode_atom(key, value, max_event_bytes=limit)


def test_v1_samples_decode() -> None:
    created = decode((SAMPLES / "atom_created.json").read_bytes(), key=b"a-17")
    assert isinstance(created, AtomCreated) and created.metadata == {"tenant": "t1"}
    assert created.created_at is not None and created.created_at.utcoffset() is not None
    assert decode((SAMPLES / "atom_deleted.json").read_bytes(), key=b"a-17") == AtomDeleted(
        atom_id="a-17"
    )
    record = msgspec.json.decode(
        (SAMPLES / "embedding_record.json").read_bytes(), type=EmbeddingRecord
    )
    assert record.source.header() == "atoms/0/42" and record.vector[1] == -0.5
    commands = [
        msgspec.json.decode(line, type=ControlCommand)
        for line in (SAMPLES / "control_commands.jsonl").read_bytes().splitlines()
    ]
    assert [type(c).__name__ for c in commands] == [
        "StartMigration",
        "StartMigration",
        "PauseMigration",
        "ResumeMigration",
        "CancelMigration",
        "Rollback",
        "Finalize",
    ]
    assert isinstance(commands[1], StartMigration) and commands[1].backfill == BackfillConfig()
    status = msgspec.json.decode((SAMPLES / "routing_status.json").read_bytes(), type=RoutingStatus)
    assert status.phase is RoutingPhase.MIGRATING and status.last_rejection is not None


def test_v1_embedding_records_decode_without_the_v2_fields() -> None:
    for encoding, name in (
        ("json", "embedding_record.json"),
        ("msgpack", "embedding_record.msgpack"),
    ):
        record = decode_embedding((SAMPLES / name).read_bytes(), encoding)
        assert (record.model_fingerprint, record.metadata, record.created_at) == (None, None, None)


def test_v2_samples_decode() -> None:
    record = decode_embedding((SAMPLES_V2 / "embedding_record.json").read_bytes())
    assert record.model_fingerprint is not None and record.model_fingerprint.startswith("sha256:")
    assert record.metadata == {"tenant": "t1"}
    assert record.created_at is not None and record.created_at.utcoffset() is not None
    packed = decode_embedding(
        (SAMPLES_V2 / "embedding_record.msgpack").read_bytes(), encoding="msgpack"
    )
    assert packed.vector == [float(np.float32(x)) for x in record.vector]
    assert msgspec.structs.replace(packed, vector=record.vector) == record
    events = [
        msgspec.json.decode(line, type=ControlEvent)
        for line in (SAMPLES_V2 / "control_events.jsonl").read_bytes().splitlines()
    ]
    assert events == [ModelFingerprint(model="minilm", fingerprint=record.model_fingerprint)]
    status = msgspec.json.decode(
        (SAMPLES_V2 / "routing_status.json").read_bytes(), type=RoutingStatus
    )
    assert status.fingerprints is not None
    assert status.fingerprints["minilm"] == record.model_fingerprint
    v1_status = msgspec.json.decode(
        (SAMPLES / "routing_status.json").read_bytes(), type=RoutingStatus
    )
    assert v1_status.fingerprints is None
    assert msgspec.structs.replace(status, fingerprints=None) == v1_status


def dead_letter_sample(path: Path) -> list[tuple[str, bytes]]:
    """A DLQ record's headers as stored: [name, UTF-8 value] pairs."""
    pairs = msgspec.json.decode(path.read_bytes(), type=list[tuple[str, str]])
    return [(name, value.encode("utf-8")) for name, value in pairs]


def test_dead_letter_header_samples_decode_and_v2_adds_only_the_model() -> None:
    v1_headers = dead_letter_sample(SAMPLES / "dead_letter_headers.json")
    v1 = decode_dead_letter_headers(v1_headers)
    assert v1 == DeadLetterHeaders(
        topic="atoms",
        partition=2,
        offset=41,
        stage="validate",
        error_class="ValidationError",
        error="Expected `str`, got `int` - at `$.text`",
    )
    assert v1.model is None and v1.source() == "atoms/2/41"
    assert encode_dead_letter_headers(v1) == v1_headers[1:], "v1 encodes as it did"
    v2_headers = dead_letter_sample(SAMPLES_V2 / "dead_letter_headers.json")
    v2 = decode_dead_letter_headers(v2_headers)
    assert (v2.model, v2.stage, v2.error_class) == ("bge-small", "validate", "OverlongInput")
    assert encode_dead_letter_headers(v2) == v2_headers[1:]
    later = decode_dead_letter_headers([*v2_headers, ("lattice.dlq.retry-of", b"x")])
    assert later == v2, "headers of a later version are ignored"
    with pytest.raises(msgspec.ValidationError, match="stage"):
        decode_dead_letter_headers([(n, v) for n, v in v1_headers if n != "lattice.dlq.stage"])


def test_v2_routing_snapshot_sample_decodes_to_the_routing_status_sample() -> None:
    snapshot = msgspec.json.decode(
        (SAMPLES_V2 / "routing_snapshot.json").read_bytes(), type=RoutingSnapshot
    )
    assert (snapshot.fold_version, snapshot.next_offset, snapshot.last_offset) == (1, 18, 17)
    assert snapshot.migration is not None and snapshot.migration.counts[1] == (500, 2400)
    status = msgspec.json.decode(
        (SAMPLES_V2 / "routing_status.json").read_bytes(), type=RoutingStatus
    )
    assert state_of(snapshot).status() == status
    assert msgspec.json.decode(msgspec.json.encode(snapshot), type=RoutingSnapshot) == snapshot


def test_msgpack_sample_decodes_to_the_json_sample_at_float32() -> None:
    from_json = decode_embedding((SAMPLES / "embedding_record.json").read_bytes())
    from_msgpack = decode_embedding(
        (SAMPLES / "embedding_record.msgpack").read_bytes(), encoding="msgpack"
    )
    assert from_msgpack.vector == [float(np.float32(x)) for x in from_json.vector]
    assert msgspec.structs.replace(from_msgpack, vector=from_json.vector) == from_json


def test_msgpack_values_that_do_not_fit_are_refused() -> None:
    packed = (SAMPLES / "embedding_record.msgpack").read_bytes()
    with pytest.raises(msgspec.DecodeError):
        decode_embedding(packed[:-30], encoding="msgpack")
    record = msgspec.msgpack.decode(packed)
    record["vector"] = record["vector"][:8]
    with pytest.raises(ValueError, match="vector holds 8 bytes, dim 3 needs 12"):
        decode_embedding(msgspec.msgpack.encode(record), encoding="msgpack")
    with pytest.raises(ValueError, match=r"unknown lattice\.encoding 'avro'"):
        decode_embedding(packed, encoding="avro")


def test_float16_output_is_the_vector_at_half_precision_in_half_the_bytes() -> None:
    rng = np.random.default_rng(7)
    vector = rng.standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    records = {
        encoding: embedding_output(
            atom_id="a-1",
            model="m",
            vector=vector,
            normalized=True,
            source=SourceRef(topic="atoms", partition=0, offset=5),
            path="live",
            migration_id=None,
            embedded_at=datetime(2026, 12, 2, tzinfo=UTC),
            encoding=encoding,
        )
        for encoding in ("msgpack", "msgpack-f16")
    }
    f32, f16 = (records[e].value or b"" for e in ("msgpack", "msgpack-f16"))
    assert len(f32) - len(f16) == 2 * 384
    assert dict(records["msgpack-f16"].headers)["lattice.encoding"] == b"msgpack-f16"
    decoded = decode_embedding(f16, encoding="msgpack-f16")
    assert decoded.vector == vector.astype(np.float16).astype(np.float32).tolist()
    cosine = float(np.dot(np.asarray(decoded.vector), vector) / np.linalg.norm(decoded.vector))
    assert cosine > 0.99999
    record = msgspec.msgpack.decode(f16)
    record["vector"] = record["vector"][:-2]
    with pytest.raises(ValueError, match="vector holds 766 bytes, dim 384 needs 768"):
        decode_embedding(msgspec.msgpack.encode(record), encoding="msgpack-f16")


def test_backfill_defaults_are_the_original_design() -> None:
    assert msgspec.structs.asdict(BackfillConfig()) == {
        "batch_size": 100,
        "max_concurrent": 4,
        "dual_write": True,
        "target_query_threshold": 0.8,
        "rollback_window_secs": 86400,
    }


def test_round_trips() -> None:
    for directory in (SAMPLES, SAMPLES_V2):
        for sample in ("embedding_record.json", "routing_status.json"):
            kind = EmbeddingRecord if sample.startswith("embedding") else RoutingStatus
            value = msgspec.json.decode((directory / sample).read_bytes(), type=kind)
            assert msgspec.json.decode(msgspec.json.encode(value), type=kind) == value


def test_null_optional_fields_count_as_absent_and_unknown_fields_are_ignored() -> None:
    event = decode(
        b'{"type":"atom.created","atom_id":"a","text":"t","created_at":null,'
        b'"metadata":null,"extra":{"x":1}}'
    )
    assert event == AtomCreated(atom_id="a", text="t")


def test_null_value_under_a_key_is_a_delete_and_null_key_is_accepted() -> None:
    assert decode(None, key=b"a") == AtomDeleted(atom_id="a")
    assert decode(b'{"type":"atom.deleted","atom_id":"z"}', key=None) == AtomDeleted(atom_id="z")


@pytest.mark.parametrize(
    ("key", "value", "stage", "message"),
    [
        (b"a", b"\xff", "decode", "value is not valid UTF-8 (byte 0)"),
        (b"a", b"{", "decode", "value is not valid JSON: Input data was truncated"),
        (b"a", b"[]", "decode", "value is not a JSON object (got array)"),
        (b"a", b"null", "decode", "value is not a JSON object (got null)"),
        (
            b"a",
            b"x" * 5000,
            "decode",
            "event is 5000 bytes, over the limit of 4096 bytes (limits.max_event_bytes)",
        ),
        (b"\xc3", None, "decode", "key is not valid UTF-8 (byte 0)"),
        (None, None, "validate", "record has neither a key nor a value"),
        (b"a", b'{"atom_id":"a"}', "validate", "Object missing required field `type`"),
        (
            b"a",
            b'{"type":"atom.created","atom_id":"a"}',
            "validate",
            "Object missing required field `text`",
        ),
        (
            b"a",
            b'{"type":"atom.moved","atom_id":"a"}',
            "validate",
            "Invalid value 'atom.moved' - at `$.type`",
        ),
        (
            b"a",
            b'{"type":"atom.created","atom_id":"a","text":1}',
            "validate",
            "Expected `str`, got `int` - at `$.text`",
        ),
        (
            b"a",
            b'{"type":"atom.created","atom_id":"a","text":" \\n"}',
            "validate",
            "text must contain at least one non-whitespace character",
        ),
        (
            b"a",
            b'{"type":"atom.created","atom_id":"a","text":"t","created_at":"2026-11-27T10:00:00"}',
            "validate",
            "Expected `datetime` with a timezone component - at `$.created_at`",
        ),
        (
            b"a",
            b'{"type":"atom.created","atom_id":"a","text":"t","metadata":{"k":2}}',
            "validate",
            "Expected `str`, got `int` - at `$.metadata[...]`",
        ),
        (b"", b'{"type":"atom.deleted","atom_id":""}', "validate", "atom_id must not be empty"),
        (
            b"b",
            b'{"type":"atom.deleted","atom_id":"a"}',
            "validate",
            "record key 'b' differs from atom_id 'a'",
        ),
        (
            None,
            b'{"type":"atom.deleted","atom_id":"' + b"\xc3\xa9" * 257 + b'"}',
            "validate",
            "atom_id is 514 bytes, over the limit of 512 bytes",
        ),
        (  # a schema error before the break: not JSON all the same (contract section 5)
            None,
            b'{"type":"atom.created","atom_id":5,"te',
            "decode",
            "value is not valid JSON: Input data was truncated",
        ),
        (  # past the recursion limit, in a field the decoder ignores
            None,
            b'{"type":"atom.deleted","atom_id":"a","zz":' + b"[" * 1500 + b"]" * 1500 + b"}",
            "decode",
            "value nests too deeply to decode: maximum recursion depth exceeded while "
            "deserializing an object",
        ),
    ],
)
def test_invalid_atoms_have_stage_and_exact_message(
    key: bytes | None, value: bytes | None, stage: str, message: str
) -> None:
    with pytest.raises(InvalidAtom) as caught:
        decode(value, key=key)
    assert (caught.value.stage, caught.value.reason) == (stage, message)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            b'{"command":"start_migration","migration_id":"m","source_model":"a"}',
            "Object missing required field `target_model`",
        ),
        (
            b'{"command":"start_migration","migration_id":"m","source_model":"a","target_model":"b",'
            b'"backfill":{"target_query_threshold":1.5}}',
            "Expected `float` <= 1.0 - at `$.backfill.target_query_threshold`",
        ),
        (
            b'{"command":"start_migration","migration_id":"m","source_model":"a","target_model":"b",'
            b'"backfill":{"batch_size":0}}',
            "Expected `int` >= 1 - at `$.backfill.batch_size`",
        ),
        (b'{"command":"explode","migration_id":"m"}', "Invalid value 'explode' - at `$.command`"),
        (
            b'{"command":"finalize","migration_id":""}',
            "Expected `str` of length >= 1 - at `$.migration_id`",
        ),
    ],
)
def test_invalid_control_commands(command: bytes, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(command, type=ControlCommand)
    assert str(caught.value) == message


def test_v2_replay_events_decode() -> None:
    lines = (SAMPLES_V2 / "replay_events.jsonl").read_bytes().splitlines()
    events = [msgspec.json.decode(line, type=ControlEvent) for line in lines]
    replay_id = "replay-20261127T100000Z-1a2b3c"
    assert events == [
        StartReplay(
            replay_id=replay_id,
            model="minilm",
            partitions=2,
            from_offsets={0: 0, 1: 120},
            to_offsets={0: 5000, 1: 5000},
            command_id="cli-9f8e7d6c5b4a",
            issued_by="ops",
        ),
        ReplayHandoff(replay_id=replay_id, partition=0, offset=5210, log_start=0),
        ReplayProgress(replay_id=replay_id, partition=0, offset=2500, processed=1100, total=2300),
        CancelReplay(replay_id=replay_id),
    ]
    assert msgspec.json.decode(msgspec.json.encode(events[0]), type=ControlEvent) == events[0]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"command": "start_replay", "replay_id": "r", "model": "m", "partitions": 1,'
            b' "from_offsets": {"0": -1}, "to_offsets": {"0": 1}}',
            type=ControlEvent,
        )
