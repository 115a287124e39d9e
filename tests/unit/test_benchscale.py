"""The scale bench's resume time: progress under the final owners, not the old ones."""

from __future__ import annotations

import math

import pytest

from stream.tools.benchscale import Progress, resume_secs

pytestmark = pytest.mark.timeout(10)


def test_progress_before_the_last_reassignment_does_not_count() -> None:
    samples = [
        (11.0, {0: (50, 100), 1: (100, 100)}),  # the survivor still moves 0 on
        (20.0, {0: (60, 100), 1: (100, 100)}),  # reassigned at 20 (checked at 20)
        (30.0, {0: (60, 100), 1: (100, 100)}),  # the new owner rebuilds its state
        (42.0, {0: (61, 100), 1: (100, 100)}),  # and moves it on
    ]
    assert resume_secs(10.0, 20.0, samples) == pytest.approx(32.0)


def test_a_partition_that_never_resumes_gives_nan() -> None:
    samples = [(20.0, {0: (60, 100)}), (30.0, {0: (60, 100)})]
    assert math.isnan(resume_secs(10.0, 20.0, samples))


def test_no_unfinished_partition_resumes_at_the_reassignment() -> None:
    assert resume_secs(10.0, 25.0, [(25.0, {0: (100, 100)})]) == pytest.approx(15.0)
    assert math.isnan(resume_secs(None, None, []))


def test_atoms_left_count_only_the_given_partitions() -> None:
    progress = Progress(counts={0: (10, 50), 1: (40, 40), 2: (0, 30)})
    assert progress.left([0, 2]) == 70
    assert progress.left([1]) == 0
    assert progress.left([]) == 0
