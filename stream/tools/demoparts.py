"""Pieces of the demo: its searches through `serve`, its changing corpus, commit offsets."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import httpx
import msgspec
import psycopg
from psycopg import sql

from schemas.routing import RoutingStatus
from stream.config import Config
from stream.core.records import OutRecord
from stream.kafka.admin import Admin
from stream.kafka.producer import OutputProducer
from stream.kafka.reader import PartitionReader
from stream.ops.progress import progress_line
from stream.processor.sensors import Sensor
from stream.sink.store import table_name

QUERIES = (
    "compress data to make files smaller",
    "send an email message to a mail server",
    "pick random numbers",
    "run another program and read its output",
    "split text into lines that fit a width",
)


Say = Callable[[str], None]
K = TypeVar("K", bound=Hashable)


@dataclass
class Round:
    """One pass over the queries: which model was expected and which ones answered."""

    label: str
    expected: str
    answered: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def end_offsets(config: Config, topic: str) -> dict[int, int]:
    """The end offsets of every partition of `topic`."""
    async with Admin(config.kafka) as admin:
        partitions = list(range(await admin.partition_count(topic) or 0))
    async with PartitionReader(config.kafka) as reader:
        return await reader.end_offsets(topic, partitions)


class Search:
    """Queries through the API, nearest neighbours from the answering model's table."""

    def __init__(
        self,
        config: Config,
        client: httpx.AsyncClient,
        db: psycopg.AsyncConnection[Any],
        stored: Offsets[tuple[str, int]],
        texts: Mapping[str, str],
        say: Say,
        hits: int = 2,
    ) -> None:
        self.config, self.client, self.db = config, client, db
        self.stored, self.texts, self.say, self.hits = stored, texts, say, hits

    async def round(self, label: str, expected: str, status: RoutingStatus) -> Round:
        progress = status.progress
        done = ""
        if progress is not None:
            total = "unknown" if progress.total is None else progress.total
            done = f", backfill {progress.processed}/{total}"
        self.say(
            f"\n== {label}: phase {status.phase}, state {status.state}, query model "
            f"{status.query_model}{done}"
        )
        await self.caught_up(expected)
        found = Round(label, expected)
        for query in QUERIES:
            try:
                model, hits = await self.ask(query)
            except (httpx.HTTPError, psycopg.Error, QueryFailed) as exc:
                found.failures.append(f"{query}: {exc}")
                self.say(f'  "{query}" FAILED: {exc}')
                continue
            found.answered.append(model)
            if model != expected:
                found.failures.append(f"{query}: answered by {model}, expected {expected}")
            mark = "" if model == expected else f"  FAILED: expected {expected}"
            self.say(f'  "{query}" -> answered by {model}{mark}')
            for score, atom_id in hits:
                text = self.texts.get(atom_id, "")
                self.say(f"      {score:.3f}  {text[:96]}{'...' if len(text) > 96 else ''}")
        return found

    async def ask(self, query: str) -> tuple[str, list[tuple[float, str]]]:
        response = await self.client.post("/v1/embeddings", json={"input": query})
        if response.status_code != 200:
            raise QueryFailed(f"HTTP {response.status_code}: {response.text[:200]}")
        answer = response.json()
        model: str = answer["model"]
        vector = "[" + ",".join(map(repr, answer["data"][0]["embedding"])) + "]"
        cursor = await self.db.execute(
            sql.SQL(
                "SELECT 1 - (embedding <=> %s::vector), atom_id FROM {} WHERE NOT deleted "
                "ORDER BY embedding <=> %s::vector LIMIT %s"
            ).format(self.table(model)),
            (vector, vector, self.hits),
        )
        hits = [(float(score), str(atom_id)) for score, atom_id in await cursor.fetchall()]
        if not hits:
            raise QueryFailed(f"no rows in {table_name(self.config.sink.table_prefix, model)}")
        return model, hits

    def table(self, model: str) -> sql.Identifier:
        return sql.Identifier(table_name(self.config.sink.table_prefix, model))

    async def caught_up(self, model: str) -> None:
        """Wait until the sink has stored the model's topic up to its end now."""
        topic = self.config.topics.embeddings(model)
        ends = {(topic, p): end for p, end in (await end_offsets(self.config, topic)).items()}
        with anyio.fail_after(60):
            await self.stored.reached(ends)

    async def live_ids(self, model: str) -> set[str]:
        cursor = await self.db.execute(
            sql.SQL("SELECT atom_id FROM {} WHERE NOT deleted").format(self.table(model))
        )
        return {str(row[0]) for row in await cursor.fetchall()}


class QueryFailed(Exception):
    """The API or the store did not answer a query."""


class Corpus:
    """The atoms as the demo produced them, and a steady stream of changes."""

    def __init__(self, initial: Sequence[str], reserve: Sequence[str]) -> None:
        self.live: dict[str, str] = {f"doc-{i}": text for i, text in enumerate(initial)}
        self.texts = dict(self.live)  # the latest text of every atom, deleted ones too
        self.reserve = list(reserve)
        self.next_id = len(initial)
        self.counts: Counter[str] = Counter()

    async def produce_initial(self, config: Config, producer: OutputProducer) -> None:
        for atom_id, text in self.live.items():
            await self._send(config, producer, atom_id, text)
        await producer.flush()

    async def keep_ingesting(self, config: Config, producer: OutputProducer, rate: float) -> None:
        """Creates, updates and deletes in turn at `rate` events/s, until cancelled; texts
        replaced or deleted go back to the reserve, so the corpus keeps its size."""
        began = time.monotonic()
        for n in range(1_000_000):
            kind = ("create", "update", "delete")[n % 3]
            if kind == "delete" and self.live:
                atom_id = sorted(self.live)[(n * 7) % len(self.live)]
                self.reserve.append(self.live.pop(atom_id))
                await self._send(config, producer, atom_id, None)
            else:
                text = self.reserve.pop(0)
                if kind == "update" and self.live:
                    atom_id = sorted(self.live)[(n * 11) % len(self.live)]
                    self.reserve.append(self.live[atom_id])
                else:
                    kind = "create"
                    atom_id, self.next_id = f"doc-{self.next_id}", self.next_id + 1
                self.live[atom_id] = self.texts[atom_id] = text
                await self._send(config, producer, atom_id, text)
            await producer.flush()
            self.counts[kind] += 1
            await anyio.sleep(max(0.0, began + (n + 1) / rate - time.monotonic()))  # pacing

    @staticmethod
    async def _send(
        config: Config, producer: OutputProducer, atom_id: str, text: str | None
    ) -> None:
        event: dict[str, str] = {"type": "atom.deleted", "atom_id": atom_id}
        if text is not None:
            event = {"type": "atom.created", "atom_id": atom_id, "text": text}
        record = OutRecord(atom_id.encode(), msgspec.json.encode(event), [])
        await producer.send(config.topics.atoms, record)


class Offsets(Sensor, Generic[K]):
    """Committed offsets (the processor's, as a sensor, or the sink's), waitable."""

    def __init__(self) -> None:
        self.committed: dict[K, int] = {}
        self._changed = anyio.Event()

    def on_commit(self, offsets: Mapping[Any, int]) -> None:
        self.update(offsets)

    def update(self, offsets: Mapping[K, int]) -> None:
        self.committed.update(offsets)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def reached(self, ends: Mapping[K, int], *, progress: Say | None = None) -> None:
        """Wait until every key is committed up to `ends` (an empty partition needs nothing)."""
        began = time.monotonic()
        total = sum(ends.values())
        while True:
            done = sum(min(self.committed.get(k, 0), end) for k, end in ends.items())
            if progress is not None:
                progress(progress_line(done, total, time.monotonic() - began))
            if done >= total:
                return
            await self._changed.wait()
