"""Dead letters keep the original record and replace, not repeat, lattice.dlq.* headers."""

from stream.core.deadletter import dead_letter
from stream.core.records import SourceRecord


def test_dead_letter_keeps_original_and_replaces_dlq_headers() -> None:
    record = SourceRecord(
        topic="atoms",
        partition=2,
        offset=41,
        key=b"k",
        value=b"v",
        headers=(("trace", b"1"), ("lattice.dlq.stage", b"old"), ("lattice.dlq.error", b"old")),
        timestamp_ms=1234,
    )
    letter = dead_letter(record, "validate", "ValidationError", "text: ünicode reason")
    assert (letter.key, letter.value, letter.timestamp_ms) == (b"k", b"v", 1234)
    assert letter.headers == [
        ("trace", b"1"),
        ("lattice.dlq.topic", b"atoms"),
        ("lattice.dlq.partition", b"2"),
        ("lattice.dlq.offset", b"41"),
        ("lattice.dlq.stage", b"validate"),
        ("lattice.dlq.error-class", b"ValidationError"),
        ("lattice.dlq.error", "text: ünicode reason".encode()),
    ]


def test_record_with_neither_key_nor_value_gets_an_empty_value_and_a_marker() -> None:
    record = SourceRecord(
        topic="atoms", partition=0, offset=0, key=None, value=None, headers=(), timestamp_ms=None
    )
    letter = dead_letter(record, "validate", "InvalidAtom", "record has neither a key nor a value")
    assert (letter.key, letter.value) == (None, b"")
    assert ("lattice.dlq.null-value", b"true") in letter.headers


def test_a_dead_letter_for_one_model_names_it_last() -> None:
    record = SourceRecord(
        topic="atoms", partition=0, offset=7, key=b"k", value=b"v", headers=(), timestamp_ms=1
    )
    letter = dead_letter(record, "embed", "RuntimeError", "boom", model="bge-small")
    assert letter.headers[-2:] == [
        ("lattice.dlq.error", b"boom"),
        ("lattice.dlq.model", b"bge-small"),
    ]
    assert [name for name, _ in dead_letter(record, "embed", "E", "r").headers] == [
        "lattice.dlq.topic",
        "lattice.dlq.partition",
        "lattice.dlq.offset",
        "lattice.dlq.stage",
        "lattice.dlq.error-class",
        "lattice.dlq.error",
    ]
