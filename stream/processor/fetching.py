"""The live path's window fetch: until the window is full or `max_wait_ms` passed since its
first record (`core.windows.window_deadline`)."""

from __future__ import annotations

import time

import anyio

from stream.config import BatchingConfig
from stream.core.records import SourceRecord
from stream.core.windows import window_deadline
from stream.kafka.consumer import GroupConsumer
from stream.processor.stages import StageClock, cpu

IDLE_FETCH_MS = 500  # longest a fetch waits for a first record when nothing else is to do
REFRESH_FETCH_MS = 10  # a fetch round trip to the broker, with room to spare


class WindowFetch:
    """Fetches live windows from the group consumer's buffer."""

    def __init__(
        self, consumer: GroupConsumer, batching: BatchingConfig, stages: StageClock | None
    ) -> None:
        self._consumer = consumer
        self._batching = batching
        self._stages = stages
        self.fetched_at = time.monotonic()  # when the last window's fetch ended

    async def window(
        self, stop: anyio.Event, window_atoms: int, *, wait: bool
    ) -> list[SourceRecord]:
        """Fetch until the window is full or `max_wait_ms` passed since its first record
        (without waiting for a first record when `wait` is false: backfill has work)."""
        batching = self._batching
        records: list[SourceRecord] = []
        deadline: float | None = None
        refreshed = False
        while len(records) < window_atoms and not stop.is_set():
            if deadline is None:
                timeout_ms = IDLE_FETCH_MS if wait else 0
            else:  # past the deadline: only what is already buffered (timeout 0)
                timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
                if timeout_ms == 0 and not refreshed:
                    # The client fetches a partition again only once its buffer is drained,
                    # so what arrived while the last step ran is still on the broker: one
                    # short wait takes the answer to the fetch that draining just started
                    # (else those atoms wait a whole extra step).
                    timeout_ms, refreshed = REFRESH_FETCH_MS, True
            before = len(records)
            with cpu(self._stages, "fetch"):  # from the buffer: no wait
                fetched = await self._consumer.fetch(
                    timeout_ms=timeout_ms, max_records=window_atoms - len(records)
                )
            records.extend(fetched)
            if records and deadline is None:
                now = time.monotonic()
                deadline = window_deadline(
                    now=now,
                    wall_now=time.time(),
                    stamps_ms=[r.timestamp_ms for r in records],
                    since_last_fetch=now - self.fetched_at,
                    max_wait_secs=batching.max_wait_ms / 1000,
                )
            elif timeout_ms == 0 and len(records) == before:
                break  # the deadline has passed and the buffer is drained
            if not records:
                break
        self.fetched_at = time.monotonic()
        return records
