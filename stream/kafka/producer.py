"""The output producer: `send(topic, record) -> Ack`, with typed errors.

aiokafka batches sends per partition (`linger_ms`, `max_batch_size`); `send` only enqueues,
and the returned `Ack` resolves when the broker acknowledged. Both raise `RecordRejected`
(this record can never be written), `SendFailed` (a retry may succeed), `NotAuthorized` or
`FatalKafkaError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

from aiokafka import AIOKafkaProducer

from stream.config import KafkaConfig
from stream.core.records import OutRecord
from stream.kafka.clients import make_producer
from stream.kafka.errors import is_client_error, kafka_errors, send_error


class Ack:
    """The broker's acknowledgement of one send; `await ack` returns the record's offset."""

    __slots__ = ("_bootstrap", "_future", "_topic")

    def __init__(self, future: asyncio.Future[Any], topic: str, bootstrap: str) -> None:
        self._future = future
        self._topic = topic
        self._bootstrap = bootstrap

    def __await__(self) -> Generator[Any, None, int]:
        return self._wait().__await__()

    async def _wait(self) -> int:
        try:
            metadata = await self._future
        except Exception as exc:
            if is_client_error(exc):
                raise send_error(exc, self._topic, self._bootstrap) from exc
            raise
        return int(metadata.offset)


class OutputProducer:
    """One aiokafka producer for the lifetime of an `async with` block."""

    def __init__(self, kafka: KafkaConfig, *, linger_ms: int = 5, idempotent: bool | None = None):
        self._kafka = kafka
        self._producer: AIOKafkaProducer = make_producer(
            kafka, linger_ms=linger_ms, idempotent=idempotent
        )

    async def __aenter__(self) -> OutputProducer:
        async with kafka_errors("producer", self._kafka.bootstrap_servers):
            await self._producer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._producer.stop()

    async def send(self, topic: str, record: OutRecord, *, partition: int | None = None) -> Ack:
        """Enqueue `record` for `topic`; the `Ack` resolves once the broker has it."""
        try:
            future = await self._producer.send(
                topic,
                value=record.value,
                key=record.key,
                headers=record.headers,
                timestamp_ms=record.timestamp_ms,
                partition=partition,
            )
        except Exception as exc:
            if is_client_error(exc):
                raise send_error(exc, topic, self._kafka.bootstrap_servers) from exc
            raise
        return Ack(future, topic, self._kafka.bootstrap_servers)

    async def flush(self) -> None:
        """Wait until every record sent so far has been delivered (or failed)."""
        async with kafka_errors("producer flush", self._kafka.bootstrap_servers):
            await self._producer.flush()
