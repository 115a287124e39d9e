"""Routing snapshots, pure: exact round trips, folding on from any prefix, which to use."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import msgspec
import pytest

from schemas.control import (
    BackfillConfig,
    BackfillProgress,
    ControlEvent,
    Finalize,
    HandoffRecorded,
    ModelFingerprint,
    PauseMigration,
    ReplayHandoff,
    ReplayProgress,
    ResumeMigration,
    Rollback,
    StartMigration,
    StartReplay,
    WindowClosed,
)
from schemas.routing import MigrationState, Rejection
from schemas.snapshot import MigrationSnapshot, ReplaySnapshot, RoutingSnapshot
from stream.core.replays import Replay
from stream.core.routing import FOLD_VERSION, Migration, RoutingState, apply, initial_state
from stream.core.snapshot import (
    FoldBasis,
    FoldPoint,
    latest_usable,
    snapshot_due,
    snapshot_of,
    state_of,
    unusable_reason,
)

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
BASIS = FoldBasis("a", frozenset({"a", "b", "c"}))


def at(offset: int) -> datetime:
    # Millisecond broker times, as `record_time` makes them.
    return T0 + timedelta(milliseconds=1500 * offset + 7)


def progress(partition: int, offset: int, processed: int | None = None) -> BackfillProgress:
    return BackfillProgress(
        migration_id="m1",
        partition=partition,
        offset=offset,
        processed=processed,
        total=None if processed is None else 40,
    )


# A log through every kind of state: fingerprints, a rejection, two partitions (one counted),
# pause, resume, completion, rollback; then a second migration finalized.
LOG: list[ControlEvent] = [
    ModelFingerprint(model="a", fingerprint="sha256:aa"),
    StartMigration(migration_id="m1", source_model="a", target_model="nope"),
    StartMigration(
        migration_id="m1",
        source_model="a",
        target_model="b",
        backfill=BackfillConfig(target_query_threshold=0.5, rollback_window_secs=60),
    ),
    HandoffRecorded(migration_id="m1", partition=0, offset=100, log_start=10, partitions=2),
    HandoffRecorded(
        migration_id="m1", partition=1, offset=50, log_start=0, partitions=2, counted=True
    ),
    progress(0, 60),
    progress(1, 20, processed=25),
    PauseMigration(migration_id="m1", reason="latency"),
    progress(1, 30, processed=10),  # a late duplicate: the furthest count stays
    ResumeMigration(migration_id="m1"),
    progress(0, 100),
    progress(1, 50, processed=40),
    Rollback(migration_id="m1"),
    StartMigration(migration_id="m2", source_model="a", target_model="c"),
    HandoffRecorded(migration_id="m2", partition=0, offset=5, log_start=0, partitions=1),
    BackfillProgress(migration_id="m2", partition=0, offset=5),
    Finalize(migration_id="m2"),
    WindowClosed(migration_id="m2"),  # after finalize: an internal event that changes nothing
    ModelFingerprint(model="c", fingerprint="sha256:cc"),
    # Replays (v2): one with a handoff and progress on one of its partitions, one just asked.
    StartReplay(
        replay_id="r1",
        model="c",
        partitions=2,
        from_offsets={0: 0, 1: 0},
        to_offsets={0: 30, 1: 20},
    ),
    ReplayHandoff(replay_id="r1", partition=0, offset=40, log_start=0),
    ReplayProgress(replay_id="r1", partition=0, offset=10, processed=5, total=9),
    StartReplay(replay_id="r2", model="c", partitions=1, from_offsets={0: 0}, to_offsets={0: 10}),
]


def fold(
    events: list[ControlEvent], start: RoutingState | None = None, first: int = 0
) -> RoutingState:
    state = start or initial_state(BASIS.stable_model, BASIS.models)
    for offset, event in enumerate(events, start=first):
        state = apply(state, event, offset, at(offset))
    return state


def round_trip(state: RoutingState, next_offset: int) -> RoutingSnapshot:
    point = FoldPoint(next_offset, next_offset - 1, 1_700_000_000_000 + next_offset)
    snapshot = snapshot_of(state, BASIS, point, control_topic="ctl")
    return msgspec.json.decode(msgspec.json.encode(snapshot), type=RoutingSnapshot)


def test_a_snapshot_carries_every_field_of_the_fold_exactly() -> None:
    paused = fold(LOG[:9])
    snapshot = round_trip(paused, 9)
    assert state_of(snapshot) == paused
    assert snapshot.fold_version == FOLD_VERSION == 2
    assert (snapshot.next_offset, snapshot.last_offset) == (9, 8)
    assert snapshot.basis_models == ["a", "b", "c"] and snapshot.used_ids == ["m1"]
    assert snapshot.fingerprints == {"a": "sha256:aa"}
    assert snapshot.last_rejection == Rejection(
        command="start_migration", migration_id="m1", reason="unknown model nope", at=at(1)
    )
    migration = snapshot.migration
    assert migration is not None
    # Paused past the threshold (75 of 130: 50 events of partition 0, 25 atoms of partition 1).
    assert migration.state is MigrationState.PAUSED and migration.query_frozen == "b"
    assert migration.handoffs == {0: 100, 1: 50} and migration.log_starts == {0: 10, 1: 0}
    assert migration.backfilled == {0: 60, 1: 30}
    assert migration.counted == [1] and migration.counts == {1: (25, 40)}
    assert migration.backfill.target_query_threshold == 0.5
    assert (snapshot.control_offset, snapshot.updated_at) == (8, at(8))


def test_a_completed_migration_keeps_its_window_times() -> None:
    completed = fold(LOG[:12])
    snapshot = round_trip(completed, 12)
    assert state_of(snapshot) == completed
    migration = snapshot.migration
    assert migration is not None and migration.state is MigrationState.COMPLETED
    assert migration.cutover_at == at(11)
    assert migration.window_ends_at == at(11) + timedelta(seconds=60)
    assert state_of(snapshot).status() == completed.status()


def test_folding_on_from_a_snapshot_of_any_prefix_equals_the_full_fold() -> None:
    full = fold(LOG)
    assert full.stable_model == "c" and full.used_ids == frozenset({"m1", "m2"})
    assert sorted(full.replays) == ["r1", "r2"] and full.replays["r1"].counts == {0: (5, 9)}
    for split in range(1, len(LOG) + 1):
        restored = state_of(round_trip(fold(LOG[:split]), split))
        assert fold(LOG[split:], start=restored, first=split) == full, split


def test_restored_mappings_are_read_only_like_the_fold_s() -> None:
    migration = state_of(round_trip(fold(LOG[:9]), 9)).migration
    assert migration is not None
    assert isinstance(migration.handoffs, MappingProxyType)
    assert isinstance(migration.counts, MappingProxyType)


def test_unusable_snapshots_say_why() -> None:
    snapshot = round_trip(fold(LOG[:5]), 5)

    def reason(s: RoutingSnapshot, basis: FoldBasis = BASIS, end: int = 5) -> str | None:
        return unusable_reason(s, basis, control_topic="ctl", end_offset=end)

    assert reason(snapshot) is None
    assert reason(msgspec.structs.replace(snapshot, fold_version=1)) == (
        "fold version 1, this processor folds version 2"
    )
    assert reason(msgspec.structs.replace(snapshot, control_topic="old")) == (
        "taken of control topic old, not ctl"
    )
    assert reason(snapshot, FoldBasis("b", BASIS.models)) == ("folded from stable model a, not b")
    assert reason(snapshot, FoldBasis("a", frozenset({"a", "b"}))) == (
        "folded with models ['a', 'b', 'c'], not ['a', 'b']"
    )
    assert reason(snapshot, end=4) == "covers offsets to 5, the control log ends at 4"


def test_the_usable_snapshot_that_covers_the_most_is_chosen() -> None:
    early, late = round_trip(fold(LOG[:3]), 3), round_trip(fold(LOG[:7]), 7)
    foreign = msgspec.structs.replace(round_trip(fold(LOG[:9]), 9), control_topic="x")
    chosen, skipped = latest_usable(
        [late, foreign, early], BASIS, control_topic="ctl", end_offset=20
    )
    assert chosen == late
    assert skipped == ["snapshot to offset 9: taken of control topic x, not ctl"]
    assert latest_usable([], BASIS, control_topic="ctl", end_offset=20) == (None, [])


@pytest.mark.parametrize(
    ("next_offset", "snapshot_offset", "every", "due"),
    [
        (9_999, 0, 10_000, False),
        (10_000, 0, 10_000, True),
        (20_004, 10_005, 10_000, False),
        (20_005, 10_005, 10_000, True),
        (50_000, 0, 0, False),  # 0: snapshots off
    ],
)
def test_a_snapshot_is_due_every_so_many_records(
    next_offset: int, snapshot_offset: int, every: int, due: bool
) -> None:
    assert snapshot_due(next_offset, snapshot_offset, every) is due


def test_a_snapshot_has_a_field_for_every_field_of_the_fold_state() -> None:
    # A field added to the fold state without one here would be lost by every restart.
    assert {f.name for f in dataclasses.fields(Migration)} == set(
        MigrationSnapshot.__struct_fields__
    )
    assert {f.name for f in dataclasses.fields(Replay)} == set(ReplaySnapshot.__struct_fields__)
    state_fields = {f.name for f in dataclasses.fields(RoutingState)} - {"models"}
    assert state_fields <= set(RoutingSnapshot.__struct_fields__)
    assert "basis_models" in RoutingSnapshot.__struct_fields__  # `models` is the basis
