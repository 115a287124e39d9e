"""The live path's lookahead: the next window fetched and prepared while this one runs.

While a window's forward passes, sends and commit run, the next window is fetched from the
consumer's buffer, decoded and tokenized beside it (`PreparedWindow`), so the tokenizer and
the event loop work while the device does (issue 12). Nothing of the next window is written
before its turn, so outputs, dead letters and commits keep their order.

Invariants (the consumer's positions are past a window held ahead):
- A window is held only between two live windows. Before anything else reads or moves the
  positions (a backfill step, a handoff at an idle partition's position), it is given back:
  every partition is sought back to where it was before the lookahead fetched.
- If the current window fails, the lookahead is cancelled and given back before the failure
  handling rewinds the window itself.
- A rebalance since the lookahead fetched: positions moved under it, so it is dropped and the
  caller reads again from the committed offsets (as for a fetch that spanned a rebalance).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup

from stream.core.records import SourceRecord
from stream.errors import LatticeError
from stream.kafka.consumer import GroupConsumer
from stream.processor.prepared import PreparedWindow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ahead:
    """A window fetched ahead, in rebalance generation `generation`, and prepared."""

    records: list[SourceRecord]
    generation: int
    prepared: PreparedWindow


class Lookahead:
    """At most one window held ahead of its turn, and the positions it was fetched from."""

    def __init__(self, consumer: GroupConsumer) -> None:
        self._consumer = consumer
        self._held: Ahead | None = None
        self._positions: dict[int, int] = {}  # every owned partition's, before the fetch
        self._generation = -1
        self._running: tuple[anyio.CancelScope, anyio.Event] | None = None
        self.used = 0  # windows taken for their turn
        self.given_back = 0  # windows given back unprocessed (their records read again)

    @property
    def held(self) -> bool:
        """Whether a window is held ahead (the positions are past it)."""
        return self._held is not None

    async def start(
        self, tasks: TaskGroup, generation: int, fetch: Callable[[], Awaitable[Ahead | None]]
    ) -> bool:
        """Run `fetch` (the next window, prepared) in `tasks`, beside the current window.
        False, and nothing started, when a position cannot be read (a rebalance is under
        way: the next window is fetched in its turn)."""
        if self._held is not None or self._running is not None:
            raise AssertionError("a lookahead is already held or running")
        try:
            self._positions = {
                p: await self._consumer.position(p) for p in self._consumer.assignment()
            }
        except LatticeError as exc:
            log.debug("no lookahead: %s", exc)
            return False
        self._generation = generation
        scope, done = anyio.CancelScope(), anyio.Event()
        self._running = scope, done

        async def fill() -> None:
            try:
                with scope:
                    self._held = await fetch()
            except Exception as exc:  # the positions go back; its turn fetches it again
                log.warning("the lookahead failed (%r); the window is fetched in its turn", exc)
                self._held = None
                self._seek_back()
            finally:
                done.set()

        tasks.start_soon(fill)
        return True

    async def finish(self) -> None:
        """Wait for the lookahead started beside the window that just succeeded."""
        if self._running is not None:
            await self._running[1].wait()
            self._running = None

    async def abandon(self, generation: int) -> bool:
        """The window beside it failed: cancel the lookahead and give it back. False when a
        rebalance ran since it started (the caller reads from the committed offsets)."""
        if self._running is not None:
            scope, done = self._running
            scope.cancel()
            await done.wait()
            self._running = None
        return self.give_back(generation)

    def take(self) -> Ahead | None:
        """The window held ahead, if any, for its turn (the positions are past it)."""
        ahead, self._held = self._held, None
        self._positions = {}
        self.used += ahead is not None
        return ahead

    def give_back(self, generation: int) -> bool:
        """Seek every partition back to before the lookahead's fetch: its records are read
        again. False when a rebalance ran since (`generation` differs): the positions it
        saw are gone, and the caller must read from the committed offsets instead."""
        if generation != self._generation:
            self.drop()
            return False
        if self._held is not None:
            self.given_back += 1
        self._held = None
        self._seek_back()
        return True

    def drop(self) -> None:
        """Forget the window held ahead without seeking: the caller reads again from the
        committed offsets (its records with them)."""
        if self._held is not None:
            self.given_back += 1
        self._held = None
        self._positions = {}

    def _seek_back(self) -> None:
        for partition, offset in self._positions.items():
            self._consumer.seek(partition, offset)
        self._positions = {}
