"""Deterministic benchmark texts: short, medium, long and heavy-tailed mixed workloads."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from stream.tools.corpus import sample_texts

WORKLOADS = ("short", "medium", "long", "mixed")


def workload_texts(name: str, count: int, *, seed: int = 7) -> list[str]:
    """Deterministic texts of a target size: short ~16 tokens, medium ~64, long ~256+ (cut),
    mixed heavy-tailed (log-normal word counts)."""
    rng = random.Random(f"{name}-{seed}")
    words = " ".join(sample_texts()).split()
    sizes = {
        "short": lambda: rng.randint(8, 14),
        "medium": lambda: rng.randint(40, 56),
        "long": lambda: rng.randint(230, 300),
    }
    pick: Callable[[], int] = sizes.get(
        name, lambda: min(400, max(3, int(rng.lognormvariate(3.3, 0.9))))
    )
    texts = []
    for i in range(count):
        size = pick()
        start = rng.randrange(0, len(words) - size)
        texts.append(f"{i}: " + " ".join(words[start : start + size]))
    return texts


class LazyTexts(Sequence[str]):
    """Workload texts made on demand, so a 100k backlog costs the bench no memory."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._words = " ".join(sample_texts()).split()

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not 0 <= index < self._count:
            raise IndexError(index)
        start = (index * 7919) % (len(self._words) - 60)
        return f"{index}: " + " ".join(self._words[start : start + 10 + index % 50])
