"""Dead letters (CONTRACT section 5): the original record plus `lattice.dlq.*` headers. Pure."""

from __future__ import annotations

from schemas.atoms import Stage
from schemas.deadletter import HEADER_PREFIX, DeadLetterHeaders, encode_dead_letter_headers
from stream.core.records import OutRecord, SourceRecord

__all__ = ["HEADER_PREFIX", "REDUCTIONS", "dead_letter"]

# How far a dead letter the broker refused is reduced, one step per refusal: 0 is the full
# record; 1 cuts the value to `REDUCED_VALUE_BYTES`; 2 also drops the original headers and
# cuts the key and the reason. A letter refused at the last step is given up on (counted).
REDUCTIONS = 2
REDUCED_VALUE_BYTES = 1024
REDUCED_KEY_BYTES = 512
REDUCED_REASON_CHARS = 1024


def dead_letter(
    record: SourceRecord,
    stage: Stage,
    error_class: str,
    reason: str,
    *,
    model: str | None = None,
    reduction: int = 0,
) -> OutRecord:
    """Keep the original key, value, headers and timestamp; add (or replace) the DLQ headers.

    `model` names the one write model the record failed for (header `lattice.dlq.model`);
    None when it failed before any model (decode, validate). `reduction` (see `REDUCTIONS`)
    makes the smaller letter written after the broker refused a bigger one: it still says
    where the input is (topic, partition, offset) and why it failed.
    """
    kept = [(name, value) for name, value in record.headers if not name.startswith(HEADER_PREFIX)]
    value = record.value
    key = record.key
    truncated_from = None
    if reduction >= 1 and value is not None and len(value) > REDUCED_VALUE_BYTES:
        truncated_from = len(value)
        value = value[:REDUCED_VALUE_BYTES]
    if reduction >= 2:
        kept = []
        key = None if key is None else key[:REDUCED_KEY_BYTES]
        reason = reason[:REDUCED_REASON_CHARS]
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
        truncated_from=truncated_from,
        headers_dropped=reduction >= 2,
    )
    headers = kept + encode_dead_letter_headers(info)
    return OutRecord(key=key, value=value, headers=headers, timestamp_ms=record.timestamp_ms)
