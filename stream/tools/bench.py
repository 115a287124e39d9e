"""`lattice-embed bench`: what a model sustains here, offline and end to end, in one run.

For each workload, on the same deterministic texts:
  (a) model only: plain transformers, length-sorted batches of 64 (the reference);
  (b) the embedder as the pipeline uses it (token-budget micro-batches);
  (c) end to end through Kafka from a backlog (produce N atoms, then run the processor);
  (d) end to end at a fixed offered load (half of (c)), with p50/p99 latency.
Ratios are taken between numbers measured in the same run, so they hold across machines.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np

from schemas.control import BackfillConfig, StartMigration
from stream.config import Config, with_run_topics
from stream.core.records import OutRecord
from stream.embed.embedder import Embedder
from stream.embed.pool import ModelPool
from stream.kafka.admin import Admin, TopicSpec
from stream.kafka.producer import OutputProducer
from stream.kafka.reader import PartitionReader
from stream.ops.operator import send_command
from stream.processor.app import run_processor
from stream.processor.sensors import Sensor
from stream.processor.stages import StageClock
from stream.processor.topics import prepare_topics
from stream.tools.benchreport import Rate, WorkloadResult, median, write_report
from stream.tools.workloads import workload_texts

log = logging.getLogger(__name__)


def model_only(embedder: Embedder, texts: Sequence[str], batch: int = 64) -> Rate:
    """The reference: Hugging Face tokenizer padding per batch of 64 length-sorted texts."""
    import torch

    tokenizer, model = embedder._tokenizer, embedder._model  # the same weights, plain use
    lengths = [len(ids) for ids in embedder.tokenize(texts).input_ids]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    began = time.perf_counter()
    padded = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = [texts[i] for i in order[start : start + batch]]
            inputs = tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=embedder.config.max_tokens,
                return_tensors="pt",
            ).to(embedder.device)
            padded += int(inputs["input_ids"].numel())
            hidden = model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
    return Rate(len(texts), time.perf_counter() - began, sum(lengths), padded)


def embedder_rate(embedder: Embedder, texts: Sequence[str]) -> Rate:
    """The embedder as the pipeline drives it: tokenize, token-budget micro-batches."""
    began = time.perf_counter()
    _, stats = embedder.embed_tokens(embedder.tokenize(texts))
    return Rate(len(texts), time.perf_counter() - began, stats.tokens, stats.padded_tokens)


async def produce_texts(
    config: Config, texts: Sequence[str], *, rate: float | None = None, prefix: str = "b"
) -> None:
    # The input side is a plain producer, as a client application would run it.
    async with OutputProducer(config.kafka, idempotent=False) as producer:
        began = time.monotonic()
        for i, text in enumerate(texts):
            if rate is not None and (due := began + i / rate) > time.monotonic():
                await producer.flush()  # what is due is on the wire; wait for the next one
                await anyio.sleep(max(0.0, due - time.monotonic()))  # offered load pacing
            atom_id = f"{prefix}-{i}"
            value = msgspec.json.encode({"type": "atom.created", "atom_id": atom_id, "text": text})
            await producer.send(config.topics.atoms, OutRecord(atom_id.encode(), value, []))
        await producer.flush()


class CommitWatch(Sensor):
    """Waits on a one-partition processor: its assignment, and commits up to `goal`."""

    def __init__(self, goal: int) -> None:
        self.goal = goal
        self.committed = 0
        self.done = anyio.Event()
        self.assigned = anyio.Event()
        self.assigned_at = time.perf_counter()
        self.loop_cpu_at = time.thread_time()
        self.loop_cpu_seconds = 0.0  # the event loop's CPU time from assignment to `goal`
        self.process_cpu_at = time.process_time()
        self.process_cpu_seconds = 0.0  # the whole process's, every thread (the tokenizer's)
        self._committed = anyio.Event()
        self.embedded: dict[str, int] = {}  # atoms each model embedded (successful batches)
        self.window_seconds = 0.0  # wall time of the live windows, fetch to commit
        self.step_seconds: list[float] = []  # each backfill step's wall time

    def on_window(self, seconds: float) -> None:
        """Add up the live windows' wall time (what live traffic leaves backfill is the rest)."""
        self.window_seconds += seconds

    def on_backfill_step(self, seconds: float) -> None:
        """Keep each backfill step's wall time (what a live window waited behind it)."""
        self.step_seconds.append(seconds)

    def on_batch(self, model: str, atoms: int, seconds: float) -> None:
        """Count what each model embedded."""
        self.embedded[model] = self.embedded.get(model, 0) + atoms

    def on_commit(self, offsets: Mapping[int, int]) -> None:
        """Track the highest committed offset."""
        self.committed = max(self.committed, max(offsets.values()))
        if self.committed >= self.goal and not self.done.is_set():
            self.loop_cpu_seconds = time.thread_time() - self.loop_cpu_at  # on the loop thread
            self.process_cpu_seconds = time.process_time() - self.process_cpu_at
            self.done.set()
        self._committed.set()
        self._committed = anyio.Event()

    async def reach(self, offset: int) -> None:
        """Wait until the committed offset is at least `offset`."""
        while self.committed < offset:
            await self._committed.wait()

    def on_assigned(self, partitions: Sequence[int]) -> None:
        """Throughput counts from the moment the processor owns the partitions: start-up
        (topic checks, control replay, group join) is not part of it."""
        self.assigned_at = time.perf_counter()
        self.loop_cpu_at = time.thread_time()
        self.process_cpu_at = time.process_time()
        self.assigned.set()


def fresh_run(config: Config, tag: str) -> Config:
    config = with_run_topics(config, f"bench-{tag}-{uuid.uuid4().hex[:6]}")
    return msgspec.structs.replace(
        config, metrics=msgspec.structs.replace(config.metrics, enabled=False)
    )


async def end_to_end(
    config: Config,
    pool: ModelPool,
    texts: Sequence[str],
    *,
    second_model: str | None = None,
    rate: float | None = None,
    stages: StageClock | None = None,
    watch: CommitWatch | None = None,
) -> tuple[Rate, list[float]]:
    """Processor throughput from a backlog (rate None) or latencies at an offered load.

    `stages` times each stage of the pipeline; `watch` (for `goal` = the atoms) also gives
    the event loop's CPU time over the run."""
    config = fresh_run(config, "e2e")
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, 1, 1)])
    await prepare_topics(config)
    if second_model is not None:
        command = StartMigration(
            migration_id="bench",
            source_model=config.routing.stable_model,
            target_model=second_model,
            backfill=BackfillConfig(rollback_window_secs=3600),
        )
        await send_command(config, command)
    if rate is None:
        await produce_texts(config, texts)
    watch = watch or CommitWatch(len(texts))
    stop = anyio.Event()

    async def produce_at_rate() -> None:
        # Offered load starts once the processor owns the partitions, so a slow group join
        # (Kafka's initial rebalance delay, Tansu's session_timeout/2) is not counted as latency.
        await watch.assigned.wait()
        await produce_texts(config, texts, rate=rate)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(
            lambda: run_processor(config, stop=stop, models=pool, sensor=watch, stages=stages)
        )
        if rate is not None:
            tasks.start_soon(produce_at_rate)
        await watch.done.wait()
        elapsed = time.perf_counter() - watch.assigned_at
        stop.set()
    measured = await latencies(config, len(texts)) if rate is not None else []
    return Rate(len(texts), elapsed), measured


async def latencies(config: Config, count: int, prefix: bytes = b"") -> list[float]:
    """Per atom: output record time minus input record time, in milliseconds."""

    async def times(topic: str) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        async with PartitionReader(config.kafka) as reader:
            with anyio.move_on_after(60):
                async for records in reader.follow(topic):
                    for record in records:
                        if record.key and record.key.startswith(prefix) and record.timestamp_ms:
                            found.setdefault(record.key, record.timestamp_ms)
                    if len(found) >= count:
                        break
        return found

    produced = await times(config.topics.atoms)
    output = await times(config.topics.embeddings(config.routing.stable_model))
    return [float(output[k] - produced[k]) for k in output if k in produced]


async def serve_throughput(
    config: Config,
    pool: ModelPool,
    levels: Sequence[int],
    *,
    requests: int,
    secs: float,
    texts: int = 256,
) -> dict[str, Any]:
    """The embeddings API in this process on a free loopback port, against the configured
    broker (fresh control topics: the stable model answers), measured by `bench_serve`:
    one mixed-workload text per request, at most `requests` requests or `secs` seconds per
    concurrency level."""
    from stream.serve.bench import bench_serve
    from stream.serve.server import run_serve
    from stream.serve.service import EmbeddingService

    config = fresh_run(config, "serve")
    service = EmbeddingService(config, pool=pool)
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(
            functools.partial(run_serve, config, host="127.0.0.1", port=0, service=service)
        )
        with anyio.fail_after(120):
            await service.wait_ready()
        report = await bench_serve(
            f"http://127.0.0.1:{port}",
            workload_texts("mixed", texts, seed=11),
            levels,
            requests_per_level=requests,
            max_secs_per_level=secs,
            api_key=config.serve.api_keys[0] if config.serve.api_keys else None,
        )
        tasks.cancel_scope.cancel()
    report["model"] = config.routing.stable_model
    report["requests_per_level"] = requests
    report["max_secs_per_level"] = secs
    return report


async def _workload(
    config: Config,
    pool: ModelPool,
    embedder: Embedder,
    name: str,
    atoms: int,
    runs: int,
    load_secs: float,
) -> WorkloadResult:
    """One workload: model only, embedder, end to end (medians of `runs`), then latency at
    half the end-to-end rate."""
    texts = workload_texts(name, atoms)
    lengths = embedder.tokenize(texts).lengths
    result = WorkloadResult(name=name, mean_tokens=float(np.mean(lengths)))
    measured: dict[str, list[Rate]] = {"model_only": [], "embedder": [], "end_to_end": []}
    # Warm-up: first-use costs (CUDA context, kernel selection, torch.compile) stay out.
    await anyio.to_thread.run_sync(model_only, embedder, texts)
    await anyio.to_thread.run_sync(embedder_rate, embedder, texts)
    for _ in range(runs):
        measured["model_only"].append(await anyio.to_thread.run_sync(model_only, embedder, texts))
        measured["embedder"].append(await anyio.to_thread.run_sync(embedder_rate, embedder, texts))
        measured["end_to_end"].append((await end_to_end(config, pool, texts))[0])
    result.runs = {k: [r.atoms_per_sec for r in v] for k, v in measured.items()}
    result.model_only = median(result.runs["model_only"])
    result.embedder = median(result.runs["embedder"])
    result.end_to_end = median(result.runs["end_to_end"])
    result.tokens_per_sec = median([r.tokens_per_sec for r in measured["embedder"]])
    result.padding_model_only = median([r.padding for r in measured["model_only"]])
    result.padding_embedder = median([r.padding for r in measured["embedder"]])
    result.offered_rate = result.end_to_end / 2
    batch_secs = config.batching.micro_batch_atoms / result.embedder if result.embedder else 0
    result.p99_bound_ms = 2 * config.batching.max_wait_ms + 1000 * batch_secs
    load_count = max(8, int(result.offered_rate * load_secs))
    _, latencies = await end_to_end(
        config, pool, workload_texts(name, load_count, seed=8), rate=result.offered_rate
    )
    if latencies:
        result.p50_ms = float(np.percentile(latencies, 50))
        result.p99_ms = float(np.percentile(latencies, 99))
    return result


@dataclass(frozen=True)
class ScaleOptions:
    """The migration-at-scale measurements (`--scale`, `--work`)."""

    config_path: str | None = None
    scale_target: str | None = None
    scale_events: int = 1_000_000
    scale_keys: int = 200_000
    scale_static: bool = False
    work_target: str | None = None
    work_events: int = 100_000
    work_keys: int = 20_000


async def run_bench(
    config: Config,
    *,
    workloads: Sequence[str],
    atoms: int,
    runs: int,
    dual: str | None,
    load_secs: float,
    out: Path,
    backfill_target: str | None = None,
    backfill_live_rate: float = 5.0,
    backfill_share_target: str | None = None,
    memory_atoms: int | None = None,
    scale: ScaleOptions | None = None,
    serve_levels: Sequence[int] | None = None,
    serve_requests: int = 512,
    serve_secs: float = 20.0,
    control_log: tuple[int, float] | None = None,
    exactly_once_atoms: int | None = None,
    pipeline_atoms: int | None = None,
    workers_levels: Sequence[int] | None = None,
    workers_atoms: int = 20_000,
) -> dict[str, Any]:
    """Run every measurement; write JSON and a PNG plot under `out`; return the report.

    `control_log` (partitions, hours) adds the control-log replay measurement, which needs
    no model: the model is loaded only for the measurements that use it.
    """
    pool = ModelPool(config)
    model = config.routing.stable_model
    results: list[WorkloadResult] = []
    for name in workloads:
        embedder = await pool.get(model)
        result = await _workload(config, pool, embedder, name, atoms, runs, load_secs)
        results.append(result)
        log.info(
            "bench %s: model only %.1f, embedder %.1f, end to end %.1f atoms/s (%.2fx); "
            "at %.1f atoms/s p50 %.0f ms, p99 %.0f ms",
            name,
            result.model_only,
            result.embedder,
            result.end_to_end,
            result.ratio,
            result.offered_rate,
            result.p50_ms,
            result.p99_ms,
        )
    report: dict[str, Any] = {
        "model": model,
        "device": config.runtime.device,
        "atoms": atoms,
        "runs": runs,
        "max_wait_ms": config.batching.max_wait_ms,
        "workloads": [{**asdict(r), "ratio_end_to_end_vs_model_only": r.ratio} for r in results],
    }
    if dual is not None:
        texts = workload_texts("mixed", atoms)
        embedder = await pool.get(model)
        second = await pool.get(dual)
        a = median([(await anyio.to_thread.run_sync(model_only, embedder, texts)).seconds])
        b = median([(await anyio.to_thread.run_sync(model_only, second, texts)).seconds])
        both = [(await end_to_end(config, pool, texts, second_model=dual))[0] for _ in range(runs)]
        ideal = len(texts) / (a + b)
        measured_rate = median([r.atoms_per_sec for r in both])
        report["dual_write"] = {
            "models": [model, dual],
            "atoms_per_sec": measured_rate,
            "ideal_atoms_per_sec": ideal,
            "ratio": measured_rate / ideal,
        }
    if exactly_once_atoms is not None:
        from stream.tools.benchexactlyonce import exactly_once_ratio

        report["exactly_once"] = await exactly_once_ratio(
            config, pool, atoms=exactly_once_atoms, runs=runs
        )
    if pipeline_atoms is not None:
        from stream.tools.benchpipeline import pipeline_ceiling

        report["pipeline"] = await pipeline_ceiling(config, pool, atoms=pipeline_atoms, runs=runs)
    if workers_levels:
        from stream.tools.benchworkers import workers_scaling

        report["workers_scaling"] = await workers_scaling(
            config,
            scale.config_path if scale else None,
            workers_levels,
            atoms=workers_atoms,
            workdir=out / "workers",
        )
    if backfill_target is not None:
        from stream.tools.benchmigration import backfill_latency

        report["backfill_latency"] = await backfill_latency(
            config,
            pool,
            backfill_target,
            history=atoms * 4,
            rate=backfill_live_rate,
            secs=load_secs,
            config_path=scale.config_path if scale else None,
        )
    if backfill_share_target is not None:
        from stream.tools.benchmigration import backfill_share

        report["backfill_share"] = await backfill_share(
            config,
            pool,
            backfill_share_target,
            secs=load_secs,
            config_path=scale.config_path if scale else None,
        )
    if memory_atoms is not None:
        from stream.tools.benchmigration import memory_under_backlog

        report["memory"] = await memory_under_backlog(config, pool, memory_atoms)
    if scale is not None and scale.work_target is not None:
        from stream.tools.benchscale import update_heavy_work

        report["work"] = await update_heavy_work(
            config, pool, scale.work_target, events=scale.work_events, keys=scale.work_keys
        )
    if scale is not None and scale.scale_target is not None:
        from stream.tools.benchscale import scale_migration

        report["scale"] = await scale_migration(
            config,
            scale.config_path,
            pool,
            scale.scale_target,
            events=scale.scale_events,
            keys=scale.scale_keys,
            workdir=out / "scale",
            static=scale.scale_static,
        )
    if serve_levels is not None:
        report["serve"] = await serve_throughput(
            config, pool, serve_levels, requests=serve_requests, secs=serve_secs
        )
    if control_log is not None:
        from stream.tools.benchcontrol import control_log_replay

        partitions, hours = control_log
        report["control_log"] = await control_log_replay(config, partitions=partitions, hours=hours)
    await anyio.to_thread.run_sync(write_report, report, results, out)
    return report
