"""The window processor's two stages, with the real tiny models and a recording `send`.

The send callable stands in for the producer (the Kafka boundary), so that per-key order
and send failures can be checked exactly; the integration tests run the real producer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka.errors import KafkaTimeoutError, RecordTooLargeError

from stream.config import Config, ModelConfig
from stream.core.deadletter import SourceRecord
from stream.embed.pool import ModelPool
from stream.processor.window import LiveStats, RetryWindow, WindowProcessor

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def record(offset: int, key: str, value: dict[str, Any] | None) -> SourceRecord:
    return SourceRecord(
        topic="atoms",
        partition=0,
        offset=offset,
        key=key.encode(),
        value=None if value is None else msgspec.json.encode(value),
        headers=(),
        timestamp_ms=None,
    )


def created(offset: int, key: str, text: str) -> SourceRecord:
    return record(offset, key, {"type": "atom.created", "atom_id": key, "text": text})


class Recorder:
    """Collects sends in call order; `fail` maps a topic to the exception its send raises."""

    def __init__(self, fail: dict[str, Exception] | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.fail = fail or {}

    async def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        timestamp_ms: int | None,
    ) -> asyncio.Future[None]:
        if topic in self.fail:
            raise self.fail[topic]
        self.sent.append((topic, key, value))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


def window_processor(tiny_model: Path, tiny_model_b: Path, send: Recorder) -> WindowProcessor:
    config = Config(
        models={"a": ModelConfig(path=str(tiny_model)), "b": ModelConfig(path=str(tiny_model_b))}
    )
    config = msgspec.structs.replace(
        config, batching=msgspec.structs.replace(config.batching, micro_batch_atoms=4)
    )
    return WindowProcessor(config, ModelPool(config), send, LiveStats())


async def test_each_model_gets_every_key_in_input_order(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    texts = ["short", "a much longer text " * 12, "medium sized text here", "short"]
    records = [created(i, f"k{i % 3}", text) for i, text in enumerate(texts * 3)]
    records.append(record(len(records), "k1", {"type": "atom.deleted", "atom_id": "k1"}))
    send = Recorder()
    await window_processor(tiny_model, tiny_model_b, send).process(records, ("a", "b"), None)
    for model in ("a", "b"):
        keyed = [(key, value) for topic, key, value in send.sent if topic == f"embeddings.{model}"]
        assert len(keyed) == len(records)
        for key in (b"k0", b"k1", b"k2"):
            offsets = [
                None if value is None else msgspec.json.decode(value)["source"]["offset"]
                for k, value in keyed
                if k == key
            ]
            expected = [r.offset for r in records if r.key == key]
            if key == b"k1":  # the delete is last: a tombstone, after every earlier version
                assert offsets[-1] is None and offsets[:-1] == expected[:-1]
            else:
                assert offsets == expected


async def test_a_send_that_times_out_asks_for_the_window_again(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    send = Recorder(fail={"embeddings.b": KafkaTimeoutError()})
    processor = window_processor(tiny_model, tiny_model_b, send)
    with pytest.raises(RetryWindow, match=r"send to embeddings\.b failed"):
        await processor.process([created(0, "k", "text")], ("a", "b"), None)


async def test_a_record_the_broker_refuses_becomes_one_produce_dead_letter(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    send = Recorder(fail={"embeddings.b": RecordTooLargeError()})
    processor = window_processor(tiny_model, tiny_model_b, send)
    await processor.process([created(0, "k", "text"), created(1, "j", "more")], ("a", "b"), None)
    letters = [key for topic, key, _ in send.sent if topic == "embed.dlq"]
    assert letters == [b"k", b"j"] or letters == [b"j", b"k"]
    assert processor.stats.dead_letters == {"produce": 2}
