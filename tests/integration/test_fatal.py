"""What no retry can fix ends the processor with one line: a topic deleted under it, an ACL
that denies it. Nothing may be committed past what was written.

Both tests drain a first batch (its offsets committed, its outputs written), then break
the processor's access and produce a second batch: the processor must exit 1 within a
minute with one `lattice-embed: error:` line and no traceback, and its committed offsets
must still be those of the first batch.

The ACL test runs on a broker of its own: Kafka's StandardAuthorizer, a PLAINTEXT listener
whose anonymous principal is a super user (the test's admin), and a SASL_PLAINTEXT listener
where the processor logs in as a SCRAM user with ACLs the test grants and then denies.
aiokafka's admin client has no ACL calls; the test sends CreateAcls itself.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.protocol.admin import CreateAclsRequest

from stream.config import Config, load_config
from stream.kafka.clients import connection_options
from tests.integration.conftest import write_config
from tests.integration.test_security import free_ports
from tests.support.kafka import (
    REPO,
    atom_value,
    collect,
    committed,
    create_topic,
    end_offsets,
    local_kafka,
    produce,
    unique,
    until_committed,
)

pytestmark = [pytest.mark.anyio, pytest.mark.kafka, pytest.mark.slow]

USER = "lattice"
MECHANISM = "SCRAM-SHA-512"
FIRST, SECOND = 120, 120  # atoms before and after access is broken
PARTITIONS = 2

# CreateAcls codes (org.apache.kafka.common.acl / resource).
TOPIC, GROUP, CLUSTER, TRANSACTIONAL_ID = 2, 3, 4, 5
LITERAL = 3
ALL, WRITE = 2, 4
DENY, ALLOW = 2, 3


def atoms_batch(prefix: str, count: int) -> list[tuple[bytes | None, bytes | None]]:
    return [
        (f"{prefix}-{i}".encode(), atom_value(f"{prefix}-{i}", f"atom {prefix} {i}"))
        for i in range(count)
    ]


class Child:
    """`lattice-embed run` as a child process, its stderr in a file next to its config."""

    def __init__(self, config_path: Path) -> None:
        self.log = config_path.with_suffix(f".{time.monotonic_ns()}.log")
        self._config_path = config_path
        self.process: anyio.abc.Process | None = None

    async def __aenter__(self) -> Child:
        command = [
            sys.executable,
            "-m",
            "stream.ops.cli",
            "run",
            "--config",
            str(self._config_path),
        ]
        stderr = await anyio.to_thread.run_sync(self.log.open, "wb")
        with stderr:  # the child holds its own descriptor
            self.process = await anyio.open_process(
                command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
            with anyio.move_on_after(30, shield=True):
                await self.process.wait()
        await self.process.aclose()

    async def exited(self, within: float) -> int:
        """Wait for the exit; its status."""
        assert self.process is not None
        with anyio.fail_after(within):
            return await self.process.wait()

    async def stderr(self) -> str:
        return await anyio.Path(self.log).read_text()


async def one_error_line(child: Child) -> str:
    """The single `lattice-embed: error:` line of a child that exited, with no traceback."""
    stderr = await child.stderr()
    assert "Traceback" not in stderr, stderr[-5000:]
    errors = [line for line in stderr.splitlines() if line.startswith("lattice-embed: ")]
    assert len(errors) == 1, stderr[-5000:]
    return errors[0]


async def drained(bootstrap: str, group: str, atoms: str, *, within: float) -> dict[int, int]:
    """Wait until `group` committed the input topic's end on every partition; the offsets."""
    ends = await end_offsets(bootstrap, atoms, PARTITIONS)
    return await until_committed(bootstrap, group, atoms, ends, within=within)


@pytest.mark.timeout(240)
async def test_an_output_topic_deleted_under_the_processor_ends_it_with_one_line(
    bootstrap: str, make_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, path = make_config(atoms)
    output = config.topics.embeddings("tiny")
    async with Child(path) as child:
        await produce(bootstrap, atoms, atoms_batch("first", FIRST))
        outputs = await collect(
            bootstrap, output, lambda records: len(records) >= FIRST, within=120
        )
        before = await drained(bootstrap, config.kafka.group_id, atoms, within=60)
        assert sum(before.values()) == FIRST == len(outputs)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([output])
        finally:
            await admin.close()
        deleted_at = time.monotonic()
        await produce(bootstrap, atoms, atoms_batch("second", SECOND))
        assert await child.exited(within=90) == 1, (await child.stderr())[-5000:]
        print(f"exited {time.monotonic() - deleted_at:.1f}s after the deletion")
        line = await one_error_line(child)
        assert line.startswith(f"lattice-embed: error: topic {output} was deleted"), line
        after = await committed(bootstrap, config.kafka.group_id, atoms, PARTITIONS)
        assert after == before  # the second batch had nowhere to go: none of it committed


# --- the ACL broker -------------------------------------------------------------------------


class AclBroker:
    """A broker with the StandardAuthorizer: `plaintext` (anonymous, a super user) and
    `sasl` (the SCRAM user `USER` with `password`)."""

    def __init__(self, plaintext: str, sasl: str, password: str) -> None:
        self.plaintext = plaintext
        self.sasl = sasl
        self.password = password

    async def acl(self, resource_type: int, name: str, operation: int, permission: int) -> None:
        """Add one ACL for `USER` (from any host) and wait until it is in force."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.plaintext)
        await admin.start()
        try:
            request = CreateAclsRequest(
                resource_type, name, LITERAL, f"User:{USER}", "*", operation, permission
            )
            response = await admin._send_request(request)
        finally:
            await admin.close()
        errors = [(code, message) for code, message in response.creation_responses if code]
        assert not errors, errors


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    root = tmp_path_factory.mktemp("acl-kafka")
    password = secrets.token_hex(16)
    plain_port, sasl_port = free_ports(2)
    properties = [
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users=User:ANONYMOUS",
        "allow.everyone.if.no.acl.found=false",
        f"sasl.enabled.mechanisms={MECHANISM}",
        f"listener.name.sasl_plaintext.{MECHANISM.lower()}.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    ]
    with local_kafka(
        KAFKA_PORT=str(plain_port),
        KAFKA_DIR=str(root / "kafka"),
        KAFKA_EXTRA_LISTENERS=f"SASL_PLAINTEXT://127.0.0.1:{sasl_port}",
        KAFKA_EXTRA_PROPERTIES="\n".join(properties),
        KAFKA_FORMAT_ARGS=f"--add-scram {MECHANISM}=[name={USER},password={password}]",
    ):
        yield AclBroker(f"127.0.0.1:{plain_port}", f"127.0.0.1:{sasl_port}", password)


def sasl_config(directory: Path, broker: AclBroker, tiny_model: Path, atoms: str) -> Path:
    """A config whose [kafka] logs in over SASL_PLAINTEXT as `USER`."""
    path = write_config(
        directory, broker.sasl, models={"tiny": tiny_model}, stable="tiny", atoms=atoms
    )
    security = (
        'security_protocol = "SASL_PLAINTEXT"\n'
        f'sasl_mechanism = "{MECHANISM}"\n'
        f'sasl_plain_username = "{USER}"\n'
        f'sasl_plain_password = "{broker.password}"\n'
    )
    path.write_text(path.read_text().replace("[kafka]\n", "[kafka]\n" + security, 1))
    return path


async def write_denied(config: Config, topic: str) -> bool:
    """Whether a send to `topic` as the processor's user is refused now."""
    producer = AIOKafkaProducer(**connection_options(config.kafka), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"probe", key=b"probe")
    except TopicAuthorizationFailedError:
        return True
    finally:
        await producer.stop()
    return False


@pytest.mark.timeout(300)
async def test_an_acl_that_denies_the_output_topic_ends_the_processor_with_one_line(
    acl_broker: AclBroker, tiny_model: Path, tmp_path: Path
) -> None:
    for resource_type, name in ((TOPIC, "*"), (GROUP, "*"), (TRANSACTIONAL_ID, "*")):
        await acl_broker.acl(resource_type, name, ALL, ALLOW)
    await acl_broker.acl(CLUSTER, "kafka-cluster", ALL, ALLOW)
    atoms = unique("atoms")
    path = sasl_config(tmp_path, acl_broker, tiny_model, atoms)
    config = load_config(path, {})
    plain = acl_broker.plaintext
    await create_topic(plain, atoms, partitions=PARTITIONS)
    output = config.topics.embeddings("tiny")
    async with Child(path) as child:
        await produce(plain, atoms, atoms_batch("first", FIRST))
        outputs = await collect(plain, output, lambda records: len(records) >= FIRST, within=120)
        before = await drained(plain, config.kafka.group_id, atoms, within=60)
        assert sum(before.values()) == FIRST == len(outputs)
        await acl_broker.acl(TOPIC, output, WRITE, DENY)
        for _ in range(60):  # ACLs reach the broker through its metadata log
            if await write_denied(config, output):
                break
            await anyio.sleep(0.5)
        else:
            pytest.fail(f"writes to {output} were still allowed 30 s after the deny")
        denied_at = time.monotonic()
        await produce(plain, atoms, atoms_batch("second", SECOND))
        assert await child.exited(within=90) == 1, (await child.stderr())[-5000:]
        print(f"exited {time.monotonic() - denied_at:.1f}s after the deny")
        line = await one_error_line(child)
        assert line.startswith("lattice-embed: error: "), line
        assert "refused access" in line and output in line, line
        after = await committed(plain, config.kafka.group_id, atoms, PARTITIONS)
        assert after == before  # nothing of the second batch was written, none committed
