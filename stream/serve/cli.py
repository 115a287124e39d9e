"""`lattice-embed serve` as a long-running command: SIGTERM or SIGINT stops it gracefully."""

from __future__ import annotations

import logging
import signal

import anyio

from stream.config import Config
from stream.serve.server import run_serve

log = logging.getLogger(__name__)


async def serve_until_signalled(config: Config, *, host: str | None, port: int | None) -> None:
    """Run the embeddings API until SIGTERM or SIGINT; requests in flight finish first."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_cancel_on_signals, tasks.cancel_scope)
        await run_serve(config, host=host, port=port)


async def _cancel_on_signals(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: stopping the embeddings API", signal.Signals(signum).name)
            scope.cancel()
            return
