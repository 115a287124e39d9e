"""Steady live ingestion for migration tests: creates, updates and deletes at a stated
fraction of the processor's capacity, measured at the start of the test."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import anyio
from aiokafka.errors import KafkaError

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
        *,
        ride_outages: bool = False,
    ) -> None:
        """`ride_outages`: a burst the broker does not take is sent again (the same events,
        in order) until it does, as an upstream producer retries through an outage."""
        self._bootstrap = bootstrap
        self._topic = topic
        self._events = events
        self.rate = rate
        self.produced = 0
        self.refused = 0  # bursts sent again after an error (ride_outages)
        self._ride_outages = ride_outages
        self._stop = anyio.Event()

    def stop(self) -> None:
        """End the load after the burst in flight."""
        self._stop.set()

    async def run(self) -> None:
        """Produce until `stop`; bursts of BURST events, each when its time has come."""
        began = time.monotonic()
        while not self._stop.is_set():
            burst = list(self._events(BURST))
            while True:
                try:
                    await produce(self._bootstrap, self._topic, burst)
                    break
                except KafkaError:
                    if not self._ride_outages:
                        raise
                    self.refused += 1
                    await anyio.sleep(1.0)  # an upstream producer's retry backoff
            self.produced += BURST
            due = began + self.produced / self.rate
            with anyio.move_on_after(max(0.0, due - time.monotonic())):
                await self._stop.wait()  # pacing of the offered load, not a condition wait
