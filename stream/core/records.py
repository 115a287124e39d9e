"""Records as the business code sees them, independent of the Kafka client. Pure."""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """An input record as read from Kafka."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record to produce: an embedding, a tombstone (`value` None) or a dead letter."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int | None = None
