"""One window of input records -> acknowledged outputs and dead letters.

Inside a window, texts are embedded in length-sorted micro-batches and each micro-batch is
produced as soon as it is embedded, keeping per-key order (`InOrderRelease`). The live path
and backfill both use it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from anyio.streams.memory import MemoryObjectSendStream

from schemas.atoms import AtomCreated, AtomEvent, InvalidAtom, Stage, decode_atom
from schemas.embeddings import Path, SourceRef
from stream.config import Config
from stream.core.batching import InOrderRelease, plan_micro_batches
from stream.core.deadletter import SourceRecord, dead_letter
from stream.core.output import OutputRecord, embedding_output, tombstone_output
from stream.embed.embedder import Embedder, Tokenized, Vectors
from stream.embed.pool import ModelPool

log = logging.getLogger(__name__)

# Errors that belong to one record: retrying cannot help, so the input becomes a dead letter.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


class RetryWindow(Exception):
    """A transient produce failure: the window must be processed again from its start."""


@dataclass
class LiveStats:
    """Counters of the processor: the one source for logs, progress and /metrics."""

    atoms_in: Counter[str] = field(default_factory=Counter)  # by path: live, backfill
    outputs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, path)
    tombstones: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    truncated: Counter[str] = field(default_factory=Counter)
    embed_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    on_batch: Callable[[str, int, float], None] | None = None  # (model, atoms, seconds)
    on_window: Callable[[float], None] | None = None  # live window seconds

    def batch_embedded(self, model: str, atoms: int, seconds: float) -> None:
        """One model call finished."""
        self.embed_seconds[model] += seconds
        if self.on_batch is not None:
            self.on_batch(model, atoms, seconds)


Send = Callable[
    [str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None], Awaitable[Any]
]


@dataclass
class _Window:
    records: Sequence[SourceRecord]
    path: Path
    migration_id: str | None
    events: dict[int, AtomEvent] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)
    acks: list[tuple[Any, int, str]] = field(default_factory=list)


# (model, window positions the micro-batch finished, their vectors)
_Embedded = tuple[str, list[int], dict[int, Vectors]]

# Micro-batches the model may run ahead of the output stage; each holds at most
# `micro_batch_atoms` vectors, so this bounds the vectors queued between the stages.
PIPELINE_DEPTH = 4


class _ModelOutputs:
    """One model's side of a window: vectors so far and the per-key release order."""

    def __init__(self, window: _Window, model: str, embedder: Embedder) -> None:
        self.model = model
        self.embedder = embedder
        self.vectors: dict[int, Vectors] = {}
        self._window = window
        self._live = [p for p in sorted(window.events) if p not in window.dead]
        self._slot = {position: index for index, position in enumerate(self._live)}
        self.release = InOrderRelease([window.events[p].atom_id for p in self._live])

    def deletes(self) -> list[int]:
        """Positions that need no vector (tombstones)."""
        return [p for p in self._live if not isinstance(self._window.events[p], AtomCreated)]

    def finish(self, positions: Sequence[int]) -> list[int]:
        """Mark window positions finished; return those now free to leave, in order.

        Positions dead before the window started have no slot and are ignored; positions
        that died since are released too, and `_emit` skips them.
        """
        free = self.release.finish(self._slot[p] for p in positions if p in self._slot)
        return [self._live[index] for index in free]


class WindowProcessor:
    """Turns one window of input records into acknowledged outputs and dead letters."""

    def __init__(self, config: Config, models: ModelPool, send: Send, stats: LiveStats) -> None:
        self._config = config
        self._models = models
        self._send = send
        self.stats = stats
        self._limiter = anyio.CapacityLimiter(1)

    async def process(
        self,
        records: Sequence[SourceRecord],
        write_models: Sequence[str],
        migration_id: str | None,
        *,
        path: Path = "live",
    ) -> None:
        """Produce every output of `records` and wait for the acknowledgements.

        On the live path invalid records become dead letters; on the backfill path they are
        skipped (the live path dead-lettered them already). Raises `RetryWindow` when a send
        failed for a reason that a retry can fix.
        """
        window = _Window(records, path=path, migration_id=migration_id)
        for position, record in enumerate(records):
            try:
                window.events[position] = decode_atom(
                    record.key, record.value, max_event_bytes=self._config.limits.max_event_bytes
                )
            except InvalidAtom as exc:
                if path == "backfill":
                    window.dead.add(position)
                    continue
                cause = type(exc.__cause__).__name__ if exc.__cause__ else type(exc).__name__
                await self._dead_letter(window, position, exc.stage, cause, exc.reason)
        self.stats.atoms_in[path] += len(records)
        plans = [(model, await self._models.get(model)) for model in write_models]
        jobs = [
            (model, embedder, *await self._tokenize(window, model, embedder))
            for model, embedder in plans
        ]
        outputs = {model: _ModelOutputs(window, model, embedder) for model, embedder in plans}
        for model_outputs in outputs.values():  # deletes need no model: tombstones go first
            await self._release(window, model_outputs, model_outputs.deletes())
        # Two stages joined by a bounded stream: the model thread runs up to PIPELINE_DEPTH
        # micro-batches ahead while the event loop encodes and produces finished ones.
        embedded_in, embedded_out = anyio.create_memory_object_stream[_Embedded](PIPELINE_DEPTH)
        try:
            async with anyio.create_task_group() as stages:
                stages.start_soon(self._infer, window, jobs, embedded_in)
                async with embedded_out:
                    async for model, done, vectors in embedded_out:
                        outputs[model].vectors.update(vectors)
                        await self._release(window, outputs[model], done)
        except BaseExceptionGroup as group:  # callers handle RetryWindow & co., not groups
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None
            raise
        for model, model_outputs in outputs.items():
            if not model_outputs.release.done:
                raise AssertionError(f"window left unreleased items for model {model}")
        await self._await_acks(window)

    async def _tokenize(
        self, window: _Window, model: str, embedder: Embedder
    ) -> tuple[list[list[int]], Tokenized]:
        """Tokenize each distinct text once; dead-letter or count the overlong ones.

        Returns, for each distinct text, the window positions that carry it, and the tokens.
        """
        positions_of: dict[str, list[int]] = defaultdict(list)
        for position, event in window.events.items():
            if isinstance(event, AtomCreated) and position not in window.dead:
                positions_of[event.text].append(position)
        texts = list(positions_of)
        tokens = await anyio.to_thread.run_sync(
            lambda: embedder.tokenize(texts), limiter=self._limiter
        )
        for text, long in zip(texts, tokens.overlong, strict=True):
            if not long:
                continue
            if self._config.limits.on_overlong == "dead_letter":
                for position in positions_of[text]:
                    await self._dead_letter(
                        window,
                        position,
                        "validate",
                        "OverlongInput",
                        f"text needs more than {embedder.config.max_tokens} tokens "
                        f"(models.{model}.max_tokens) and limits.on_overlong is dead_letter",
                    )
            else:
                self.stats.truncated[model] += len(positions_of[text])
        return [positions_of[text] for text in texts], tokens

    async def _infer(
        self,
        window: _Window,
        jobs: list[tuple[str, Embedder, list[list[int]], Tokenized]],
        embedded: MemoryObjectSendStream[_Embedded],
    ) -> None:
        """Embed every model's micro-batches in turn; hand each result to the output stage."""
        async with embedded:
            for model, embedder, positions, tokens in jobs:
                batches = plan_micro_batches(
                    tokens.lengths,
                    max_atoms=self._config.batching.micro_batch_atoms,
                    max_tokens=self._config.batching.max_batch_tokens,
                )
                for batch in batches:
                    todo = [i for i in batch if any(p not in window.dead for p in positions[i])]
                    rows = (
                        await self._embed_batch(window, model, embedder, tokens, todo, positions)
                        if todo
                        else {}
                    )
                    vectors = {p: row for i, row in rows.items() for p in positions[i]}
                    await embedded.send((model, [p for i in batch for p in positions[i]], vectors))

    async def _release(
        self, window: _Window, outputs: _ModelOutputs, finished: Sequence[int]
    ) -> None:
        """Produce whatever `finished` frees, keeping each key's records in input order."""
        for position in outputs.finish(finished):
            await self._emit(window, position, outputs.model, outputs.embedder, outputs.vectors)

    async def _embed_batch(
        self,
        window: _Window,
        model: str,
        embedder: Embedder,
        tokens: Tokenized,
        batch: list[int],
        positions: list[list[int]],
    ) -> dict[int, Vectors]:
        """Embed one micro-batch with retries; isolate and dead-letter inputs that still fail."""
        retries = self._config.batching.embed_retries
        for attempt in range(retries + 1):
            try:
                rows = await self._run_model(model, embedder, tokens, batch)
                return dict(zip(batch, rows, strict=True))
            except Exception as exc:
                log.warning(
                    "model %s failed on a batch of %d (attempt %d/%d): %r",
                    model,
                    len(batch),
                    attempt + 1,
                    retries + 1,
                    exc,
                )
        rows_by_index: dict[int, Vectors] = {}
        for i in batch:
            try:
                rows_by_index[i] = (await self._run_model(model, embedder, tokens, [i]))[0]
            except Exception as exc:
                for position in positions[i]:
                    await self._dead_letter(window, position, "embed", type(exc).__name__, str(exc))
        return rows_by_index

    async def _run_model(
        self, model: str, embedder: Embedder, tokens: Tokenized, batch: list[int]
    ) -> Vectors:
        subset = Tokenized(
            input_ids=[tokens.input_ids[i] for i in batch],
            overlong=[tokens.overlong[i] for i in batch],
        )
        vectors, stats = await anyio.to_thread.run_sync(
            embedder.embed_tokens, subset, limiter=self._limiter
        )
        self.stats.batch_embedded(model, stats.atoms, stats.seconds)
        return vectors

    async def _emit(
        self,
        window: _Window,
        position: int,
        model: str,
        embedder: Embedder,
        vectors: dict[int, Vectors],
    ) -> None:
        if position in window.dead:
            return
        record = window.records[position]
        event = window.events[position]
        source = SourceRef(topic=record.topic, partition=record.partition, offset=record.offset)
        output: OutputRecord
        if isinstance(event, AtomCreated):
            output = embedding_output(
                atom_id=event.atom_id,
                model=model,
                vector=vectors.pop(position),
                normalized=embedder.config.normalize,
                source=source,
                path=window.path,
                migration_id=window.migration_id,
                embedded_at=datetime.now(UTC),
                encoding=self._config.output.encoding,
            )
            self.stats.outputs[model, window.path] += 1
        else:
            output = tombstone_output(atom_id=event.atom_id, model=model, source=source)
            self.stats.tombstones[model] += 1
        topic = self._config.topics.embeddings(model)
        try:
            ack = await self._send(topic, output.key, output.value, output.headers, None)
        except RECORD_ERRORS as exc:
            await self._dead_letter(window, position, "produce", type(exc).__name__, str(exc))
            return
        except KafkaError as exc:  # e.g. no metadata for the topic in time: transient
            raise RetryWindow(f"send to {topic} failed: {exc!r}") from exc
        window.acks.append((ack, position, model))

    async def _dead_letter(
        self, window: _Window, position: int, stage: Stage, error_class: str, reason: str
    ) -> None:
        """Exactly one dead letter per bad input offset."""
        if position in window.dead:
            return
        window.dead.add(position)
        letter = dead_letter(window.records[position], stage, error_class, reason)
        self.stats.dead_letters[stage] += 1
        log.info(
            "dead letter %s/%d/%d stage=%s: %s",
            window.records[position].topic,
            window.records[position].partition,
            window.records[position].offset,
            stage,
            reason,
        )
        try:
            ack = await self._send(
                self._config.topics.dlq,
                letter.key,
                letter.value,
                letter.headers,
                letter.timestamp_ms,
            )
        except KafkaError as exc:
            raise RetryWindow(f"dead letter could not be written: {exc!r}") from exc
        window.acks.append((ack, position, ""))

    async def _await_acks(self, window: _Window) -> None:
        """Wait for every send; record-specific failures become dead letters, others retry."""
        while window.acks:
            acks, window.acks = window.acks, []
            for ack, position, model in acks:
                try:
                    await ack
                except RECORD_ERRORS as exc:
                    if not model:
                        raise RetryWindow(f"dead letter could not be written: {exc!r}") from exc
                    await self._dead_letter(
                        window, position, "produce", type(exc).__name__, str(exc)
                    )
                except KafkaError as exc:
                    raise RetryWindow(f"send to {model or 'dlq'} failed: {exc!r}") from exc


def to_source_record(message: Any) -> SourceRecord:
    """Adapt an aiokafka ConsumerRecord."""
    return SourceRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers or ()),
        timestamp_ms=message.timestamp,
    )
