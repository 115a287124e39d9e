"""RoutingSnapshot: the routing folded from a prefix of the control log (v2, the project's own).

Processors write snapshots to a compacted side topic (`<control>.snapshots` by default), so a
start-up reads the latest snapshot and replays only the control records after it instead of
the whole log. A snapshot is an optimisation, never a source of truth: the control log stays
the event log, and a snapshot that does not match it (another fold version, another model
set, another log) is ignored and the log is replayed from offset 0.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from schemas.control import BackfillConfig
from schemas.routing import MigrationState, Rejection, ReplayState

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFold = Annotated[int, msgspec.Meta(ge=1)]


class MigrationSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One migration's fold state (`stream.core.routing.Migration`), field for field."""

    migration_id: str
    source: str
    target: str
    backfill: BackfillConfig = BackfillConfig()
    state: MigrationState = MigrationState.IN_PROGRESS
    epoch: int = 0
    partitions: int | None = None
    handoffs: dict[int, int] = msgspec.field(default_factory=dict)
    log_starts: dict[int, int] = msgspec.field(default_factory=dict)
    backfilled: dict[int, int] = msgspec.field(default_factory=dict)
    counted: list[int] = msgspec.field(default_factory=list)
    counts: dict[int, tuple[int, int]] = msgspec.field(default_factory=dict)
    query_frozen: str | None = None
    cutover_at: datetime | None = None
    window_ends_at: datetime | None = None
    window_closed: bool = False


class ReplaySnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One replay's fold state (`stream.core.replays.Replay`), field for field."""

    replay_id: str
    model: str
    partitions: int
    from_offsets: dict[int, int] = msgspec.field(default_factory=dict)
    to_offsets: dict[int, int] = msgspec.field(default_factory=dict)
    state: ReplayState = ReplayState.IN_PROGRESS
    handoffs: dict[int, int] = msgspec.field(default_factory=dict)
    log_starts: dict[int, int] = msgspec.field(default_factory=dict)
    reached: dict[int, int] = msgspec.field(default_factory=dict)
    counts: dict[int, tuple[int, int]] = msgspec.field(default_factory=dict)
    requested_at: datetime | None = None
    ended_at: datetime | None = None
    reason: str | None = None


class RoutingSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The routing after control records [0, `next_offset`) were applied.

    `fold_version` names the state machine that folded it; `basis_stable_model` and
    `basis_models` are the configuration the fold started from (the routing before any
    record, and the models a `start_migration` may name). A reader whose fold version or
    basis differs would fold the log differently, so it ignores the snapshot.
    `last_offset` and `last_timestamp_ms` identify the last record folded: a reader checks
    that the control log still holds that record (not a recreated topic) before using it.
    """

    fold_version: PositiveFold
    control_topic: str
    next_offset: NonNegativeInt
    last_offset: NonNegativeInt
    last_timestamp_ms: int
    basis_stable_model: str
    basis_models: list[str]
    stable_model: str
    migration: MigrationSnapshot | None = None
    used_ids: list[str] = msgspec.field(default_factory=list)
    control_offset: int | None = None
    updated_at: datetime | None = None
    last_rejection: Rejection | None = None
    fingerprints: dict[str, str] = msgspec.field(default_factory=dict)
    replays: list[ReplaySnapshot] = msgspec.field(default_factory=list)
    # v2: the signature policy the fold ran under (`TrustPolicy.basis`; "" when signatures
    # are not required): a reader under another policy would reject other records.
    basis_trust: str = ""
