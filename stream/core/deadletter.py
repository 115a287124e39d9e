"""Dead letters (CONTRACT section 5): the original record plus `lattice.dlq.*` headers. Pure."""

from __future__ import annotations

from schemas.atoms import Stage
from schemas.deadletter import HEADER_PREFIX, DeadLetterHeaders, encode_dead_letter_headers
from stream.core.records import OutRecord, SourceRecord

__all__ = ["HEADER_PREFIX", "dead_letter"]


def dead_letter(
    record: SourceRecord, stage: Stage, error_class: str, reason: str, *, model: str | None = None
) -> OutRecord:
    """Keep the original key, value, headers and timestamp; add (or replace) the DLQ headers.

    `model` names the one write model the record failed for (header `lattice.dlq.model`);
    None when it failed before any model (decode, validate).
    """
    kept = [(name, value) for name, value in record.headers if not name.startswith(HEADER_PREFIX)]
    value = record.value
    # Kafka clients cannot produce a record with neither key nor value: keep an empty value
    # and say so, rather than lose the dead letter.
    null_value = record.key is None and value is None
    if null_value:
        value = b""
    info = DeadLetterHeaders(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        stage=stage,
        error_class=error_class,
        error=reason,
        model=model,
        null_value=null_value,
    )
    headers = kept + encode_dead_letter_headers(info)
    return OutRecord(key=record.key, value=value, headers=headers, timestamp_ms=record.timestamp_ms)
