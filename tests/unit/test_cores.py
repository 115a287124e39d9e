"""The cores torch may use: affinity capped by a container's CPU quota."""

from __future__ import annotations

import os

import pytest

from stream.embed.cores import quota_cores, usable_cores

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("cpu_max", "v1_quota", "v1_period", "cores"),
    [
        ("max 100000", None, None, None),  # v2, no limit
        ("200000 100000", None, None, 2),
        ("150000 100000", None, None, 2),  # 1.5 CPUs: rounded up
        ("50000 100000", None, None, 1),
        (None, "-1", "100000", None),  # v1, no limit
        (None, "400000", "100000", 4),
        (None, None, None, None),  # no cgroup files
    ],
)
def test_quota_cores(
    cpu_max: str | None, v1_quota: str | None, v1_period: str | None, cores: int | None
) -> None:
    assert quota_cores(cpu_max, v1_quota, v1_period) == cores


def test_usable_cores_is_within_the_affinity() -> None:
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
