"""Steady live ingestion for migration tests: creates, updates and deletes at a stated
fraction of the processor's capacity, measured at the start of the test."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import anyio

from tests.support.kafka import produce

# Each burst produces this many events; bursts are paced to the target rate.
BURST = 10


class LiveLoad:
    """Produces `events(count)` batches at `rate` events/s until stopped."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events: Callable[[int], Iterable[tuple[bytes | None, bytes | None]]],
        rate: float,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._events = events
        self.rate = rate
        self.produced = 0
        self._stop = anyio.Event()

    def stop(self) -> None:
        """End the load after the burst in flight."""
        self._stop.set()

    async def run(self) -> None:
        """Produce until `stop`; bursts of BURST events, each when its time has come."""
        began = time.monotonic()
        while not self._stop.is_set():
            await produce(self._bootstrap, self._topic, self._events(BURST))
            self.produced += BURST
            due = began + self.produced / self.rate
            with anyio.move_on_after(max(0.0, due - time.monotonic())):
                await self._stop.wait()  # pacing of the offered load, not a condition wait
