"""Create the topics the processor owns; read partition counts and end offsets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import for_code

from stream.config import KafkaConfig
from stream.errors import BrokerUnavailable, NotAuthorized
from stream.kafka.clients import MAX_REQUEST_BYTES, connection_options
from stream.kafka.errors import kafka_errors

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
UNKNOWN_TOPIC_OR_PARTITION = 3
TOPIC_AUTHORIZATION_FAILED = 29


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic the processor creates when it is missing (it never deletes one)."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


def event_log_configs() -> dict[str, str]:
    """A never-deleted, never-compacted log whose record times come from the broker."""
    return {
        "cleanup.policy": "delete",
        "retention.ms": "-1",
        "retention.bytes": "-1",
        "message.timestamp.type": "LogAppendTime",
    }


def snapshot_configs() -> dict[str, str]:
    """Routing snapshots: compacted (the latest per key stays), in small segments so the
    cleaner can reclaim superseded ones; a snapshot of a 100-partition migration is ~10 KB."""
    return {
        "cleanup.policy": "compact",
        "segment.bytes": str(16 * 1024 * 1024),
        "max.message.bytes": str(MAX_REQUEST_BYTES),
    }


def output_configs() -> dict[str, str]:
    """Output topics accept records up to the processor's request size."""
    return {"max.message.bytes": str(MAX_REQUEST_BYTES)}


class Admin:
    """An admin client for the lifetime of an `async with` block."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._kafka = kafka
        self._client = AIOKafkaAdminClient(**connection_options(kafka))

    async def __aenter__(self) -> Admin:
        async with kafka_errors("admin", self._kafka.bootstrap_servers):
            await self._client.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._client.close()

    async def partition_count(self, topic: str) -> int | None:
        """Partitions of `topic`, or None when it does not exist."""
        async with kafka_errors("admin", self._kafka.bootstrap_servers):
            described = await self._client.describe_topics([topic])
        for entry in described:
            if entry["topic"] == topic and entry["error_code"] == 0:
                return len(entry["partitions"])
        return None

    async def missing_topics(self, topics: list[str]) -> list[str]:
        """Those of `topics` the broker says do not exist (`NotAuthorized` if it refuses
        to describe one: a missing Describe ACL hides whether it exists)."""
        async with kafka_errors("admin", self._kafka.bootstrap_servers):
            described = await self._client.describe_topics(topics)
        missing = []
        for entry in described:
            code = entry["error_code"]
            if code == UNKNOWN_TOPIC_OR_PARTITION:
                missing.append(entry["topic"])
            elif code == TOPIC_AUTHORIZATION_FAILED:
                raise NotAuthorized(
                    f"admin: Kafka at {self._kafka.bootstrap_servers} refused to describe "
                    f"topic {entry['topic']}: {for_code(code).__name__}"
                )
        return sorted(missing)

    async def committed(self, group_id: str, topic: str) -> dict[int, int]:
        """The offsets `group_id` has committed on `topic`, per partition (tools, benches)."""
        async with kafka_errors("admin", self._kafka.bootstrap_servers):
            found = await self._client.list_consumer_group_offsets(group_id)
        return {tp.partition: int(meta.offset) for tp, meta in found.items() if tp.topic == topic}

    async def group_members(self, group_id: str) -> tuple[str, int]:
        """The state of consumer group `group_id` (`Stable`, `PreparingRebalance`, `Empty`,
        ...) and how many members it has (tools, benches)."""
        async with kafka_errors("admin", self._kafka.bootstrap_servers):
            responses = await self._client.describe_consumer_groups([group_id])
        for response in responses:
            for error_code, name, state, _protocol_type, _protocol, members, *_ in response.groups:
                if name == group_id and error_code == 0:
                    return str(state), len(members)
        return "Dead", 0

    async def ensure_topics(self, specs: list[TopicSpec]) -> list[str]:
        """Create every missing topic in `specs`; return the names actually created."""
        if not specs:
            return []
        async with kafka_errors("admin", self._kafka.bootstrap_servers):
            existing = set(await self._client.list_topics())
            missing = [spec for spec in specs if spec.name not in existing]
            if not missing:
                return []
            response = await self._client.create_topics(
                [
                    NewTopic(
                        name=spec.name,
                        num_partitions=spec.partitions,
                        replication_factor=spec.replication_factor,
                        topic_configs=spec.configs,
                    )
                    for spec in missing
                ]
            )
        created = []
        for topic, code, *rest in response.topic_errors:
            if code == 0:
                created.append(topic)
                log.info("created topic %s", topic)
            elif code != TOPIC_ALREADY_EXISTS:
                detail = rest[0] if rest and rest[0] else for_code(code).__name__
                raise BrokerUnavailable(f"cannot create topic {topic}: {detail}")
        return created
