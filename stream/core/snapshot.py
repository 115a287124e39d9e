"""Routing snapshots: a `RoutingState` as a `RoutingSnapshot` and back, and which one to use.

Why snapshots. The control log is an event log that is never compacted, and every instance
rebuilds the routing by folding it from offset 0 (G5). Backfill checkpoints dominate it: a
day-long migration over 100 partitions at one checkpoint a second per partition appends
8.64 million records, and folding them at start-up took minutes. Two measures keep it cheap:

1. a coarser checkpoint rate (`[backfill] checkpoint_interval_secs`, default 10 s) divides
   the log's growth by ten at the cost of up to that much re-done backfill per partition
   when a new owner also lost the on-disk key store (its own cursor is exact otherwise);
2. snapshots bound the replay whatever the log's length: processors write the folded state
   every `[control] snapshot_every` records to a compacted side topic, and a start-up folds
   only the records after the latest usable snapshot.

The snapshot is exact, not approximate: every field of the fold state is carried, so
`state_of(snapshot_of(s))` equals `s`, and folding the tail on top of it gives the same state
as folding the whole log. It is never trusted blindly: a snapshot folded by another version
of the state machine, from another configuration basis (stable model, model set), for
another control topic, or past the log's end is unusable, and the log is replayed in full.
Keeping the snapshot beside the log (rather than as records inside it) keeps the log's
contract unchanged and lets old logs without snapshots replay exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from schemas.snapshot import MigrationSnapshot, ReplaySnapshot, RoutingSnapshot
from stream.core.replays import Replay
from stream.core.routing import FOLD_VERSION, Migration, RoutingState


@dataclass(frozen=True, slots=True)
class FoldBasis:
    """What a fold starts from besides the log: the configured stable model and model set."""

    stable_model: str
    models: frozenset[str]
    trust: str = ""  # `TrustPolicy.basis()`: which signatures the fold accepts


@dataclass(frozen=True, slots=True)
class FoldPoint:
    """Where in the control log a fold stands: the next offset, and the last record folded."""

    next_offset: int
    last_offset: int
    last_timestamp_ms: int


def snapshot_of(
    state: RoutingState, basis: FoldBasis, point: FoldPoint, *, control_topic: str
) -> RoutingSnapshot:
    """The snapshot of `state`, the fold of control records [0, `point.next_offset`)."""
    migration = state.migration
    return RoutingSnapshot(
        fold_version=FOLD_VERSION,
        control_topic=control_topic,
        next_offset=point.next_offset,
        last_offset=point.last_offset,
        last_timestamp_ms=point.last_timestamp_ms,
        basis_stable_model=basis.stable_model,
        basis_models=sorted(basis.models),
        stable_model=state.stable_model,
        migration=None if migration is None else _migration_snapshot(migration),
        used_ids=sorted(state.used_ids),
        control_offset=state.control_offset,
        updated_at=state.updated_at,
        last_rejection=state.last_rejection,
        fingerprints=dict(sorted(state.fingerprints.items())),
        replays=[_replay_snapshot(state.replays[r]) for r in sorted(state.replays)],
        basis_trust=basis.trust,
    )


def state_of(snapshot: RoutingSnapshot) -> RoutingState:
    """The fold state a snapshot carries (equal to the state it was taken of)."""
    migration = snapshot.migration
    return RoutingState(
        stable_model=snapshot.stable_model,
        models=frozenset(snapshot.basis_models),
        migration=None if migration is None else _migration_of(migration),
        used_ids=frozenset(snapshot.used_ids),
        control_offset=snapshot.control_offset,
        updated_at=snapshot.updated_at,
        last_rejection=snapshot.last_rejection,
        fingerprints=MappingProxyType(dict(snapshot.fingerprints)),
        replays=MappingProxyType({r.replay_id: _replay_of(r) for r in snapshot.replays}),
    )


def unusable_reason(
    snapshot: RoutingSnapshot, basis: FoldBasis, *, control_topic: str, end_offset: int
) -> str | None:
    """Why folding on from `snapshot` would not give what a full replay gives; None if it would.

    `end_offset` is the control log's end offset: a snapshot past it belongs to another
    (deleted and recreated) log.
    """
    if snapshot.fold_version != FOLD_VERSION:
        return f"fold version {snapshot.fold_version}, this processor folds version {FOLD_VERSION}"
    if snapshot.control_topic != control_topic:
        return f"taken of control topic {snapshot.control_topic}, not {control_topic}"
    if snapshot.basis_stable_model != basis.stable_model:
        return f"folded from stable model {snapshot.basis_stable_model}, not {basis.stable_model}"
    if frozenset(snapshot.basis_models) != basis.models:
        return f"folded with models {snapshot.basis_models}, not {sorted(basis.models)}"
    if snapshot.basis_trust != basis.trust:
        return f"folded under signature policy {snapshot.basis_trust!r}, not {basis.trust!r}"
    if snapshot.next_offset > end_offset or snapshot.last_offset >= snapshot.next_offset:
        return f"covers offsets to {snapshot.next_offset}, the control log ends at {end_offset}"
    return None


def latest_usable(
    snapshots: Iterable[RoutingSnapshot], basis: FoldBasis, *, control_topic: str, end_offset: int
) -> tuple[RoutingSnapshot | None, list[str]]:
    """The usable snapshot that covers the most of the log, and why each other was skipped.

    Several instances write snapshots, so the newest record is not always the furthest one.
    """
    best: RoutingSnapshot | None = None
    skipped: list[str] = []
    for snapshot in snapshots:
        reason = unusable_reason(
            snapshot, basis, control_topic=control_topic, end_offset=end_offset
        )
        if reason is not None:
            skipped.append(f"snapshot to offset {snapshot.next_offset}: {reason}")
        elif best is None or snapshot.next_offset > best.next_offset:
            best = snapshot
    return best, skipped


def snapshot_due(next_offset: int, snapshot_offset: int, every: int) -> bool:
    """Whether a fold at `next_offset` should be snapshotted: `every` records (0: never)
    have been folded since the last snapshot known, the one that covers `snapshot_offset`."""
    return every > 0 and next_offset - snapshot_offset >= every


def _migration_snapshot(migration: Migration) -> MigrationSnapshot:
    return MigrationSnapshot(
        migration_id=migration.migration_id,
        source=migration.source,
        target=migration.target,
        backfill=migration.backfill,
        state=migration.state,
        epoch=migration.epoch,
        partitions=migration.partitions,
        handoffs=dict(sorted(migration.handoffs.items())),
        log_starts=dict(sorted(migration.log_starts.items())),
        backfilled=dict(sorted(migration.backfilled.items())),
        counted=sorted(migration.counted),
        counts=dict(sorted(migration.counts.items())),
        query_frozen=migration.query_frozen,
        cutover_at=migration.cutover_at,
        window_ends_at=migration.window_ends_at,
        window_closed=migration.window_closed,
    )


def _migration_of(snapshot: MigrationSnapshot) -> Migration:
    return Migration(
        migration_id=snapshot.migration_id,
        source=snapshot.source,
        target=snapshot.target,
        backfill=snapshot.backfill,
        state=snapshot.state,
        epoch=snapshot.epoch,
        partitions=snapshot.partitions,
        handoffs=MappingProxyType(dict(snapshot.handoffs)),
        log_starts=MappingProxyType(dict(snapshot.log_starts)),
        backfilled=MappingProxyType(dict(snapshot.backfilled)),
        counted=frozenset(snapshot.counted),
        counts=MappingProxyType(dict(snapshot.counts)),
        query_frozen=snapshot.query_frozen,
        cutover_at=snapshot.cutover_at,
        window_ends_at=snapshot.window_ends_at,
        window_closed=snapshot.window_closed,
    )


def _replay_snapshot(replay: Replay) -> ReplaySnapshot:
    return ReplaySnapshot(
        replay_id=replay.replay_id,
        model=replay.model,
        partitions=replay.partitions,
        from_offsets=dict(sorted(replay.from_offsets.items())),
        to_offsets=dict(sorted(replay.to_offsets.items())),
        state=replay.state,
        handoffs=dict(sorted(replay.handoffs.items())),
        log_starts=dict(sorted(replay.log_starts.items())),
        reached=dict(sorted(replay.reached.items())),
        counts=dict(sorted(replay.counts.items())),
        requested_at=replay.requested_at,
        ended_at=replay.ended_at,
        reason=replay.reason,
    )


def _replay_of(snapshot: ReplaySnapshot) -> Replay:
    return Replay(
        replay_id=snapshot.replay_id,
        model=snapshot.model,
        partitions=snapshot.partitions,
        from_offsets=MappingProxyType(dict(snapshot.from_offsets)),
        to_offsets=MappingProxyType(dict(snapshot.to_offsets)),
        state=snapshot.state,
        handoffs=MappingProxyType(dict(snapshot.handoffs)),
        log_starts=MappingProxyType(dict(snapshot.log_starts)),
        reached=MappingProxyType(dict(snapshot.reached)),
        counts=MappingProxyType(dict(snapshot.counts)),
        requested_at=snapshot.requested_at,
        ended_at=snapshot.ended_at,
        reason=snapshot.reason,
    )
