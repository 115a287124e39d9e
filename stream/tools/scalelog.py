"""Synthetic atom logs for the scale benchmarks, and the checks of a migration's result.

The history is generated without a Python object per key (numpy draws, keys are `k<index>`),
and the checks stream both topics once, holding one small tuple per key: what a bench at a
million events can afford.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field

import msgspec
import numpy as np

from schemas.embeddings import EmbeddingRecord
from stream.config import Config
from stream.core.records import OutRecord
from stream.kafka.admin import Admin
from stream.kafka.producer import OutputProducer
from stream.kafka.reader import PartitionReader
from stream.tools.workloads import LazyTexts

PRODUCE_FLUSH_EVERY = 20_000  # records in flight before the generator waits for acks
SAMPLE_ONE_IN = 500  # keys whose texts the vector check keeps (by a hash of the key)


def atom_event(kind: str, atom_id: str, text: str | None = None) -> bytes:
    """One `atoms` value as a client writes it."""
    body: dict[str, str] = {"type": f"atom.{kind}", "atom_id": atom_id}
    if text is not None:
        body["text"] = text
    return msgspec.json.encode(body)


@dataclass
class UpdateHeavyLog:
    """`events` events over `keys` keys: every key created once, then updates of random keys,
    and at the end deletes of `delete_share` of the keys (distinct, random).

    `live(count)` continues the log as live ingestion would: creates of new keys, updates and
    deletes of random ones (shares `live_mix`).
    """

    events: int
    keys: int
    delete_share: float = 0.1
    seed: int = 7
    live_mix: tuple[float, float, float] = (0.4, 0.5, 0.1)  # creates, updates, deletes
    _next_key: int = 0
    _texts: LazyTexts = field(default_factory=lambda: LazyTexts(1 << 30))
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        deletes = int(self.keys * self.delete_share)
        if self.events < self.keys + deletes:
            raise ValueError("events must cover one create per key and the deletes")
        self._rng = np.random.default_rng(self.seed)

    def history(self) -> Iterator[tuple[bytes, bytes]]:
        """The history, in produce order: (key, value)."""
        deletes = int(self.keys * self.delete_share)
        for i in range(self.keys):
            yield self._event("created", i)
        self._next_key = self.keys
        updates = self.events - self.keys - deletes
        for start in range(0, updates, 65_536):
            for i in self._rng.integers(0, self.keys, size=min(65_536, updates - start)):
                yield self._event("created", int(i))  # an update is a new `atom.created`
        for i in self._rng.choice(self.keys, size=deletes, replace=False):
            yield self._event("deleted", int(i))

    def live(self, count: int) -> Iterator[tuple[bytes, bytes]]:
        """`count` more events as live ingestion makes them."""
        kinds = self._rng.choice(3, size=count, p=list(self.live_mix))
        for kind in kinds:
            if kind == 0:
                self._next_key += 1
                yield self._event("created", self._next_key - 1)
            else:
                index = int(self._rng.integers(0, max(1, self._next_key)))
                yield self._event("created" if kind == 1 else "deleted", index)

    def _event(self, kind: str, index: int) -> tuple[bytes, bytes]:
        atom_id = f"k{index}"
        text = None if kind == "deleted" else self._texts[int(self._rng.integers(0, 1 << 20))]
        return atom_id.encode(), atom_event(kind, atom_id, text)


async def produce_events(config: Config, events: Iterator[tuple[bytes, bytes]]) -> int:
    """Produce (key, value) events to `atoms` as fast as the broker takes them."""
    count = 0
    async with OutputProducer(config.kafka, linger_ms=20, idempotent=False) as producer:
        for key, value in events:
            await producer.send(config.topics.atoms, OutRecord(key, value, []))
            count += 1
            if count % PRODUCE_FLUSH_EVERY == 0:
                await producer.flush()
        await producer.flush()
    return count


@dataclass
class FinalState:
    """Per key, what a from-scratch replay of `atoms` ends with: the (partition, offset) of
    its last event, or None when deleted; plus the texts of a sample of live keys."""

    last: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    sample_texts: dict[str, str] = field(default_factory=dict)

    @property
    def live_keys(self) -> int:
        return sum(1 for v in self.last.values() if v is not None)


@contextlib.asynccontextmanager
async def read_partitions(
    config: Config, topic: str
) -> AsyncIterator[tuple[PartitionReader, Mapping[int, tuple[int, int]]]]:
    """A reader and the start and end offsets of every partition of `topic`."""
    async with Admin(config.kafka) as admin:
        count = await admin.partition_count(topic)
    if count is None:
        raise RuntimeError(f"topic {topic} does not exist")
    async with PartitionReader(config.kafka) as reader:
        partitions = list(range(count))
        starts = await reader.beginning_offsets(topic, partitions)
        ends = await reader.end_offsets(topic, partitions)
        yield reader, {p: (starts[p], ends[p]) for p in partitions}


async def atoms_final(config: Config) -> FinalState:
    """Stream `atoms` once: each key's final event, and sampled live texts."""
    final = FinalState()
    async with read_partitions(config, config.topics.atoms) as (reader, ranges):
        for partition, (start, end) in ranges.items():
            async for chunk in reader.chunks(config.topics.atoms, partition, start, end):
                for record in chunk:
                    key = (record.key or b"").decode()
                    value = record.value
                    deleted = value is None or b'"atom.deleted"' in value
                    final.last[key] = None if deleted else (record.partition, record.offset)
                    if zlib.crc32(key.encode()) % SAMPLE_ONE_IN == 0:
                        if deleted:
                            final.sample_texts.pop(key, None)
                        else:
                            assert value is not None
                            final.sample_texts[key] = msgspec.json.decode(value)["text"]
    return final


@dataclass
class TargetCheck:
    """What the target topic holds against the from-scratch replay."""

    records: int
    g2_missing: int  # live keys without a vector at their final version (last in log order)
    g4_stale: int  # keys whose highest-source-offset record is not the final version
    sample_vectors: dict[str, list[float]]


async def check_target(config: Config, model: str, final: FinalState) -> TargetCheck:
    """Stream `embeddings.<model>` once and compare it with `final` (G2, G4)."""
    topic = config.topics.embeddings(model)
    last: dict[str, tuple[int, int] | None] = {}
    highest: dict[str, tuple[int, tuple[int, int] | None]] = {}
    vectors: dict[str, list[float]] = {}
    records = 0
    decoder = msgspec.json.Decoder(EmbeddingRecord)
    async with read_partitions(config, topic) as (reader, ranges):
        for partition, (start, end) in ranges.items():
            async for chunk in reader.chunks(topic, partition, start, end):
                for record in chunk:
                    records += 1
                    key = (record.key or b"").decode()
                    headers = dict(record.headers)
                    offset = int(headers["lattice.source-offset"].decode().rsplit("/", 1)[1])
                    if record.value is None:
                        version: tuple[int, int] | None = None
                    else:
                        embedded = decoder.decode(record.value)
                        version = (embedded.source.partition, embedded.source.offset)
                        if key in final.sample_texts:
                            vectors[key] = list(embedded.vector)
                    last[key] = version
                    if key not in highest or offset >= highest[key][0]:
                        highest[key] = (offset, version)
    missing = sum(1 for k, v in final.last.items() if v is not None and last.get(k) != v)
    stale = sum(1 for k, v in final.last.items() if (highest[k][1] if k in highest else None) != v)
    return TargetCheck(records, missing, stale, vectors)


def sample_keys(final: FinalState, count: int, seed: int = 3) -> list[str]:
    """Up to `count` sampled live keys, for the vector check."""
    keys = sorted(k for k in final.sample_texts if final.last.get(k) is not None)
    random.Random(seed).shuffle(keys)
    return keys[:count]
