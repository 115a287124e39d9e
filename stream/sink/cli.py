"""`lattice-embed sink` as a long-running command: SIGTERM or SIGINT finishes the batch."""

from __future__ import annotations

import logging
import signal

import anyio

from stream.config import Config
from stream.sink.runner import run_sink

log = logging.getLogger(__name__)


async def sink_until_signalled(config: Config) -> None:
    """Run the sink until SIGTERM or SIGINT; the batch in flight is applied and committed."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tasks:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info(
                        "received %s: finishing the batch in flight", signal.Signals(signum).name
                    )
                    stop.set()
                    return

        tasks.start_soon(on_signals)
        stats = await run_sink(config, stop=stop)
        log.info(
            "sink: stopped after %d upserts, %d deletes, %d skipped",
            stats.upserts,
            stats.deletes,
            stats.skipped,
        )
        tasks.cancel_scope.cancel()
