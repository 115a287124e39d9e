"""Run the processor inside the test's event loop, and wait on the control log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from stream.app import run_processor
from stream.config import Config
from stream.control import ControlPlane
from stream.pipeline import LiveStats
from stream.routing import RoutingState


@asynccontextmanager
async def processor(config: Config, *, role: str = "all") -> AsyncIterator[LiveStats]:
    """Run the processor in this event loop; stop it (draining) on exit."""
    stop = anyio.Event()
    stats = LiveStats()
    async with anyio.create_task_group() as tasks:

        async def run() -> None:
            result = await run_processor(config, stop=stop, role=role)
            stats.__dict__.update(result.__dict__)

        tasks.start_soon(run)
        try:
            yield stats
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
