"""`bench --pipeline`: the pipeline's own ceiling, apart from the model (issue 12).

Three measurements on the same mixed backlog, alternating, medians of the runs:
- a bare aiokafka copy loop: consume, decode the JSON, produce a record of the size of an
  EmbeddingRecord, commit per window; the client's ceiling in Python on this machine;
- the processor end to end with a synthetic zero-cost model (`ZeroCostEmbedder`: tokenized
  and batched as usual, the forward pass replaced by a table lookup), which is the regime a
  GPU puts the pipeline in, and with a GPU's setting: tokenization in a thread beside the
  forward passes (`[runtime] tokenize_beside_model`);
- the processor end to end with the real model.
One more zero-cost and one more model run, with the stage clocks on (they cost time of their
own, so the rates come from the runs without them), report where the time went, per atom
and stage (`stream.processor.stages`): CPU time on the event loop (fetch, decode, encode, produce,
and the loop's remainder: aiokafka's background tasks and asyncio), CPU time of
tokenization, and the wall time of the device and of commits; and the whole process's CPU
time per atom (every thread: the Rust tokenizer's pool too) with the cores it kept busy.
The same runs time the tokenizer alone on the same windows (all its threads): however well
the rest overlaps, end to end with a zero-cost model cannot outrun it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import numpy as np

from schemas.embeddings import SourceRef
from stream.config import Config
from stream.core.output import embedding_output
from stream.embed.embedder import Embedder, Vectors
from stream.embed.pool import ModelPool
from stream.kafka.admin import Admin, TopicSpec
from stream.kafka.copyloop import copy_partition
from stream.processor.stages import LOOP_STAGES, STAGES, StageClock
from stream.tools.bench import CommitWatch, end_to_end, fresh_run, produce_texts
from stream.tools.benchreport import Rate, median
from stream.tools.workloads import workload_texts

# After the stages: the loop's remainder, wall time, and the process's CPU time (all
# threads) per atom, and the cores that kept busy.
TOTALS = ("loop_rest", "wall", "cpu", "cores")
TABLE_ROWS = 1024  # distinct synthetic vectors
# The copy loop copies the backlog this many times over: at tens of thousands of records a
# second one pass is too short to time steadily.
COPY_REPEAT = 4


class ZeroCostEmbedder(Embedder):
    """Bench only: the configured model's tokenizer and batching, no forward pass. Each
    row's vector is a fixed unit vector picked by a checksum of its token ids, so equal
    texts get equal vectors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = np.random.default_rng(0).standard_normal((TABLE_ROWS, self.dim))
        self._table = (table / np.linalg.norm(table, axis=1, keepdims=True)).astype(np.float32)

    def _forward(self, ids: Any, mask: Any) -> Vectors:
        keys = (ids * mask).sum(dim=1).numpy() % TABLE_ROWS
        rows: Vectors = self._table[keys]
        return rows


async def zero_cost_pool(config: Config, real: Embedder) -> ModelPool:
    """A pool whose stable model is `real`'s zero-cost twin (same name and fingerprint)."""
    pool = ModelPool(config)
    twin = await anyio.to_thread.run_sync(
        lambda: ZeroCostEmbedder(
            real.name,
            real.config,
            device=real.device,
            micro_batch_atoms=real.micro_batch_atoms,
            max_batch_tokens=real.max_batch_tokens,
        )
    )
    await pool.adopt(twin)
    return pool


def output_sample(config: Config, embedder: Embedder) -> bytes:
    """An EmbeddingRecord value as the processor writes it for this model."""
    record = embedding_output(
        atom_id="b-123456",
        model=embedder.name,
        vector=np.full(embedder.dim, 0.0123456, dtype=np.float32),
        normalized=True,
        source=SourceRef(topic=config.topics.atoms, partition=0, offset=123456),
        path="live",
        migration_id=None,
        embedded_at=datetime.now(UTC),
        fingerprint=embedder.fingerprint,
        metadata=None,
        created_at=None,
        encoding=config.output.encoding,
    )
    return record.value or b""


async def copy_loop(config: Config, texts: Sequence[str], value: bytes) -> Rate:
    """The bare copy loop (`stream.kafka.copyloop`) over a fresh backlog of `texts`."""
    config = fresh_run(config, "copy")
    output = config.topics.embeddings("copy")
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, 1, 1), TopicSpec(output, 1, 1)])
    await produce_texts(config, texts)
    seconds = await copy_partition(
        config.kafka,
        config.topics.atoms,
        output,
        value,
        count=len(texts),
        window=config.batching.window_atoms,
    )
    return Rate(len(texts), seconds)


async def staged_run(
    config: Config, pool: ModelPool, texts: Sequence[str]
) -> tuple[Rate, dict[str, float]]:
    """One end-to-end backlog run with the stage clocks on: the rate, and microseconds per
    atom by stage (`loop_rest`: the loop's CPU outside the timed loop stages)."""
    stages = StageClock()
    watch = CommitWatch(len(texts))
    rate, _ = await end_to_end(config, pool, texts, stages=stages, watch=watch)
    table = stages.per_atom_us(len(texts))
    loop_us = 1e6 * watch.loop_cpu_seconds / len(texts)
    table["loop_rest"] = max(0.0, loop_us - sum(table[s] for s in LOOP_STAGES))
    table["loop_total"] = loop_us
    table["wall"] = 1e6 * rate.seconds / len(texts)
    table["cpu"] = 1e6 * watch.process_cpu_seconds / len(texts)
    table["cores"] = watch.process_cpu_seconds / rate.seconds if rate.seconds else 0.0
    return rate, table


async def tokenizer_rate(embedder: Embedder, texts: Sequence[str], window: int) -> Rate:
    """The tokenizer alone over `texts` in windows of `window`, as the processor calls it
    (in a worker thread; the Rust tokenizer spreads each batch over its own threads)."""

    def tokenize_all() -> float:
        began = time.perf_counter()
        for start in range(0, len(texts), window):
            embedder.tokenize(texts[start : start + window])
        return time.perf_counter() - began

    return Rate(len(texts), await anyio.to_thread.run_sync(tokenize_all))


async def pipeline_ceiling(
    config: Config, pool: ModelPool, *, atoms: int, runs: int
) -> dict[str, Any]:
    """The copy loop, zero-cost end to end and model end to end, alternating `runs` times."""
    model = config.routing.stable_model
    real = await pool.get(model)
    zero = await zero_cost_pool(config, real)
    texts = workload_texts("mixed", atoms)
    value = output_sample(config, real)
    # As on an accelerator: the tokenizer has its own thread beside the (free) forward passes.
    gpu_like = msgspec.structs.replace(
        config, runtime=msgspec.structs.replace(config.runtime, tokenize_beside_model=True)
    )
    copy: list[float] = []
    zero_rates: list[float] = []
    model_rates: list[float] = []
    tokenizer: list[float] = []
    tables: dict[str, dict[str, float]] = {}
    await end_to_end(gpu_like, zero, texts[: max(64, atoms // 8)])  # warm-up
    for _ in range(runs):  # rates without the stage clocks, which cost time themselves
        copy.append((await copy_loop(config, list(texts) * COPY_REPEAT, value)).atoms_per_sec)
        zero_rates.append((await end_to_end(gpu_like, zero, texts))[0].atoms_per_sec)
        model_rates.append((await end_to_end(config, pool, texts))[0].atoms_per_sec)
        window = config.batching.window_atoms
        tokenizer.append((await tokenizer_rate(real, texts, window)).atoms_per_sec)
    _, tables["zero_cost"] = await staged_run(gpu_like, zero, texts)
    _, tables["model"] = await staged_run(config, pool, texts)
    return {
        "workload": "mixed",
        "atoms": atoms,
        "output_bytes": len(value),
        "copy_loop_atoms_per_sec": median(copy),
        "zero_cost_atoms_per_sec": median(zero_rates),
        "model_atoms_per_sec": median(model_rates),
        "ratio_zero_cost_vs_copy_loop": median(zero_rates) / median(copy) if copy else 0.0,
        "tokenizer_atoms_per_sec": median(tokenizer),
        "ratio_tokenizer_vs_copy_loop": median(tokenizer) / median(copy) if copy else 0.0,
        "runs": {
            "copy_loop": copy,
            "zero_cost": zero_rates,
            "model": model_rates,
            "tokenizer": tokenizer,
        },
        "stages_us_per_atom": tables,
    }


def pipeline_lines(p: dict[str, Any]) -> list[str]:
    """The `--pipeline` measurement as table lines."""
    lines = [
        f"pipeline ({p['workload']}, {p['atoms']} atoms, outputs of {p['output_bytes']} B): "
        f"bare copy loop {p['copy_loop_atoms_per_sec']:.0f} atoms/s, zero-cost model end to "
        f"end {p['zero_cost_atoms_per_sec']:.0f} ({p['ratio_zero_cost_vs_copy_loop']:.2f}x the "
        f"copy loop), model end to end {p['model_atoms_per_sec']:.0f}; the tokenizer alone "
        f"{p['tokenizer_atoms_per_sec']:.0f} ({p['ratio_tokenizer_vs_copy_loop']:.2f}x the "
        "copy loop: the most a zero-cost model end to end can reach here)",
        "per atom, us: " + " ".join(f"{s:>9}" for s in (*STAGES, *TOTALS)),
    ]
    for name, table in p["stages_us_per_atom"].items():
        cells = " ".join(f"{table.get(s, 0.0):9.1f}" for s in (*STAGES, *TOTALS))
        lines.append(f"{name:>12}: {cells}")
    return lines
