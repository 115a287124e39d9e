"""Dynamic batching across concurrent API requests, one batcher per model.

Requests queue their texts; a single runner takes whatever is queued when the model is free
(up to `max_batch_atoms` texts, whole requests only) and runs one model call for all of it
in a worker thread. It never waits on a timer: an idle model starts on the first request at
once, and while a batch runs the next one accumulates (the scheme of Hugging Face's
text-embeddings-inference). The queue is bounded in texts; beyond it requests are refused.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import numpy as np

from stream.embed.embedder import Embedder, Tokenized, Vectors

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More texts are waiting for this model than `[serve] max_queued_inputs` allows."""


class BatcherClosed(Exception):
    """The batcher stopped (shutdown) before this request ran."""


@dataclass(eq=False)
class _Request:
    texts: Sequence[str]
    query: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    vectors: Vectors | None = None
    tokens: int = 0
    error: BaseException | None = None
    abandoned: bool = False


@dataclass(frozen=True, slots=True)
class Embedded:
    """One request's answer: a row per text, and the tokens the model read."""

    vectors: Vectors
    tokens: int


BatchHook = Callable[[str, int, int, float], None]  # model, requests, texts, seconds


class Batcher:
    """Queues requests for one model and runs them in batches, one model call at a time."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        limiter: anyio.CapacityLimiter,
        max_batch_atoms: int,
        max_queued_inputs: int,
        on_batch: BatchHook | None = None,
    ) -> None:
        self.embedder = embedder
        self._limiter = limiter
        self._max_batch = max_batch_atoms
        self._max_queued = max_queued_inputs
        self._on_batch = on_batch
        self._queue: deque[_Request] = deque()
        self._queued_inputs = 0
        self._wakeup = anyio.Event()
        self._closed = False

    @property
    def queued_inputs(self) -> int:
        """Texts waiting for the model (not counting the batch running now)."""
        return self._queued_inputs

    async def embed(self, texts: Sequence[str], *, query: bool) -> Embedded:
        """Embed `texts` with the query (or document) prefix, batched with other requests.

        Raises `QueueFull` at once when the queue has no room for them.
        """
        if self._closed:
            raise BatcherClosed(f"model {self.embedder.name}: shutting down")
        if self._queued_inputs + len(texts) > self._max_queued:
            raise QueueFull(
                f"model {self.embedder.name}: {self._queued_inputs} texts queued, "
                f"the limit is {self._max_queued}"
            )
        request = _Request(texts=texts, query=query)
        self._queue.append(request)
        self._queued_inputs += len(texts)
        self._wakeup.set()
        try:
            await request.done.wait()
        except BaseException:
            request.abandoned = True  # the client went away: skip it if not yet taken
            raise
        if request.error is not None:
            raise request.error
        assert request.vectors is not None
        return Embedded(vectors=request.vectors, tokens=request.tokens)

    async def run(self) -> None:
        """Take what is queued, run it, repeat; until cancelled (then fail what waits)."""
        try:
            while True:
                batch = self._take()
                if not batch:
                    await self._wakeup.wait()
                    self._wakeup = anyio.Event()
                    continue
                await self._run_batch(batch)
        finally:
            self._closed = True
            while self._queue:
                request = self._queue.popleft()
                request.error = BatcherClosed(f"model {self.embedder.name}: shutting down")
                request.done.set()

    def _take(self) -> list[_Request]:
        """Whole requests from the head of the queue, up to `max_batch_atoms` texts (at least
        one request, however large: a request is never split)."""
        batch: list[_Request] = []
        texts = 0
        while self._queue:
            head = self._queue[0]
            if head.abandoned:
                self._queue.popleft()
                self._queued_inputs -= len(head.texts)
                continue
            if batch and texts + len(head.texts) > self._max_batch:
                break
            self._queue.popleft()
            self._queued_inputs -= len(head.texts)
            batch.append(head)
            texts += len(head.texts)
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        started = anyio.current_time()
        try:
            vectors, lengths = await anyio.to_thread.run_sync(
                _embed_batch, self.embedder, batch, limiter=self._limiter
            )
        except Exception as exc:  # the model failed: every request of this batch fails
            log.warning("serve: model %s failed: %s", self.embedder.name, exc)
            for request in batch:
                request.error = exc
                request.done.set()
            return
        except BaseException as exc:  # cancelled while the thread ran: fail, then stop
            for request in batch:
                request.error = BatcherClosed(f"model {self.embedder.name}: shutting down")
                request.done.set()
            raise exc
        row = 0
        for request in batch:
            count = len(request.texts)
            request.vectors = vectors[row : row + count]
            request.tokens = sum(lengths[row : row + count])
            row += count
            request.done.set()
        if self._on_batch is not None:
            self._on_batch(self.embedder.name, len(batch), row, anyio.current_time() - started)


def _embed_batch(embedder: Embedder, batch: list[_Request]) -> tuple[Vectors, list[int]]:
    """Tokenize each request with its prefix, then one model call over all of them."""
    input_ids: list[list[int]] = []
    overlong: list[bool] = []
    for query in (True, False):
        texts = [text for request in batch if request.query is query for text in request.texts]
        tokenized = embedder.tokenize(texts, query=query)
        input_ids += tokenized.input_ids
        overlong += tokenized.overlong
    vectors, _ = embedder.embed_tokens(Tokenized(input_ids=input_ids, overlong=overlong))
    lengths = [len(ids) for ids in input_ids]
    # Back to request order: rows were grouped queries first, then documents.
    order = [i for flag in (True, False) for i, r in enumerate(batch) if r.query is flag]
    spans: dict[int, tuple[int, int]] = {}
    row = 0
    for index in order:
        count = len(batch[index].texts)
        spans[index] = (row, row + count)
        row += count
    rows = np.concatenate([np.arange(*spans[i]) for i in range(len(batch))])
    return vectors[rows], [lengths[i] for i in rows]
