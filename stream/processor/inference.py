"""The inference stage: tokenize, plan micro-batches, embed, isolate the inputs that fail.

It knows nothing of Kafka: it turns texts into vectors for one model and says which
texts could not be embedded, and why. Every call into the model runs in a worker thread
behind a `CapacityLimiter` (on an accelerator, tokenization has one of its own), so the
event loop (and the consumer's heartbeats) never wait on the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from stream.config import BatchingConfig
from stream.embed.embedder import Embedder, Tokenized, Vectors
from stream.processor.sensors import ProcessorStats, Sensor
from stream.processor.stages import cpu, wall

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """One micro-batch: vectors by text index, and the texts that failed with their error."""

    vectors: dict[int, Vectors] = field(default_factory=dict)
    failed: dict[int, Exception] = field(default_factory=dict)


class Inference:
    """Runs one process's models: tokenization and forward passes, off the event loop."""

    def __init__(
        self,
        batching: BatchingConfig,
        stats: ProcessorStats,
        sensor: Sensor,
        *,
        tokenize_beside_model: bool = False,
    ) -> None:
        """`tokenize_beside_model`: tokenization has a thread of its own, so the next window
        tokenizes while this one's forward passes run (on an accelerator). On a CPU both
        take turns in one thread: run together, the Rust tokenizer's threads and torch's
        fight over the cores (measured with a 2-layer model on 2 cores: end to end about 0.87x)."""
        self._batching = batching
        self._stats = stats
        self._sensor = sensor
        self._limiter = anyio.CapacityLimiter(1)  # forward passes
        self._tokenizer_limiter = (
            anyio.CapacityLimiter(1) if tokenize_beside_model else self._limiter
        )

    async def tokenize(self, embedder: Embedder, texts: Sequence[str]) -> Tokenized:
        """Token ids of `texts` with the document prefix, cut to the model's window."""

        def tokenize() -> Tokenized:
            with cpu(self._stats.stages, "tokenize"):
                return embedder.tokenize(texts)

        return await anyio.to_thread.run_sync(tokenize, limiter=self._tokenizer_limiter)

    async def embed(self, embedder: Embedder, tokens: Tokenized, batch: list[int]) -> BatchResult:
        """Embed one micro-batch with retries; then each text alone, to isolate bad inputs."""
        retries = self._batching.embed_retries
        for attempt in range(retries + 1):
            try:
                rows = await self._run(embedder, [tokens.input_ids[i] for i in batch])
                return BatchResult(vectors=dict(zip(batch, rows, strict=True)))
            except Exception as exc:
                log.warning(
                    "model %s failed on a batch of %d (attempt %d/%d): %r",
                    embedder.name,
                    len(batch),
                    attempt + 1,
                    retries + 1,
                    exc,
                )
        result = BatchResult()
        for i in batch:
            try:
                result.vectors[i] = (await self._run(embedder, [tokens.input_ids[i]]))[0]
            except Exception as exc:
                result.failed[i] = exc
        return result

    async def _run(self, embedder: Embedder, input_ids: list[list[int]]) -> Vectors:
        def forward() -> Vectors:
            with wall(self._stats.stages, "device"):
                return embedder.embed_batch(input_ids)

        began = time.perf_counter()
        vectors = await anyio.to_thread.run_sync(forward, limiter=self._limiter)
        seconds = time.perf_counter() - began
        self._stats.embed_seconds[embedder.name] += seconds
        self._sensor.on_batch(embedder.name, len(input_ids), seconds)
        return vectors
