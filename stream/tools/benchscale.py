"""Migration benchmarks at production scale (`lattice-embed bench --scale`, `--work`).

- `scale_migration`: a migration over a million-event history with 3 partitions and two
  processor processes, live ingestion throughout at a stated fraction of the capacity
  measured first, and one process SIGKILLed and restarted at about 80% progress. Reports each
  process's idle and peak resident memory, how long the partitions of the killed process
  took to move forward again, and G2/G4 on the result (streamed checks, a sample of vectors
  compared with a from-scratch embedding).
- `update_heavy_work`: on an update-heavy log, how many atoms the target model embeds
  against the live keys (superseded and deleted versions must cost nothing).

The history counts as embedded with the source before the bench starts: the group's offsets
are committed at the log end (`commit_group_offsets`), so what is measured is the migration,
not hours of first ingestion on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np

from schemas.control import StartMigration
from schemas.routing import RoutingPhase
from stream.config import Config
from stream.core.routing import RoutingState
from stream.embed.pool import ModelPool
from stream.kafka.admin import Admin, TopicSpec
from stream.kafka.consumer import commit_group_offsets
from stream.kafka.reader import PartitionReader
from stream.ops.operator import send_command
from stream.ops.workers import worker_environment
from stream.processor.app import run_processor
from stream.processor.control import ControlPlane
from stream.tools.bench import end_to_end, fresh_run
from stream.tools.scalelog import (
    UpdateHeavyLog,
    atoms_final,
    check_target,
    produce_events,
    sample_keys,
)
from stream.tools.workloads import workload_texts

PARTITIONS = 3
POLL_SECS = 1.0  # how often the bench reads the control log and samples memory
LIVE_BURST = 50  # live events per produce call of the load generator
IDLE_SECS = 15.0  # live traffic before the migration: the idle RSS is its peak
VECTOR_SAMPLE = 200
VECTOR_ATOL = 1e-4
ASSIGNED = re.compile(r"assigned partitions: \[([0-9, ]*)\]")


@dataclass
class Instance:
    """One `lattice-embed run` process of the bench."""

    name: str
    process: anyio.abc.Process
    log_path: Path
    idle_rss: int = 0
    peak_rss: int = 0

    def rss(self) -> int:
        return _rss_of(self.process.pid)

    def assigned(self) -> list[int] | None:
        """The partitions of the last assignment the process logged (None: none yet)."""
        found = ASSIGNED.findall(self.log_path.read_text(errors="replace"))
        if not found:
            return None
        return [int(p) for p in found[-1].split(",") if p.strip()]


@dataclass
class Progress:
    """Per-partition backfill counts from the control log, over time."""

    counts: dict[int, tuple[int, int]] = field(default_factory=dict)
    processed: int = 0
    total: int | None = None
    phase: RoutingPhase | None = None

    @classmethod
    def of(cls, state: RoutingState) -> Progress:
        migration = state.migration
        if migration is None:
            return cls(phase=state.routing_config().phase)
        progress = migration.progress
        return cls(
            counts=dict(migration.counts),
            processed=progress.processed,
            total=progress.total,
            phase=state.routing_config().phase,
        )

    def left(self, partitions: Sequence[int]) -> int:
        """Atoms backfill has still to embed in `partitions` (unknown totals count none)."""
        return sum(
            max(0, total - done) for p, (done, total) in self.counts.items() if p in partitions
        )

    @property
    def fraction(self) -> float:
        return self.processed / self.total if self.total else 0.0


async def scale_migration(
    config: Config,
    config_path: str | None,
    pool: ModelPool,
    target: str,
    *,
    events: int,
    keys: int,
    live_fraction: float = 0.25,
    restart_at: float = 0.8,
    workdir: Path,
    static: bool = False,
) -> dict[str, float]:
    """The million-event migration with two processes, one killed and restarted (with
    `static`, as static group members: the restarted one rejoins under its old id)."""
    capacity = (await end_to_end(config, pool, workload_texts("mixed", 2000)))[0].atoms_per_sec
    live_rate = capacity * live_fraction
    config = fresh_run(config, "scale")
    log = UpdateHeavyLog(events=events, keys=keys)
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, PARTITIONS, 1)])
    began = time.monotonic()
    produced = await produce_events(config, log.history())
    produce_secs = time.monotonic() - began
    ends = await _end_offsets(config)
    await commit_group_offsets(config.kafka, config.topics.atoms, config.kafka.group_id, ends)
    await anyio.Path(workdir).mkdir(parents=True, exist_ok=True)
    result: dict[str, float] = {
        "events": float(produced),
        "keys": float(keys),
        "produce_secs": produce_secs,
        "capacity_atoms_per_sec": capacity,
        "live_rate": live_rate,
    }
    stop_load = anyio.Event()
    live_events = 0

    async def load() -> None:
        nonlocal live_events
        start = time.monotonic()
        while not stop_load.is_set():
            live_events += await produce_events(config, log.live(LIVE_BURST))
            due = start + live_events / live_rate
            with anyio.move_on_after(max(0.0, due - time.monotonic())):
                await stop_load.wait()  # pacing of the offered load, not a condition wait

    # Two processes on one host: each gets half the cores for torch (as `--workers 2` does),
    # or the model threads of both spin against each other (`stream/embed/cores.py`).
    env = {**instance_env(config), **worker_environment(config, 0, 2, {})}
    env.pop("LATTICE_KAFKA_CLIENT_ID", None)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            processor_child(
                "a", config_path, env, workdir / "a.log", workdir / "state-a", member(static, "a")
            )
        )
        second = await stack.enter_async_context(
            processor_child(
                "b", config_path, env, workdir / "b.log", workdir / "state-b", member(static, "b")
            )
        )
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load)
            await _wait_assigned([first, second])
            idle_until = time.monotonic() + IDLE_SECS
            while time.monotonic() < idle_until:
                for instance in (first, second):
                    instance.idle_rss = max(instance.idle_rss, instance.rss())
                await anyio.sleep(POLL_SECS)  # sampling period of the RSS probe
            command = StartMigration(
                migration_id="scale", source_model=config.routing.stable_model, target_model=target
            )
            migration_began = time.monotonic()
            await send_command(config, command)
            instances = [first, second]
            killed_at: float | None = None
            owners: tuple[tuple[int, ...], ...] = ()
            reassigned_at: float | None = None  # the last assignment change after the kill
            samples: list[tuple[float, dict[int, tuple[int, int]]]] = []
            async with ControlPlane(config) as control:
                await control.replay()
                while True:
                    progress = Progress.of(await control.replay())
                    for instance in instances:
                        instance.peak_rss = max(instance.peak_rss, instance.rss())
                    if killed_at is None and progress.fraction >= restart_at:
                        killed_at = time.monotonic()
                        owners = tuple(tuple(i.assigned() or ()) for i in instances)
                        result["killed_at_fraction"] = progress.fraction
                        # The process with the most backfill left: its partitions must resume.
                        victim = max(instances, key=lambda i: progress.left(i.assigned() or ()))
                        result["killed_left"] = float(progress.left(victim.assigned() or ()))
                        victim.process.send_signal(signal.SIGKILL)
                        await victim.process.wait()
                        restarted = await stack.enter_async_context(
                            processor_child(
                                f"{victim.name}2",
                                config_path,
                                env,
                                workdir / f"{victim.name}2.log",
                                workdir / f"state-{victim.name}",
                                member(static, victim.name),
                            )
                        )
                        restarted.idle_rss = victim.idle_rss  # the same pod, restarted
                        restarted.peak_rss = victim.peak_rss  # its peak before the kill counts
                        instances = [restarted if i is victim else i for i in instances]
                    if killed_at is not None:
                        now = time.monotonic()
                        samples.append((now, dict(progress.counts)))
                        seen = tuple(tuple(i.assigned() or ()) for i in instances)
                        if seen != owners:
                            owners, reassigned_at = seen, now
                    if progress.phase is RoutingPhase.ROLLBACK_WINDOW:
                        break
                    await anyio.sleep(POLL_SECS)  # period of the progress and RSS probes
            result["migration_secs"] = time.monotonic() - migration_began
            result["resume_secs"] = resume_secs(killed_at, reassigned_at, samples)
            result["backfill_total"] = float(progress.total or 0)
            stop_load.set()
        result["live_events"] = float(live_events)
        # Let the live events produced last reach the target before the checks.
        await _wait_committed(config, await _end_offsets(config), within=300.0)
        for index, instance in enumerate(instances):
            result[f"instance{index}_idle_rss_mib"] = instance.idle_rss / 2**20
            result[f"instance{index}_peak_rss_mib"] = instance.peak_rss / 2**20
            result[f"instance{index}_growth_mib"] = (instance.peak_rss - instance.idle_rss) / 2**20
    result.update(await _checks(config, pool, target))
    return result


async def update_heavy_work(
    config: Config, pool: ModelPool, target: str, *, events: int, keys: int
) -> dict[str, float]:
    """Backfill of an update-heavy log in this process: atoms the target model embedded for
    backfill against the live keys (no live traffic, so every target embed is backfill's)."""
    config = fresh_run(config, "work")
    log = UpdateHeavyLog(events=events, keys=keys)
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, PARTITIONS, 1)])
    await produce_events(config, log.history())
    ends = await _end_offsets(config)
    await commit_group_offsets(config.kafka, config.topics.atoms, config.kafka.group_id, ends)
    stop = anyio.Event()
    stats: Any = None

    async def processor() -> None:
        nonlocal stats
        stats = await run_processor(config, stop=stop, models=pool)

    began = time.monotonic()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(processor)
        command = StartMigration(
            migration_id="work", source_model=config.routing.stable_model, target_model=target
        )
        await send_command(config, command)
        async with ControlPlane(config) as control:
            await control.replay()
            while True:
                if Progress.of(await control.replay()).phase is RoutingPhase.ROLLBACK_WINDOW:
                    break
                await anyio.sleep(POLL_SECS)  # period of the progress probe
        stop.set()
    embedded = stats.outputs[(target, "backfill")] if stats else 0
    result = {"events": float(events), "keys": float(keys), "secs": time.monotonic() - began}
    checks = await _checks(config, pool, target)
    result.update(checks, target_embeds=float(embedded))
    result["embeds_per_live_key"] = embedded / checks["live_keys"] if checks["live_keys"] else 0
    return result


async def _checks(config: Config, pool: ModelPool, target: str) -> dict[str, float]:
    """G2 and G4 against a from-scratch replay, and a sample of vectors re-embedded."""
    final = await atoms_final(config)
    check = await check_target(config, target, final)
    sample = sample_keys(final, VECTOR_SAMPLE)
    model = await pool.get(target)
    expected = model.embed([final.sample_texts[k] for k in sample])
    got = np.array([check.sample_vectors[k] for k in sample if k in check.sample_vectors])
    vectors_ok = len(got) == len(sample) and bool(np.allclose(got, expected, atol=VECTOR_ATOL))
    return {
        "live_keys": float(final.live_keys),
        "target_records": float(check.records),
        "g2_missing": float(check.g2_missing),
        "g4_stale": float(check.g4_stale),
        "vectors_checked": float(len(sample)),
        "vectors_ok": float(vectors_ok),
    }


async def _end_offsets(config: Config) -> dict[int, int]:
    async with PartitionReader(config.kafka) as reader:
        return await reader.end_offsets(config.topics.atoms, list(range(PARTITIONS)))


async def _wait_committed(config: Config, ends: Mapping[int, int], *, within: float) -> None:
    """Wait until the group has committed `ends` on every partition."""
    async with Admin(config.kafka) as admin:
        with anyio.fail_after(within):
            while True:
                committed = await admin.committed(config.kafka.group_id, config.topics.atoms)
                if all(committed.get(p, 0) >= end for p, end in ends.items()):
                    return
                await anyio.sleep(POLL_SECS)  # period of the commit probe


async def _wait_assigned(instances: list[Instance], within: float = 600.0) -> None:
    """Wait until both processes own partitions (they logged their assignments)."""
    with anyio.fail_after(within):
        while True:
            assigned = [instance.assigned() for instance in instances]
            if all(assigned) and sum(len(a or []) for a in assigned) == PARTITIONS:
                return
            await anyio.sleep(POLL_SECS)  # period of the log probe


def resume_secs(
    killed_at: float | None,
    reassigned_at: float | None,
    samples: Sequence[tuple[float, Mapping[int, tuple[int, int]]]],
) -> float:
    """Seconds from the kill until every partition that was unfinished when the partitions
    were last reassigned has progressed under its new owner (NaN: never, or no kill).

    `samples` are (time, {partition: (done, total)}) from the control log after the kill.
    Progress that an old owner made between the kill and the last reassignment does not
    count: a partition resumes when its final owner moves it on."""
    if killed_at is None or reassigned_at is None:
        return float("nan")
    before = [counts for at, counts in samples if at <= reassigned_at]
    base = before[-1] if before else {}
    waiting = {p for p, (done, total) in base.items() if done < total}
    resumed: dict[int, float] = {}
    for at, counts in samples:
        if at <= reassigned_at:
            continue
        for partition in waiting - resumed.keys():
            done, total = counts.get(partition, (0, 0))
            if done > base[partition][0] or done >= total:
                resumed[partition] = at - killed_at
    if resumed.keys() != waiting:
        return float("nan")
    return max(resumed.values(), default=reassigned_at - killed_at)


def member(static: bool, name: str) -> str | None:
    """The group instance id of a child named `name`: its name when static, else none."""
    return f"bench-{name}" if static else None


def instance_env(config: Config) -> dict[str, str]:
    """The run's topics and group as LATTICE_* overrides for the child processes."""
    topics, kafka = config.topics, config.kafka
    return {
        "LATTICE_TOPICS_ATOMS": topics.atoms,
        "LATTICE_TOPICS_CONTROL": topics.control,
        "LATTICE_TOPICS_ROUTING": topics.routing,
        "LATTICE_TOPICS_DLQ": topics.dlq,
        "LATTICE_TOPICS_EMBEDDINGS_PREFIX": topics.embeddings_prefix,
        "LATTICE_KAFKA_GROUP_ID": kafka.group_id,
        "LATTICE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "LATTICE_METRICS_ENABLED": "false",
    }


@contextlib.asynccontextmanager
async def processor_child(
    name: str,
    config_path: str | None,
    env: dict[str, str],
    log_path: Path,
    state_dir: Path,
    group_instance_id: str | None = None,
    args: tuple[str, ...] = (),
) -> AsyncIterator[Instance]:
    """`lattice-embed run` as a child with its own state directory (and, if given, static
    group instance id)."""
    command = [sys.executable, "-m", "stream.ops.cli", "run", *args]
    if config_path:
        command += ["--config", config_path]
    child_env = {**os.environ, **env, "LATTICE_STATE_DIR": str(state_dir)}
    if group_instance_id is not None:
        child_env["LATTICE_KAFKA_GROUP_INSTANCE_ID"] = group_instance_id
    with log_path.open("wb") as log_file:
        process = await anyio.open_process(command, env=child_env, stdout=log_file, stderr=log_file)
        instance = Instance(name, process, log_path)
        try:
            yield instance
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(60), anyio.CancelScope(shield=True):
                    await process.wait()
                if process.returncode is None:
                    process.kill()


def _rss_of(pid: int) -> int:
    """Resident set size of a process (Linux /proc; 0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
