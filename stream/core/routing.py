"""The migration state machine: pure functions of (state, control event, record time).

Every instance replays the control log through `apply` and so computes the same routing
(G5). Time is the control record's broker timestamp, never a clock read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from schemas.control import (
    BackfillConfig,
    BackfillProgress,
    CancelMigration,
    ControlEvent,
    Finalize,
    HandoffRecorded,
    MigrationFailed,
    ModelFingerprint,
    PauseMigration,
    ReplayHandoff,
    ReplayProgress,
    ResumeMigration,
    Rollback,
    StartMigration,
    WindowClosed,
)
from schemas.routing import (
    EmbeddingRoutingConfig,
    MigrationState,
    Progress,
    Rejection,
    ReplayState,
    RoutingPhase,
    RoutingStatus,
)
from stream.core.replays import (
    REPLAY_EVENTS,
    Replay,
    ReplayEvent,
    ReplayRejected,
    abandon_unwritten,
    apply_replay_event,
)

ACTIVE = (MigrationState.IN_PROGRESS, MigrationState.PAUSED, MigrationState.FAILED)
# Bump whenever `apply` would fold some control log differently: routing snapshots written
# by another fold version are then ignored and the log is replayed from its start.
FOLD_VERSION = 2
_EMPTY: Mapping[int, int] = MappingProxyType({})
_NO_FINGERPRINTS: Mapping[str, str] = MappingProxyType({})
_NO_REPLAYS: Mapping[str, Replay] = MappingProxyType({})
_INTERNAL = (
    HandoffRecorded,
    BackfillProgress,
    WindowClosed,
    MigrationFailed,
    ReplayHandoff,
    ReplayProgress,
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration as the control log has shaped it so far."""

    migration_id: str
    source: str
    target: str
    backfill: BackfillConfig
    state: MigrationState = MigrationState.IN_PROGRESS
    epoch: int = 0
    partitions: int | None = None
    handoffs: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    log_starts: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    backfilled: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    counted: frozenset[int] = frozenset()  # partitions whose backfill counts atoms (v2)
    counts: Mapping[int, tuple[int, int]] = field(default_factory=lambda: MappingProxyType({}))
    query_frozen: str | None = None
    cutover_at: datetime | None = None
    window_ends_at: datetime | None = None
    window_closed: bool = False

    @property
    def progress(self) -> Progress:
        """processed/total of backfill; total None until every partition has a handoff (and,
        for partitions that count atoms, has finished its keys pass)."""
        processed = 0
        total: int | None = 0
        for partition, handoff in self.handoffs.items():
            done, of = self._partition_progress(partition, handoff)
            processed += done
            total = None if total is None or of is None else total + of
        if self.partitions is None or len(self.handoffs) < self.partitions:
            total = None
        return Progress(processed=processed, total=total)

    def _partition_progress(self, partition: int, handoff: int) -> tuple[int, int | None]:
        log_start = self.log_starts[partition]
        reached = min(max(self.backfilled.get(partition, log_start), log_start), handoff)
        if partition not in self.counted:  # v1: events of [log start, handoff)
            return reached - log_start, handoff - log_start
        counts = self.counts.get(partition)
        if reached >= handoff:  # complete: whatever was counted is processed
            total = counts[1] if counts is not None else 0
            return total, total
        if counts is None:
            return 0, None
        return counts

    @property
    def backfill_done(self) -> bool:
        """Every partition has a handoff and is backfilled up to it (an empty range counts)."""
        if self.partitions is None or len(self.handoffs) < self.partitions:
            return False
        return all(
            self.backfilled.get(p, self.log_starts[p]) >= handoff
            for p, handoff in self.handoffs.items()
        )

    @property
    def threshold_reached(self) -> bool:
        """Backfill progress has reached `target_query_threshold`."""
        progress = self.progress
        if progress.total is None:
            return False
        if progress.total == 0:
            return True
        return progress.processed / progress.total >= self.backfill.target_query_threshold

    def writes_target(self, partition: int) -> bool:
        """Whether the live path writes `partition`'s atoms to the target model too.

        With `dual_write = false`, a partition joins once its backfill has caught up with the
        live head and recorded its handoff.
        """
        if self.state is MigrationState.COMPLETED:
            return not self.window_closed
        if self.state in (MigrationState.IN_PROGRESS, MigrationState.PAUSED):
            return self.backfill.dual_write or partition in self.handoffs
        return False

    @property
    def dual_writing(self) -> bool:
        """The live path writes the target too (so handoffs must be recorded)."""
        if self.state in (MigrationState.IN_PROGRESS, MigrationState.PAUSED):
            return self.backfill.dual_write
        return self.state is MigrationState.COMPLETED and not self.window_closed


@dataclass(frozen=True, slots=True)
class RoutingState:
    """The routing rebuilt from the control log."""

    stable_model: str
    models: frozenset[str]
    migration: Migration | None = None
    used_ids: frozenset[str] = frozenset()
    control_offset: int | None = None
    updated_at: datetime | None = None
    last_rejection: Rejection | None = None
    # The fingerprint each model name had when first written (the first record wins).
    fingerprints: Mapping[str, str] = field(default_factory=lambda: _NO_FINGERPRINTS)
    # Every replay by id (v2), finished ones too: ids are never reused (`stream.core.replays`).
    replays: Mapping[str, Replay] = field(default_factory=lambda: _NO_REPLAYS)

    @property
    def active(self) -> Migration | None:
        """The migration that still shapes the routing beyond the stable model, if any."""
        migration = self.migration
        if migration is None:
            return None
        if migration.state in ACTIVE:
            return migration
        if migration.state is MigrationState.COMPLETED and not migration.window_closed:
            return migration
        return None

    def routing_config(self) -> EmbeddingRoutingConfig:
        """The original design's full routing config: query model, write models, phase."""
        migration = self.active
        if migration is None:
            return EmbeddingRoutingConfig(
                query_model=self.stable_model, write_models=(self.stable_model,)
            )
        source, target = migration.source, migration.target
        if migration.state is MigrationState.COMPLETED:
            return EmbeddingRoutingConfig(
                query_model=target,
                write_models=(source, target),
                phase=RoutingPhase.ROLLBACK_WINDOW,
            )
        if migration.state is MigrationState.FAILED:
            return EmbeddingRoutingConfig(query_model=source, write_models=(source,))
        if migration.state is MigrationState.PAUSED and migration.query_frozen is not None:
            query = migration.query_frozen
        else:
            query = target if migration.threshold_reached else source
        writes = (source, target) if migration.backfill.dual_write else (source,)
        return EmbeddingRoutingConfig(
            query_model=query, write_models=writes, phase=RoutingPhase.MIGRATING
        )

    def route_query(self) -> str:
        """The original design's question: which model answers a query?"""
        return self.routing_config().query_model

    def status(self) -> RoutingStatus:
        """The RoutingStatus published on the routing topic."""
        config = self.routing_config()
        migration = self.migration
        return RoutingStatus(
            query_model=config.query_model,
            write_models=list(config.write_models),
            phase=config.phase,
            migration_id=migration.migration_id if migration else None,
            state=migration.state if migration else None,
            progress=migration.progress if migration else None,
            rollback_window_ends_at=migration.window_ends_at if migration else None,
            control_offset=self.control_offset,
            updated_at=self.updated_at,
            last_rejection=self.last_rejection,
            fingerprints=dict(sorted(self.fingerprints.items())) or None,
            replays=[
                r.status() for r in self.replays.values() if r.state is ReplayState.IN_PROGRESS
            ]
            or None,
        )


def initial_state(stable_model: str, models: frozenset[str] | set[str]) -> RoutingState:
    """The routing before any control record: the stable model alone."""
    return RoutingState(stable_model=stable_model, models=frozenset(models))


@dataclass(frozen=True, slots=True)
class Rejected(Exception):
    """A control event that is not legal now; the state stays as it was."""

    reason: str = field(default="")


def apply(state: RoutingState, event: ControlEvent, offset: int, at: datetime) -> RoutingState:
    """Apply one control record. Illegal commands are recorded in `last_rejection` only."""
    try:
        applied = _transition(state, event, at)
    except Rejected as rejected:
        if isinstance(event, _INTERNAL):
            # Internal events that lost a race (e.g. progress after cancel) change nothing.
            return replace(state, control_offset=offset)
        return reject(state, event, offset, at, rejected.reason)
    if any(r.state is ReplayState.IN_PROGRESS for r in applied.replays.values()):
        writes = applied.routing_config().write_models
        applied = replace(applied, replays=abandon_unwritten(applied.replays, writes, at))
    return replace(applied, control_offset=offset, updated_at=at)


def _replay(state: RoutingState, event: ReplayEvent, at: datetime) -> RoutingState:
    """Replay commands and events (`stream.core.replays`); `Rejected` when illegal."""
    writes = state.routing_config().write_models
    try:
        replays = apply_replay_event(state.replays, event, writes, at)
    except ReplayRejected as exc:
        raise Rejected(str(exc)) from None
    return replace(state, replays=replays)


def reject(
    state: RoutingState, event: ControlEvent, offset: int, at: datetime, reason: str
) -> RoutingState:
    """`event` refused: recorded as the last rejection with `reason`, nothing else changes.

    Also for a record whose signature is missing, unknown or wrong, internal events
    included (a forged one must show in `status`).
    """
    return replace(
        state,
        control_offset=offset,
        updated_at=at,
        last_rejection=Rejection(
            command=type(event).__struct_config__.tag,  # type: ignore[arg-type]
            command_id=event.command_id,
            migration_id=getattr(event, "migration_id", None),
            reason=reason,
            at=at,
        ),
    )


def reject_malformed(state: RoutingState, offset: int, at: datetime, reason: str) -> RoutingState:
    """A control record that does not decode: recorded as a rejection, nothing else changes."""
    return replace(
        state,
        control_offset=offset,
        updated_at=at,
        last_rejection=Rejection(command="unknown", reason=f"malformed command: {reason}", at=at),
    )


def _record_fingerprint(state: RoutingState, event: ModelFingerprint) -> RoutingState:
    """The first fingerprint recorded for a model name stays; a different one is refused.

    Instances starting together may each append the same record: the copies are harmless.
    """
    recorded = state.fingerprints.get(event.model)
    if recorded == event.fingerprint:
        return state
    if recorded is not None:
        raise Rejected(
            f"model {event.model} has fingerprint {recorded} in the control log; "
            f"{event.fingerprint} needs a new model name"
        )
    fingerprints = MappingProxyType({**state.fingerprints, event.model: event.fingerprint})
    return replace(state, fingerprints=fingerprints)


def _transition(state: RoutingState, event: ControlEvent, at: datetime) -> RoutingState:
    if isinstance(event, ModelFingerprint):
        return _record_fingerprint(state, event)
    if isinstance(event, StartMigration):
        return _start(state, event)
    if isinstance(event, REPLAY_EVENTS):
        return _replay(state, event, at)
    migration = state.migration
    if migration is None or migration.migration_id != event.migration_id:
        raise Rejected(f"no migration {event.migration_id}")
    updated = _migration_transition(state, migration, event, at)
    if updated.state is MigrationState.IN_PROGRESS and updated.backfill_done:
        updated = replace(
            updated,
            state=MigrationState.COMPLETED,
            cutover_at=at,
            window_ends_at=at + timedelta(seconds=updated.backfill.rollback_window_secs),
        )
    stable = state.stable_model
    if updated.state in (MigrationState.FINALIZED,) or (
        updated.state is MigrationState.COMPLETED and updated.window_closed
    ):
        stable = updated.target
    return replace(state, migration=updated, stable_model=stable)


def _start(state: RoutingState, event: StartMigration) -> RoutingState:
    if state.active is not None:
        raise Rejected(
            f"migration {state.active.migration_id} is {state.active.state}; "
            "start is legal only when no migration is active"
        )
    if event.migration_id in state.used_ids:
        raise Rejected(f"migration id {event.migration_id} was used before")
    if event.source_model != state.stable_model:
        raise Rejected(
            f"source_model {event.source_model} is not the stable model {state.stable_model}"
        )
    if event.target_model not in state.models:
        raise Rejected(f"unknown model {event.target_model}")
    if event.target_model == event.source_model:
        raise Rejected("target_model must differ from source_model")
    migration = Migration(
        migration_id=event.migration_id,
        source=event.source_model,
        target=event.target_model,
        backfill=event.backfill,
    )
    return replace(state, migration=migration, used_ids=state.used_ids | {event.migration_id})


def _migration_transition(
    state: RoutingState, migration: Migration, event: ControlEvent, at: datetime
) -> Migration:
    current = migration.state
    window_open = current is MigrationState.COMPLETED and not migration.window_closed
    if isinstance(event, PauseMigration):
        _require(current is MigrationState.IN_PROGRESS, "pause", current)
        query = state.routing_config().query_model
        return replace(migration, state=MigrationState.PAUSED, query_frozen=query)
    if isinstance(event, ResumeMigration):
        _require(current in (MigrationState.PAUSED, MigrationState.FAILED), "resume", current)
        if current is MigrationState.FAILED:
            # Writes were source-only while failed: record new handoffs so backfill covers them.
            return replace(
                migration,
                state=MigrationState.IN_PROGRESS,
                epoch=migration.epoch + 1,
                handoffs=MappingProxyType({}),
                counted=frozenset(),
                counts=MappingProxyType({}),
                partitions=None,
                query_frozen=None,
            )
        return replace(migration, state=MigrationState.IN_PROGRESS, query_frozen=None)
    if isinstance(event, CancelMigration):
        _require(current in ACTIVE, "cancel", current)
        return replace(migration, state=MigrationState.CANCELLED)
    if isinstance(event, Rollback):
        _require(window_open, "rollback", current, "completed with the rollback window open")
        return replace(migration, state=MigrationState.ROLLED_BACK)
    if isinstance(event, Finalize):
        _require(window_open, "finalize", current, "completed with the rollback window open")
        return replace(migration, state=MigrationState.FINALIZED, window_closed=True)
    if isinstance(event, WindowClosed):
        _require(window_open, "window_closed", current)
        return replace(migration, window_closed=True)
    if isinstance(event, MigrationFailed):
        _require(current is MigrationState.IN_PROGRESS, "fail", current)
        return replace(migration, state=MigrationState.FAILED)
    if isinstance(event, HandoffRecorded):
        _require(current in ACTIVE and event.epoch == migration.epoch, "handoff", current)
        if event.partition in migration.handoffs:
            return migration  # the first handoff recorded for a partition wins
        return replace(
            migration,
            partitions=event.partitions,
            counted=migration.counted | {event.partition} if event.counted else migration.counted,
            handoffs=_with(migration.handoffs, event.partition, event.offset),
            log_starts=_with(
                migration.log_starts,
                event.partition,
                migration.log_starts.get(event.partition, event.log_start),
            ),
        )
    if isinstance(event, BackfillProgress):
        _require(current in ACTIVE, "backfill progress", current)
        done = max(migration.backfilled.get(event.partition, 0), event.offset)
        updated = replace(migration, backfilled=_with(migration.backfilled, event.partition, done))
        if event.total is None:
            return updated
        # Duplicate or late progress events merge by taking the furthest.
        processed = min(event.processed or 0, event.total)
        seen = migration.counts.get(event.partition)
        if seen is not None and seen[0] > processed:
            processed = seen[0]
        counts = MappingProxyType({**migration.counts, event.partition: (processed, event.total)})
        return replace(updated, counts=counts)
    raise Rejected(f"unsupported command {type(event).__name__}")


def _require(legal: bool, what: str, state: MigrationState, needs: str = "") -> None:
    if not legal:
        detail = f" (needs {needs})" if needs else ""
        raise Rejected(f"cannot {what} a migration that is {state}{detail}")


def _with(mapping: Mapping[int, int], key: int, value: int) -> Mapping[int, int]:
    return MappingProxyType({**mapping, key: value})
