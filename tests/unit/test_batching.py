"""Micro-batch planning and in-order release: pure, property-tested."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from stream.core.batching import (
    GROWTH,
    SLACK,
    InOrderRelease,
    padding_fraction,
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
