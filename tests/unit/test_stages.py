"""The bench's stage clocks: off costs nothing and counts nothing; on, each block is added
to its stage."""

from __future__ import annotations

import time

import pytest

from stream.processor.stages import STAGES, StageClock, cpu, wall

pytestmark = pytest.mark.timeout(10)


def test_clocks_add_each_block_to_its_stage_and_report_per_atom() -> None:
    stages = StageClock()
    for _ in range(2):
        with wall(stages, "device"):
            time.sleep(0.01)  # the stage being timed: a wait, which wall time counts
        with cpu(stages, "decode"):
            sum(range(100_000))
    with cpu(stages, "commit"):
        time.sleep(0.01)  # a wait is no CPU time
    assert stages.seconds["device"] >= 0.02
    assert stages.seconds["decode"] > 0
    assert stages.seconds["commit"] < 0.005
    per_atom = stages.per_atom_us(4)
    assert list(per_atom) == list(STAGES)
    assert per_atom["device"] == pytest.approx(1e6 * stages.seconds["device"] / 4)
    assert per_atom["fetch"] == 0.0


def test_with_the_clocks_off_nothing_is_timed() -> None:
    with cpu(None, "decode"), wall(None, "device"):
        pass
    assert StageClock().per_atom_us(0) == dict.fromkeys(STAGES, 0.0)
