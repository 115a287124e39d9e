"""`bench --serve`: throughput and latency of a running embeddings API, over loopback.

Each level runs `concurrency` clients that send one text per request, back to back, until
the level's request budget or time budget is spent; requests are counted only when answered
200, and every other answer is reported as an error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import httpx
import numpy as np

LEVELS = (1, 16, 64)


async def bench_serve(
    base_url: str,
    texts: Sequence[str],
    concurrency: Sequence[int] = LEVELS,
    *,
    requests_per_level: int = 512,
    max_secs_per_level: float = 20.0,
    input_type: str = "document",
    api_key: str | None = None,
    warmup: int = 8,
) -> dict[str, Any]:
    """Measure requests/s and p50/p99 latency (ms) at each concurrency level.

    Returns `{"levels": [{"concurrency", "requests", "errors", "seconds", "requests_per_s",
    "p50_ms", "p99_ms"}, ...]}`. `texts` are used round-robin, one per request.
    """
    if not texts:
        raise ValueError("bench_serve needs at least one text")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(
        max_connections=max(concurrency), max_keepalive_connections=max(concurrency)
    )
    levels: list[dict[str, Any]] = []
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=60.0, trust_env=False
    ) as client:
        for i in range(warmup):
            await _one(client, texts[i % len(texts)], input_type)
        for clients in concurrency:
            levels.append(
                await _level(
                    client, texts, clients, requests_per_level, max_secs_per_level, input_type
                )
            )
    return {"base_url": base_url, "input_type": input_type, "levels": levels}


async def _level(
    client: httpx.AsyncClient,
    texts: Sequence[str],
    clients: int,
    budget: int,
    max_secs: float,
    input_type: str,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    issued = 0
    started = time.perf_counter()
    deadline = started + max_secs

    async def worker() -> None:
        nonlocal issued, errors
        while issued < budget and time.perf_counter() < deadline:
            text = texts[issued % len(texts)]
            issued += 1
            sent = time.perf_counter()
            ok = await _one(client, text, input_type)
            if ok:
                latencies.append(time.perf_counter() - sent)
            else:
                errors += 1

    async with anyio.create_task_group() as tasks:
        for _ in range(clients):
            tasks.start_soon(worker)
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


async def _one(client: httpx.AsyncClient, text: str, input_type: str) -> bool:
    try:
        response = await client.post(
            "/v1/embeddings", json={"input": text, "input_type": input_type}
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def format_serve_table(report: dict[str, Any]) -> str:
    """The levels as a small text table."""
    lines = [f"{'clients':>8} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}"]
    for level in report["levels"]:
        lines.append(
            f"{level['concurrency']:>8} {level['requests_per_s']:>9} {level['p50_ms']:>9} "
            f"{level['p99_ms']:>9} {level['errors']:>7}"
        )
    return "\n".join(lines)
