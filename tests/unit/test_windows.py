"""Pure decisions of the live path: the window deadline and a partition's write models."""

from __future__ import annotations

import pytest

from schemas.control import BackfillConfig
from schemas.routing import MigrationState
from stream.core.routing import Migration
from stream.core.windows import partition_write_models, partitions_to_backfill, window_deadline

pytestmark = pytest.mark.timeout(10)

WALL = 1_700_000_000.0  # the wall clock "now", in seconds


def deadline(*stamps_ms: int | None, since_last_fetch: float = 5.0) -> float:
    """The deadline on a monotonic clock that reads 100.0 now, max wait 50 ms."""
    return window_deadline(
        now=100.0,
        wall_now=WALL,
        stamps_ms=list(stamps_ms),
        since_last_fetch=since_last_fetch,
        max_wait_secs=0.050,
    )


def ms(seconds_ago: float) -> int:
    return int((WALL - seconds_ago) * 1000)


def test_an_atom_that_just_arrived_gets_the_full_wait() -> None:
    assert deadline(ms(0)) == pytest.approx(100.050)
    assert deadline(None, 0) == pytest.approx(100.050)  # no usable timestamp: full wait


def test_time_waited_in_the_buffer_counts_and_the_oldest_atom_decides() -> None:
    assert deadline(ms(0.010), ms(0.040), ms(0)) == pytest.approx(100.010)
    assert deadline(ms(0.200)) == pytest.approx(100.0)  # waited longer than max wait: now


def test_skewed_producer_clocks_are_bounded() -> None:
    # A clock far behind cannot claim more waiting than the time since the last fetch ...
    assert deadline(ms(3600.0), since_last_fetch=0.040) == pytest.approx(100.010)
    # ... and one ahead never makes the window wait longer than max wait.
    assert deadline(ms(-60.0)) == pytest.approx(100.050)


def migration(*, dual_write: bool, handoffs: dict[int, int], state: MigrationState) -> Migration:
    return Migration(
        migration_id="m1",
        source="a",
        target="b",
        backfill=BackfillConfig(dual_write=dual_write),
        state=state,
        handoffs=handoffs,
    )


def test_write_models_follow_the_routing_without_a_migration() -> None:
    assert partition_write_models(["a"], None, 0) == ("a",)


def test_dual_write_sends_every_partition_to_the_routing_write_models() -> None:
    active = migration(dual_write=True, handoffs={}, state=MigrationState.IN_PROGRESS)
    assert partition_write_models(["a", "b"], active, 0) == ("a", "b")


def test_without_dual_write_a_partition_joins_the_target_at_its_handoff() -> None:
    active = migration(dual_write=False, handoffs={1: 40}, state=MigrationState.IN_PROGRESS)
    assert partition_write_models(["a"], active, 0) == ("a",)
    assert partition_write_models(["a"], active, 1) == ("a", "b")
    paused = migration(dual_write=False, handoffs={1: 40}, state=MigrationState.PAUSED)
    assert partition_write_models(["a"], paused, 1) == ("a", "b")
    failed = migration(dual_write=False, handoffs={1: 40}, state=MigrationState.FAILED)
    assert partition_write_models(["a"], failed, 1) == ("a",)


def test_backfill_work_is_the_owned_partitions_short_of_their_handoff() -> None:
    active = Migration(
        migration_id="m1",
        source="a",
        target="b",
        backfill=BackfillConfig(),
        handoffs={0: 10, 1: 20, 2: 0},
        backfilled={0: 10, 1: 5},
    )
    assert partitions_to_backfill(active, [0, 1, 2, 3], done=set()) == [1]
    assert partitions_to_backfill(active, [0, 1, 2, 3], done={1}) == []
    paused = migration(dual_write=True, handoffs={1: 20}, state=MigrationState.PAUSED)
    assert partitions_to_backfill(paused, [1], done=set()) == []
    assert partitions_to_backfill(None, [1], done=set()) == []


def test_without_dual_write_partitions_without_a_handoff_chase_the_head() -> None:
    chasing = migration(dual_write=False, handoffs={1: 40}, state=MigrationState.IN_PROGRESS)
    assert partitions_to_backfill(chasing, [0, 1], done=set()) == [0, 1]
    assert partitions_to_backfill(chasing, [0, 1], done={1}) == [0]
