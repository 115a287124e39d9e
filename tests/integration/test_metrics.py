"""/metrics, /healthz and /readyz during a real run: counters agree with what was produced."""

from __future__ import annotations

import re
import socket
from typing import Any

import anyio
import pytest

from tests.support.kafka import atom_value, create_topic, delete_value, end_offsets, produce, unique
from tests.support.processor import processor

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, str]:
    """A plain HTTP GET; returns (status, body)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from the exposition text."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # exposition order
    pattern = (
        rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$"
        if wanted
        else (rf"^{re.escape(name)} (\S+)$")
    )
    match = re.search(pattern, text, re.M)
    assert match is not None, f"{name}{{{wanted}}} missing"
    return float(match.group(1))


@pytest.mark.timeout(120)
async def test_metrics_agree_with_the_run_and_readiness_waits_for_partitions(
    bootstrap: str, make_config: Any
) -> None:
    atoms = unique("atoms")
    port = free_port()
    config, _ = make_config(atoms, extra=f'[metrics]\nhost = "127.0.0.1"\nport = {port}\n')
    good = [(f"a{i}".encode(), atom_value(f"a{i}", f"text number {i}")) for i in range(30)]
    bad = [(b"x1", b"not json"), (b"x2", atom_value("x2", "  "))]
    async with processor(config) as running:
        with anyio.fail_after(60):  # the endpoint comes up before the control log is replayed
            await running.listening.wait()
        assert running.metrics_port == port
        status, body = await get(port, "/readyz")
        assert status == 503, "no partitions yet: the input topic does not exist"
        assert (await get(port, "/healthz"))[0] == 200
        await create_topic(bootstrap, atoms, partitions=2)
        await produce(bootstrap, atoms, [*good, *bad, (b"a0", delete_value("a0"))])
        await running.drained(await end_offsets(bootstrap, atoms, 2), within=90)
        status, body = await get(port, "/readyz")
        assert status == 200, body
        status, text = await get(port, "/metrics")
    assert status == 200
    assert sample(text, "lattice_atoms_in_total", path="live") == 33
    assert sample(text, "lattice_embeddings_out_total", model="tiny", path="live") == 30
    assert sample(text, "lattice_tombstones_out_total", model="tiny") == 1
    assert sample(text, "lattice_dead_letters_total", stage="decode") == 1
    assert sample(text, "lattice_dead_letters_total", stage="validate") == 1
    assert sample(text, "lattice_ready") == 1
    assert sample(text, "lattice_routing_phase", phase="stable") == 1
    assert sample(text, "lattice_consumer_lag", topic=atoms, partition="0") == 0
    assert sample(text, "lattice_batch_atoms_count", model="tiny") >= 1
    assert sample(text, "lattice_window_seconds_count") >= 1
    assert sample(text, "lattice_backfill_step_seconds_count") == 0  # no migration ran
    assert "lattice_migration_progress_ratio NaN" in text
