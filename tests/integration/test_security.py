"""The processor on a real broker that wants SASL_SSL: SCRAM-SHA-512 over TLS with a test CA.

The module starts its own broker (deploy/kafka/local-kafka, fresh KAFKA_DIR, free ports) with
a PLAINTEXT listener for the readiness probe and a SASL_SSL listener for the tests; the SCRAM
user is created when the data directory is formatted.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream.config import Config, load_config
from stream.kafka.clients import connection_options
from tests.integration.conftest import write_config
from tests.support.kafka import REPO, atom_value, collect, latest_by_key, local_kafka, unique
from tests.support.processor import processor
from tests.support.tls import TlsFiles, make_tls_files

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER = "lattice"
MECHANISM = "SCRAM-SHA-512"


@dataclass(frozen=True)
class SecureBroker:
    """A broker whose SASL_SSL listener is at `bootstrap`; its PLAINTEXT one is at `plaintext`."""

    bootstrap: str
    plaintext: str
    password: str
    tls: TlsFiles


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """A separate local Kafka with a SASL_SSL (SCRAM-SHA-512) listener; stopped afterwards."""
    root = tmp_path_factory.mktemp("secure-kafka")
    tls = make_tls_files(root / "tls")
    password = secrets.token_hex(16)
    plain_port, sasl_port = free_ports(2)
    properties = [
        f"sasl.enabled.mechanisms={MECHANISM}",
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        *tls.broker_properties("sasl_ssl"),
    ]
    with local_kafka(
        KAFKA_PORT=str(plain_port),
        KAFKA_DIR=str(root / "kafka"),  # fresh: the SCRAM user is added when it is formatted
        KAFKA_EXTRA_LISTENERS=f"SASL_SSL://127.0.0.1:{sasl_port}",
        KAFKA_EXTRA_PROPERTIES="\n".join(properties),
        KAFKA_FORMAT_ARGS=f"--add-scram {MECHANISM}=[name={USER},password={password}]",
    ):
        yield SecureBroker(
            bootstrap=f"127.0.0.1:{sasl_port}",
            plaintext=f"127.0.0.1:{plain_port}",
            password=password,
            tls=tls,
        )


def write_secure_config(
    directory: Path, broker: SecureBroker, tiny_model: Path, *, atoms: str, password: str
) -> Path:
    """A config as `make_config` writes it, with [kafka] connecting over SASL_SSL."""
    path = write_config(
        directory, broker.bootstrap, models={"tiny": tiny_model}, stable="tiny", atoms=atoms
    )
    text = path.read_text()
    assert text.startswith("[kafka]\n"), text
    security = (
        'security_protocol = "SASL_SSL"\n'
        f'sasl_mechanism = "{MECHANISM}"\n'
        f'sasl_plain_username = "{USER}"\n'
        f'sasl_plain_password = "{password}"\n'
        f'ssl_cafile = "{broker.tls.ca}"\n'
    )
    path.write_text(text.replace("[kafka]\n", "[kafka]\n" + security, 1))
    return path


async def create_topic(config: Config, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(**connection_options(config.kafka))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce(config: Config, topic: str, records: list[tuple[bytes, bytes]]) -> dict[int, int]:
    """Send the records; return the end offset of each partition written."""
    producer = AIOKafkaProducer(**connection_options(config.kafka), acks="all", linger_ms=5)
    await producer.start()
    ends: dict[int, int] = {}
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        for future in futures:
            meta = await future
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


async def read_keys(config: Config, topic: str, n: int, *, within: float) -> list[Any]:
    """Read `topic` over SASL_SSL until `n` distinct keys have arrived."""
    return await collect(
        config.kafka.bootstrap_servers,
        topic,
        lambda records: len({r.key for r in records}) >= n,
        within=within,
        client=connection_options(config.kafka),
    )


@pytest.mark.anyio
@pytest.mark.timeout(240)
async def test_atoms_reach_the_embeddings_topic_over_sasl_ssl_scram(
    secure_broker: SecureBroker, tiny_model: Path, tmp_path: Path
) -> None:
    atoms = unique("atoms")
    path = write_secure_config(
        tmp_path, secure_broker, tiny_model, atoms=atoms, password=secure_broker.password
    )
    config = load_config(path, {})
    assert config.kafka.security_protocol == "SASL_SSL"
    await create_topic(config, atoms, partitions=2)
    ids = [f"s-{i}" for i in range(20)]
    ends = await produce(
        config, atoms, [(i.encode(), atom_value(i, f"secure atom number {i}")) for i in ids]
    )
    async with processor(config) as running:
        await running.drained(ends, within=120)
        out = await read_keys(config, config.topics.embeddings("tiny"), len(ids), within=60)
    latest = latest_by_key(out)
    assert set(latest) == set(ids)
    assert all(record.value is not None for record in latest.values())


@pytest.mark.timeout(120)
def test_wrong_password_fails_fast_with_one_error_line(
    secure_broker: SecureBroker, tiny_model: Path, tmp_path: Path
) -> None:
    path = write_secure_config(
        tmp_path, secure_broker, tiny_model, atoms=unique("atoms"), password="not-the-password"
    )
    began = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stream.ops.cli", "run", "--config", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
            # A refused login reads as an unreachable broker: no start-up wait for it here.
            env={**os.environ, "LATTICE_KAFKA_START_TIMEOUT_SECS": "0"},
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"run with a wrong password still ran after 90 s; stderr: {exc.stderr!r}")
    took = time.monotonic() - began
    print(f"exit {done.returncode} after {took:.1f}s; stderr:\n{done.stderr}")
    assert done.returncode == 1, done.stderr
    assert took < 60
    # Log lines start with a timestamp; the failure is one line of its own, and no traceback.
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("lattice-embed: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(
        f"lattice-embed: error: admin: cannot connect to Kafka at {secure_broker.bootstrap} "
        "(unreachable, or its TLS/SASL settings refused ours): "
    ), done.stderr
