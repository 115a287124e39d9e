"""The model-time scheduler between live and backfill: exact values, then properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.scheduler import (
    Decision,
    RateEstimate,
    ShareScheduler,
    Step,
    chunk_atoms,
    chunk_prefix,
)

# min_share 0.25, chunks of 0.25 s: the live cap is 0.25 * 0.75 / 0.25 = 0.75 s. Values chosen to
# be exact in binary where the assertions compare with ==.


def make(min_share: float = 0.25, chunk_secs: float = 0.25) -> ShareScheduler:
    return ShareScheduler(min_share, chunk_secs)


def test_nothing_to_do_is_idle() -> None:
    assert make().next_step(live_waiting=False, backfill_pending=False) == Decision(Step.IDLE)


def test_live_alone_runs_without_a_cap() -> None:
    scheduler = make()
    for i in range(3):
        assert scheduler.next_step(live_waiting=True, backfill_pending=False) == Decision(Step.LIVE)
        scheduler.record_live(0.5, now=float(i))


def test_backfill_alone_gets_full_chunks() -> None:
    scheduler = make()
    for i in range(3):
        assert scheduler.next_step(live_waiting=False, backfill_pending=True) == Decision(
            Step.BACKFILL, 0.25
        )
        scheduler.record_backfill(0.25, now=float(i))


def test_both_waiting_alternate_whole_quanta() -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=True, backfill_pending=False)
    scheduler.record_live(0.6, now=0.6)  # a live window before the migration began
    steps = []
    for i in range(6):
        decision = scheduler.next_step(live_waiting=True, backfill_pending=True)
        steps.append(decision)
        if decision.step is Step.LIVE:
            scheduler.record_live(0.75, now=1.0 + i)
        else:
            scheduler.record_backfill(0.25, now=1.0 + i)
    assert steps == [Decision(Step.BACKFILL, 0.25), Decision(Step.LIVE, 0.75)] * 3


def test_a_chunk_that_ran_short_still_hands_over_to_live() -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=False, backfill_pending=True)
    scheduler.record_backfill(0.01, now=0.01)  # e.g. a model-free keys-pass step
    assert scheduler.next_step(live_waiting=True, backfill_pending=True) == Decision(
        Step.LIVE, 0.75
    )


def test_a_long_live_window_after_a_chunk_is_followed_by_one_more() -> None:
    """After a chunk, a live window of at least half a chunk (0.125 s) gets one more live
    window with what the cap (0.75 s) has left, then the next chunk: only one."""
    scheduler = make()
    scheduler.next_step(live_waiting=False, backfill_pending=True)
    scheduler.record_backfill(0.25, now=0.25)
    steps = []
    for seconds in (0.375, 0.25):
        steps.append(scheduler.next_step(live_waiting=True, backfill_pending=True))
        scheduler.record_live(seconds, now=1.0)
    steps.append(scheduler.next_step(live_waiting=True, backfill_pending=True))
    assert steps == [
        Decision(Step.LIVE, 0.75),
        Decision(Step.LIVE, 0.375),
        Decision(Step.BACKFILL, 0.25),
    ]


@pytest.mark.parametrize(
    "first_window",
    [
        0.0625,  # under half a chunk (0.125 s): few atoms came meanwhile
        0.6875,  # 0.0625 s left under the cap (0.75 s): under half a chunk
    ],
)
def test_no_second_live_window_after_a_short_one_or_near_the_cap(first_window: float) -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=False, backfill_pending=True)
    scheduler.record_backfill(0.25, now=0.25)
    assert scheduler.next_step(live_waiting=True, backfill_pending=True) == Decision(
        Step.LIVE, 0.75
    )
    scheduler.record_live(first_window, now=1.0)
    assert scheduler.next_step(live_waiting=True, backfill_pending=True) == Decision(
        Step.BACKFILL, 0.25
    )


def test_live_windows_before_backfill_had_work_do_not_drain() -> None:
    """A migration starts after a long live window: backfill gets the first turn."""
    scheduler = make()
    scheduler.next_step(live_waiting=True, backfill_pending=False)
    scheduler.record_live(0.5, now=0.5)
    assert scheduler.next_step(live_waiting=True, backfill_pending=True) == Decision(
        Step.BACKFILL, 0.25
    )


def test_live_cap() -> None:
    assert make().live_cap_secs == 0.75
    assert ShareScheduler(0.5, 0.25).live_cap_secs == 0.25


def test_share_window_decays() -> None:
    scheduler = ShareScheduler(0.25, 0.3, window_secs=1.0)
    assert scheduler.backfill_share(0.0) is None
    scheduler.next_step(live_waiting=False, backfill_pending=True)
    scheduler.record_backfill(1.0, now=0.0)
    scheduler.next_step(live_waiting=True, backfill_pending=False)
    scheduler.record_live(1.0, now=1.0)  # backfill's second is one half-life old
    assert scheduler.backfill_share(1.0) == pytest.approx(0.5 / 1.5)
    assert scheduler.backfill_share(2.0) == pytest.approx(0.5 / 1.5), "decay keeps ratios"


@pytest.mark.parametrize(
    ("min_share", "chunk_secs", "window_secs"),
    [(0.0, 0.3, 1.0), (1.0, 0.3, 1.0), (0.25, 0.0, 1.0), (0.25, 0.3, 0.0)],
)
def test_bad_settings_are_refused(min_share: float, chunk_secs: float, window_secs: float) -> None:
    with pytest.raises(ValueError):
        ShareScheduler(min_share, chunk_secs, window_secs=window_secs)


def test_negative_or_nan_seconds_are_refused() -> None:
    scheduler = make()
    with pytest.raises(ValueError):
        scheduler.record_live(-0.1, now=0.0)
    with pytest.raises(ValueError):
        scheduler.record_backfill(math.nan, now=0.0)


def test_chunk_atoms() -> None:
    assert chunk_atoms(0.2, 0.01) == 20
    assert chunk_atoms(0.3, 0.1) == 3, "0.3 / 0.1 is 2.9999999999999996 in floats"
    assert chunk_atoms(0.001, 0.01) == 1
    assert chunk_atoms(10.0, 0.001, max_atoms=500) == 500
    assert chunk_atoms(0.2, 0.0, max_atoms=64) == 64
    assert chunk_atoms(0.0, 0.01, min_atoms=4, max_atoms=8) == 4
    with pytest.raises(ValueError):
        chunk_atoms(0.2, 0.01, min_atoms=0)


def test_chunk_prefix() -> None:
    sizes = [100, 100, 400, 100]
    assert chunk_prefix(sizes, 0.2, secs_per_byte=0.001) == 2
    assert chunk_prefix(sizes, 0.6, secs_per_byte=0.001) == 3
    assert chunk_prefix(sizes, 0.7, secs_per_byte=0.001) == 4
    assert chunk_prefix(sizes, 0.7, secs_per_byte=0.001, max_atoms=2) == 2
    assert chunk_prefix(sizes, 0.01, secs_per_byte=0.001) == 1, "always progress"
    assert chunk_prefix(sizes, 0.25, secs_per_byte=0.001, secs_per_atom=0.05) == 1
    assert chunk_prefix([], 1.0, secs_per_byte=0.001) == 0
    # A floor: a slow model's chunk still batches `min_atoms`, past the budget if need be.
    assert chunk_prefix(sizes, 0.01, secs_per_byte=0.001, min_atoms=3) == 3
    assert chunk_prefix(sizes, 0.7, secs_per_byte=0.001, min_atoms=3) == 4, "budget above it"
    assert chunk_prefix(sizes[:2], 0.01, secs_per_byte=0.001, min_atoms=3) == 2, "all there is"
    with pytest.raises(ValueError):
        chunk_prefix(sizes, 1.0, secs_per_byte=0.001, max_atoms=0)
    with pytest.raises(ValueError):
        chunk_prefix(sizes, 1.0, secs_per_byte=0.001, min_atoms=5, max_atoms=4)


def test_rate_estimate() -> None:
    rate = RateEstimate(0.01, weight=0.5)
    rate.observe(10, 0.2)  # measured 0.02
    assert rate.secs_per_unit == pytest.approx(0.015)
    rate.observe(0, 1.0)
    rate.observe(5, 0.0)
    assert rate.secs_per_unit == pytest.approx(0.015)
    with pytest.raises(ValueError):
        RateEstimate(0.0)
    with pytest.raises(ValueError):
        RateEstimate(0.01, weight=0.0)


# Properties: simulated runs of a live owner that does exactly what the scheduler says.

shares = st.floats(min_value=0.05, max_value=0.75)
chunks = st.floats(min_value=0.01, max_value=1.0)


@settings(max_examples=60, deadline=None)
@given(
    min_share=shares,
    chunk_secs=chunks,
    windows=st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=50, max_size=50),
    overrun=st.lists(st.floats(min_value=0.8, max_value=1.2), min_size=50, max_size=50),
)
def test_backfill_gets_at_least_min_share_under_continuous_live(
    min_share: float, chunk_secs: float, windows: list[float], overrun: list[float]
) -> None:
    """Live always waiting with windows up to the cap, chunks within 20% of their budget:
    backfill's share is at least what a chunk 20% short leaves it next to a full window,
    and min_share itself when live is saturated (every window at the cap)."""
    scheduler = ShareScheduler(min_share, chunk_secs, window_secs=1e9)
    now = live = backfill = 0.0
    for i in range(4000):
        decision = scheduler.next_step(live_waiting=True, backfill_pending=True)
        if decision.step is Step.LIVE:
            assert decision.budget_secs is not None
            assert decision.budget_secs <= scheduler.live_cap_secs
            seconds = windows[i % len(windows)] * decision.budget_secs
            now += seconds
            live += seconds
            scheduler.record_live(seconds, now)
        else:
            assert decision.step is Step.BACKFILL
            assert decision.budget_secs is not None
            assert decision.budget_secs <= chunk_secs
            seconds = decision.budget_secs * overrun[i % len(overrun)]
            now += seconds
            backfill += seconds
            scheduler.record_backfill(seconds, now)
    floor = 0.8 * min_share / (0.8 * min_share + 1.0 - min_share)
    assert backfill / (live + backfill) >= floor - 1e-9
    share = scheduler.backfill_share(now)
    assert share is not None
    assert share >= floor - 1e-6


def test_saturated_live_leaves_backfill_exactly_min_share() -> None:
    scheduler = ShareScheduler(0.25, 0.25, window_secs=1e9)
    now = 0.0
    for _ in range(100):
        decision = scheduler.next_step(live_waiting=True, backfill_pending=True)
        assert decision.budget_secs is not None
        now += decision.budget_secs  # each step takes exactly its budget
        if decision.step is Step.LIVE:
            scheduler.record_live(decision.budget_secs, now)
        else:
            scheduler.record_backfill(decision.budget_secs, now)
    assert scheduler.backfill_share(now) == pytest.approx(0.25)


@settings(max_examples=60, deadline=None)
@given(
    min_share=shares,
    chunk_secs=chunks,
    windows=st.lists(st.floats(min_value=0.01, max_value=5.0), min_size=1, max_size=20),
)
def test_backfill_never_starves_even_with_uncapped_live_windows(
    min_share: float, chunk_secs: float, windows: list[float]
) -> None:
    """A caller that ignores the live cap: backfill still runs after at most two live
    windows, and the second only while the first left room under the cap."""
    scheduler = ShareScheduler(min_share, chunk_secs)
    most = 2
    now = 0.0
    steps = []
    in_a_row, live_since_chunk = 0, 0.0
    for i in range(200):
        decision = scheduler.next_step(live_waiting=True, backfill_pending=True)
        steps.append(decision.step)
        if decision.step is Step.LIVE:
            assert live_since_chunk < scheduler.live_cap_secs
            in_a_row += 1
            assert in_a_row <= most
            now += windows[i % len(windows)]
            live_since_chunk += windows[i % len(windows)]
            scheduler.record_live(windows[i % len(windows)], now)
        else:
            assert decision.budget_secs is not None
            in_a_row, live_since_chunk = 0, 0.0
            now += decision.budget_secs
            scheduler.record_backfill(decision.budget_secs, now)
    assert steps[0] is Step.BACKFILL
    assert steps.count(Step.BACKFILL) >= 200 // (most + 1)


@settings(max_examples=60, deadline=None)
@given(
    min_share=shares,
    chunk_secs=chunks,
    spare=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=30),
)
def test_with_live_idle_backfill_gets_everything(
    min_share: float, chunk_secs: float, spare: list[float]
) -> None:
    scheduler = ShareScheduler(min_share, chunk_secs)
    now = 0.0
    for seconds in spare * 5:
        decision = scheduler.next_step(live_waiting=False, backfill_pending=True)
        assert decision == Decision(Step.BACKFILL, chunk_secs)
        now += seconds
        scheduler.record_backfill(min(seconds, chunk_secs), now)
    share = scheduler.backfill_share(now)
    assert share is None or share == 1.0


@settings(max_examples=100, deadline=None)
@given(
    min_share=shares,
    chunk_secs=chunks,
    events=st.lists(
        st.tuples(st.booleans(), st.booleans(), st.floats(min_value=0.0, max_value=2.0)),
        max_size=200,
    ),
)
def test_a_live_window_waits_at_most_one_chunk(
    min_share: float, chunk_secs: float, events: list[tuple[bool, bool, float]]
) -> None:
    """Whatever arrives when: a waiting live window never sees two chunks in a row, every
    chunk is within its budget of at most `chunk_secs`, and nothing idles with work."""
    scheduler = ShareScheduler(min_share, chunk_secs)
    now = 0.0
    previous = Step.IDLE
    for live_waiting, backfill_pending, fraction in events:
        decision = scheduler.next_step(live_waiting=live_waiting, backfill_pending=backfill_pending)
        if live_waiting and previous is Step.BACKFILL:
            assert decision.step is Step.LIVE
        if decision.step is Step.IDLE:
            assert not live_waiting and not backfill_pending
        elif decision.step is Step.LIVE:
            assert live_waiting
            now += fraction
            scheduler.record_live(fraction, now)
        else:
            assert backfill_pending
            assert decision.budget_secs is not None
            assert 0.0 < decision.budget_secs <= chunk_secs
            seconds = fraction * decision.budget_secs
            now += seconds
            scheduler.record_backfill(seconds, now)
        previous = decision.step
