"""Migration benchmarks: live latency while backfilling, backfill's share of spare
capacity, and memory under a large backlog."""

from __future__ import annotations

import os
import time

import anyio
import numpy as np

from schemas.control import StartMigration
from stream.config import Config
from stream.embed.pool import ModelPool
from stream.kafka.admin import Admin, TopicSpec
from stream.ops.operator import send_command
from stream.processor.app import run_processor
from stream.processor.control import ControlPlane
from stream.tools.bench import CommitWatch, end_to_end, fresh_run, latencies, produce_texts
from stream.tools.loadgen import offer_load
from stream.tools.workloads import LazyTexts, workload_texts

LIVE_DRAIN_SECS = 300.0  # how long the live atoms offered may take to be committed
# The capacity that sizes the share bench: the median of this many backlog runs of this many
# atoms. One run of 2,000 (about a second here) read 1,681-2,266 atoms/s on one host within an
# hour, and the live load (capacity / 4) and the spare capacity both scale with it: a figure
# 15% high leaves backfill less than its stated spare even at perfect efficiency.
CAPACITY_RUNS = 3
CAPACITY_ATOMS = 4000


async def backfill_share(
    config: Config, pool: ModelPool, target: str, *, secs: float, config_path: str | None = None
) -> dict[str, float]:
    """Backfill's rate against the spare capacity, with live traffic using half of it.

    Capacity `c` is measured first (one model, from a backlog: the median of
    `CAPACITY_RUNS`; `capacity_spread` is their range over the median). Live atoms are then offered
    at `c / 4`: dual-written, they use half the model time, leaving `c / 2` atoms/s spare for
    backfill. Reports the backfill rate as a share of that, and live p99 during backfill
    against its bound (2 x idle p99 + one backfill step).
    """
    texts = workload_texts("mixed", CAPACITY_ATOMS)
    runs = [(await end_to_end(config, pool, texts))[0].atoms_per_sec for _ in range(CAPACITY_RUNS)]
    capacity = float(np.median(runs))
    spare = capacity / 2
    history = int(spare * secs * 2) + 1000  # more than backfill can finish while measured
    result = await backfill_latency(
        config, pool, target, history=history, rate=capacity / 4, secs=secs, config_path=config_path
    )
    result.update(
        capacity_atoms_per_sec=capacity,
        capacity_spread=(max(runs) - min(runs)) / capacity,
        spare_atoms_per_sec=spare,
        share_ratio=result.get("emit_atoms_per_sec", 0.0) / spare,
        share_ratio_overall=result["backfill_atoms_per_sec"] / spare,
        # The live load as it ran, not as its rate implies: the wall time its windows took
        # (dual-written at `c / 4`, half of it if a live window cost what a backlog's does),
        # each live atom's window time in backlog atoms (2.0 for two models at backlog
        # efficiency), and backfill's rate against the capacity the rest of the time holds.
        live_cost_ratio=result.get("live_window_secs_per_atom", 0.0) * capacity,
        share_of_time_left=result.get("emit_atoms_per_sec", 0.0)
        / max(1e-9, capacity * (1.0 - result.get("live_busy_fraction", 1.0))),
        p99_bound_ms=2 * result["idle_p99_ms"] + config.batching.backfill_chunk_ms,
        step_budget_ms=float(config.batching.backfill_chunk_ms),
    )
    return result


async def backfill_latency(
    config: Config,
    pool: ModelPool,
    target: str,
    *,
    history: int,
    rate: float,
    secs: float,
    config_path: str | None = None,
) -> dict[str, float]:
    """Live p50/p99 at `rate` atoms/s with no migration, then while `history` atoms are
    backfilled to `target`; and the backfill rate reached meanwhile. The live atoms come
    from a separate process (`stream.tools.loadgen`), as client applications send them."""

    config = fresh_run(config, "backfill")
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, 1, 1)])
    await produce_texts(config, workload_texts("mixed", history), prefix="h")
    await pool.get(target)
    count = max(4, int(rate * secs))
    watch = CommitWatch(history)
    stop = anyio.Event()
    result: dict[str, float] = {}
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: run_processor(config, stop=stop, models=pool, sensor=watch))
        await watch.done.wait()
        await offer_load(
            config, config_path, workload="mixed", count=count, seed=9, rate=rate, prefix="idle"
        )
        command = StartMigration(
            migration_id="bench",
            source_model=config.routing.stable_model,
            target_model=target,
        )
        await send_command(config, command)
        began = time.monotonic()
        source, before = config.routing.stable_model, dict(watch.embedded)

        def backfilled() -> int:
            """Backfill's embeds so far: the target's less the source's (every live atom
            goes to both). Counted as the model returns them: the control log's progress
            lags by up to a checkpoint interval, a large share of a 20 s measurement."""
            source_embeds = watch.embedded.get(source, 0) - before.get(source, 0)
            return watch.embedded.get(target, 0) - before.get(target, 0) - source_embeds

        # (seconds since the command, backfilled, live windows' seconds, live atoms embedded)
        samples: list[tuple[float, int, float, int]] = []

        def take() -> tuple[float, int, float, int]:
            live = watch.embedded.get(source, 0) - before.get(source, 0)
            return time.monotonic() - began, backfilled(), watch.window_seconds, live

        async def sample() -> None:
            while True:
                samples.append(take())
                await anyio.sleep(0.25)  # sampling period of the embed counters

        async with anyio.create_task_group() as probes:
            probes.start_soon(sample)
            await offer_load(
                config,
                config_path,
                workload="mixed",
                count=count,
                seed=10,
                rate=rate,
                prefix="busy",
            )
            probes.cancel_scope.cancel()
        samples.append(take())
        ended, embedded = samples[-1][0], samples[-1][1]
        result["backfill_atoms_per_sec"] = embedded / ended
        result["backfill_embedded"] = float(embedded)
        # The rate over the second half of the load: the keys pass at the start reads the
        # history without the model (2-5 s of a 20 s measurement over 60,000 atoms here).
        # (Each live window embeds with the target first, so a sample may run ahead by up
        # to one window's atoms: a few percent of the thousands counted over ten seconds.)
        half = [sample for sample in samples if sample[0] >= samples[-1][0] / 2]
        if len(half) >= 2:
            (t0, n0, w0, a0), (t1, n1, w1, a1) = half[0], half[-1]
            result["emit_atoms_per_sec"] = (n1 - n0) / (t1 - t0)
            # What live took of the wall time meanwhile, and its cost per live atom.
            result["live_busy_fraction"] = (w1 - w0) / (t1 - t0)
            result["live_window_secs_per_atom"] = (w1 - w0) / max(1, a1 - a0)
        steps = watch.step_seconds
        if steps:  # each step's wall time against its budget (`backfill_chunk_ms`)
            result["step_p50_ms"] = 1000 * float(np.percentile(steps, 50))
            result["step_p99_ms"] = 1000 * float(np.percentile(steps, 99))
        async with ControlPlane(config) as control:
            state = await control.replay()
        progress = state.migration.progress if state.migration else None
        result["backfill_done"] = float(progress.processed if progress else 0)
        result["backfill_total"] = float(progress.total or 0 if progress else 0)
        with anyio.fail_after(LIVE_DRAIN_SECS):  # every live atom is measured, late ones too
            await watch.reach(history + 2 * count)
        stop.set()
    idle = await latencies(config, count, b"idle-")
    busy = await latencies(config, count, b"busy-")
    result.update(
        live_rate=rate,
        idle_p50_ms=float(np.percentile(idle, 50)),
        idle_p99_ms=float(np.percentile(idle, 99)),
        busy_p50_ms=float(np.percentile(busy, 50)),
        busy_p99_ms=float(np.percentile(busy, 99)),
    )
    result["p99_ratio"] = result["busy_p99_ms"] / result["idle_p99_ms"]
    return result


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def memory_under_backlog(config: Config, pool: ModelPool, atoms: int) -> dict[str, float]:
    """Peak resident memory while the processor drains an `atoms` backlog, against the same
    process idle with its model loaded (texts are generated as they are produced)."""
    model = await pool.get(config.routing.stable_model)
    model_bytes = sum(p.numel() * p.element_size() for p in model._model.parameters())
    config = fresh_run(config, "memory")
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, 1, 1)])
    await produce_texts(config, LazyTexts(atoms))
    baseline = _rss_bytes()
    peak = baseline
    watch = CommitWatch(atoms)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _rss_bytes())
            await anyio.sleep(0.05)  # sampling period of the RSS probe

    stop = anyio.Event()
    began = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(sample)
        tasks.start_soon(lambda: run_processor(config, stop=stop, models=pool, sensor=watch))
        await watch.done.wait()
        stop.set()
        elapsed = time.perf_counter() - began
        await anyio.sleep(0.2)  # let the processor drain before the sampler stops
        tasks.cancel_scope.cancel()
    mib = 1024 * 1024
    return {
        "atoms": float(atoms),
        "seconds": elapsed,
        "model_mib": model_bytes / mib,
        "baseline_rss_mib": baseline / mib,
        "peak_rss_mib": peak / mib,
        "growth_mib": (peak - baseline) / mib,
    }
