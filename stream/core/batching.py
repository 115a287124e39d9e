"""Micro-batch assembly and in-order release. Pure: no I/O, no torch, no Kafka."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

# A batch's longest item may be at most GROWTH x its shortest + SLACK tokens: length buckets
# keep padding low even in small windows of heavy-tailed texts (measured on MiniLM/CPU,
# windows of 32 mixed texts: 39 atoms/s unbucketed, 123 atoms/s bucketed).
GROWTH = 1.5
SLACK = 8


def plan_micro_batches(
    lengths: Sequence[int], *, max_atoms: int, max_tokens: int
) -> list[list[int]]:
    """Split items into model batches of similar token length.

    Items are sorted by length; a batch closes when it holds `max_atoms` items, when its
    padded size (items x longest length) would pass `max_tokens`, or when the next item is
    longer than GROWTH x the batch's shortest + SLACK (a length bucket). A single item
    longer than `max_tokens` still gets a batch of its own. Returns lists of indices into
    `lengths`; every index appears exactly once.
    """
    if max_atoms < 1 or max_tokens < 1:
        raise ValueError("max_atoms and max_tokens must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        padded = (len(current) + 1) * lengths[index]
        too_long = current and lengths[index] > GROWTH * lengths[current[0]] + SLACK
        if current and (len(current) >= max_atoms or padded > max_tokens or too_long):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def plan_by_cost(
    lengths: Sequence[int], *, max_atoms: int, max_tokens: int, overhead_tokens: float
) -> list[list[int]]:
    """Split items into the model batches that take the least estimated model time.

    A batch of `n` items whose longest has `L` tokens is estimated to cost
    `overhead_tokens + n * L`: its padded size plus a fixed cost per forward pass, counted
    in padded-token equivalents (`Embedder.calibrate` measures it on the device).
    Fixed-size buckets split a small window of mixed lengths into many tiny batches whose
    fixed cost dominates; this weighs that against padding. Items are sorted by length and
    split into contiguous runs by dynamic programming (exact within the cost model), with
    the same limits as `plan_micro_batches`: at most `max_atoms` items and, unless alone,
    at most `max_tokens` padded tokens a batch.
    """
    if max_atoms < 1 or max_tokens < 1:
        raise ValueError("max_atoms and max_tokens must be positive")
    if overhead_tokens < 0:
        raise ValueError(f"overhead_tokens must be non-negative, got {overhead_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    count = len(order)
    # best[j]: least cost of the first j sorted items; start[j]: where its last batch begins.
    best = np.zeros(count + 1)
    start = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = lengths[order[end - 1]]
        most = min(end, max_atoms, max(1, max_tokens // max(longest, 1)))
        first = end - most
        costs = best[first:end] + (end - np.arange(first, end)) * longest
        pick = int(np.argmin(costs))  # the first minimum: the largest batch among equals
        best[end] = costs[pick] + overhead_tokens
        start[end] = first + pick
    batches: list[list[int]] = []
    end = count
    while end > 0:
        batches.append(order[start[end] : end])
        end = start[end]
    batches.reverse()
    return batches


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> float:
    """Share of padded token slots that carry no token, over all batches."""
    slots = real = 0
    for batch in batches:
        if batch:
            longest = max(lengths[i] for i in batch)
            slots += longest * len(batch)
            real += sum(lengths[i] for i in batch)
    return 0.0 if slots == 0 else (slots - real) / slots


class InOrderRelease:
    """Releases finished items so that items with the same key leave in arrival order.

    Items finish out of order (batches are sorted by length, not by offset). An item is
    released once it and every earlier item with the same key have finished; items with
    different keys never wait on each other.
    """

    def __init__(self, keys: Sequence[Hashable]) -> None:
        self._keys = list(keys)
        self._pending: dict[Hashable, deque[int]] = {}
        for position, key in enumerate(self._keys):
            self._pending.setdefault(key, deque()).append(position)
        self._finished = [False] * len(self._keys)

    def finish(self, positions: Iterable[int]) -> list[int]:
        """Mark items finished; return the positions now free to leave, in arrival order."""
        touched: list[Hashable] = []
        for position in positions:
            if self._finished[position]:
                raise ValueError(f"position {position} finished twice")
            self._finished[position] = True
            touched.append(self._keys[position])
        released: list[int] = []
        for key in dict.fromkeys(touched):
            queue = self._pending[key]
            while queue and self._finished[queue[0]]:
                released.append(queue.popleft())
        return sorted(released)

    @property
    def done(self) -> bool:
        """True once every item has been released."""
        return all(not queue for queue in self._pending.values())


def overhead_tokens(small: tuple[int, float], large: tuple[int, float], *, most: float) -> float:
    """The fixed cost of a forward pass in padded-token equivalents, from two timings.

    `small` and `large` are (padded tokens, seconds) of two batches; a straight line
    through them gives seconds = fixed + tokens * per_token, and the answer is
    fixed / per_token, within [0, most]. A device too fast for the large batch to cost
    more than the small one (per_token <= 0: all fixed cost) gives `most`.
    """
    (small_tokens, small_secs), (large_tokens, large_secs) = small, large
    if large_tokens <= small_tokens:
        raise ValueError("the large batch must have more padded tokens than the small one")
    per_token = (large_secs - small_secs) / (large_tokens - small_tokens)
    if per_token <= 0.0:
        return most
    fixed = small_secs - small_tokens * per_token
    return min(most, max(0.0, fixed / per_token))
