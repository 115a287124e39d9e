"""Hostile atom events through the broker: sending them, and checking every input offset
against the oracle (`tests.support.hostile_atoms.atom_verdict`): one output per write model,
or exactly one dead letter at its offset, with the original key, value, headers and
timestamp, the right `lattice.dlq.stage` and stale `lattice.dlq.*` input headers replaced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from schemas.embeddings import EmbeddingRecord
from tests.support.hostile import PARTITIONS
from tests.support.hostile_atoms import Headers, Record, Verdict, atom_verdict

DLQ_PREFIX = "lattice.dlq."
DLQ_HEADERS = {
    DLQ_PREFIX + name for name in ("topic", "partition", "offset", "stage", "error-class", "error")
}


@dataclass(frozen=True)
class Sent:
    """One input record as produced, where it landed, and what it must become."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    partition: int
    offset: int
    verdict: Verdict

    def describe(self) -> str:
        return (
            f"input {self.partition}/{self.offset} key={self.key!r:.80} "
            f"value={self.value!r:.300}: expected {self.verdict}"
        )


async def send_atoms(
    bootstrap: str, topic: str, cases: Sequence[tuple[Record, Headers]]
) -> list[Sent]:
    """Produce every case (partition by index, explicit timestamps) and note where it went."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 * 1024 * 1024
    )
    base_ms = 1_700_000_000_000
    try:
        await producer.start()
        futures = [
            await producer.send(
                topic,
                key=key,
                value=value,
                headers=list(extra) or None,
                partition=index % PARTITIONS,
                timestamp_ms=base_ms + index,
            )
            for index, ((key, value), extra) in enumerate(cases)
        ]
        landed = [await future for future in futures]
    finally:
        await producer.stop()
    return [
        Sent(
            key,
            value,
            list(extra),
            base_ms + index,
            meta.partition,
            meta.offset,
            atom_verdict(key, value),
        )
        for index, (((key, value), extra), meta) in enumerate(zip(cases, landed, strict=True))
    ]


def check_output(sent: Sent, record: Any) -> None:
    """An embedding or tombstone for the right atom, from the right input offset."""
    verdict = sent.verdict
    assert verdict.atom_id is not None
    assert record.key == verdict.atom_id.encode(), sent.describe()
    if verdict.tombstone:
        assert record.value is None, sent.describe()
        return
    embedding = msgspec.json.decode(record.value, type=EmbeddingRecord)
    assert (embedding.atom_id, embedding.model) == (verdict.atom_id, "tiny"), sent.describe()
    assert (embedding.source.partition, embedding.source.offset) == (sent.partition, sent.offset)
    assert (embedding.metadata or None) == (verdict.metadata or None), sent.describe()


def check_letter(atoms: str, sent: Sent, letter: Any) -> None:
    """The original record, its non-DLQ headers and timestamp, with one set of DLQ headers."""
    context = f"{sent.describe()}; dead letter headers {letter.headers}"
    assert (letter.key, letter.value) == (sent.key, sent.value), context
    assert letter.timestamp == sent.timestamp_ms, context
    names = [name for name, _ in letter.headers if name.startswith(DLQ_PREFIX)]
    assert len(names) == len(set(names)), f"lattice.dlq.* headers repeated: {context}"
    assert DLQ_HEADERS <= set(names) <= DLQ_HEADERS | {DLQ_PREFIX + "null-value"}, context
    values = {name: value.decode("utf-8") for name, value in letter.headers if name in names}
    assert values[DLQ_PREFIX + "stage"] in sent.verdict.stages, context
    assert values[DLQ_PREFIX + "topic"] == atoms, context
    kept = [(n, v) for n, v in letter.headers if not n.startswith(DLQ_PREFIX)]
    assert kept == [(n, v) for n, v in sent.headers if not n.startswith(DLQ_PREFIX)], context


def check_atoms(
    atoms: str, sent: list[Sent], outputs: list[Any], letters: list[Any], *, retried: bool = False
) -> Counter[str]:
    """Every input offset ended as its verdict says; nothing else was written.

    `retried`: windows were retried, so an output may be written more than once
    (at-least-once), a dead letter still exactly once.
    """
    outputs_at: dict[tuple[int, int], list[Any]] = {}
    for record in outputs:
        topic, partition, offset = (
            dict(record.headers)["lattice.source-offset"].decode().rsplit("/", 2)
        )
        assert topic == atoms
        outputs_at.setdefault((int(partition), int(offset)), []).append(record)
    letters_at: dict[tuple[int, int], list[Any]] = {}
    for letter in letters:
        headers = dict(letter.headers)
        where = int(headers[DLQ_PREFIX + "partition"]), int(headers[DLQ_PREFIX + "offset"])
        letters_at.setdefault(where, []).append(letter)
    inputs = {(s.partition, s.offset) for s in sent}
    assert set(outputs_at) <= inputs and set(letters_at) <= inputs, "output of no input"
    tally: Counter[str] = Counter()
    for case in sent:
        out = outputs_at.get((case.partition, case.offset), [])
        dlq = letters_at.get((case.partition, case.offset), [])
        outcome = case.verdict.outcome
        if outcome == "either":
            outcome = "dead" if dlq else "output"
        if outcome == "output":
            reasons = [dict(letter.headers)[DLQ_PREFIX + "error"] for letter in dlq]
            assert not dlq, f"{case.describe()}; dead letter instead: {reasons}"
            assert len(out) >= 1 if retried else len(out) == 1, f"{case.describe()}: {len(out)}"
            for record in out:
                check_output(case, record)
        else:
            assert not out, f"{case.describe()}; output instead of a dead letter"
            assert len(dlq) == 1, f"{case.describe()}; {len(dlq)} dead letters"
            check_letter(atoms, case, dlq[0])
        tally[outcome] += 1
    return tally
