"""What a window remembers across its retries: the dead letters it already wrote, and the
input records whose outputs went in a batch the broker refused.

Both are bounded: a window that succeeds forgets its entries, and past the limit (windows
that keep failing) the oldest are forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream.core.records import SourceRecord

# Dead letters a failed window wrote before it failed, kept for its retry (at-least-once
# only); more than this many means windows keep failing, and the oldest are forgotten.
LETTER_LEDGER_MAX = 10_000

# A dead letter's identity: input topic, partition, offset, and the model (None: all).
LetterKey = tuple[str, int, int, str | None]


class LetterLedger:
    """Dead letters written by windows that then failed, so their retries do not write
    them again (exactly one dead letter per bad offset, across window retries).

    At-least-once only: an aborted transaction discards its dead letters, so in
    exactly-once mode a retry must write them again. A window that succeeds forgets its
    offsets (they are committed next), so the ledger holds only failed windows' letters.
    """

    def __init__(self, limit: int = LETTER_LEDGER_MAX) -> None:
        self._written: dict[LetterKey, None] = {}
        self._limit = limit

    def __contains__(self, key: LetterKey) -> bool:
        return key in self._written

    def __len__(self) -> int:
        return len(self._written)

    def add(self, key: LetterKey) -> None:
        """Remember one written dead letter (the oldest goes past the limit)."""
        self._written[key] = None
        if len(self._written) > self._limit:
            del self._written[next(iter(self._written))]

    def forget(self, records: Sequence[SourceRecord]) -> None:
        """Drop every entry of `records` (their window succeeded)."""
        if not self._written:
            return
        offsets = {(r.topic, r.partition, r.offset) for r in records}
        for key in [k for k in self._written if k[:3] in offsets]:
            del self._written[key]


class RefusedRecords:
    """Input records whose outputs went in a batch the broker refused: their window's
    retry sends one record at a time. Bounded like `LetterLedger` (a window succeeds or
    keeps failing; either way its entries go)."""

    def __init__(self, limit: int = LETTER_LEDGER_MAX) -> None:
        self._records: dict[tuple[str, int, int], None] = {}
        self._limit = limit

    def add(self, records: Sequence[SourceRecord]) -> None:
        """Remember `records` (the oldest go past the limit)."""
        for r in records:
            self._records[r.topic, r.partition, r.offset] = None
        while len(self._records) > self._limit:
            del self._records[next(iter(self._records))]

    def any_of(self, records: Sequence[SourceRecord]) -> bool:
        """Whether any of `records` was in a refused batch."""
        return bool(self._records) and any(
            (r.topic, r.partition, r.offset) in self._records for r in records
        )

    def forget(self, records: Sequence[SourceRecord]) -> None:
        """Drop `records` (their window succeeded)."""
        if self._records:
            for r in records:
                self._records.pop((r.topic, r.partition, r.offset), None)
