"""`lattice-embed serve`: the API app on uvicorn, and the service it answers from."""

from __future__ import annotations

import functools

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from stream.config import Config
from stream.serve.api import build_app
from stream.serve.asgi import serve_asgi
from stream.serve.service import EmbeddingService


async def run_serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    service: EmbeddingService | None = None,
    task_status: TaskStatus[int] = TASK_STATUS_IGNORED,
) -> None:
    """Listen first (so /readyz answers 503 while starting), then follow the control log.

    Reports the bound port; runs until cancelled. Pass `service` to share a model pool or
    to wait on it (`wait_ready`, `wait_applied`) in the same process.
    """
    service = service or EmbeddingService(config)
    listen = functools.partial(
        serve_asgi,
        build_app(service),
        host or config.serve.host,
        config.serve.port if port is None else port,
        name="embeddings API",
    )
    async with anyio.create_task_group() as tasks:
        task_status.started(await tasks.start(listen))
        await service.run()
