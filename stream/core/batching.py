"""Micro-batch assembly and in-order release. Pure: no I/O, no torch, no Kafka."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence

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
