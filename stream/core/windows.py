"""Pure decisions of the live path for one window: when it closes, where its atoms go."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from schemas.routing import MigrationState
from stream.core.routing import Migration


def window_deadline(
    *,
    now: float,
    wall_now: float,
    stamps_ms: Sequence[int | None],
    since_last_fetch: float,
    max_wait_secs: float,
) -> float:
    """When a window whose first records are fetched closes, on the clock of `now`.

    It closes `max_wait_secs` after its first atom arrived, not after it was fetched:
    atoms that waited in the consumer's buffer while the previous window was processed
    count that time, by record timestamp (`wall_now` is the wall clock, in seconds). The
    age is capped by `since_last_fetch`, which bounds what a producer clock that runs
    behind can claim; a clock that runs ahead (negative age) counts nothing. Under load a
    window then closes as soon as the buffer is drained instead of adding a full wait to
    every atom.
    """
    stamps = [stamp for stamp in stamps_ms if stamp is not None and stamp > 0]
    age = wall_now - min(stamps) / 1000 if stamps else 0.0
    age = min(max(age, 0.0), since_last_fetch)
    return now + max(0.0, max_wait_secs - age)


def partition_write_models(
    write_models: Sequence[str], migration: Migration | None, partition: int
) -> tuple[str, ...]:
    """The models a partition's live atoms are written to.

    The routing's write models, plus the target for a partition that joined a
    `dual_write = false` migration (its backfill caught up with the live head).
    """
    writes = tuple(write_models)
    if migration is None or migration.backfill.dual_write or migration.target in writes:
        return writes
    return (*writes, migration.target) if migration.writes_target(partition) else writes


def partitions_to_backfill(
    migration: Migration | None, assigned: Sequence[int], done: Collection[int]
) -> list[int]:
    """The owned partitions with backfill work, in order.

    Only while the migration is in progress: a partition with a handoff until the control
    log says it is backfilled up to it (or this instance finished it, `done`); without a
    handoff only under `dual_write = false`, where backfill chases the live head.
    """
    if migration is None or migration.state is not MigrationState.IN_PROGRESS:
        return []
    work = []
    for partition in assigned:
        handoff = migration.handoffs.get(partition)
        if handoff is None:
            if not migration.backfill.dual_write:
                work.append(partition)
        elif migration.backfilled.get(partition, 0) < handoff and partition not in done:
            work.append(partition)
    return work
