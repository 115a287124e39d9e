"""Build aiokafka clients from the config (only `stream/kafka/` constructs them)."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from stream.config import KafkaConfig

# An embedding record is ~8 KiB of JSON; a dead letter carries an input of up to the broker's
# limit plus headers. Both fit under this request size; owned topics allow it too.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def connection_options(kafka: KafkaConfig) -> dict[str, Any]:
    """Keyword arguments every aiokafka client takes: bootstrap, identity, security."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=kafka.ssl_cafile, certfile=kafka.ssl_certfile, keyfile=kafka.ssl_keyfile
        )
    if kafka.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = kafka.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = kafka.sasl_plain_username
        options["sasl_plain_password"] = kafka.sasl_plain_password
    return options


def make_producer(
    kafka: KafkaConfig,
    *,
    transactional_id: str | None = None,
    linger_ms: int = 5,
    idempotent: bool | None = None,
) -> AIOKafkaProducer:
    """A producer with acks=all (idempotent unless configured off), sized for our records."""
    return AIOKafkaProducer(
        **connection_options(kafka),
        acks="all",
        enable_idempotence=kafka.enable_idempotence if idempotent is None else idempotent,
        compression_type=None if kafka.compression_type == "none" else kafka.compression_type,
        transactional_id=transactional_id,
        linger_ms=linger_ms,
        max_batch_size=1024 * 1024,
        max_request_size=MAX_REQUEST_BYTES,
    )


def make_consumer(
    kafka: KafkaConfig, *, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer with manual commits that reads only committed data."""
    options: dict[str, Any] = {
        **connection_options(kafka),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "session_timeout_ms": kafka.session_timeout_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "max_partition_fetch_bytes": MAX_REQUEST_BYTES,
        "fetch_max_bytes": 4 * MAX_REQUEST_BYTES,
    }
    options.update(overrides)
    return AIOKafkaConsumer(**options)
