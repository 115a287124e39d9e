"""Run the processor inside the test's event loop, and wait on the control log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import anyio

from stream.config import Config
from stream.core.routing import RoutingState
from stream.processor.app import run_processor
from stream.processor.control import ControlPlane
from stream.processor.sensors import ProcessorStats, Sensor


class Running(Sensor):
    """A processor running in the test's event loop: its stats and committed offsets."""

    def __init__(self) -> None:
        self.stats = ProcessorStats()
        self.committed: dict[int, int] = {}
        self.metrics_port: int | None = None
        self.listening = anyio.Event()  # set once the metrics endpoint is bound
        self._changed = anyio.Event()

    def on_listening(self, port: int | None) -> None:
        self.metrics_port = port
        self.listening.set()

    def on_commit(self, offsets: Mapping[int, int]) -> None:
        self.committed.update(offsets)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def drained(self, ends: Mapping[int, int], *, within: float = 120) -> None:
        """Wait until every partition is committed up to `ends` (empty ones need nothing)."""
        with anyio.fail_after(within):
            while any(self.committed.get(p, 0) < end for p, end in ends.items() if end > 0):
                await self._changed.wait()


@asynccontextmanager
async def processor(config: Config, *, role: str = "all") -> AsyncIterator[Running]:
    """Run the processor in this event loop; stop it (draining) on exit."""
    stop = anyio.Event()
    running = Running()
    async with anyio.create_task_group() as tasks:

        async def run() -> None:
            result = await run_processor(
                config,
                stop=stop,
                role=role,
                sensor=running,
            )
            running.stats.__dict__.update(result.__dict__)

        tasks.start_soon(run)
        try:
            yield running
        finally:
            stop.set()


async def wait_for_routing(
    config: Config, done: Callable[[RoutingState], bool], *, within: float
) -> RoutingState:
    """Tail the control log until `done(state)` holds."""
    async with ControlPlane(config) as control:
        await control.replay()
        with anyio.fail_after(within):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(control.tail)
                while not done(control.state):
                    last = control.state.control_offset
                    await control.wait_applied(0 if last is None else last + 1)
                tasks.cancel_scope.cancel()
        return control.state
