"""One window of input records -> acknowledged outputs and dead letters.

A `Window` is the state of one window: its decoded events, its dead positions and the
acknowledgements it waits for. `WindowProcessor` drives it: decode, tokenize each model's
distinct texts, then two stages joined by a bounded stream: the model thread runs up to
`PIPELINE_DEPTH` micro-batches ahead while the event loop encodes and produces finished
ones, keeping each key's records in input order (`InOrderRelease`). The live path and
backfill both use it.

Dead letters are per model where the failure is: an input that fails decoding or validation
is one dead letter and reaches no model; an input that one model rejects (too long for its
window with `on_overlong = "dead_letter"`, that model failed on it, its output for that
model was refused) is a dead letter naming that model, and the other write models still
embed and publish it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from schemas.atoms import AtomCreated, AtomEvent, InvalidAtom, Stage
from schemas.embeddings import EmbeddingPath, SourceRef
from stream.config import Config
from stream.core.batching import InOrderRelease
from stream.core.deadletter import REDUCTIONS, dead_letter
from stream.core.output import embedding_output, tombstone_output
from stream.core.records import OutRecord, SourceRecord
from stream.embed.embedder import Embedder, Tokenized, Vectors
from stream.embed.pool import ModelPool
from stream.errors import OverlongInput, RecordRejected, SendFailed, TargetFailing
from stream.kafka.producer import Ack, OutputProducer
from stream.processor.inference import Inference
from stream.processor.prepared import (
    PreparedWindow,
    decode_records,
    distinct_texts,
    prepare_window,
)
from stream.processor.retries import LetterKey, LetterLedger, RefusedRecords
from stream.processor.sensors import ProcessorStats
from stream.processor.stages import cpu

log = logging.getLogger(__name__)

# Micro-batches the model may run ahead of the output stage; each holds at most
# `micro_batch_atoms` vectors, so this bounds the vectors queued between the stages.
PIPELINE_DEPTH = 4

# Inputs a migration target fails alone in a row, with no success between, after which the
# model itself is taken to be failing (not the inputs): the migration fails instead of
# dead-lettering every input for the target.
TARGET_FAILING_INPUTS = 3


# (model, window positions the micro-batch finished, their vectors)
_Embedded = tuple[str, list[int], dict[int, Vectors]]


class RetryWindow(Exception):
    """A transient produce failure: the window must be processed again from its start."""


class Window:
    """One window's events, dead letters and pending acknowledgements.

    `dead` holds the positions that reach no model (invalid input, or skipped by backfill);
    `dead_for[model]` those that one model rejected, and only that model skips.
    """

    def __init__(
        self,
        records: Sequence[SourceRecord],
        *,
        path: EmbeddingPath,
        migration_id: str | None,
        config: Config,
        producer_for: Callable[[int], OutputProducer],
        stats: ProcessorStats,
        ledger: LetterLedger | None = None,
        batched: bool = True,
        prepared: PreparedWindow | None = None,
    ) -> None:
        """`producer_for(partition)`: the producer for the outputs of an input partition
        (one for all; in exactly-once mode, that partition's transactional producer).
        `ledger`: dead letters an earlier try of these records wrote (None: exactly-once).
        `batched`: outputs go as one batch per output partition (`flush`); else one send
        per record, which tells a record the broker refuses apart from the others.
        `prepared`: these records decoded and tokenized ahead (the live path's lookahead)."""
        self.records = records
        self.path = path
        self.migration_id = migration_id
        self.events: dict[int, AtomEvent] = {}
        self.dead: set[int] = set()
        self.dead_for: defaultdict[str, set[int]] = defaultdict(set)
        self._config = config
        self._producer_for = producer_for
        self._stats = stats
        self._acks: list[tuple[Ack, int, str]] = []  # outputs: (ack, position, model)
        # Batched outputs (`batched`): those not sent yet, per (input partition, topic), and
        # one ack per sent partition batch with the (position, model) pairs it carries.
        self.batched = batched
        self._outbox: defaultdict[tuple[int, str], list[tuple[int, str, OutRecord]]] = defaultdict(
            list
        )
        self._batch_acks: list[tuple[Ack, list[tuple[int, str]]]] = []
        self.refused: list[SourceRecord] = []  # records of batches the broker refused
        # Dead letters: (ack, position, model or None, reduction), and what each one says.
        self._letter_acks: list[tuple[Ack, int, str | None, int]] = []
        self._letters: dict[tuple[int, str | None], tuple[Stage, str, str]] = {}
        self._ledger = ledger
        self.prepared = prepared if prepared is not None and prepared.fits(records) else None

    async def decode(self) -> None:
        """Decode every record; invalid ones are dead letters (live) or skipped (backfill,
        whose events the live path dead-lettered already)."""
        limit = self._config.limits.max_event_bytes
        decoded = (
            self.prepared.decoded
            if self.prepared is not None
            else decode_records(self.records, limit, self._stats.stages)
        )
        for position, found in enumerate(decoded):
            if not isinstance(found, InvalidAtom):
                self.events[position] = found
            elif self.path == "backfill":
                self.dead.add(position)
            else:
                cause = type(found.__cause__).__name__ if found.__cause__ else type(found).__name__
                await self.dead_letter(position, found.stage, cause, found.reason)
        self._stats.atoms_in[self.path] += len(self.records)

    def is_dead(self, position: int, model: str) -> bool:
        """Whether `model` has nothing to produce for `position`."""
        return position in self.dead or position in self.dead_for[model]

    def texts(self) -> dict[str, list[int]]:
        """Each distinct text to embed, with the window positions that carry it."""
        return distinct_texts(self.events, self.dead)

    async def emit(
        self, position: int, model: str, embedder: Embedder, vector: Vectors | None
    ) -> None:
        """Produce one output (an embedding, or a tombstone when `vector` is None)."""
        if self.is_dead(position, model):
            return
        record = self.records[position]
        event = self.events[position]
        source = SourceRef(topic=record.topic, partition=record.partition, offset=record.offset)
        output: OutRecord
        if isinstance(event, AtomCreated):
            if vector is None:
                raise AssertionError(f"no vector for window position {position}")
            with cpu(self._stats.stages, "encode"):
                output = embedding_output(
                    atom_id=event.atom_id,
                    model=model,
                    vector=vector,
                    normalized=embedder.config.normalize,
                    source=source,
                    path=self.path,
                    migration_id=self.migration_id,
                    embedded_at=datetime.now(UTC),
                    fingerprint=embedder.fingerprint,
                    metadata=event.metadata,
                    created_at=event.created_at,
                    encoding=self._config.output.encoding,
                )
            self._stats.outputs[model, self.path] += 1
        else:
            output = tombstone_output(
                atom_id=event.atom_id, model=model, source=source, fingerprint=embedder.fingerprint
            )
            self._stats.tombstones[model] += 1
        topic = self._config.topics.embeddings(model)
        if self.batched:
            self._outbox[record.partition, topic].append((position, model, output))
            return
        try:
            producer = self._producer_for(record.partition)
            with cpu(self._stats.stages, "produce"):
                ack = await producer.send(topic, output)
        except RecordRejected as exc:
            error_class = type(exc.__cause__).__name__
            await self.dead_letter(position, "produce", error_class, str(exc), model=model)
            return
        except SendFailed as exc:  # e.g. no metadata for the topic in time: transient
            raise RetryWindow(str(exc)) from exc
        self._acks.append((ack, position, model))

    async def flush(self) -> None:
        """Send the buffered outputs, one batch per output partition and producer, in the
        order they were emitted (so each key's records stay in input order)."""
        outbox, self._outbox = self._outbox, defaultdict(list)
        for (partition, topic), outputs in outbox.items():
            try:
                with cpu(self._stats.stages, "produce"):
                    sent = await self._producer_for(partition).send_batches(
                        topic, [output for _, _, output in outputs]
                    )
            except RecordRejected as exc:
                self._refuse([position for position, _, _ in outputs], exc)
            except SendFailed as exc:
                raise RetryWindow(str(exc)) from exc
            for ack, indexes in sent:
                self._batch_acks.append((ack, [outputs[i][:2] for i in indexes]))

    def _refuse(self, positions: Sequence[int], exc: RecordRejected) -> NoReturn:
        """The broker refused a batch: the window is retried with one send per record, so
        that only the record it refuses becomes a dead letter. (Sending those records again
        now would put them after later batches of the same keys.)"""
        self.refused = [self.records[p] for p in sorted(set(positions))]
        raise RetryWindow(
            f"a batch of {len(self.refused)} outputs was refused ({exc}); the window is "
            "retried with one send per record"
        ) from exc

    async def dead_letter(
        self,
        position: int,
        stage: Stage,
        error_class: str,
        reason: str,
        *,
        model: str | None = None,
    ) -> None:
        """Exactly one dead letter per bad input offset: for the record (`model` None, it
        reaches no model), or for one model (the other write models still publish it)."""
        if position in self.dead:
            return
        if model is None:
            self.dead.add(position)
        elif position in self.dead_for[model]:
            return
        else:
            self.dead_for[model].add(position)
            self._stats.model_dead_letters[model, stage] += 1
        record = self.records[position]
        if self._ledger is not None and self._key(position, model) in self._ledger:
            log.debug("dead letter %s/%d/%d written by an earlier try", *self._key(position)[:3])
            return
        self._stats.dead_letters[stage] += 1
        log.info(
            "dead letter %s/%d/%d stage=%s model=%s: %s",
            record.topic,
            record.partition,
            record.offset,
            stage,
            model or "-",
            reason,
        )
        self._letters[position, model] = (stage, error_class, reason)
        await self._send_letter(position, model, 0)

    def _key(self, position: int, model: str | None = None) -> LetterKey:
        record = self.records[position]
        return record.topic, record.partition, record.offset, model

    async def keep_letters(self) -> None:
        """The window failed: wait for the dead letters still in flight and remember
        those the broker wrote, so the retry does not write them again."""
        if self._ledger is None:
            return
        letters, self._letter_acks = self._letter_acks, []
        for ack, position, model, _ in letters:
            if await ack.outcome():
                self._ledger.add(self._key(position, model))

    async def _send_letter(self, position: int, model: str | None, reduction: int) -> None:
        """Send the dead letter of (`position`, `model`), reduced `reduction` steps; one the
        broker refuses is sent again smaller, and given up on (counted, logged) past the
        last step, so a poison record cannot stall its partition."""
        stage, error_class, reason = self._letters[position, model]
        record = self.records[position]
        letter = dead_letter(record, stage, error_class, reason, model=model, reduction=reduction)
        try:
            ack = await self._producer_for(record.partition).send(self._config.topics.dlq, letter)
        except RecordRejected as exc:
            await self._letter_refused(position, model, reduction, exc)
            return
        except SendFailed as exc:
            raise RetryWindow(f"dead letter could not be written: {exc}") from exc
        self._letter_acks.append((ack, position, model, reduction))

    async def _letter_refused(
        self, position: int, model: str | None, reduction: int, exc: RecordRejected
    ) -> None:
        record = self.records[position]
        where = f"{record.topic}/{record.partition}/{record.offset}"
        if reduction < REDUCTIONS:
            log.warning("dead letter for %s refused (%s); writing it reduced", where, exc)
            self._stats.dead_letters_reduced += 1
            await self._send_letter(position, model, reduction + 1)
            return
        log.error("dead letter for %s refused even reduced (%s); given up on", where, exc)
        self._stats.dead_letters_lost += 1

    async def settle(self) -> None:
        """Wait for every send; record-specific failures become dead letters (a refused dead
        letter goes again reduced), others retry the window."""
        await self.flush()
        batches, self._batch_acks = self._batch_acks, []
        for batch, items in batches:
            try:
                await batch
            except RecordRejected as exc:
                self._refuse([position for position, _ in items], exc)
            except SendFailed as exc:
                raise RetryWindow(str(exc)) from exc
        while self._acks or self._letter_acks:
            acks, self._acks = self._acks, []
            for ack, position, model in acks:
                try:
                    await ack
                except RecordRejected as exc:
                    error_class = type(exc.__cause__).__name__
                    await self.dead_letter(position, "produce", error_class, str(exc), model=model)
                except SendFailed as exc:
                    raise RetryWindow(str(exc)) from exc
            letters, self._letter_acks = self._letter_acks, []
            for index, (letter, position, letter_model, reduction) in enumerate(letters):
                try:
                    await letter
                except RecordRejected as exc:
                    await self._letter_refused(position, letter_model, reduction, exc)
                except SendFailed as exc:
                    self._letter_acks[:0] = letters[index + 1 :]  # for `keep_letters`
                    raise RetryWindow(f"dead letter could not be written: {exc}") from exc
                else:
                    if self._ledger is not None:
                        self._ledger.add(self._key(position, letter_model))


class _ModelOutputs:
    """One model's side of a window: vectors so far and the per-key release order."""

    def __init__(self, window: Window, model: str, embedder: Embedder) -> None:
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

    async def finish(self, positions: Sequence[int]) -> None:
        """Mark window positions finished and produce whatever that frees, in key order.

        Positions dead for every model (invalid input) have no slot and are ignored;
        positions this model rejected are released too, and `Window.emit` skips them.
        """
        free = self.release.finish(self._slot[p] for p in positions if p in self._slot)
        for index in free:
            position = self._live[index]
            vector = self.vectors.pop(position, None)
            await self._window.emit(position, self.model, self.embedder, vector)
        await self._window.flush()


# One model's work over a window: its text positions, tokens and micro-batch plan.
_Job = tuple[str, Embedder, list[list[int]], Tokenized, list[list[int]]]


class WindowProcessor:
    """Turns one window of input records into acknowledged outputs and dead letters."""

    def __init__(
        self,
        config: Config,
        models: ModelPool,
        producer: OutputProducer,
        inference: Inference,
        stats: ProcessorStats,
    ) -> None:
        self._config = config
        self.models = models
        self._producer = producer
        self._inference = inference
        self.stats = stats
        # Per model: inputs failed alone in a row since its last success (any window).
        self._failed_in_a_row: dict[str, int] = defaultdict(int)
        self.letters = LetterLedger()
        # Input records a refused batch carried: their windows go one send per record until
        # they succeed (see `Window.flush`).
        self._alone = RefusedRecords()

    async def process(
        self,
        records: Sequence[SourceRecord],
        write_models: Sequence[str],
        migration_id: str | None,
        *,
        path: EmbeddingPath = "live",
        target: str | None = None,
        first: str | None = None,
        producer_for: Callable[[int], OutputProducer] | None = None,
        prepared: PreparedWindow | None = None,
    ) -> None:
        """Produce every output of `records` and wait for the acknowledgements (through
        `producer_for(input partition)` if given: exactly-once transactions).

        `prepared`: `records` decoded and tokenized ahead (`prepare`); used if it fits them.

        `first`: the model embedded first (the query model: what searches read sees the
        window's atoms while the other write models still run); else `target` is first.

        Raises `RetryWindow` when a send failed for a reason that a retry can fix, and
        `TargetFailing` when `target` (a migration's target, one of `write_models`) fails
        `TARGET_FAILING_INPUTS` inputs in a row alone: the model is broken, not the inputs,
        so the caller fails the migration instead of dead-lettering every input for it.
        """
        batched = not self._alone.any_of(records)
        while True:
            window = Window(
                records,
                path=path,
                migration_id=migration_id,
                config=self._config,
                producer_for=producer_for or (lambda _: self._producer),
                stats=self.stats,
                # Only transactions pass `producer_for`; an aborted one wrote no dead letter.
                ledger=self.letters if producer_for is None else None,
                batched=batched,
                prepared=prepared,
            )
            try:
                await self._process(window, write_models, target, first)
            except Exception as exc:
                await window.keep_letters()
                if not (isinstance(exc, RetryWindow) and window.refused):
                    raise
                if producer_for is not None:  # a transaction: aborted first, by the caller
                    self._alone.add(window.refused)
                    raise
                # At-least-once: again at once, one send per record (what the refused
                # batches' neighbours wrote is written again, in order).
                log.warning("%s", exc)
                batched = False
                continue
            break
        self.letters.forget(records)
        self._alone.forget(records)

    async def prepare(
        self, records: Sequence[SourceRecord], write_models: Sequence[str]
    ) -> PreparedWindow:
        """`records` decoded and tokenized for the loaded ones of `write_models`, ahead of
        their turn (which writes their outputs and dead letters, `process`)."""
        embedders = [e for m in write_models if (e := self.models.loaded(m)) is not None]
        return await prepare_window(
            records,
            embedders,
            self._inference,
            max_event_bytes=self._config.limits.max_event_bytes,
            stages=self.stats.stages,
        )

    async def _process(
        self,
        window: Window,
        write_models: Sequence[str],
        target: str | None,
        first: str | None,
    ) -> None:
        await window.decode()
        embedders = [(model, await self.models.get(model)) for model in write_models]
        positions_of = window.texts()
        tokenized: dict[str, Tokenized] = {}  # by tokenization key: once per tokenizer
        if window.prepared is not None and window.prepared.texts == list(positions_of):
            tokenized.update(window.prepared.tokens)
        jobs = [
            await self._job(window, model, embedder, positions_of, tokenized)
            for model, embedder in embedders
        ]
        # The query model first: its outputs are what searches wait for. (A target that fails
        # then shows after them: the window is redone without it, those outputs written
        # twice, at-least-once; in exactly-once mode they are aborted first.) Without one,
        # the target first: a failing target shows before any output.
        jobs.sort(key=lambda job: (job[0] != first, job[0] != target))
        outputs = {model: _ModelOutputs(window, model, embedder) for model, embedder in embedders}
        for model_outputs in outputs.values():  # deletes need no model: tombstones go first
            await model_outputs.finish(model_outputs.deletes())
        embedded_in, embedded_out = anyio.create_memory_object_stream[_Embedded](PIPELINE_DEPTH)
        try:
            async with anyio.create_task_group() as stages:
                stages.start_soon(self._infer, window, jobs, embedded_in, target)
                async with embedded_out:
                    async for model, done, vectors in embedded_out:
                        outputs[model].vectors.update(vectors)
                        await outputs[model].finish(done)
        except BaseExceptionGroup as group:  # callers handle RetryWindow & co., not groups
            if len(group.exceptions) == 1 and not isinstance(
                group.exceptions[0], BaseExceptionGroup
            ):
                raise group.exceptions[0] from None
            raise
        for model, model_outputs in outputs.items():
            if not model_outputs.release.done:
                raise AssertionError(f"window left unreleased items for model {model}")
        await window.settle()

    async def _job(
        self,
        window: Window,
        model: str,
        embedder: Embedder,
        positions_of: dict[str, list[int]],
        tokenized: dict[str, Tokenized],
    ) -> _Job:
        """Tokenize each distinct text once (once for every model with the same tokenizer:
        `tokenized`) and plan its micro-batches; handle overlong texts."""
        texts = list(positions_of)
        tokens = tokenized.get(embedder.tokenization_key)
        if tokens is None:
            tokens = await self._inference.tokenize(embedder, texts)
            tokenized[embedder.tokenization_key] = tokens
        for text, long in zip(texts, tokens.overlong, strict=True):
            if not long:
                continue
            if self._config.limits.on_overlong == "dead_letter":
                for position in positions_of[text]:
                    await window.dead_letter(
                        position,
                        "validate",
                        OverlongInput.__name__,
                        f"text needs more than {embedder.config.max_tokens} tokens "
                        f"(models.{model}.max_tokens) and limits.on_overlong is dead_letter",
                        model=model,
                    )
            else:
                self.stats.truncated[model] += len(positions_of[text])
        positions = [positions_of[text] for text in texts]
        return model, embedder, positions, tokens, embedder.plan(tokens.lengths)

    async def _infer(
        self,
        window: Window,
        jobs: list[_Job],
        embedded: MemoryObjectSendStream[_Embedded],
        target: str | None,
    ) -> None:
        """Embed every model's micro-batches in turn; hand each result to the output stage."""
        async with embedded:
            for model, embedder, positions, tokens, batches in jobs:
                for batch in batches:
                    todo = [
                        i for i in batch if any(not window.is_dead(p, model) for p in positions[i])
                    ]
                    vectors = await self._embed(
                        window, model, embedder, tokens, todo, positions, model == target
                    )
                    await embedded.send((model, [p for i in batch for p in positions[i]], vectors))

    async def _embed(
        self,
        window: Window,
        model: str,
        embedder: Embedder,
        tokens: Tokenized,
        batch: list[int],
        positions: list[list[int]],
        is_target: bool,
    ) -> dict[int, Vectors]:
        """Vectors by window position for one micro-batch; inputs that fail are dead letters
        for this model (or, for a migration target that fails input after input,
        `TargetFailing`)."""
        if not batch:
            return {}
        result = await self._inference.embed(embedder, tokens, batch)
        if result.vectors:
            self._failed_in_a_row[model] = 0
        else:
            self._failed_in_a_row[model] += len(result.failed)
        if is_target and self._failed_in_a_row[model] >= TARGET_FAILING_INPUTS:
            failed = self._failed_in_a_row[model]
            self._failed_in_a_row[model] = 0
            exc = next(iter(result.failed.values()))
            raise TargetFailing(
                model, f"model {model} failed {failed} inputs in a row, each alone: {exc!r}"
            )
        for i, exc in result.failed.items():
            for position in positions[i]:
                await window.dead_letter(
                    position, "embed", type(exc).__name__, str(exc), model=model
                )
        return {p: row for i, row in result.vectors.items() for p in positions[i]}
