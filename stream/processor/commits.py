"""Offsets of the live path: commit after the acknowledgements, rewind for a retry, lag.

Protocol steps for one window: (1) every output and dead letter of the window is
acknowledged, (2) each partition's offset is committed as `last offset + 1`, (3) only then
is it counted as processed (for lag and for "live atoms are waiting").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from stream.core.records import SourceRecord
from stream.errors import CommitFailed
from stream.kafka.consumer import GroupConsumer
from stream.processor.sensors import Sensor

log = logging.getLogger(__name__)


class Offsets:
    """What this instance has processed and committed, per owned partition."""

    def __init__(self, consumer: GroupConsumer, sensor: Sensor) -> None:
        self._consumer = consumer
        self._sensor = sensor
        self._processed: dict[int, int] = {}
        # The highest offset this instance ever committed per partition, kept across
        # rebalances: the group's committed offset is never below it (a later owner starts
        # from at least there). A committed offset read lower is stale (a transactional
        # commit whose marker the group coordinator has not applied yet), so reading
        # resumes from here instead, and a fetched record below it was processed already.
        self._floor: dict[int, int] = {}
        self.stale_reads = 0  # committed offsets read below the floor (resumed from it)
        self.dropped_done = 0  # fetched records below the floor (dropped: processed already)

    async def commit(self, records: Sequence[SourceRecord]) -> None:
        """Commit the window's offsets (`offset + 1` per partition); a commit refused by a
        rebalance is logged and dropped, since the new owner redoes the window."""
        offsets: dict[int, int] = {}
        for record in records:
            offsets[record.partition] = max(offsets.get(record.partition, 0), record.offset + 1)
        try:
            await self._consumer.commit(offsets)
        except CommitFailed as exc:
            log.warning("commit after a rebalance failed (the new owner redoes it): %s", exc)
            return
        self._processed.update(offsets)
        self._raise_floor(offsets)
        self._sensor.on_commit(offsets)

    def committed(self, offsets: dict[int, int]) -> None:
        """Offsets committed by an exactly-once transaction (not by `commit`)."""
        if offsets:
            self._processed.update(offsets)
            self._raise_floor(offsets)
            self._sensor.on_commit(offsets)

    def _raise_floor(self, offsets: dict[int, int]) -> None:
        for partition, offset in offsets.items():
            self._floor[partition] = max(self._floor.get(partition, 0), offset)

    async def resume_from_committed(self, partitions: Sequence[int]) -> dict[int, int | None]:
        """Read `partitions` from the group's committed offsets as the broker has them now,
        never from below what this instance committed itself. Returns where each resumes
        (None: nothing committed, so from the first offset)."""
        found = await self._consumer.read_committed(partitions)
        resumed: dict[int, int | None] = {}
        for partition, offset in found.items():
            floor = self._floor.get(partition)
            if floor is not None and (offset is None or offset < floor):
                log.warning(
                    "partition %d: the group's committed offset read %s, below the %d this "
                    "instance committed (not applied yet); reading from %d",
                    partition,
                    offset,
                    floor,
                    floor,
                )
                offset = floor
                self.stale_reads += 1
            resumed[partition] = offset
            await self._consumer.seek_committed(partition, offset)
        return resumed

    def drop_done(self, records: Sequence[SourceRecord]) -> list[SourceRecord]:
        """`records` without those below this instance's own commits (processed already);
        any such record is logged: it means a read position went back past a commit."""
        if not self._floor:
            return list(records)
        kept = [r for r in records if r.offset >= self._floor.get(r.partition, 0)]
        if len(kept) < len(records):
            dropped = Counter(r.partition for r in records) - Counter(r.partition for r in kept)
            log.warning(
                "dropped %d fetched records below this instance's own committed offsets "
                "(processed already), by partition: %s; floors %s",
                len(records) - len(kept),
                dict(dropped),
                {p: self._floor[p] for p in dropped},
            )
            self.dropped_done += len(records) - len(kept)
        return kept

    async def confirm_membership(self) -> None:
        """Commit again what is committed already: the broker refuses it (`CommitFailed`) if
        this member's session expired and its partitions went to another (a zombie).

        Backfill runs this before each step: a zombie would otherwise keep writing backfill
        records for partitions whose new owner is writing newer versions live.
        """
        if self._processed:
            await self._consumer.commit(dict(self._processed))

    def rewind(self, records: Sequence[SourceRecord]) -> None:
        """Seek each partition back to the window's first record, to process it again."""
        first: dict[int, int] = {}
        for record in records:
            first[record.partition] = min(first.get(record.partition, record.offset), record.offset)
        for partition, offset in first.items():
            self._consumer.seek(partition, offset)

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: they are another instance's to count."""
        for partition in partitions:
            self._processed.pop(partition, None)

    def lag(self) -> dict[tuple[str, int], int]:
        """Atoms in the log past what this instance processed, per owned partition."""
        lags = {}
        for partition, processed in self._processed.items():
            highwater = self._consumer.highwater(partition)
            if highwater is not None:
                lags[self._consumer.topic, partition] = max(0, highwater - processed)
        return lags

    async def live_waiting(self) -> bool:
        """Live atoms are in the log past what this instance has fetched (the high-water
        marks come with the consumer's background fetches; unknown counts as waiting)."""
        for partition in self._consumer.assignment():
            highwater = self._consumer.highwater(partition)
            try:
                if highwater is None or highwater > await self._consumer.position(partition):
                    return True
            except CommitFailed:  # revoked meanwhile: its new owner looks at it
                continue
        return False
