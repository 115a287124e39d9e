"""Where a processor's time goes, stage by stage: the bench's per-stage table (issue 12).

Off in production (`ProcessorStats.stages` is None and every clock is a no-op); the bench
turns it on for one run. Two kinds of clock:
- `cpu(stages, name)`: CPU time of the calling thread (`time.thread_time`). On the event
  loop it times code that does not suspend (decode, encode, a send that only enqueues, a
  fetch from the buffer); in the model thread it times tokenization.
- `wall(stages, name)`: elapsed time, for what waits on something else: the device (a
  forward pass, its host copy included) and the commit's round trip.
What the event loop spends outside the timed stages (aiokafka's fetcher and sender tasks,
heartbeats, asyncio itself) is the loop's total CPU time minus the timed loop stages; the
bench measures that total (`loop_cpu_seconds`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

# In pipeline order; `LOOP_STAGES` run on the event loop.
STAGES = ("fetch", "decode", "tokenize", "device", "encode", "produce", "commit")
LOOP_STAGES = ("fetch", "decode", "encode", "produce")

_OFF: AbstractContextManager[None] = nullcontext()


class StageClock:
    """Seconds per stage, summed over a run."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def per_atom_us(self, atoms: int) -> dict[str, float]:
        """Microseconds per atom of every stage (0 for a stage that never ran)."""
        return {name: 1e6 * self.seconds[name] / atoms if atoms else 0.0 for name in STAGES}


class _Timed:
    """One timed block (a plain class: a generator-based context manager costs a few
    microseconds a use, which the per-record stages would show as their own time)."""

    __slots__ = ("_began", "_name", "_read", "_seconds")

    def __init__(self, seconds: defaultdict[str, float], name: str, read: Callable[[], float]):
        self._seconds = seconds
        self._name = name
        self._read = read
        self._began = 0.0

    def __enter__(self) -> None:
        self._began = self._read()

    def __exit__(self, *exc_info: object) -> None:
        self._seconds[self._name] += self._read() - self._began


def cpu(stages: StageClock | None, name: str) -> AbstractContextManager[None]:
    """Time the block as CPU time of this thread under `name` (no-op when off)."""
    return _OFF if stages is None else _Timed(stages.seconds, name, time.thread_time)


def wall(stages: StageClock | None, name: str) -> AbstractContextManager[None]:
    """Time the block as elapsed time under `name` (no-op when off)."""
    return _OFF if stages is None else _Timed(stages.seconds, name, time.perf_counter)
