"""ControlCommand: the operator commands on the control topic (CONTRACT section 3)."""

from __future__ import annotations

from typing import Annotated

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class BackfillConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a migration backfills history; defaults are the original design's."""

    batch_size: PositiveInt = 100
    max_concurrent: PositiveInt = 4
    dual_write: bool = True
    target_query_threshold: Fraction = 0.8
    rollback_window_secs: NonNegativeInt = 86400


class _Event(msgspec.Struct, tag_field="command", frozen=True, kw_only=True):
    command_id: str | None = None
    issued_by: str | None = None


class _Command(_Event, frozen=True, kw_only=True):
    migration_id: Identifier


class StartMigration(_Command, tag="start_migration", frozen=True):
    """Begin moving from `source_model` to `target_model`."""

    source_model: Identifier
    target_model: Identifier
    backfill: BackfillConfig = BackfillConfig()


class PauseMigration(_Command, tag="pause_migration", frozen=True):
    """Pause backfill; dual-write continues."""

    reason: str | None = None


class ResumeMigration(_Command, tag="resume_migration", frozen=True):
    """Resume a paused or failed backfill."""


class CancelMigration(_Command, tag="cancel_migration", frozen=True):
    """Abandon the migration: the source model alone again."""


class Rollback(_Command, tag="rollback", frozen=True):
    """Inside the rollback window: return to the source model."""


class Finalize(_Command, tag="finalize", frozen=True):
    """Inside the rollback window: close it now and write the target alone."""


class StartReplay(_Event, tag="start_replay", frozen=True, kw_only=True):
    """v2: re-embed [from_offsets, to_offsets) of every partition of `atoms` into `model`.

    Partition owners run it between live windows with the backfill machinery: per key only
    the latest version below the owner's handoff, never after a newer live write. The CLI
    resolves timestamps to offsets, so every instance agrees on the range; `to_offsets` is
    exclusive. Legal only while `model` is in the write set and `replay_id` is new.
    """

    replay_id: Identifier
    model: Identifier
    partitions: PositiveInt
    from_offsets: dict[int, NonNegativeInt]
    to_offsets: dict[int, NonNegativeInt]


class CancelReplay(_Event, tag="cancel_replay", frozen=True, kw_only=True):
    """v2: stop an unfinished replay (what it wrote stays; nothing stale is left behind)."""

    replay_id: Identifier


MigrationCommand = PauseMigration | ResumeMigration | CancelMigration | Rollback | Finalize
"""The commands that name only a migration."""

ControlCommand = (
    StartMigration
    | PauseMigration
    | ResumeMigration
    | CancelMigration
    | Rollback
    | Finalize
    | StartReplay
    | CancelReplay
)


# Internal events the processor appends to the control log (their shape is the project's own).


class HandoffRecorded(_Command, tag="handoff", frozen=True, kw_only=True):
    """Dual-write began on `partition` at `offset`: backfill covers [log_start, offset)."""

    epoch: int = 0
    partition: Annotated[int, msgspec.Meta(ge=0)]
    offset: Annotated[int, msgspec.Meta(ge=0)]
    log_start: Annotated[int, msgspec.Meta(ge=0)]
    partitions: PositiveInt
    # v2: backfill of this partition counts atoms (latest versions only), not events; its
    # total is unknown until a BackfillProgress with `total` arrives (after the keys pass).
    counted: bool = False


class BackfillProgress(_Command, tag="backfill_progress", frozen=True, kw_only=True):
    """Backfill of `partition` has emitted everything before `offset`.

    v2 (`counted` handoffs): `processed` atoms embedded so far of `total` that backfill will
    embed in all (known once the partition's keys pass is done).
    """

    epoch: int = 0
    partition: Annotated[int, msgspec.Meta(ge=0)]
    offset: Annotated[int, msgspec.Meta(ge=0)]
    processed: Annotated[int, msgspec.Meta(ge=0)] | None = None
    total: Annotated[int, msgspec.Meta(ge=0)] | None = None


class WindowClosed(_Command, tag="window_closed", frozen=True, kw_only=True):
    """The rollback window has passed: writes go to the target alone from here."""


class MigrationFailed(_Command, tag="migration_failed", frozen=True, kw_only=True):
    """The processor cannot carry on with the migration (e.g. the target model fails to load)."""

    reason: str


class ModelFingerprint(_Event, tag="model_fingerprint", frozen=True, kw_only=True):
    """The fingerprint `model` had when a processor first wrote it (the first record wins).

    A processor whose configured weights or settings for `model` differ refuses to start:
    new weights under an old name need a migration to a new name.
    """

    model: Identifier
    fingerprint: Identifier


class ReplayHandoff(_Event, tag="replay_handoff", frozen=True, kw_only=True):
    """v2: the owner of `partition` first saw the replay at live position `offset`.

    The replay emits at most up to here; live writes from here on win. `log_start` is the
    partition's first offset then (a range start below it begins there).
    """

    replay_id: Identifier
    partition: Annotated[int, msgspec.Meta(ge=0)]
    offset: NonNegativeInt
    log_start: NonNegativeInt = 0


class ReplayProgress(_Event, tag="replay_progress", frozen=True, kw_only=True):
    """v2: the replay of `partition` has handled every record before `offset`; `processed`
    atoms embedded of `total` it embeds in all (known after the partition's keys pass)."""

    replay_id: Identifier
    partition: Annotated[int, msgspec.Meta(ge=0)]
    offset: NonNegativeInt
    processed: NonNegativeInt | None = None
    total: NonNegativeInt | None = None


InternalEvent = (
    HandoffRecorded
    | BackfillProgress
    | WindowClosed
    | MigrationFailed
    | ModelFingerprint
    | ReplayHandoff
    | ReplayProgress
)
ControlEvent = ControlCommand | InternalEvent
