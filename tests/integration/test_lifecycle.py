"""The processor as a process: SIGTERM drains and commits, SIGKILL loses nothing, bad starts."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from schemas.embeddings import EmbeddingRecord
from stream.embed.embedder import Embedder
from stream.embed.pool import ModelPool
from stream.processor.app import run_processor
from tests.support.kafka import (
    atom_value,
    collect,
    committed,
    create_topic,
    produce,
    read_all,
    unique,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

SMALL_WINDOWS = "[batching]\nwindow_atoms = 32\nmicro_batch_atoms = 16\n"


@contextmanager
def processor_process(
    config_path: Path, *args: str, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`lattice-embed run [args]` as a child process (with `env` added to the test's
    environment); killed if the test leaves it running.

    Its log goes to a file next to the config (`log_of`) and is printed when the test fails.
    """
    log_path = config_path.with_suffix(f".{time.monotonic_ns()}.log")
    with open(log_path, "wb") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "stream.ops.cli", "run", "--config", str(config_path), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # The tests' own knobs are no settings: the processor refuses unknown LATTICE_*.
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("LATTICE_TEST_")},
                **(env or {}),
            },
        )
        _LOGS[child.pid] = log_path
        try:
            yield child
        except BaseException:
            print(log_path.read_text(errors="replace")[-5000:])
            raise
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)


_LOGS: dict[int, Path] = {}


def log_of(child: subprocess.Popen[bytes]) -> str:
    """What a `processor_process` child has logged so far."""
    return _LOGS[child.pid].read_text(errors="replace")


def source_offsets(records: list[Any]) -> Counter[int]:
    """The highest source offset output per input partition (+1: what a commit must say)."""
    ends: Counter[int] = Counter()
    for record in records:
        source = msgspec.json.decode(record.value, type=EmbeddingRecord).source
        ends[source.partition] = max(ends[source.partition], source.offset + 1)
    return ends


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigterm_drains_commits_and_exits_zero(bootstrap: str, make_config: Any) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=3)
    config, path = make_config(atoms, extra=SMALL_WINDOWS)
    await produce(
        bootstrap,
        atoms,
        (
            (f"a-{i}".encode(), atom_value(f"a-{i}", f"atom {i} " * (i % 40 + 1)))
            for i in range(3000)
        ),
    )
    with processor_process(path) as child:
        await collect(
            bootstrap,
            config.topics.embeddings("tiny"),
            lambda r: len(r) >= 100,
            within=120,
            alive=lambda: child.poll() is None,
        )
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
    out = await read_all(bootstrap, config.topics.embeddings("tiny"))
    consumed = source_offsets(out)
    offsets = await committed(bootstrap, config.kafka.group_id, atoms, 3)
    assert offsets == {p: consumed.get(p, -1) for p in range(3)}
    assert sum(consumed.values()) < 3000, "SIGTERM landed mid-stream"


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_sigkill_mid_stream_then_restart_loses_nothing(
    bootstrap: str, make_config: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    total = 3000
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=3)
    config, path = make_config(atoms, extra=SMALL_WINDOWS)
    await produce(
        bootstrap,
        atoms,
        (
            (f"a-{i}".encode(), atom_value(f"a-{i}", f"atom {i} " * (i % 40 + 1)))
            for i in range(total)
        ),
    )
    topic = config.topics.embeddings("tiny")
    with processor_process(path) as child:
        await collect(
            bootstrap,
            topic,
            lambda r: len(r) >= 300,
            within=120,
            alive=lambda: child.poll() is None,
        )
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    before_restart = len(await read_all(bootstrap, topic))
    assert before_restart < total, "SIGKILL landed mid-stream"
    with processor_process(path) as child:
        out = await collect(
            bootstrap,
            topic,
            lambda r: len({x.key for x in r}) >= total,
            within=180,
            alive=lambda: child.poll() is None,
        )
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
    out = await read_all(bootstrap, topic)
    per_key = Counter(r.key for r in out)
    assert set(per_key) == {f"a-{i}".encode() for i in range(total)}
    duplicates = sum(per_key.values()) - total
    with capsys.disabled():
        print(f"\nSIGKILL after {before_restart} outputs: {duplicates} duplicates on restart")
    assert duplicates <= before_restart, "restart resumed from committed offsets"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.timeout(150)
def test_bad_starts_fail_with_one_clear_line(tmp_path: Path) -> None:
    refused = (
        "lattice-embed: error: admin: cannot connect to Kafka at 127.0.0.1:1 (unreachable, or "
        "its TLS/SASL settings refused ours): KafkaConnectionError: "
        "Unable to bootstrap from [('127.0.0.1', 1, <AddressFamily.AF_INET: 2>)]"
    )
    no_wait = {"LATTICE_BOOTSTRAP_SERVERS": "127.0.0.1:1", "LATTICE_KAFKA_START_TIMEOUT_SECS": "0"}
    unreachable = run_cli("run", env=no_wait)
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().splitlines() == [refused]
    began = time.monotonic()
    waited = run_cli("run", env={**no_wait, "LATTICE_KAFKA_START_TIMEOUT_SECS": "2"})
    assert waited.returncode == 1 and time.monotonic() - began >= 1.0
    lines = waited.stderr.strip().splitlines()
    assert lines[-1] == refused
    assert "Kafka unreachable during the start" in waited.stderr and "starting again in 1 s" in (
        waited.stderr
    ), lines
    unknown = run_cli("run", env={"LATTICE_ROUTING_STABLE_MODEL": "bge-small"})
    assert unknown.returncode == 2
    assert unknown.stderr == (
        "lattice-embed: config: routing.stable_model: unknown model 'bge-small' "
        "(configured: minilm)\n"
    )
    config = tmp_path / "c.toml"
    config.write_text(f'[routing]\nstable_model = "m"\n[models.m]\npath = "{tmp_path}/nope"\n')
    missing = run_cli("run", "--config", str(config))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        f"lattice-embed: error: model m: {tmp_path}/nope is not a readable model directory "
        "(no config.json)"
    )


class _StuckLoad(ModelPool):
    """A pool whose model load never finishes on its own: the start is stuck in it."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.loading = anyio.Event()

    async def get(self, name: str) -> Embedder:
        self.loading.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.mark.timeout(60)
async def test_sigterm_during_the_start_ends_it_cleanly(
    bootstrap: str, make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The CI failure of stop 16: SIGTERM while the models loaded killed the process (-15)."""
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=1)
    config, _ = make_config(atoms)
    pool = _StuckLoad(config)
    caplog.set_level(logging.INFO, logger="stream.processor.app")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: run_processor(config, models=pool))
        with anyio.fail_after(30):
            await pool.loading.wait()
        os.kill(os.getpid(), signal.SIGTERM)
    assert "stopped during start-up, before the first atom" in caplog.text
