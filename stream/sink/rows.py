"""What one `embeddings.<model>` record asks of the store: upsert a vector, or delete.

Pure: no database, no Kafka client. Every change carries the source offset of the atom
event behind it (the record's `source` field, or header `lattice.source-offset`), which is
what last-writer-wins compares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec

from schemas.embeddings import ENCODING_HEADER, FINGERPRINT_HEADER, decode_embedding

SOURCE_OFFSET_HEADER = "lattice.source-offset"


@dataclass(frozen=True, slots=True)
class SourceOffset:
    """Where the atom event sits in the atoms topic."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Upsert:
    """Store this vector for the atom, unless the store holds a newer source offset."""

    atom_id: str
    source: SourceOffset
    vector: Sequence[float]
    fingerprint: str | None
    migration_id: str | None
    path: str
    embedded_at: datetime | None
    metadata: dict[str, str] | None
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class Delete:
    """The atom is deleted as of `source` (None: the tombstone carries no source offset)."""

    atom_id: str
    source: SourceOffset | None


Change = Upsert | Delete


class BadRecord(ValueError):
    """A record the sink cannot apply (no key, undecodable value); it is skipped, logged."""


def parse_source_offset(text: str) -> SourceOffset:
    """`<topic>/<partition>/<offset>` (topic names cannot hold '/')."""
    topic, partition, offset = text.rsplit("/", 2)
    return SourceOffset(topic=topic, partition=int(partition), offset=int(offset))


def to_change(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
) -> Change:
    """The store change a Kafka record asks for. Raises `BadRecord`."""
    if key is None:
        raise BadRecord("record without a key (the atom id)")
    try:
        atom_id = key.decode()
        header = {name: raw.decode() for name, raw in headers}
    except UnicodeDecodeError as exc:
        raise BadRecord(f"key or header is not UTF-8: {exc}") from exc
    try:
        source = (
            parse_source_offset(header[SOURCE_OFFSET_HEADER])
            if SOURCE_OFFSET_HEADER in header
            else None
        )
    except ValueError as exc:
        raise BadRecord(f"bad {SOURCE_OFFSET_HEADER} header: {exc}") from exc
    if value is None:
        return Delete(atom_id=atom_id, source=source)
    encoding = header.get(ENCODING_HEADER)
    try:
        record = decode_embedding(value, encoding)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise BadRecord(f"not an EmbeddingRecord: {exc}") from exc
    if record.atom_id != atom_id:
        raise BadRecord(f"key {atom_id!r} differs from atom_id {record.atom_id!r}")
    return Upsert(
        atom_id=atom_id,
        source=SourceOffset(
            topic=record.source.topic,
            partition=record.source.partition,
            offset=record.source.offset,
        ),
        vector=record.vector,
        fingerprint=record.model_fingerprint or header.get(FINGERPRINT_HEADER),
        migration_id=record.migration_id,
        path=record.path,
        embedded_at=record.embedded_at,
        metadata=record.metadata,
        created_at=record.created_at,
    )
