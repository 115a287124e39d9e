"""How many cores this process may use: its CPU affinity, capped by a container's quota.

torch sizes its intra-op thread pool from the machine's cores, not from a container's CPU
limit; a pod limited to 2 CPUs on a 64-core node then runs dozens of spinning threads on 2
cores, and small batches take many times longer (measured: two processes of 2 threads each
on a 2-core host made a 4-layer model's cost per atom about 10x the single-thread figure).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def quota_cores(cpu_max: str | None, v1_quota: str | None, v1_period: str | None) -> int | None:
    """Cores a CPU quota allows (rounded up), from cgroup v2's `cpu.max` ("max 100000" or
    "200000 100000") or cgroup v1's quota and period (quota -1: none); None without one."""
    quota: float | None = None
    period: float | None = None
    if cpu_max is not None:
        fields = cpu_max.split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = float(fields[0]), float(fields[1])
    elif v1_quota is not None and v1_period is not None and int(v1_quota) > 0:
        quota, period = float(v1_quota), float(v1_period)
    if quota is None or period is None or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota = quota_cores(_read(CGROUP_V2_MAX), _read(CGROUP_V1_QUOTA), _read(CGROUP_V1_PERIOD))
    except ValueError:  # an unreadable quota file: no cap
        quota = None
    return max(1, min(cores, quota) if quota is not None else cores)
