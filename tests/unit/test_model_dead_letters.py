"""Dead letters per model: a record one model rejects is a dead letter naming that model,
and the other write models still publish it; model-independent errors stay one dead letter.

Real tiny models, a fake producer: model `a` takes 256 tokens, model `b` only 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from schemas.deadletter import DeadLetterHeaders, decode_dead_letter_headers
from stream.config import Config, ModelConfig
from stream.core.records import SourceRecord
from stream.embed.embedder import Embedder, Vectors
from stream.embed.pool import ModelPool
from stream.errors import RecordRejected, TargetFailing
from stream.processor.inference import Inference
from stream.processor.sensors import ProcessorStats, Sensor
from stream.processor.window import TARGET_FAILING_INPUTS, RetryWindow, WindowProcessor
from tests.support.fakes import FakeProducer, record_bytes, source

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LONG = "many words in this text " * 8  # 42 tokens: over b's 16, under a's 256
SHORT = "short text"


def created(offset: int, key: str, text: str) -> SourceRecord:
    event = {"type": "atom.created", "atom_id": key, "text": text}
    return source("atoms", 0, offset, key.encode(), msgspec.json.encode(event))


def make_processor(
    tiny_model: Path, tiny_model_b: Path, producer: FakeProducer, *, on_overlong: str
) -> WindowProcessor:
    config = Config(
        models={
            "a": ModelConfig(path=str(tiny_model)),
            "b": ModelConfig(path=str(tiny_model_b), max_tokens=16),
        }
    )
    config = msgspec.structs.replace(
        config,
        batching=msgspec.structs.replace(config.batching, micro_batch_atoms=4),
        limits=msgspec.structs.replace(config.limits, on_overlong=on_overlong),
    )
    stats = ProcessorStats()
    inference = Inference(config.batching, stats, Sensor())
    return WindowProcessor(config, ModelPool(config), producer, inference, stats)  # type: ignore[arg-type]


def letters(producer: FakeProducer) -> list[DeadLetterHeaders]:
    return [decode_dead_letter_headers(r.headers) for t, r in producer.sent if t == "embed.dlq"]


def offsets(producer: FakeProducer, model: str) -> list[int]:
    """Source offsets of the embeddings published for `model`, sorted."""
    return sorted(
        msgspec.json.decode(r.value or b"")["source"]["offset"]
        for t, r in producer.sent
        if t == f"embeddings.{model}"
    )


async def fail_on(embedder: Embedder, text: str | None) -> None:
    """Make `embedder` raise on every batch holding `text` (on every batch: None)."""
    poison = None
    if text is not None:
        poison = (await anyio.to_thread.run_sync(embedder.tokenize, [text])).input_ids[0]
    real = embedder.embed_batch

    def embed_batch(input_ids: Sequence[Sequence[int]]) -> Vectors:
        if poison is None or any(list(ids) == poison for ids in input_ids):
            raise RuntimeError("model fell over (fake)")
        return real(input_ids)

    embedder.embed_batch = embed_batch  # type: ignore[method-assign]


@pytest.mark.parametrize("write_models", [("a", "b"), ("b", "a")])
async def test_a_text_too_long_for_one_model_is_dead_for_that_model_only(
    tiny_model: Path, tiny_model_b: Path, write_models: tuple[str, str]
) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="dead_letter")
    records = [created(0, "k0", SHORT), created(1, "k1", LONG), created(2, "k2", SHORT + " 2")]
    await processor.process(records, write_models, "m1")
    assert offsets(producer, "a") == [0, 1, 2], "the source still publishes the long text"
    assert offsets(producer, "b") == [0, 2]
    assert letters(producer) == [
        DeadLetterHeaders(
            topic="atoms",
            partition=0,
            offset=1,
            stage="validate",
            error_class="OverlongInput",
            error="text needs more than 16 tokens (models.b.max_tokens) and "
            "limits.on_overlong is dead_letter",
            model="b",
        )
    ]
    dead = next(r for t, r in producer.sent if t == "embed.dlq")
    assert (dead.key, dead.value) == (records[1].key, records[1].value)
    assert processor.stats.dead_letters == {"validate": 1}
    assert processor.stats.model_dead_letters == {("b", "validate"): 1}
    assert processor.stats.truncated == {}


async def test_truncation_is_still_per_model_and_no_dead_letter(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="truncate")
    await processor.process([created(0, "k0", LONG)], ("a", "b"), "m1")
    assert (offsets(producer, "a"), offsets(producer, "b")) == ([0], [0])
    assert letters(producer) == [] and processor.stats.truncated == {"b": 1}


async def test_a_model_that_fails_on_one_input_dead_letters_it_for_itself(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="truncate")
    await fail_on(await processor.models.get("b"), "poison")
    records = [created(0, "k0", SHORT), created(1, "k1", "poison"), created(2, "k2", "other")]
    await processor.process(records, ("a", "b"), "m1", target="b")
    assert offsets(producer, "a") == [0, 1, 2]
    assert offsets(producer, "b") == [0, 2]
    [letter] = letters(producer)
    assert (letter.offset, letter.stage, letter.model) == (1, "embed", "b")
    assert (letter.error_class, letter.error) == ("RuntimeError", "model fell over (fake)")
    assert processor.stats.model_dead_letters == {("b", "embed"): 1}


async def test_decode_and_validate_errors_stay_one_dead_letter_without_a_model(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="dead_letter")
    blank = {"type": "atom.created", "atom_id": "y", "text": " "}
    records = [
        source("atoms", 0, 0, b"x", b"not json"),
        source("atoms", 0, 1, b"y", msgspec.json.encode(blank)),
        created(2, "k", LONG),
    ]
    await processor.process(records, ("a", "b"), None)
    assert [(d.offset, d.stage, d.model) for d in letters(producer)] == [
        (0, "decode", None),
        (1, "validate", None),
        (2, "validate", "b"),
    ]
    assert offsets(producer, "a") == [2] and offsets(producer, "b") == []
    assert processor.stats.dead_letters == {"decode": 1, "validate": 2}


async def test_an_output_the_broker_refuses_is_dead_for_its_model_only(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    at_send = FakeProducer(fail={"embeddings.b": RecordRejected("record too large")})
    processor = make_processor(tiny_model, tiny_model_b, at_send, on_overlong="truncate")
    await processor.process([created(0, "k", SHORT), created(1, "j", LONG)], ("b", "a"), None)
    assert offsets(at_send, "a") == [0, 1]
    assert sorted((d.offset, d.stage, d.model) for d in letters(at_send)) == [
        (0, "produce", "b"),
        (1, "produce", "b"),
    ]
    # Refused at the ack (over the topic's size): the batch first, then the record alone.
    at_ack = FakeProducer(max_bytes={"embeddings.b": 1})
    processor = make_processor(tiny_model, tiny_model_b, at_ack, on_overlong="truncate")
    await processor.process([created(0, "k", SHORT)], ("a", "b"), None)
    # a's output is written by the batched try and again by the one-by-one retry, in order.
    assert offsets(at_ack, "a") == [0, 0] and offsets(at_ack, "b") == []
    assert [(d.offset, d.stage, d.model) for d in letters(at_ack)] == [(0, "produce", "b")]


async def test_outputs_go_in_one_batch_per_model_and_a_refused_batch_finds_its_record(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="truncate")
    records = [created(i, f"k{i}", f"text {i}") for i in range(8)]
    await processor.process(records, ("a", "b"), None)
    # Micro-batches of 4: two batches per model, one per released micro-batch.
    assert producer.batches == 4
    assert offsets(producer, "a") == offsets(producer, "b") == list(range(8))
    # One output too large for b, among eight: only that one is a dead letter.
    limit = max(record_bytes(r) for t, r in producer.sent if t == "embeddings.b") + 100
    refusing = FakeProducer(max_bytes={"embeddings.b": limit})
    processor = make_processor(tiny_model, tiny_model_b, refusing, on_overlong="truncate")
    big = {"type": "atom.created", "atom_id": "k3", "text": "t", "metadata": {"m": "x" * limit}}
    records[3] = source("atoms", 0, 3, b"k3", msgspec.json.encode(big))
    await processor.process(records, ("a", "b"), None)
    # Batches the broker took before the refusal are written again by the retry.
    assert sorted(set(offsets(refusing, "b"))) == [0, 1, 2, 4, 5, 6, 7]
    assert [(d.offset, d.stage, d.model) for d in letters(refusing)] == [(3, "produce", "b")]


async def test_a_refused_batch_in_a_transaction_retries_the_window_one_by_one(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer(max_bytes={"embeddings.b": 1})
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="truncate")
    records = [created(0, "k", SHORT), created(1, "j", SHORT)]
    transaction: Any = lambda _: producer  # noqa: E731 - as the live path's per-partition lookup
    with pytest.raises(RetryWindow, match="retried with one send per record"):
        await processor.process(records, ("a", "b"), None, producer_for=transaction)
    assert letters(producer) == []  # the caller aborts the transaction, then retries
    batches = producer.batches
    await processor.process(records, ("a", "b"), None, producer_for=transaction)
    assert producer.batches == batches, "the retry sends one record at a time"
    assert [(d.offset, d.model) for d in letters(producer)] == [(0, "b"), (1, "b")]
    producer.max_bytes.clear()  # the topic's limit raised: the same records fit now
    await processor.process(records, ("a", "b"), None, producer_for=transaction)
    assert producer.batches > batches, "once the window succeeded, batches again"


async def test_backfill_dead_letters_name_the_target(tiny_model: Path, tiny_model_b: Path) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="dead_letter")
    records = [source("atoms", 0, 0, b"x", b"not json"), created(1, "k", LONG)]
    await processor.process(records, ("b",), "m1", path="backfill", target="b")
    assert [(d.offset, d.stage, d.model) for d in letters(producer)] == [(1, "validate", "b")]
    assert offsets(producer, "b") == []


async def test_a_target_that_fails_every_input_raises_instead_of_dead_lettering(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="truncate")
    await fail_on(await processor.models.get("b"), None)
    records = [created(i, f"k{i}", f"text {i}") for i in range(TARGET_FAILING_INPUTS)]
    with pytest.raises(TargetFailing, match="model b failed 3 inputs in a row") as raised:
        await processor.process(records, ("a", "b"), "m1", target="b")
    assert raised.value.model == "b"
    assert producer.sent == [], "the target runs first: nothing is published twice"
    # Not the migration's target (e.g. the migration is paused): dead letters for b alone.
    await processor.process(records, ("a", "b"), "m1")
    assert offsets(producer, "a") == [0, 1, 2] and offsets(producer, "b") == []
    assert [(d.offset, d.model) for d in letters(producer)] == [(0, "b"), (1, "b"), (2, "b")]


async def test_failures_count_across_windows_until_a_success(
    tiny_model: Path, tiny_model_b: Path
) -> None:
    producer = FakeProducer()
    processor = make_processor(tiny_model, tiny_model_b, producer, on_overlong="truncate")
    await fail_on(await processor.models.get("b"), None)
    one: Any = [created(0, "k0", "text 0")]
    for _ in range(TARGET_FAILING_INPUTS - 1):  # one input alone per window
        await processor.process(one, ("a", "b"), "m1", target="b")
    with pytest.raises(TargetFailing):
        await processor.process(one, ("a", "b"), "m1", target="b")
    assert len(letters(producer)) == TARGET_FAILING_INPUTS - 1
