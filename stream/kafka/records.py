"""The record adapter: aiokafka's ConsumerRecord -> `SourceRecord`."""

from __future__ import annotations

from typing import Any

from stream.core.records import SourceRecord


def to_source_record(message: Any) -> SourceRecord:
    """Adapt one aiokafka ConsumerRecord."""
    return SourceRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers or ()),
        timestamp_ms=message.timestamp,
    )
