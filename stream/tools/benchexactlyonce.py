"""`bench --exactly-once`: the throughput cost of transactions, measured in one run.

The same backlog of mixed-workload atoms is drained end to end at least once and exactly
once (`[kafka] exactly_once`: one transaction per window and input partition), runs
alternating so that drift on the machine hits both alike. The ratio of the medians is the
figure the README quotes; the issue's aim is at least 0.9.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from stream.config import Config
from stream.embed.pool import ModelPool
from stream.tools.bench import end_to_end
from stream.tools.benchreport import median
from stream.tools.workloads import workload_texts

log = logging.getLogger(__name__)


def exactly_once_config(config: Config) -> Config:
    """`config` with transactions on (they need the idempotent producer)."""
    kafka = msgspec.structs.replace(config.kafka, exactly_once=True, enable_idempotence=True)
    return msgspec.structs.replace(config, kafka=kafka)


async def exactly_once_ratio(
    config: Config, pool: ModelPool, *, atoms: int, runs: int
) -> dict[str, Any]:
    """Median end-to-end atoms/s at least once and exactly once, and their ratio."""
    texts = workload_texts("mixed", atoms, seed=5)
    transactional = exactly_once_config(config)
    at_least_once: list[float] = []
    exactly_once: list[float] = []
    for run in range(runs):
        at_least_once.append((await end_to_end(config, pool, texts))[0].atoms_per_sec)
        exactly_once.append((await end_to_end(transactional, pool, texts))[0].atoms_per_sec)
        log.info(
            "bench exactly-once run %d: at least once %.1f, exactly once %.1f atoms/s",
            run + 1,
            at_least_once[-1],
            exactly_once[-1],
        )
    alo, eos = median(at_least_once), median(exactly_once)
    return {
        "workload": "mixed",
        "atoms": atoms,
        "runs": {"at_least_once": at_least_once, "exactly_once": exactly_once},
        "at_least_once_atoms_per_sec": alo,
        "exactly_once_atoms_per_sec": eos,
        "ratio": eos / alo if alo else 0.0,
    }
