"""The replay state machine (`stream.core.replays` through `routing.apply`), exact values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.control import (
    BackfillConfig,
    CancelMigration,
    CancelReplay,
    ControlEvent,
    ReplayHandoff,
    ReplayProgress,
    StartMigration,
    StartReplay,
)
from schemas.routing import Progress, ReplayState, ReplayStatus
from stream.core.replays import replay_partitions_with_work
from stream.core.routing import RoutingState, apply, initial_state

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def run(events: list[ControlEvent], *, start: RoutingState | None = None) -> RoutingState:
    state = start or initial_state("a", {"a", "b"})
    first = 0 if state.control_offset is None else state.control_offset + 1
    for offset, event in enumerate(events, start=first):
        state = apply(state, event, offset, T0 + timedelta(seconds=offset))
    return state


def request(
    replay_id: str = "r1",
    model: str = "a",
    *,
    frm: dict[int, int] | None = None,
    to: dict[int, int] | None = None,
) -> StartReplay:
    return StartReplay(
        replay_id=replay_id,
        model=model,
        partitions=2,
        from_offsets=frm if frm is not None else {0: 10, 1: 0},
        to_offsets=to if to is not None else {0: 50, 1: 30},
        command_id="c1",
    )


def handoff(partition: int, offset: int, log_start: int = 0) -> ReplayHandoff:
    return ReplayHandoff(replay_id="r1", partition=partition, offset=offset, log_start=log_start)


def progress(
    partition: int, offset: int, processed: int | None = None, total: int | None = None
) -> ReplayProgress:
    return ReplayProgress(
        replay_id="r1", partition=partition, offset=offset, processed=processed, total=total
    )


def test_a_replay_ends_at_the_range_end_or_the_handoff_and_completes_with_its_last_partition() -> (
    None
):
    state = run([request()])
    replay = state.replays["r1"]
    assert (replay.state, replay.requested_at, replay.events) == (ReplayState.IN_PROGRESS, T0, 70)
    assert [replay.needs_handoff(p) for p in (0, 1)] == [True, True]
    assert replay.progress == Progress(processed=0, total=None)

    state = run([handoff(0, 40, log_start=15), handoff(1, 90)], start=state)
    replay = state.replays["r1"]
    assert (replay.start(0), replay.end(0)) == (15, 40), "log start and handoff bound it"
    assert (replay.start(1), replay.end(1)) == (0, 30), "the range end bounds it"
    assert replay_partitions_with_work(replay, [0, 1], done=()) == [0, 1]
    assert replay_partitions_with_work(replay, [1], done={1}) == []

    state = run([progress(0, 20, 0, 12), progress(1, 30, 7, 7)], start=state)
    replay = state.replays["r1"]
    assert replay.state is ReplayState.IN_PROGRESS
    assert replay.progress == Progress(processed=7, total=19)
    assert replay_partitions_with_work(replay, [0, 1], done=()) == [0]

    # A late, smaller duplicate does not move progress back.
    state = run([progress(0, 30, 5, 12), progress(0, 25, 3, 12)], start=state)
    assert state.replays["r1"].counts[0] == (5, 12)
    assert state.replays["r1"].reached[0] == 30

    state = run([progress(0, 40, 12, 12)], start=state)
    replay = state.replays["r1"]
    assert replay.state is ReplayState.COMPLETED
    assert replay.ended_at == T0 + timedelta(seconds=state.control_offset or 0)
    assert replay.progress == Progress(processed=19, total=19)
    assert state.status().replays is None, "only replays in progress are in the status"
    late = run([progress(0, 41, 12, 12)], start=state)
    assert late.replays == state.replays and late.last_rejection is None


def test_empty_ranges_and_handoffs_below_the_range_need_no_work() -> None:
    state = run([request(frm={0: 5, 1: 9}, to={0: 5, 1: 20})])
    replay = state.replays["r1"]
    assert [replay.needs_handoff(p) for p in (0, 1)] == [False, True]
    assert replay.partition_done(0) and not replay.done
    # The owner was behind the range: the live path writes all of it.
    state = run([handoff(1, 7)], start=state)
    replay = state.replays["r1"]
    assert replay.state is ReplayState.COMPLETED
    assert replay.progress == Progress(processed=0, total=0)


def test_the_status_lists_replays_in_progress() -> None:
    state = run([request(), handoff(0, 40), progress(0, 20, 2, 9)])
    status = state.status()
    assert status.replays == [
        ReplayStatus(
            replay_id="r1",
            model="a",
            state=ReplayState.IN_PROGRESS,
            progress=Progress(processed=2, total=None),
            events=70,
        )
    ]


def test_illegal_requests_are_rejected_with_their_reason() -> None:
    state = run([request(model="b")])
    assert state.replays == {}
    assert state.last_rejection is not None
    assert state.last_rejection.command == "start_replay"
    assert state.last_rejection.command_id == "c1"
    assert state.last_rejection.reason == (
        "model b is not in the write set (a): a replay writes only a model the processors write"
    )
    state = run([request(frm={0: 0})])
    assert state.last_rejection is not None
    assert state.last_rejection.reason == "from_offsets must name every partition 0..1, got [0]"
    state = run([request(), request()])
    assert state.last_rejection is not None
    assert state.last_rejection.reason == "replay id r1 was used before"
    state = run([CancelReplay(replay_id="nope")])
    assert state.last_rejection is not None and state.last_rejection.reason == "no replay nope"
    # An internal event that lost a race changes nothing and is no rejection.
    state = run([request(), CancelReplay(replay_id="r1"), handoff(0, 3)])
    assert state.replays["r1"].state is ReplayState.CANCELLED
    assert state.replays["r1"].handoffs == {}
    assert state.last_rejection is None


def test_the_first_handoff_wins() -> None:
    state = run([request(), handoff(0, 40), handoff(0, 45)])
    assert state.replays["r1"].handoffs == {0: 40}


def test_a_replay_whose_model_leaves_the_write_set_is_abandoned() -> None:
    migrate = StartMigration(
        migration_id="m1", source_model="a", target_model="b", backfill=BackfillConfig()
    )
    state = run([migrate, request(replay_id="r1", model="b"), request(replay_id="r2", model="a")])
    assert {r.state for r in state.replays.values()} == {ReplayState.IN_PROGRESS}
    state = run([CancelMigration(migration_id="m1")], start=state)
    abandoned = state.replays["r1"]
    assert abandoned.state is ReplayState.ABANDONED
    assert abandoned.reason == "model b left the write set"
    assert abandoned.ended_at == T0 + timedelta(seconds=3)
    assert state.replays["r2"].state is ReplayState.IN_PROGRESS
    assert replay_partitions_with_work(abandoned, [0, 1], done=()) == []
