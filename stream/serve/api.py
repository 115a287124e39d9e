"""The HTTP API (CONTRACT section 10): OpenAI-compatible embeddings, models, routing, probes.

Errors have the OpenAI shape `{"error": {"message", "type", "code"}}` so OpenAI clients
report them as they would OpenAI's own.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import anyio
import msgspec
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stream.errors import LatticeError
from stream.serve.batcher import BatcherClosed, QueueFull
from stream.serve.probes import probe_routes
from stream.serve.service import EmbeddingService, NotReady, UnknownModel

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """The OpenAI request body; unknown fields (`user`, ...) are ignored."""

    input: str | list[Any]
    model: str | None = None
    input_type: Literal["query", "document"] = "query"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class ApiError(Exception):
    """An answer in the OpenAI error shape."""

    def __init__(self, status: int, message: str, kind: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code

    def response(self) -> Response:
        """The JSON error response."""
        body = {"error": {"message": self.message, "type": self.kind, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return _json(body, status=self.status, headers=headers)


def _invalid(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def build_app(service: EmbeddingService) -> Starlette:
    """The Starlette app for `lattice-embed serve`."""
    config = service.config
    keys = [key.encode() for key in config.serve.api_keys]
    metrics = service.metrics

    def guarded(endpoint: str, handler: Handler) -> Handler:
        async def guard(request: Request) -> Response:
            try:
                if keys:
                    _authenticate(request, keys)
                response = await handler(request)
            except ApiError as error:
                response = error.response()
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response

        return guard

    async def embeddings(request: Request) -> Response:
        started = time.perf_counter()
        if not service.ready:
            raise ApiError(
                503, "starting: control log or query model not ready", "server_error", "not_ready"
            )
        body = _parse(await _read_body(request, config.serve.max_request_bytes))
        texts = _texts(body, config.serve.max_inputs, config.limits.max_event_bytes)
        query = body.input_type == "query"
        try:
            answer = await service.embed(texts, model=body.model or None, query=query)
        except UnknownModel as exc:
            raise _invalid(str(exc), "model_not_found") from exc
        except NotReady as exc:
            raise ApiError(503, str(exc), "server_error", "not_ready") from exc
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error", "queue_full") from exc
        except (BatcherClosed, LatticeError) as exc:
            raise ApiError(503, str(exc), "server_error", "unavailable") from exc
        vectors = answer.embedded.vectors
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise _invalid(
                f"model {answer.model} has {vectors.shape[1]} dimensions, not {body.dimensions}",
                "invalid_dimensions",
            )
        tokens = answer.embedded.tokens
        response = {
            "object": "list",
            "model": answer.model,
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(row, body.encoding_format)}
                for i, row in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "lattice": {
                "fingerprint": answer.fingerprint,
                "control_offset": answer.control_offset,
                "phase": str(answer.phase),
            },
        }
        metrics.inputs.labels(answer.model, body.input_type).inc(len(texts))
        metrics.request_seconds.labels(answer.model).observe(time.perf_counter() - started)
        return _json(response)

    async def models(request: Request) -> Response:
        _require_replayed(service)
        entries = [await _model_entry(service, name) for name in sorted(config.models)]
        return _json({"object": "list", "data": entries})

    async def model(request: Request) -> Response:
        _require_replayed(service)
        name = request.path_params["name"]
        if name not in config.models:
            raise ApiError(
                404, f"model {name!r} is not configured", "invalid_request_error", "model_not_found"
            )
        return _json(await _model_entry(service, name))

    async def routing(request: Request) -> Response:
        _require_replayed(service)
        return Response(msgspec.json.encode(service.state.status()), media_type="application/json")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "method not allowed" if status == 405 else f"no route {request.url.path}"
        return ApiError(status, message, "invalid_request_error", "not_found").response()

    routes = [
        Route("/v1/embeddings", guarded("embeddings", embeddings), methods=["POST"]),
        Route("/v1/models", guarded("models", models), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded("models", model), methods=["GET"]),
        Route("/v1/routing", guarded("routing", routing), methods=["GET"]),
        *probe_routes(metrics.exposition, service.readiness),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _authenticate(request: Request, keys: list[bytes]) -> None:
    """A bearer token equal to one of the keys; compared in constant time, every key tried."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if scheme.lower() != "bearer" or not given or not matched:
        raise ApiError(
            401, "missing or invalid API key", "invalid_request_error", "invalid_api_key"
        )


def _require_replayed(service: EmbeddingService) -> None:
    if not service.ready:
        raise ApiError(
            503, "starting: control log or query model not ready", "server_error", "not_ready"
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"request body over {limit} bytes", "invalid_request_error", "too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(
                413, f"request body over {limit} bytes", "invalid_request_error", "too_large"
            )
    return bytes(body)


def _parse(body: bytes) -> EmbeddingsRequest:
    try:
        return msgspec.json.decode(body, type=EmbeddingsRequest)
    except msgspec.ValidationError as exc:
        raise _invalid(f"invalid request: {exc}", "invalid_value") from exc
    except msgspec.DecodeError as exc:
        raise _invalid(f"the body is not valid JSON: {exc}", "invalid_json") from exc


def _texts(body: EmbeddingsRequest, max_inputs: int, max_bytes: int) -> list[str]:
    """The input as a list of texts, checked like atom texts (non-blank, byte limit)."""
    items: list[Any] = [body.input] if isinstance(body.input, str) else body.input
    if not items:
        raise _invalid("input must not be empty", "empty_input")
    if len(items) > max_inputs:
        raise _invalid(
            f"input has {len(items)} items; at most {max_inputs} are allowed", "too_many_inputs"
        )
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _invalid(
                f"input[{index}] is a {type(item).__name__}, not a string", "invalid_input"
            )
        if not item.strip():
            raise _invalid(f"input[{index}] is empty", "empty_input")
        size = len(item.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise _invalid(
                f"input[{index}] is {size} bytes; at most {max_bytes} are allowed",
                "input_too_large",
            )
    return items


def _encode(row: np.ndarray[Any, np.dtype[np.float32]], encoding: str) -> Any:
    """A vector as JSON numbers, or as base64 of little-endian float32 bytes (OpenAI)."""
    if encoding == "base64":
        return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")
    return row.tolist()


async def _model_entry(service: EmbeddingService, name: str) -> dict[str, Any]:
    routing = service.state.routing_config()
    batcher = service.batchers.get(name)
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "lattice-embed",
        "dim": (
            batcher.embedder.dim
            if batcher is not None
            else await anyio.to_thread.run_sync(_configured_dim, service, name)
        ),
        "fingerprint": await _fingerprint_or_none(service, name),
        "query_model": name == routing.query_model,
        "write_model": name in routing.write_models,
        "loaded": batcher is not None,
    }


async def _fingerprint_or_none(service: EmbeddingService, name: str) -> str | None:
    try:
        return await service.fingerprint(name)
    except LatticeError as exc:  # its directory is unreadable: say so, list the others
        log.warning("serve: no fingerprint for model %s: %s", name, exc)
        return None


def _configured_dim(service: EmbeddingService, name: str) -> int | None:
    """The hidden size from the model's config.json, without loading the model."""
    path = service.config.models[name].path
    if path is None:
        return None
    try:
        with open(f"{path}/config.json", "rb") as handle:
            size = json.load(handle).get("hidden_size")
    except (OSError, ValueError):
        return None
    return size if isinstance(size, int) else None


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(body),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
