"""Handoffs: the first offset of each owned partition that the live path writes to the
target. Backfill covers everything before it; the live path everything from it on."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from schemas.control import HandoffRecorded
from stream.core.records import SourceRecord
from stream.core.routing import Migration, RoutingState
from stream.kafka.consumer import GroupConsumer
from stream.processor.control import ControlPlane

log = logging.getLogger(__name__)


class Handoffs:
    """Records the handoffs of owned partitions that dual-write without one."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    async def before_window(
        self, state: RoutingState, consumer: GroupConsumer, records: Sequence[SourceRecord]
    ) -> RoutingState:
        """Record missing handoffs (at the window's first offset, or the position of an idle
        partition) and return the state once they are applied, so this window sees them."""
        migration = state.active
        if migration is None or not migration.dual_writing:
            return state
        assigned = consumer.assignment()
        missing = [p for p in assigned if p not in migration.handoffs]
        if not missing:
            return state
        first_in_window: dict[int, int] = {}
        for record in records:
            first_in_window[record.partition] = min(
                first_in_window.get(record.partition, record.offset), record.offset
            )
        starts = await consumer.beginning_offsets(missing)
        partitions = consumer.partition_count() or len(assigned)
        last = -1
        for partition in missing:
            offset = first_in_window.get(partition)
            if offset is None:
                offset = await consumer.position(partition)
            last = await self.record(migration, partition, offset, starts[partition], partitions)
        return await self._control.wait_applied(last)

    async def record(
        self,
        migration: Migration,
        partition: int,
        offset: int,
        log_start: int,
        partitions: int,
        *,
        counted: bool = True,
    ) -> int:
        """Append the handoff of one partition; returns its control-log offset."""
        log.info("handoff %s partition %d at offset %d", migration.migration_id, partition, offset)
        return await self._control.append(
            HandoffRecorded(
                migration_id=migration.migration_id,
                epoch=migration.epoch,
                partition=partition,
                offset=offset,
                log_start=min(log_start, offset),
                partitions=partitions,
                counted=counted,
            )
        )
