"""The keys pass: which records are versions of which key (the same rules as backfill)."""

from __future__ import annotations

from stream.state.keypass import RawRecord, key_event, key_events, live_atom_ids

LIMIT = 1024


def created(atom_id: str, text: str = "hello") -> bytes:
    return f'{{"type": "atom.created", "atom_id": "{atom_id}", "text": "{text}"}}'.encode()


def test_creates_updates_and_deletes() -> None:
    records = [
        RawRecord(b"a", created("a"), 0),
        RawRecord(b"a", created("a", "v2"), 1),
        RawRecord(b"b", b'{"type": "atom.deleted", "atom_id": "b"}', 2),
        RawRecord(b"c", None, 3),  # an upstream compaction tombstone
        RawRecord(None, created("d"), 4),  # a null key: the atom_id comes from the value
    ]
    assert list(key_events(records, max_event_bytes=LIMIT)) == [
        ("a", 0, False),
        ("a", 1, False),
        ("b", 2, True),
        ("c", 3, True),
        ("d", 4, False),
    ]


def test_invalid_records_are_not_versions() -> None:
    invalid = [
        (None, None),
        (b"a", b"not json"),
        (b"a", b"[1, 2]"),
        (b"a", created("a", "   ")),
        (b"a", created("b")),  # the key differs from atom_id
        (b"a", b'{"type": "atom.created", "atom_id": "a", "text": "x", "created_at": "noon"}'),
        (b"a", b'{"type": "atom.created", "atom_id": "a", "text": "x", "metadata": {"k": 1}}'),
        (b"\xff", None),
        (b"a", b'{"type": "atom.created", "atom_id": "a", "text": "\xff"}'),
        (b"a", created("a", "x" * LIMIT)),
        (b"", None),
    ]
    for offset, (key, value) in enumerate(invalid):
        assert key_event(key, value, offset, max_event_bytes=LIMIT) is None, (key, value)


def test_live_atom_ids_are_the_valid_records() -> None:
    records = [
        RawRecord(b"a", created("a"), 10),
        RawRecord(b"x", b"{", 11),
        RawRecord(b"b", None, 12),
    ]
    assert list(live_atom_ids(records, max_event_bytes=LIMIT)) == ["a", "b"]
