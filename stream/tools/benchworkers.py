"""`bench --workers-scaling 1,2,4,8`: one machine's throughput with N worker processes.

For each N, `lattice-embed run --workers N` (the real supervisor and workers, as child
processes) starts on fresh, empty topics with as many partitions as the largest N. Once the
group is stable with all N workers (start-up and joins are not measured, and no worker has
had a head start), the bench produces a mixed backlog as fast as one producer can, and the
rate counts from its first record to the commit of the last. The production rate is
reported beside it: a level that processes about as fast as it was fed is bound by the
producer, not by the workers. Each level reports its atoms/s and its speed-up over the
first level.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from stream.config import Config
from stream.kafka.admin import Admin, TopicSpec
from stream.processor.topics import prepare_topics
from stream.tools.bench import fresh_run, produce_texts
from stream.tools.benchscale import instance_env, processor_child
from stream.tools.workloads import workload_texts

POLL_SECS = 0.25  # how often the group's state and committed offsets are read
JOIN_SECS = 600.0  # a level whose workers have not all joined in this long fails the bench
DRAIN_SECS = 1800.0  # likewise for draining the backlog once produced


async def workers_scaling(
    config: Config,
    config_path: str | None,
    levels: Sequence[int],
    *,
    atoms: int,
    workdir: Path,
) -> dict[str, Any]:
    """Drain `atoms` mixed atoms with each worker count in `levels`, one level after another."""
    partitions = max(levels)
    texts = workload_texts("mixed", atoms)
    runs: list[dict[str, Any]] = []
    await anyio.to_thread.run_sync(lambda: workdir.mkdir(parents=True, exist_ok=True))
    for workers in levels:
        run = fresh_run(config, f"workers{workers}")
        async with Admin(run.kafka) as admin:
            await admin.ensure_topics([TopicSpec(run.topics.atoms, partitions, 1)])
        await prepare_topics(run)
        log_path = workdir / f"workers-{workers}.log"
        env = {**instance_env(run), "LATTICE_RUNTIME_DEVICE": run.runtime.device}
        args = ("--workers", str(workers))
        state = workdir / f"state-{workers}"
        async with processor_child(f"w{workers}", config_path, env, log_path, state, args=args):
            with anyio.fail_after(JOIN_SECS):
                await _stable(run, workers)
            began = time.perf_counter()
            await produce_texts(run, texts)
            produced = time.perf_counter() - began
            with anyio.fail_after(DRAIN_SECS):
                await _committed(run, atoms)
            elapsed = time.perf_counter() - began
        runs.append(
            {
                "workers": workers,
                "atoms_per_sec": atoms / elapsed,
                "produce_atoms_per_sec": atoms / produced,
            }
        )
    first = runs[0]["atoms_per_sec"] if runs else 0.0
    for entry in runs:
        entry["speedup"] = entry["atoms_per_sec"] / first if first else 0.0
    return {"partitions": partitions, "atoms": atoms, "workload": "mixed", "levels": runs}


async def _stable(config: Config, workers: int) -> None:
    """Until the broker sees the group stable with `workers` members."""
    async with Admin(config.kafka) as admin:
        while True:  # a probe of the broker's view of the group
            if await admin.group_members(config.kafka.group_id) == ("Stable", workers):
                return
            await anyio.sleep(POLL_SECS)


async def _committed(config: Config, atoms: int) -> None:
    """Until the group has committed `atoms` offsets on the atoms topic."""
    group, topic = config.kafka.group_id, config.topics.atoms
    async with Admin(config.kafka) as admin:
        while True:  # a probe of the group's committed offsets
            if sum((await admin.committed(group, topic)).values()) >= atoms:
                return
            await anyio.sleep(POLL_SECS)


def scaling_lines(report: dict[str, Any]) -> list[str]:
    """The `--workers-scaling` measurement as table lines."""
    lines = [
        f"workers scaling ({report['workload']}, {report['atoms']} atoms over "
        f"{report['partitions']} partitions):"
    ]
    for entry in report["levels"]:
        lines.append(
            f"  {entry['workers']:>2} workers: {entry['atoms_per_sec']:.0f} atoms/s "
            f"({entry['speedup']:.2f}x; fed at {entry['produce_atoms_per_sec']:.0f}/s)"
        )
    return lines
