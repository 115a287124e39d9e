"""The live path's side of exactly-once mode: a window's transactions committed, aborted,
and given up when this instance was fenced (a zombie)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from stream.core.records import SourceRecord
from stream.errors import CommitFailed, LatticeError, ProducerFencedError
from stream.kafka.consumer import GroupConsumer
from stream.processor.commits import Offsets
from stream.processor.transactions import PartitionTransactions

log = logging.getLogger(__name__)


class WindowTransactions:
    """A live window's transactions, one per input partition (None: at-least-once, where
    every call is a no-op)."""

    def __init__(
        self,
        transactions: PartitionTransactions | None,
        consumer: GroupConsumer,
        offsets: Offsets,
    ) -> None:
        self._transactions = transactions
        self._consumer = consumer
        self._offsets = offsets

    async def commit(self, records: Sequence[SourceRecord]) -> list[SourceRecord]:
        """Commit each input partition's transaction with its offset; a partition whose
        commit fails is aborted; returns the records to read again (fenced: left to the
        partitions' new owner)."""
        if self._transactions is None:
            raise AssertionError("not in exactly-once mode")
        ends: dict[int, int] = {}
        for record in records:
            ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        committed: dict[int, int] = {}
        failed: list[SourceRecord] = []
        for partition, end in sorted(ends.items()):
            try:
                await self._transactions.commit(partition, end)
            except ProducerFencedError as exc:
                log.error("exactly-once: partition %d: %s; its new owner redoes it", partition, exc)
                await self.fenced([partition])  # drops every producer: nothing more commits
                failed = [r for r in records if r.partition not in committed]
                break
            except LatticeError as exc:
                log.warning(
                    "exactly-once: commit of partition %d failed (%s); redone", partition, exc
                )
                await self.abort([r for r in records if r.partition == partition])
                failed += [r for r in records if r.partition == partition]
            else:
                committed[partition] = end
        self._offsets.committed(committed)
        return failed

    async def fenced(self, partitions: set[int] | list[int]) -> None:
        """A producer was fenced: this instance's session expired and its partitions moved,
        all of them (eager rebalance). Drop every producer; none starts again before a
        rebalance assigns partitions here (it would fence their rightful owners)."""
        if self._transactions is not None:
            every = set(partitions) | set(self._consumer.assignment())
            every |= set(self._transactions.open_partitions())
            await self._transactions.release(every)
            self._transactions.fenced(every)

    async def abort(self, records: Sequence[SourceRecord]) -> None:
        """Exactly-once: abort the window's open transactions (nothing of it is seen)."""
        if self._transactions is None:
            return
        partitions = {r.partition for r in records}
        try:
            renewed = await self._transactions.abort(partitions)
            if renewed:
                log.warning(
                    "exactly-once: new producers for partitions %s (their sequence broke)",
                    sorted(renewed),
                )
                await self._confirm_owner(renewed)
        except ProducerFencedError:
            await self.fenced(partitions)
        except LatticeError as exc:  # unreachable: the producers are restarted, aborting it
            log.warning("exactly-once: abort failed (%s); restarting the producers", exc)
            await self._transactions.release(partitions)

    async def _confirm_owner(self, partitions: list[int]) -> None:
        """Before new producers start for `partitions`: is this instance still a member? A
        zombie's new producer would fence the rightful owner's, so a refused commit marks
        them fenced here until a rebalance assigns them again."""
        try:
            await self._offsets.confirm_membership()
        except CommitFailed as exc:
            log.warning("exactly-once: not the owner of %s any more: %s", partitions, exc)
            if self._transactions is not None:
                self._transactions.fenced(partitions)
