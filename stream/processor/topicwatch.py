"""Ends the processor when a topic it works with is deleted under it.

With `auto.create.topics.enable=false` (as production brokers and the local broker run), a
deleted output topic makes every send wait for metadata and time out: windows retry
forever, nothing is committed, and nothing says why. A deleted `atoms` topic leaves the
group with no partitions: the processor idles. Neither is an outage to ride out; both need
an operator. So every `TOPIC_CHECK_SECS` the processor asks the broker whether its topics
still exist, and a missing one ends it with one error line and a non-zero exit. Offsets
are committed only after their outputs are acknowledged, so nothing is committed past
what was written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio

from stream.config import Config
from stream.errors import BrokerUnavailable, TopicDeleted
from stream.kafka.admin import Admin

log = logging.getLogger(__name__)

TOPIC_CHECK_SECS = 10.0


def watched_topics(config: Config, write_models: Sequence[str]) -> list[str]:
    """The topics a running processor needs: its input, the control log, the routing
    status, dead letters, and the output topic of every model in the write set (an output
    topic of a model no longer written may be deleted)."""
    topics = config.topics
    names = {topics.atoms, topics.control, topics.routing, topics.dlq}
    names.update(topics.embeddings(model) for model in write_models)
    return sorted(names)


async def watch_topics(
    config: Config,
    write_models: Callable[[], Sequence[str]],
    *,
    interval_secs: float = TOPIC_CHECK_SECS,
) -> None:
    """Raise `TopicDeleted` once a watched topic is gone. The input topic counts only once
    it has existed (a processor may start before it and wait). An unreachable broker says
    nothing about topics: the check is skipped until it answers."""
    atoms_seen = False
    async with Admin(config.kafka) as admin:
        while True:
            await anyio.sleep(interval_secs)
            try:
                missing = await admin.missing_topics(watched_topics(config, write_models()))
            except BrokerUnavailable:
                continue
            if config.topics.atoms not in missing:
                atoms_seen = True
            elif not atoms_seen:
                missing.remove(config.topics.atoms)
            if missing:
                raise TopicDeleted(
                    f"topic {', '.join(missing)} was deleted under the processor; a restart "
                    "creates the topics it owns again (empty: replay to refill an output "
                    "topic), the input topic must be recreated first"
                )
