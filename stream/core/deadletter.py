"""Dead letters (CONTRACT section 5): the original record plus `lattice.dlq.*` headers. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.atoms import Stage
from stream.core.records import OutRecord, SourceRecord

HEADER_PREFIX = "lattice.dlq."


def dead_letter(record: SourceRecord, stage: Stage, error_class: str, reason: str) -> OutRecord:
    """Keep the original key, value, headers and timestamp; add (or replace) the DLQ headers."""
    kept = [(name, value) for name, value in record.headers if not name.startswith(HEADER_PREFIX)]
    added: Sequence[tuple[str, str]] = (
        ("topic", record.topic),
        ("partition", str(record.partition)),
        ("offset", str(record.offset)),
        ("stage", stage),
        ("error-class", error_class),
        ("error", reason),
    )
    headers = kept + [(HEADER_PREFIX + name, text.encode("utf-8")) for name, text in added]
    value = record.value
    if record.key is None and value is None:
        # Kafka clients cannot produce a record with neither key nor value: keep an empty
        # value and say so, rather than lose the dead letter.
        value = b""
        headers.append((HEADER_PREFIX + "null-value", b"true"))
    return OutRecord(key=record.key, value=value, headers=headers, timestamp_ms=record.timestamp_ms)
