"""Embedding records to sink changes: source offsets, encodings, tombstones, bad records."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from schemas.embeddings import EmbeddingRecord, PackedEmbeddingRecord, SourceRef
from stream.sink.rows import BadRecord, Delete, SourceOffset, Upsert, parse_source_offset, to_change
from stream.sink.store import table_name

SOURCE = SourceRef(topic="atoms", partition=2, offset=41)
HEADERS = [("lattice.source-offset", b"atoms/2/41")]


def record(**extra: object) -> bytes:
    fields = {
        "atom_id": "a-1",
        "model": "m",
        "dim": 2,
        "vector": [0.5, -0.25],
        "normalized": True,
        "source": SOURCE,
    }
    return msgspec.json.encode({**fields, **extra})


def test_a_json_record_is_an_upsert_at_its_source_offset() -> None:
    change = to_change(b"a-1", record(metadata={"tenant": "t1"}), HEADERS)
    assert isinstance(change, Upsert)
    assert change.source == SourceOffset("atoms", 2, 41)
    assert list(change.vector) == [0.5, -0.25] and change.metadata == {"tenant": "t1"}
    headers = [*HEADERS, ("lattice.model-fingerprint", b"sha256:ab")]
    assert to_change(b"a-1", record(), headers).fingerprint == "sha256:ab"  # type: ignore[union-attr]


def test_a_msgpack_record_decodes_to_the_same_vector() -> None:
    plain = msgspec.json.decode(record(), type=EmbeddingRecord)
    fields = msgspec.structs.asdict(plain)
    fields["vector"] = np.array(plain.vector, dtype="<f4").tobytes()
    packed = msgspec.msgpack.encode(PackedEmbeddingRecord(**fields))
    change = to_change(b"a-1", packed, [*HEADERS, ("lattice.encoding", b"msgpack")])
    assert isinstance(change, Upsert) and list(change.vector) == [0.5, -0.25]


def test_tombstones_keep_their_source_offset_when_they_have_one() -> None:
    assert to_change(b"a-1", None, HEADERS) == Delete("a-1", SourceOffset("atoms", 2, 41))
    assert to_change(b"a-1", None, []) == Delete("a-1", None)


@pytest.mark.parametrize(
    ("key", "value", "headers", "reason"),
    [
        (None, b"{}", [], "without a key"),
        (b"a-1", b"not json", [], "not an EmbeddingRecord"),
        (b"other", record(), HEADERS, "differs from atom_id"),
        (b"a-1", None, [("lattice.source-offset", b"atoms/x/1")], "bad lattice.source-offset"),
        (b"a-1", record(), [("lattice.encoding", b"avro")], "not an EmbeddingRecord"),
    ],
)
def test_bad_records_are_refused_with_a_reason(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], reason: str
) -> None:
    with pytest.raises(BadRecord, match=reason):
        to_change(key, value, headers)


def test_source_offsets_and_table_names() -> None:
    assert parse_source_offset("a.b-c/0/7") == SourceOffset("a.b-c", 0, 7)
    assert table_name("embeddings_", "minilm") == "embeddings_minilm"
    long = table_name("embeddings_", "m" * 200)
    assert len(long.encode()) <= 63 and long != table_name("embeddings_", "m" * 199)
