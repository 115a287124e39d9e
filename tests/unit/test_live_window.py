"""When a live window closes: `max_wait_ms` after its first atom arrived."""

from __future__ import annotations

import time

import pytest

from stream.config import Config
from stream.core.deadletter import SourceRecord
from stream.processor.live import LiveConsumer

MAX_WAIT = 0.050  # the default batching.max_wait_ms, in seconds


def stamped(*timestamps_ms: int | None) -> list[SourceRecord]:
    return [
        SourceRecord(
            topic="atoms",
            partition=0,
            offset=i,
            key=b"k",
            value=b"{}",
            headers=(),
            timestamp_ms=stamp,
        )
        for i, stamp in enumerate(timestamps_ms)
    ]


def remaining(records: list[SourceRecord], *, fetched_ago: float) -> float:
    """Seconds the window may still wait, the previous fetch having ended `fetched_ago` ago."""
    live = LiveConsumer(Config(), None, None, None, None)  # only the clock logic is used
    live._fetched_at = time.monotonic() - fetched_ago
    return live._window_deadline(records) - time.monotonic()


def now_ms(offset: float = 0.0) -> int:
    return int((time.time() + offset) * 1000)


def about(expected: float) -> object:  # tolerance below the 40 ms the tests shift by
    """`expected`, give or take a scheduling delay between stamping and measuring."""
    return pytest.approx(expected, abs=0.025)


@pytest.mark.timeout(10)
def test_an_atom_that_just_arrived_gets_the_full_wait() -> None:
    assert remaining(stamped(now_ms()), fetched_ago=5.0) == about(MAX_WAIT)
    assert remaining(stamped(None, 0), fetched_ago=5.0) == about(MAX_WAIT)


@pytest.mark.timeout(10)
def test_time_waited_in_the_buffer_counts_and_the_oldest_atom_decides() -> None:
    records = stamped(now_ms(-0.010), now_ms(-0.040), now_ms())
    assert remaining(records, fetched_ago=5.0) == about(MAX_WAIT - 0.040)
    assert remaining(stamped(now_ms(-0.200)), fetched_ago=5.0) == about(0.0)


@pytest.mark.timeout(10)
def test_skewed_producer_clocks_are_bounded() -> None:
    # A clock far behind cannot claim more waiting than the time since the last fetch ...
    behind = stamped(now_ms(-3600.0))
    assert remaining(behind, fetched_ago=0.040) == about(MAX_WAIT - 0.040)
    # ... and one ahead never makes the window wait longer than max_wait_ms.
    assert remaining(stamped(now_ms(60.0)), fetched_ago=5.0) == about(MAX_WAIT)
