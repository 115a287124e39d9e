"""The keys pass: atoms records -> (atom_id, offset, deleted) for `PartitionKeys.record_history`.

A record counts exactly when backfill would emit it: `schemas.atoms.decode_atom` decides,
so the keys pass and the emission agree on every record by construction. A delete is
`atom.deleted` or a null value under a key; an invalid record (bad JSON, wrong fields, empty
text, oversized, key differing from `atom_id`, ...) is skipped, as backfill skips it: the
live path already dead-lettered it, and a from-scratch replay writes nothing for it.

Why a full decode and not a cheap peek at `type` and `atom_id`: an invalid newer event must
not become its key's "latest version". If it did, the key's last valid version would be
skipped too, and the atom would be missing from the target (G2, G4). The only shortcut that
keeps the semantics is the null value (a tombstone), which needs no JSON at all; msgspec
validates the rest at a few hundred thousand small events a second on one core
(`python -m stream.tools.benchkeystore` prints the rate).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

from schemas.atoms import AtomDeleted, InvalidAtom, decode_atom

KeyEvent = tuple[str, int, bool]
"""(atom_id, offset, deleted)."""


class KeyedRecord(Protocol):
    """What the keys pass reads of a record (the processor's `SourceRecord` has these)."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def offset(self) -> int: ...


class RawRecord(NamedTuple):
    """A bare (key, value, offset) record."""

    key: bytes | None
    value: bytes | None
    offset: int


def key_event(
    key: bytes | None, value: bytes | None, offset: int, *, max_event_bytes: int
) -> KeyEvent | None:
    """The key event of one record, or None when the record is invalid (skipped)."""
    try:
        event = decode_atom(key, value, max_event_bytes=max_event_bytes)
    except InvalidAtom:
        return None
    return event.atom_id, offset, isinstance(event, AtomDeleted)


def key_events(records: Iterable[KeyedRecord], *, max_event_bytes: int) -> Iterator[KeyEvent]:
    """The key events of `records`, in order, invalid records left out. Streams: holds one
    record at a time."""
    for record in records:
        event = key_event(record.key, record.value, record.offset, max_event_bytes=max_event_bytes)
        if event is not None:
            yield event


def live_atom_ids(records: Iterable[KeyedRecord], *, max_event_bytes: int) -> Iterator[str]:
    """The atoms a live window wrote (for `PartitionKeys.mark_live`): its valid records."""
    for atom_id, _, _ in key_events(records, max_event_bytes=max_event_bytes):
        yield atom_id
