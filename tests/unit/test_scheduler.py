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

# min_share 0.25: each live second earns backfill 1/3 s; chunks at most 0.3 s, at least 0.075 s
# (a quarter of a chunk); the live cap is 0.3 * 3 = 0.9 s. Values chosen to be exact in binary
# where the assertions compare with ==.


def make(min_share: float = 0.25, chunk_secs: float = 0.3) -> ShareScheduler:
    return ShareScheduler(min_share, chunk_secs)


def test_nothing_to_do_is_idle() -> None:
    assert make().next_step(live_waiting=False, backfill_pending=False) == Decision(Step.IDLE)


def test_live_alone_runs_without_a_cap() -> None:
    assert make().next_step(live_waiting=True, backfill_pending=False) == Decision(Step.LIVE)


def test_backfill_alone_gets_full_chunks() -> None:
    scheduler = make()
    for i in range(3):
        assert scheduler.next_step(live_waiting=False, backfill_pending=True) == Decision(
            Step.BACKFILL, 0.3
        )
        scheduler.record_backfill(0.3, now=float(i))
    assert scheduler.credit_secs == 0.0, "spare capacity makes no debt"


def test_live_goes_first_then_backfill_spends_its_credit() -> None:
    scheduler = make()
    assert scheduler.next_step(live_waiting=True, backfill_pending=True) == Decision(Step.LIVE, 0.9)
    scheduler.record_live(0.6, now=0.6)
    assert scheduler.credit_secs == pytest.approx(0.2)
    decision = scheduler.next_step(live_waiting=True, backfill_pending=True)
    assert decision.step is Step.BACKFILL
    assert decision.budget_secs == pytest.approx(0.2)
    scheduler.record_backfill(0.2, now=0.8)
    assert scheduler.credit_secs == pytest.approx(0.0)
    live = 0.6 * 0.5 ** (0.2 / 10.0)  # a 10 s half-life: the live window is 0.2 s older
    assert scheduler.backfill_share(0.8) == pytest.approx(0.2 / (live + 0.2))


def test_after_a_chunk_waiting_live_always_runs() -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=True, backfill_pending=True)
    scheduler.record_live(0.9, now=1.0)  # earns 0.3 s, the most one chunk can take
    scheduler.next_step(live_waiting=True, backfill_pending=True)
    scheduler.record_backfill(0.1, now=1.1)  # the chunk ran short: 0.2 s still owed
    assert scheduler.credit_secs == pytest.approx(0.2)
    assert scheduler.next_step(live_waiting=True, backfill_pending=True).step is Step.LIVE


def test_small_credit_gets_a_minimum_chunk() -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=True, backfill_pending=True)
    scheduler.record_live(0.03, now=0.03)  # earns 0.01 s
    assert scheduler.next_step(live_waiting=True, backfill_pending=True) == Decision(
        Step.BACKFILL, 0.075
    )
    scheduler.record_backfill(0.075, now=0.105)
    assert scheduler.credit_secs == pytest.approx(-0.065)
    # live then runs until backfill is owed again
    assert scheduler.next_step(live_waiting=True, backfill_pending=True).step is Step.LIVE
    scheduler.record_live(0.15, now=0.255)  # earns 0.05: still -0.015
    assert scheduler.next_step(live_waiting=True, backfill_pending=True).step is Step.LIVE


def test_credit_is_clamped_to_one_chunk_each_way() -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=True, backfill_pending=True)
    scheduler.record_live(30.0, now=30.0)
    assert scheduler.credit_secs == 0.3
    scheduler.next_step(live_waiting=True, backfill_pending=True)
    scheduler.record_backfill(5.0, now=35.0)  # a chunk that overran its estimate badly
    assert scheduler.credit_secs == -0.3


def test_no_credit_accrues_while_backfill_has_no_work() -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=True, backfill_pending=False)
    scheduler.record_live(0.6, now=0.6)
    assert scheduler.credit_secs == 0.0
    scheduler.next_step(live_waiting=True, backfill_pending=True)
    scheduler.record_live(0.6, now=1.2)
    assert scheduler.credit_secs == pytest.approx(0.2)
    scheduler.next_step(live_waiting=True, backfill_pending=False)  # backfill done: forgiven
    assert scheduler.credit_secs == 0.0


def test_spare_time_repays_credit_but_makes_no_debt() -> None:
    scheduler = make()
    scheduler.next_step(live_waiting=True, backfill_pending=True)
    scheduler.record_live(0.6, now=0.6)  # owed 0.2
    scheduler.next_step(live_waiting=False, backfill_pending=True)
    scheduler.record_backfill(0.15, now=0.75)
    assert scheduler.credit_secs == pytest.approx(0.05)
    scheduler.next_step(live_waiting=False, backfill_pending=True)
    scheduler.record_backfill(0.3, now=1.05)
    assert scheduler.credit_secs == 0.0


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
    ("min_share", "chunk_secs", "min_chunk_secs", "window_secs"),
    [(0.0, 0.3, None, 1.0), (1.0, 0.3, None, 1.0), (0.25, 0.0, None, 1.0),
     (0.25, 0.3, 0.4, 1.0), (0.25, 0.3, None, 0.0)],
)  # fmt: skip
def test_bad_settings_are_refused(
    min_share: float, chunk_secs: float, min_chunk_secs: float | None, window_secs: float
) -> None:
    with pytest.raises(ValueError):
        ShareScheduler(
            min_share, chunk_secs, min_chunk_secs=min_chunk_secs, window_secs=window_secs
        )


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
    with pytest.raises(ValueError):
        chunk_prefix(sizes, 1.0, secs_per_byte=0.001, max_atoms=0)


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
def test_backfill_share_converges_to_min_share_under_continuous_live(
    min_share: float, chunk_secs: float, windows: list[float], overrun: list[float]
) -> None:
    """Live always waiting with windows up to the cap: backfill gets min_share (+-0.02)."""
    scheduler = ShareScheduler(min_share, chunk_secs, window_secs=1e9)
    now = live = backfill = 0.0
    for i in range(4000):
        decision = scheduler.next_step(live_waiting=True, backfill_pending=True)
        if decision.step is Step.LIVE:
            assert decision.budget_secs == pytest.approx(scheduler.live_cap_secs)
            seconds = windows[i % len(windows)] * scheduler.live_cap_secs
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
    assert backfill / (live + backfill) == pytest.approx(min_share, abs=0.02)
    share = scheduler.backfill_share(now)
    assert share is not None
    assert share == pytest.approx(min_share, abs=0.02)


@settings(max_examples=60, deadline=None)
@given(
    min_share=shares,
    chunk_secs=chunks,
    windows=st.lists(st.floats(min_value=0.01, max_value=5.0), min_size=1, max_size=20),
)
def test_backfill_never_starves_even_with_uncapped_live_windows(
    min_share: float, chunk_secs: float, windows: list[float]
) -> None:
    """A caller that ignores the live cap: backfill still runs after every live window."""
    scheduler = ShareScheduler(min_share, chunk_secs)
    now = 0.0
    steps = []
    for i in range(200):
        decision = scheduler.next_step(live_waiting=True, backfill_pending=True)
        steps.append(decision.step)
        if decision.step is Step.LIVE:
            now += windows[i % len(windows)]
            scheduler.record_live(windows[i % len(windows)], now)
        else:
            assert decision.budget_secs is not None
            now += decision.budget_secs
            scheduler.record_backfill(decision.budget_secs, now)
    runs_of_live = max(len(run) for run in "".join(s.value[0] for s in steps).split("b"))
    min_live_to_earn_min_chunk = scheduler.min_chunk_secs / min_share * (1 - min_share)
    assert runs_of_live <= math.ceil(min_live_to_earn_min_chunk / min(windows)) + 1
    assert steps.count(Step.BACKFILL) > 0


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
    assert scheduler.credit_secs == 0.0


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
        assert -chunk_secs <= scheduler.credit_secs <= chunk_secs
        previous = decision.step
