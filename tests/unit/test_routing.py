"""The migration state machine: the routing matrix, legal transitions, and properties over
random control logs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.control import (
    BackfillConfig,
    BackfillProgress,
    CancelMigration,
    ControlEvent,
    Finalize,
    HandoffRecorded,
    MigrationFailed,
    ModelFingerprint,
    PauseMigration,
    ResumeMigration,
    Rollback,
    StartMigration,
    WindowClosed,
)
from schemas.routing import MigrationState, RoutingPhase
from stream.core.routing import RoutingState, apply, initial_state

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
MODELS = {"a", "b", "c"}


def replay(events: list[ControlEvent], *, start: RoutingState | None = None) -> RoutingState:
    state = start or initial_state("a", MODELS)
    for offset, event in enumerate(events):
        state = apply(state, event, offset, T0 + timedelta(seconds=offset))
    return state


def begin(**backfill: object) -> StartMigration:
    return StartMigration(
        migration_id="m1",
        source_model="a",
        target_model="b",
        backfill=BackfillConfig(**backfill),  # type: ignore[arg-type]
    )


def handoff(
    partition: int, offset: int, *, partitions: int = 2, log_start: int = 0
) -> HandoffRecorded:
    return HandoffRecorded(
        migration_id="m1",
        partition=partition,
        offset=offset,
        log_start=log_start,
        partitions=partitions,
    )


def progress(partition: int, offset: int) -> BackfillProgress:
    return BackfillProgress(migration_id="m1", partition=partition, offset=offset)


def test_routing_matrix_through_a_whole_migration() -> None:
    state = replay([begin(target_query_threshold=0.5, rollback_window_secs=60)])
    config = state.routing_config()
    assert (config.query_model, config.write_models, config.phase) == (
        "a",
        ("a", "b"),
        RoutingPhase.MIGRATING,
    )
    status = state.status()
    assert status.progress is not None and status.progress.total is None
    state = replay([handoff(0, 100)], start=state)
    assert state.migration is not None and state.migration.progress.total is None, (
        "unknown until every partition has a handoff, never 0"
    )
    state = replay([handoff(1, 100), progress(0, 99)], start=state)
    assert state.route_query() == "a", "99/200 is under the threshold"
    state = replay([progress(0, 100)], start=state)
    assert state.route_query() == "b", "100/200 reaches it"
    state = replay([progress(1, 100)], start=state)
    assert state.migration is not None and state.migration.state is MigrationState.COMPLETED
    assert state.routing_config().phase is RoutingPhase.ROLLBACK_WINDOW
    assert state.routing_config().write_models == ("a", "b")
    ends = state.migration.window_ends_at
    assert ends is not None and state.migration.cutover_at is not None
    assert ends - state.migration.cutover_at == timedelta(seconds=60)
    closed = apply(state, WindowClosed(migration_id="m1"), 99, T0 + timedelta(hours=1))
    assert closed.routing_config().write_models == ("b",) and closed.stable_model == "b"
    assert closed.routing_config().phase is RoutingPhase.STABLE
    rolled = apply(state, Rollback(migration_id="m1"), 99, T0)
    assert rolled.routing_config().write_models == ("a",) and rolled.route_query() == "a"
    late = apply(closed, Rollback(migration_id="m1"), 100, T0)
    assert late.last_rejection is not None and late.routing_config() == closed.routing_config()


def test_total_zero_completes_at_once_and_window_end_is_from_the_cutover_record() -> None:
    state = replay([begin(rollback_window_secs=10), handoff(0, 5, log_start=5), handoff(1, 0)])
    migration = state.migration
    assert migration is not None and migration.state is MigrationState.COMPLETED
    assert migration.cutover_at == T0 + timedelta(seconds=2)
    assert migration.window_ends_at == T0 + timedelta(seconds=12)


def test_pause_keeps_dual_write_and_freezes_query_and_resume_completes() -> None:
    state = replay([begin(target_query_threshold=0.5), handoff(0, 10), handoff(1, 10)])
    state = replay([PauseMigration(migration_id="m1")], start=state)
    assert state.routing_config().write_models == ("a", "b")
    state = replay([progress(0, 10), progress(1, 10)], start=state)
    assert state.migration is not None and state.migration.state is MigrationState.PAUSED
    assert state.route_query() == "a", "frozen at pause"
    state = replay([ResumeMigration(migration_id="m1")], start=state)
    assert state.migration is not None and state.migration.state is MigrationState.COMPLETED


def test_dual_write_false_writes_source_only_while_in_progress() -> None:
    state = replay([begin(dual_write=False)])
    assert state.routing_config().write_models == ("a",)


def test_failed_then_resumed_needs_new_handoffs() -> None:
    state = replay([begin(), handoff(0, 10), MigrationFailed(migration_id="m1", reason="x")])
    assert state.routing_config().write_models == ("a",)
    state = replay([ResumeMigration(migration_id="m1")], start=state)
    assert state.migration is not None and state.migration.epoch == 1
    assert state.migration.handoffs == {}


def test_illegal_commands_are_rejected_with_a_reason() -> None:
    cases: list[tuple[list[ControlEvent], ControlEvent, str]] = [
        ([], Rollback(migration_id="m1"), "no migration m1"),
        ([], PauseMigration(migration_id="m1"), "no migration m1"),
        (
            [],
            StartMigration(migration_id="m1", source_model="a", target_model="zz"),
            "unknown model zz",
        ),
        (
            [],
            StartMigration(migration_id="m1", source_model="b", target_model="c"),
            "source_model b is not the stable model a",
        ),
        (
            [],
            StartMigration(migration_id="m1", source_model="a", target_model="a"),
            "target_model must differ from source_model",
        ),
        ([begin()], begin(), "migration m1 is in_progress; start is legal only when no migration"),
        ([begin()], Finalize(migration_id="m1"), "cannot finalize a migration that is in_progress"),
        ([begin()], Rollback(migration_id="m1"), "cannot rollback a migration that is in_progress"),
        (
            [begin()],
            ResumeMigration(migration_id="m1"),
            "cannot resume a migration that is in_progress",
        ),
        (
            [begin(), PauseMigration(migration_id="m1")],
            PauseMigration(migration_id="m1"),
            "cannot pause a migration that is paused",
        ),
        (
            [begin(), CancelMigration(migration_id="m1")],
            CancelMigration(migration_id="m1"),
            "cannot cancel a migration that is cancelled",
        ),
        ([begin(), CancelMigration(migration_id="m1")], begin(), "migration id m1 was used before"),
        ([begin()], CancelMigration(migration_id="m2"), "no migration m2"),
    ]
    for before, command, reason in cases:
        state = replay(before)
        after = apply(state, command, 50, T0)
        assert after.last_rejection is not None and after.last_rejection.reason.startswith(reason)
        assert after.routing_config() == state.routing_config()
        assert after.migration == state.migration


def test_the_first_fingerprint_of_a_model_name_wins() -> None:
    first = ModelFingerprint(model="a", fingerprint="sha256:1")
    state = replay([first, ModelFingerprint(model="b", fingerprint="sha256:2"), first])
    assert state.fingerprints == {"a": "sha256:1", "b": "sha256:2"}
    assert state.last_rejection is None, "a copy from an instance starting alongside is harmless"
    assert state.status().fingerprints == {"a": "sha256:1", "b": "sha256:2"}
    after = apply(state, ModelFingerprint(model="a", fingerprint="sha256:9"), 3, T0)
    assert after.fingerprints == state.fingerprints
    assert after.last_rejection is not None
    assert (after.last_rejection.command, after.last_rejection.migration_id) == (
        "model_fingerprint",
        None,
    )
    assert after.last_rejection.reason == (
        "model a has fingerprint sha256:1 in the control log; sha256:9 needs a new model name"
    )
    assert after.control_offset == 3 and routing_part(after) == routing_part(state)


def test_fingerprints_do_not_touch_the_routing() -> None:
    migrating = replay([begin(), handoff(0, 10)])
    state = replay([ModelFingerprint(model="b", fingerprint="sha256:2")], start=migrating)
    assert routing_part(state)[:4] == routing_part(migrating)[:4]
    assert state.fingerprints == {"b": "sha256:2"}
    assert initial_state("a", MODELS).status().fingerprints is None


# -- properties over random control logs ------------------------------------------------------

ids = st.sampled_from(["m1", "m2"])
commands = st.one_of(
    st.builds(
        StartMigration,
        migration_id=ids,
        source_model=st.sampled_from(["a", "b"]),
        target_model=st.sampled_from(["a", "b", "c", "zz"]),
        backfill=st.builds(
            BackfillConfig,
            dual_write=st.booleans(),
            target_query_threshold=st.sampled_from([0.0, 0.5, 1.0]),
            rollback_window_secs=st.sampled_from([0, 30]),
        ),
    ),
    st.builds(PauseMigration, migration_id=ids),
    st.builds(ResumeMigration, migration_id=ids),
    st.builds(CancelMigration, migration_id=ids),
    st.builds(Rollback, migration_id=ids),
    st.builds(Finalize, migration_id=ids),
    st.builds(WindowClosed, migration_id=ids),
    st.builds(MigrationFailed, migration_id=ids, reason=st.just("boom")),
    st.builds(
        HandoffRecorded,
        migration_id=ids,
        partition=st.integers(0, 1),
        offset=st.integers(0, 20),
        log_start=st.just(0),
        partitions=st.just(2),
    ),
    st.builds(
        BackfillProgress, migration_id=ids, partition=st.integers(0, 1), offset=st.integers(0, 20)
    ),
    st.builds(
        ModelFingerprint,
        model=st.sampled_from(["a", "b"]),
        fingerprint=st.sampled_from(["sha256:1", "sha256:2"]),
    ),
)


def routing_part(state: RoutingState) -> tuple[object, ...]:
    return (
        state.stable_model,
        state.migration,
        state.used_ids,
        state.routing_config(),
        dict(state.fingerprints),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(commands, max_size=30))
def test_random_logs(events: list[ControlEvent]) -> None:
    assert replay(events) == replay(events), "replaying the same log gives the same state"
    state = initial_state("a", MODELS)
    for offset, event in enumerate(events):
        before = state
        state = apply(state, event, offset, T0 + timedelta(seconds=offset))
        config = state.routing_config()
        assert config.write_models, "the write set is never empty"
        assert set(config.write_models) <= MODELS and config.query_model in MODELS
        migration = state.active
        if (
            migration is not None
            and migration.state is MigrationState.IN_PROGRESS
            and config.query_model == migration.target
        ):
            assert migration.threshold_reached, "no target query before the threshold"
        if isinstance(event, Rollback) and state.last_rejection is before.last_rejection:
            previous = before.migration
            assert previous is not None and previous.state is MigrationState.COMPLETED
            assert not previous.window_closed, "rollback only inside the window"
        if state.last_rejection is not before.last_rejection:
            assert routing_part(state) == routing_part(before), "a rejection changes nothing"
        for model, fingerprint in before.fingerprints.items():
            assert state.fingerprints[model] == fingerprint, "a recorded fingerprint never changes"
        phase_window = config.phase is RoutingPhase.ROLLBACK_WINDOW
        completed_open = (
            state.migration is not None
            and state.migration.state is MigrationState.COMPLETED
            and not state.migration.window_closed
        )
        assert phase_window == completed_open
