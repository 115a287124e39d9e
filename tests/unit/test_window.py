"""The window processor's two stages, with the real tiny models and a fake producer.

The fake stands in for the Kafka boundary (`OutputProducer`), so that per-key order and
send failures can be checked exactly; the integration tests run the real producer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from schemas.deadletter import decode_dead_letter_headers
from schemas.embeddings import decode_embedding
from stream.config import Config, ModelConfig
from stream.core.records import SourceRecord
from stream.embed.embedder import Embedder, Tokenized
from stream.embed.fingerprint import model_fingerprint
from stream.embed.pool import ModelPool
from stream.errors import RecordRejected, SendFailed
from stream.processor.inference import Inference
from stream.processor.sensors import ProcessorStats, Sensor
from stream.processor.window import RetryWindow, WindowProcessor
from tests.support.fakes import FakeProducer, source

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def record(offset: int, key: str, value: dict[str, Any] | None) -> SourceRecord:
    encoded = None if value is None else msgspec.json.encode(value)
    return source("atoms", 0, offset, key.encode(), encoded)


def created(offset: int, key: str, text: str) -> SourceRecord:
    return record(offset, key, {"type": "atom.created", "atom_id": key, "text": text})


def window_processor(
    tiny_model: Path, tiny_model_b: Path, producer: FakeProducer
) -> WindowProcessor:
    config = Config(
        models={"a": ModelConfig(path=str(tiny_model)), "b": ModelConfig(path=str(tiny_model_b))}
    )
    config = msgspec.structs.replace(
        config, batching=msgspec.structs.replace(config.batching, micro_batch_atoms=4)
    )
    stats = ProcessorStats()
    inference = Inference(config.batching, stats, Sensor())
    return WindowProcessor(config, ModelPool(config), producer, inference, stats)  # type: ignore[arg-type]


async def test_each_model_gets_every_key_in_input_order(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    texts = ["short", "a much longer text " * 12, "medium sized text here", "short"]
    records = [created(i, f"k{i % 3}", text) for i, text in enumerate(texts * 3)]
    records.append(record(len(records), "k1", {"type": "atom.deleted", "atom_id": "k1"}))
    producer = FakeProducer()
    await window_processor(tiny_model, tiny_model_b, producer).process(records, ("a", "b"), None)
    for model in ("a", "b"):
        keyed = [(r.key, r.value) for topic, r in producer.sent if topic == f"embeddings.{model}"]
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
    producer = FakeProducer(fail={"embeddings.b": SendFailed("send to embeddings.b failed")})
    processor = window_processor(tiny_model, tiny_model_b, producer)
    with pytest.raises(RetryWindow, match=r"send to embeddings\.b failed"):
        await processor.process([created(0, "k", "text")], ("a", "b"), None)


async def test_an_ack_that_fails_asks_for_the_window_again(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer(fail_ack={"embeddings.a": [SendFailed("no leader for embeddings.a")]})
    processor = window_processor(tiny_model, tiny_model_b, producer)
    with pytest.raises(RetryWindow, match="no leader"):
        await processor.process([created(0, "k", "text")], ("a", "b"), None)


async def test_a_retried_window_does_not_write_its_dead_letters_again(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    """Exactly one dead letter per bad offset, also when the window fails after writing it."""
    producer = FakeProducer(fail_ack={"embeddings.a": [SendFailed("no leader for embeddings.a")]})
    processor = window_processor(tiny_model, tiny_model_b, producer)
    records = [record(0, "bad", {"type": "atom.created"}), created(1, "k", "text")]
    with pytest.raises(RetryWindow, match="no leader"):
        await processor.process(records, ("a", "b"), None)
    assert producer.keys("embed.dlq") == [b"bad"] and len(processor.letters) == 1
    retried = [*records, record(2, "worse", {"type": "atom.created"})]  # refetched, longer
    await processor.process(retried, ("a", "b"), None)
    assert producer.keys("embed.dlq") == [b"bad", b"worse"]
    assert processor.stats.dead_letters == {"validate": 2}
    assert len(processor.letters) == 0  # the window succeeded: its offsets commit next


async def test_a_record_the_broker_refuses_becomes_one_produce_dead_letter(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer(fail={"embeddings.b": RecordRejected("record too large")})
    processor = window_processor(tiny_model, tiny_model_b, producer)
    await processor.process([created(0, "k", "text"), created(1, "j", "more")], ("a", "b"), None)
    letters = producer.keys("embed.dlq")
    assert len(letters) == 2 and set(letters) == {b"j", b"k"}
    assert processor.stats.dead_letters == {"produce": 2}
    headers = dict(next(r for t, r in producer.sent if t == "embed.dlq").headers)
    assert headers["lattice.dlq.stage"] == b"produce"


async def test_invalid_events_are_one_dead_letter_each_on_the_live_path_only(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    bad = [
        source("atoms", 0, 0, b"x", b"not json"),
        record(1, "y", {"type": "atom.created", "atom_id": "y", "text": "   "}),
    ]
    records = [*bad, created(2, "k", "fine")]
    producer = FakeProducer()
    live = window_processor(tiny_model, tiny_model_b, producer)
    await live.process(records, ("a",), None)
    assert producer.keys("embed.dlq") == [b"x", b"y"]
    assert live.stats.dead_letters == {"decode": 1, "validate": 1}
    assert producer.keys("embeddings.a") == [b"k"]
    backfill_producer = FakeProducer()
    backfill = window_processor(tiny_model, tiny_model_b, backfill_producer)
    await backfill.process(records, ("a",), "m1", path="backfill")
    assert backfill_producer.keys("embed.dlq") == []
    assert backfill_producer.keys("embeddings.a") == [b"k"]


async def test_outputs_carry_the_fingerprint_and_the_atoms_metadata(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    created_at = "2026-11-27T10:00:00+00:00"
    records = [
        record(
            0,
            "k",
            {
                "type": "atom.created",
                "atom_id": "k",
                "text": "text",
                "metadata": {"tenant": "t1"},
                "created_at": created_at,
            },
        ),
        created(1, "plain", "no metadata"),
        record(2, "gone", None),
    ]
    producer = FakeProducer()
    processor = window_processor(tiny_model, tiny_model_b, producer)
    await processor.process(records, ("a", "b"), None)
    fingerprints = {}
    for model, path in (("a", tiny_model), ("b", tiny_model_b)):
        expected = await anyio.to_thread.run_sync(
            model_fingerprint, path, ModelConfig(path=str(path))
        )
        fingerprints[model] = expected
        sent = [r for topic, r in producer.sent if topic == f"embeddings.{model}"]
        assert [r.key for r in sent] == [b"gone", b"k", b"plain"], "tombstones go first"
        for out in sent:
            assert dict(out.headers)["lattice.model-fingerprint"] == expected.encode()
        with_metadata, plain = (decode_embedding(r.value or b"") for r in sent[1:])
        assert with_metadata.model_fingerprint == plain.model_fingerprint == expected
        assert with_metadata.metadata == {"tenant": "t1"}
        assert with_metadata.created_at == datetime.fromisoformat(created_at)
        assert (plain.metadata, plain.created_at) == (None, None)
    assert fingerprints["a"] != fingerprints["b"]


@pytest.mark.parametrize(
    ("dlq_limit", "reduced", "lost"),
    [(4000, 1, 0), (1400, 2, 0), (100, 2, 1)],
    ids=["value-cut", "headers-dropped", "given-up"],
)
async def test_a_dead_letter_the_broker_refuses_is_written_reduced_or_given_up_on(
    tiny_model: Path, tiny_model_b: Path, dlq_limit: int, reduced: int, lost: int
) -> None:
    """A poison record whose dead letter is over the DLQ's size limit must not stall the
    partition: the letter goes again smaller, and past the last step is counted as lost."""
    poison = source(
        "atoms", 0, 0, b"k-poison", b"{not json " + b"x" * 8000, headers=[("trace", b"t" * 600)]
    )
    records = [poison, created(1, "k1", "a fine text")]
    producer = FakeProducer(max_bytes={"embed.dlq": dlq_limit})
    processor = window_processor(tiny_model, tiny_model_b, producer)
    with anyio.fail_after(30):
        await processor.process(records, ("a", "b"), None)
    stats = processor.stats
    assert (stats.dead_letters_reduced, stats.dead_letters_lost) == (reduced, lost)
    assert producer.keys("embeddings.a") == [b"k1"] and producer.keys("embeddings.b") == [b"k1"]
    letters = [r for topic, r in producer.sent if topic == "embed.dlq"]
    if lost:
        assert letters == []
        return
    [letter] = letters
    info = decode_dead_letter_headers(letter.headers)
    assert (info.topic, info.partition, info.offset, info.stage) == ("atoms", 0, 0, "decode")
    assert info.truncated_from == len(poison.value or b"") and len(letter.value or b"") == 1024
    assert info.headers_dropped is (reduced == 2)
    assert any(name == "trace" for name, _ in letter.headers) is (reduced == 1)


async def test_models_with_one_tokenizer_tokenize_a_window_once(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    processor = window_processor(tiny_model, tiny_model_b, FakeProducer())
    a, b = await processor.models.get("a"), await processor.models.get("b")
    assert a.tokenization_key == b.tokenization_key  # both carry MiniLM's tokenizer
    shorter = await anyio.to_thread.run_sync(
        lambda: Embedder("short", ModelConfig(path=str(tiny_model), max_tokens=16))
    )
    prefixed = await anyio.to_thread.run_sync(
        lambda: Embedder("prefixed", ModelConfig(path=str(tiny_model), document_prefix="doc: "))
    )
    assert len({a.tokenization_key, shorter.tokenization_key, prefixed.tokenization_key}) == 3
    calls: list[str] = []
    tokenize = processor._inference.tokenize

    async def counted(embedder: Embedder, texts: Sequence[str]) -> Tokenized:
        calls.append(embedder.name)
        return await tokenize(embedder, texts)

    processor._inference.tokenize = counted  # type: ignore[method-assign]
    records = [created(i, f"k{i}", f"text number {i}") for i in range(6)]
    await processor.process(records, ("a", "b"), None)
    assert calls == ["a"]
    assert processor.stats.outputs["a", "live"] == processor.stats.outputs["b", "live"] == 6


async def test_a_window_prepared_ahead_gives_the_outputs_of_one_prepared_in_turn(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    """The live path's lookahead decodes and tokenizes a window before its turn: the same
    vectors, tombstones and dead letters, in the same order, as a window done in turn."""
    records = [created(i, f"k{i % 4}", f"text {i % 5} " * (i % 7 + 1)) for i in range(12)]
    records += [
        record(12, "bad", {"type": "atom.created"}),
        record(13, "k1", {"type": "atom.deleted", "atom_id": "k1"}),
    ]
    sent: list[list[tuple[str, bytes | None, bytes | None]]] = []
    for ahead in (False, True):
        producer = FakeProducer()
        processor = window_processor(tiny_model, tiny_model_b, producer)
        for model in ("a", "b"):
            await processor.models.get(model)
        prepared = await processor.prepare(records, ("a", "b")) if ahead else None
        await processor.process(records, ("a", "b"), None, prepared=prepared)
        outputs = []
        for topic, out in producer.sent:
            value = out.value
            if value is not None and topic.startswith("embeddings."):
                fields = msgspec.json.decode(value)
                fields.pop("embedded_at")
                value = msgspec.json.encode(fields)
            outputs.append((topic, out.key, value))
        sent.append(outputs)
    plain, ahead_of_turn = sent
    assert len(plain) == 2 * 13 + 1  # 12 vectors and 1 tombstone per model, 1 dead letter
    assert ahead_of_turn == plain


async def test_a_window_prepared_for_other_records_is_not_used(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer()
    processor = window_processor(tiny_model, tiny_model_b, producer)
    await processor.models.get("a")
    prepared = await processor.prepare([created(0, "k", "one text")], ("a",))
    await processor.process([created(0, "k", "another text")], ("a",), None, prepared=prepared)
    ((topic, out),) = producer.sent
    expected = (await processor.models.get("a")).embed(["another text"])[0]
    vector = decode_embedding(out.value or b"").vector
    assert topic == "embeddings.a" and vector == pytest.approx(expected.tolist(), abs=1e-6)
