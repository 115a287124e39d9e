"""RoutingStatus and the original design's routing types (ADR-019)."""

from __future__ import annotations

import enum
from datetime import datetime

import msgspec


class RoutingPhase(enum.StrEnum):
    """The original `RoutingPhase`."""

    STABLE = "stable"
    MIGRATING = "migrating"
    ROLLBACK_WINDOW = "rollback_window"


class MigrationState(enum.StrEnum):
    """Lifecycle of one migration."""

    IN_PROGRESS = "in_progress"
    PAUSED = "paused"
    FAILED = "failed"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"
    FINALIZED = "finalized"


class ReplayState(enum.StrEnum):
    """v2: lifecycle of one replay (`start_replay`)."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"  # its model left the write set before it finished


class EmbeddingRoutingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The full routing: which model answers queries, which models are written."""

    query_model: str
    write_models: tuple[str, ...]
    phase: RoutingPhase = RoutingPhase.STABLE


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """Backfill progress; `total` is None while it is not yet known."""

    processed: int = 0
    total: int | None = None


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """The last control command that was refused, and why."""

    command: str
    reason: str
    command_id: str | None = None
    migration_id: str | None = None
    at: datetime | None = None


class ReplayStatus(msgspec.Struct, frozen=True, kw_only=True):
    """v2: one replay as the control log has shaped it (in `RoutingStatus.replays`)."""

    replay_id: str
    model: str
    state: ReplayState
    progress: Progress
    events: int = 0
    """Events in the requested ranges (every partition)."""
    reason: str | None = None


class RoutingStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The value on the routing topic and the output of `lattice-embed status --json`."""

    query_model: str
    write_models: list[str]
    phase: RoutingPhase
    migration_id: str | None = None
    state: MigrationState | None = None
    progress: Progress | None = None
    rollback_window_ends_at: datetime | None = None
    control_offset: int | None = None
    updated_at: datetime | None = None
    last_rejection: Rejection | None = None
    # v2: model name -> the fingerprint the control log recorded for it first
    fingerprints: dict[str, str] | None = None
    # v2: the replays in progress (None when there are none)
    replays: list[ReplayStatus] | None = None
