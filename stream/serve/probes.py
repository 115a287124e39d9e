"""/metrics, /healthz and /readyz as an ASGI app: the processor's endpoint and the API's probes."""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

# What Prometheus scrapes (the text exposition format of prometheus_client).
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def probe_routes(
    exposition: Callable[[], bytes],
    readiness: Callable[[], tuple[bool, str]],
    *,
    close: bool = False,
) -> list[Route]:
    """Routes for the three probes.

    `exposition` renders the metrics; `readiness` says whether the process is ready and why
    (the body of /readyz). `close` answers each probe with `Connection: close`, as the
    processor's endpoint always has (one request per connection, so plain clients that read
    to the end of the stream work).
    """
    headers = {"Connection": "close"} if close else None

    async def metrics(_: Request) -> Response:
        return Response(exposition(), media_type=EXPOSITION_TYPE, headers=headers)

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n", headers=headers)

    async def readyz(_: Request) -> Response:
        ready, detail = readiness()
        return PlainTextResponse(detail + "\n", status_code=200 if ready else 503, headers=headers)

    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]


def probe_app(
    exposition: Callable[[], bytes], readiness: Callable[[], tuple[bool, str]]
) -> Starlette:
    """The processor's HTTP endpoint: the probes alone, one request per connection."""

    async def not_found(_: Request, __: Exception) -> Response:
        return PlainTextResponse("not found\n", status_code=404, headers={"Connection": "close"})

    return Starlette(
        routes=probe_routes(exposition, readiness, close=True),
        exception_handlers={404: not_found},
    )
