"""Micro-batch planning and in-order release: pure, property-tested."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.core.batching import (
    GROWTH,
    SLACK,
    InOrderRelease,
    overhead_tokens,
    padding_fraction,
    plan_by_cost,
    plan_micro_batches,
)


@given(
    st.lists(st.integers(min_value=1, max_value=512), max_size=300),
    st.integers(min_value=1, max_value=80),
    st.integers(min_value=1, max_value=20_000),
)
def test_plan_covers_every_item_once_within_limits(
    lengths: list[int], max_atoms: int, max_tokens: int
) -> None:
    batches = plan_micro_batches(lengths, max_atoms=max_atoms, max_tokens=max_tokens)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= max_atoms
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths)
        assert len(batch) == 1 or len(batch) * max(widths) <= max_tokens
        assert max(widths) <= GROWTH * min(widths) + SLACK, "one length bucket per batch"


def test_sorting_removes_padding() -> None:
    rng = random.Random(7)
    lengths = [rng.choice([8, 200]) for _ in range(256)]
    sorted_batches = plan_micro_batches(lengths, max_atoms=64, max_tokens=10**6)
    arrival = [list(range(i, min(i + 64, 256))) for i in range(0, 256, 64)]
    assert padding_fraction(lengths, sorted_batches) < 0.1 < padding_fraction(lengths, arrival)


@given(st.lists(st.sampled_from("abcde"), max_size=40), st.randoms(use_true_random=False))
def test_release_keeps_per_key_order(keys: list[str], rng: random.Random) -> None:
    release = InOrderRelease(keys)
    order = list(range(len(keys)))
    rng.shuffle(order)
    released: list[int] = []
    while order:
        chunk = order[: rng.randint(1, 5)]
        order = order[len(chunk) :]
        released.extend(release.finish(chunk))
    assert sorted(released) == list(range(len(keys)))
    for key in set(keys):
        mine = [p for p in released if keys[p] == key]
        assert mine == sorted(mine)
    assert release.done


@given(
    st.lists(st.integers(min_value=1, max_value=512), max_size=200),
    st.integers(min_value=1, max_value=80),
    st.integers(min_value=1, max_value=20_000),
    st.floats(min_value=0.0, max_value=5_000.0),
)
def test_cost_plan_covers_every_item_once_within_limits(
    lengths: list[int], max_atoms: int, max_tokens: int, overhead: float
) -> None:
    batches = plan_by_cost(
        lengths, max_atoms=max_atoms, max_tokens=max_tokens, overhead_tokens=overhead
    )
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= max_atoms
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths)
        assert len(batch) == 1 or len(batch) * max(widths) <= max_tokens


def _cost(lengths: list[int], batches: list[list[int]], overhead: float) -> float:
    return sum(overhead + len(b) * max(lengths[i] for i in b) for b in batches)


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=9))
def test_cost_plan_is_the_cheapest_split_of_the_sorted_items(lengths: list[int]) -> None:
    """Against every split of the sorted items into contiguous runs (brute force)."""
    overhead = 40.0
    plan = plan_by_cost(lengths, max_atoms=4, max_tokens=10**6, overhead_tokens=overhead)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = float("inf")
    for cuts in range(2 ** (len(order) - 1)):
        runs, run = [], [order[0]]
        for k in range(1, len(order)):
            if cuts >> (k - 1) & 1:
                runs.append(run)
                run = []
            run.append(order[k])
        runs.append(run)
        if all(len(r) <= 4 for r in runs):
            best = min(best, _cost(lengths, runs, overhead))
    assert _cost(lengths, plan, overhead) == best


def test_cost_plan_merges_a_small_window_that_buckets_split() -> None:
    lengths = [10, 12, 20, 30, 45, 70]
    assert plan_micro_batches(lengths, max_atoms=64, max_tokens=16_384) == [[0, 1, 2], [3, 4], [5]]
    # One batch: 6 x 70 = 420 tokens + 500 overhead = 920, against three passes (1,720).
    plan = plan_by_cost(lengths, max_atoms=64, max_tokens=16_384, overhead_tokens=500.0)
    assert plan == [[0, 1, 2, 3, 4, 5]]
    # No fixed cost: the least padding, each distinct length alone.
    plan = plan_by_cost(lengths, max_atoms=64, max_tokens=16_384, overhead_tokens=0.0)
    assert plan == [[0], [1], [2], [3], [4], [5]]
    # Between: [10, 12, 20, 30] costs 4 x 30 + 80, [45, 70] 2 x 70 + 80: 420, the least.
    plan = plan_by_cost(lengths, max_atoms=64, max_tokens=16_384, overhead_tokens=80.0)
    assert plan == [[0, 1, 2, 3], [4, 5]]
    assert _cost(lengths, plan, 80.0) == 420.0
    # The limits still hold: at most 3 atoms, at most 100 padded tokens a batch.
    plan = plan_by_cost(lengths, max_atoms=3, max_tokens=100, overhead_tokens=500.0)
    assert plan == [[0, 1, 2], [3, 4], [5]]  # 3 x 20, 2 x 45, 70: no larger batch fits


def test_overhead_from_two_timings() -> None:
    # 1 ms at 16 tokens, 3 ms at 2,016: 1 us a token, so 0.984 ms fixed = 984 tokens.
    assert overhead_tokens((16, 0.001), (2016, 0.003), most=16_384) == pytest.approx(984.0)
    assert overhead_tokens((16, 0.002), (2016, 0.002), most=16_384) == 16_384  # no slope
    assert overhead_tokens((16, 0.002), (2016, 0.0019), most=16_384) == 16_384
    assert overhead_tokens((16, 0.0), (2016, 0.004), most=16_384) == 0.0  # below zero: none
    with pytest.raises(ValueError, match="more padded tokens"):
        overhead_tokens((2016, 0.003), (16, 0.001), most=16_384)
