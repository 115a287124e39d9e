"""The topics the processor owns, created when missing (it never deletes one)."""

from __future__ import annotations

import logging

from stream.config import Config
from stream.kafka.admin import (
    Admin,
    TopicSpec,
    event_log_configs,
    output_configs,
    snapshot_configs,
)

log = logging.getLogger(__name__)


def owned_topics(config: Config, partitions: int) -> list[TopicSpec]:
    """Every topic the processor creates when missing: outputs, dead letters, control, routing,
    routing snapshots."""
    topics = config.topics
    replicas = topics.replication_factor
    specs = [
        TopicSpec(topics.embeddings(name), partitions, replicas, output_configs())
        for name in sorted(config.models)
    ]
    specs.append(TopicSpec(topics.dlq, partitions, replicas, output_configs()))
    specs.append(TopicSpec(topics.control, 1, replicas, event_log_configs()))
    specs.append(TopicSpec(topics.routing, 1, replicas, {"cleanup.policy": "compact"}))
    specs.append(TopicSpec(topics.snapshots(), 1, replicas, snapshot_configs()))
    return specs


async def prepare_topics(config: Config) -> int | None:
    """Create the owned topics that are missing, sized like `atoms` unless configured.

    Returns the partition count of `atoms` (None while it does not exist).

    This is the processor's first contact with Kafka: an unreachable broker surfaces here
    as one `BrokerUnavailable` line (aiokafka's own connection log is held back meanwhile).
    """
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        async with Admin(config.kafka) as admin:
            atoms_partitions = await admin.partition_count(config.topics.atoms)
            partitions = config.topics.partitions or atoms_partitions or 1
            await admin.ensure_topics(owned_topics(config, partitions))
        return atoms_partitions
    finally:
        client_log.setLevel(level)
