"""A bare aiokafka copy loop, the bench's measure of the client's ceiling in Python here:
consume, decode each value, produce one record of a given value per input, commit per
window. Nothing of the processor runs; the clients have the processor's settings."""

from __future__ import annotations

import asyncio
import time

import msgspec
from aiokafka import TopicPartition

from stream.config import KafkaConfig
from stream.kafka.clients import make_consumer, make_producer
from stream.kafka.errors import kafka_errors


async def copy_partition(
    kafka: KafkaConfig,
    source: str,
    output: str,
    value: bytes,
    *,
    count: int,
    window: int,
) -> float:
    """Copy the first `count` records of partition 0 of `source` to `output`, each as
    `value`, acknowledged and committed window by window; the seconds it took."""
    consumer = make_consumer(kafka, group_id=kafka.group_id)
    producer = make_producer(kafka)
    tp = TopicPartition(source, 0)
    async with kafka_errors("copy loop", kafka.bootstrap_servers):
        await consumer.start()
        await producer.start()
        try:
            consumer.assign([tp])
            done, began = 0, time.perf_counter()
            while done < count:
                fetched = await consumer.getmany(timeout_ms=500, max_records=window)
                messages = fetched.get(tp, [])
                if not messages:
                    continue
                acks = []
                for message in messages:
                    msgspec.json.decode(message.value or b"")
                    acks.append(await producer.send(output, value, key=message.key))
                await asyncio.gather(*acks)
                await consumer.commit({tp: messages[-1].offset + 1})
                done += len(messages)
            return time.perf_counter() - began
        finally:
            await consumer.stop()
            await producer.stop()
