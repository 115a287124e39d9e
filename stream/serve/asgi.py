"""Run an ASGI app on uvicorn inside the caller's event loop, stopped by cancellation.

Both `lattice-embed serve` and the processor's /metrics endpoint use it. The socket is bound
here, before uvicorn starts, so port 0 (any free port) works and the bound port can be
reported through `task_status` at once: connections made before uvicorn accepts wait in
the listen backlog.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

import anyio
import uvicorn
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus
from starlette.types import ASGIApp

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECS = 5


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the embedding process owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave the process's signal handling alone (uvicorn would replace it)."""
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.setblocking(False)
    return sock


async def serve_asgi(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    name: str = "http",
    task_status: TaskStatus[int] = TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on host:port until cancelled; reports the bound port once listening.

    Raises `OSError` when the address cannot be bound. On cancellation uvicorn shuts down
    gracefully: it stops accepting, closes idle connections, and gives requests in flight
    up to `GRACEFUL_SHUTDOWN_SECS` to finish.
    """
    sock = bind(host, port)
    bound = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,  # the process's logging configuration applies
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECS,
    )
    server = _EmbeddedServer(config)
    stopped = anyio.Event()

    async def run() -> None:
        try:
            # Shielded so that shutdown below runs to its end; it is bounded by the graceful
            # timeout and starts as soon as `should_exit` is set.
            with anyio.CancelScope(shield=True):
                await server.serve(sockets=[sock])
        finally:
            stopped.set()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run)
            log.info("%s on http://%s:%d", name, host, bound)
            task_status.started(bound)
            try:
                await stopped.wait()
            finally:
                server.should_exit = True
    finally:
        sock.close()
