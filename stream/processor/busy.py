"""Partitions whose on-disk state another process on this machine still holds."""

from __future__ import annotations

import logging
from collections.abc import Hashable

from stream.state.rocks import StateBusy

log = logging.getLogger(__name__)

RETRY_SECS = 1.0  # how long a busy partition is skipped before its state is tried again
WARN_SECS = 30.0  # held this long: a warning (a zombie worker, or a lock that leaked)


class BusyPartitions:
    """Skips a partition whose state is locked by another local worker, and retries it.

    Two workers share `[state] dir`, so a partition that moves between them keeps its
    state; the old owner releases it when its revocation runs, which can be late (a long
    step, an expired session). Until then the new owner skips it: nothing crashes.
    """

    def __init__(self) -> None:
        self._retry_at: dict[Hashable, float] = {}
        self._since: dict[Hashable, float] = {}
        self._warned_at: dict[Hashable, float] = {}

    def held(self, ident: Hashable, exc: StateBusy, now: float) -> None:
        """`ident`'s state could not be opened at `now`: skip it for `RETRY_SECS`."""
        since = self._since.setdefault(ident, now)
        self._retry_at[ident] = now + RETRY_SECS
        if now == since:
            log.info("state of %s is held by another local worker; retrying (%s)", ident, exc)
        elif now - since >= WARN_SECS and now - self._warned_at.get(ident, since) >= WARN_SECS:
            self._warned_at[ident] = now
            log.warning(
                "state of %s still held by another process after %.0fs (%s)",
                ident,
                now - since,
                exc,
            )

    def cleared(self, ident: Hashable) -> None:
        """`ident`'s state opened (or the partition left): forget it."""
        self._retry_at.pop(ident, None)
        self._since.pop(ident, None)
        self._warned_at.pop(ident, None)

    def waiting(self, now: float) -> set[Hashable]:
        """The partitions to skip at `now`."""
        return {ident for ident, at in self._retry_at.items() if at > now}
