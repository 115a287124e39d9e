"""Replays as the control log shapes them: pure functions of (replay, control event, time).

A replay (`start_replay`) re-embeds a range of `atoms` into one model's topic. Partition
owners run it with the backfill machinery (`stream/processor/replays.py`); this module only
decides what the log means, so every instance (and the CLI that follows a replay) agrees:

- each partition with a non-empty range needs a handoff (`replay_handoff`): the live
  position at which its owner first saw the replay. The replay emits only records below
  `end = min(to, handoff)`; the live path writes the model from the handoff on;
- a partition is done when its progress (`replay_progress`) reaches `end`; an empty range
  (or a handoff at or below the range start) is done at once;
- the replay completes when the record that finishes its last partition is applied: every
  instance computes the same moment from the log, so no one has to append a separate
  completion record (and no two owners race to append it);
- a replay whose model leaves the write set (a migration finalized away from it, a failed
  or cancelled migration to it) is abandoned: from then on the live path no longer writes
  the model, so the replay could no longer promise "latest version last".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from schemas.control import CancelReplay, ReplayHandoff, ReplayProgress, StartReplay
from schemas.routing import Progress, ReplayState, ReplayStatus

_EMPTY: Mapping[int, int] = MappingProxyType({})

ReplayEvent = StartReplay | CancelReplay | ReplayHandoff | ReplayProgress
REPLAY_EVENTS = (StartReplay, CancelReplay, ReplayHandoff, ReplayProgress)


class ReplayRejected(Exception):
    """A replay event that is not legal now (the caller records the rejection)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """One replay as the control log has shaped it so far."""

    replay_id: str
    model: str
    partitions: int
    from_offsets: Mapping[int, int]
    to_offsets: Mapping[int, int]
    state: ReplayState = ReplayState.IN_PROGRESS
    handoffs: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    log_starts: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    reached: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    counts: Mapping[int, tuple[int, int]] = field(default_factory=lambda: MappingProxyType({}))
    requested_at: datetime | None = None
    ended_at: datetime | None = None
    reason: str | None = None

    def start(self, partition: int) -> int:
        """The first offset the replay reads: the range start, or the log start if later."""
        return max(self.from_offsets[partition], self.log_starts.get(partition, 0))

    def end(self, partition: int) -> int | None:
        """The emission end (exclusive): `min(to, handoff)`; None before the handoff."""
        handoff = self.handoffs.get(partition)
        if handoff is None:
            return None
        return min(self.to_offsets[partition], handoff)

    def has_range(self, partition: int) -> bool:
        """Whether the requested range of `partition` holds any offset."""
        return self.from_offsets[partition] < self.to_offsets[partition]

    def needs_handoff(self, partition: int) -> bool:
        """An owner must record this partition's handoff before the replay can run on it."""
        return (
            self.state is ReplayState.IN_PROGRESS
            and self.has_range(partition)
            and partition not in self.handoffs
        )

    def partition_done(self, partition: int) -> bool:
        """Nothing is left to emit on `partition`."""
        if not self.has_range(partition):
            return True
        end = self.end(partition)
        if end is None:
            return False
        return self.reached.get(partition, 0) >= end or self.start(partition) >= end

    @property
    def done(self) -> bool:
        """Every partition is done."""
        return all(self.partition_done(p) for p in range(self.partitions))

    @property
    def events(self) -> int:
        """Events in the requested ranges."""
        return sum(
            max(self.to_offsets[p] - self.from_offsets[p], 0) for p in range(self.partitions)
        )

    @property
    def progress(self) -> Progress:
        """Atoms embedded of those the replay embeds in all; the total is None until every
        partition with work has finished its keys pass (never 0 before that)."""
        processed = 0
        total: int | None = 0
        for partition in range(self.partitions):
            counts = self.counts.get(partition)
            done: int
            of: int | None
            if self.partition_done(partition):  # complete: whatever was counted is processed
                done = of = counts[1] if counts is not None else 0
            elif counts is not None:
                done, of = counts
            else:
                done, of = 0, None
            processed += done
            total = None if total is None or of is None else total + of
        return Progress(processed=processed, total=total)

    def status(self) -> ReplayStatus:
        """The replay as `RoutingStatus.replays` shows it."""
        return ReplayStatus(
            replay_id=self.replay_id,
            model=self.model,
            state=self.state,
            progress=self.progress,
            events=self.events,
            reason=self.reason,
        )


def apply_replay_event(
    replays: Mapping[str, Replay], event: ReplayEvent, write_models: Sequence[str], at: datetime
) -> Mapping[str, Replay]:
    """Every replay after one replay command or event; `ReplayRejected` when it is illegal."""
    if isinstance(event, StartReplay):
        replay = start_replay(replays, event, write_models, at)
    else:
        known = replays.get(event.replay_id)
        if known is None:
            raise ReplayRejected(f"no replay {event.replay_id}")
        replay = replay_transition(known, event, at)
    return MappingProxyType({**replays, replay.replay_id: replay})


def start_replay(
    replays: Mapping[str, Replay], event: StartReplay, write_models: Sequence[str], at: datetime
) -> Replay:
    """A new replay, or `ReplayRejected` with the reason."""
    if event.replay_id in replays:
        raise ReplayRejected(f"replay id {event.replay_id} was used before")
    if event.model not in write_models:
        raise ReplayRejected(
            f"model {event.model} is not in the write set ({', '.join(write_models)}): "
            "a replay writes only a model the processors write"
        )
    expected = set(range(event.partitions))
    for name, offsets in (("from_offsets", event.from_offsets), ("to_offsets", event.to_offsets)):
        if set(offsets) != expected:
            raise ReplayRejected(
                f"{name} must name every partition 0..{event.partitions - 1}, got {sorted(offsets)}"
            )
    return Replay(
        replay_id=event.replay_id,
        model=event.model,
        partitions=event.partitions,
        from_offsets=MappingProxyType(dict(event.from_offsets)),
        to_offsets=MappingProxyType(dict(event.to_offsets)),
        requested_at=at,
    )


def replay_transition(
    replay: Replay, event: ReplayHandoff | ReplayProgress | CancelReplay, at: datetime
) -> Replay:
    """Apply one event to its replay; completes it when its last partition is done."""
    if replay.state is not ReplayState.IN_PROGRESS:
        raise ReplayRejected(f"replay {replay.replay_id} is {replay.state}")
    if isinstance(event, CancelReplay):
        return replace(replay, state=ReplayState.CANCELLED, ended_at=at, reason="cancelled")
    if event.partition >= replay.partitions:
        raise ReplayRejected(f"replay {replay.replay_id} has no partition {event.partition}")
    if isinstance(event, ReplayHandoff):
        if event.partition in replay.handoffs:
            return replay  # the first handoff recorded for a partition wins
        updated = replace(
            replay,
            handoffs=_with(replay.handoffs, event.partition, event.offset),
            log_starts=_with(replay.log_starts, event.partition, event.log_start),
        )
    else:
        reached = max(replay.reached.get(event.partition, 0), event.offset)
        updated = replace(replay, reached=_with(replay.reached, event.partition, reached))
        if event.total is not None:
            # Duplicate or late progress events merge by taking the furthest.
            processed = min(event.processed or 0, event.total)
            seen = replay.counts.get(event.partition)
            if seen is not None and seen[0] > processed:
                processed = seen[0]
            counts = {**replay.counts, event.partition: (processed, event.total)}
            updated = replace(updated, counts=MappingProxyType(counts))
    if updated.done:
        updated = replace(updated, state=ReplayState.COMPLETED, ended_at=at)
    return updated


def abandon_unwritten(
    replays: Mapping[str, Replay], write_models: Collection[str], at: datetime
) -> Mapping[str, Replay]:
    """Replays in progress whose model is no longer written end as abandoned."""
    changed = {
        replay_id: replace(
            replay,
            state=ReplayState.ABANDONED,
            ended_at=at,
            reason=f"model {replay.model} left the write set",
        )
        for replay_id, replay in replays.items()
        if replay.state is ReplayState.IN_PROGRESS and replay.model not in write_models
    }
    if not changed:
        return replays
    return MappingProxyType({**replays, **changed})


def replay_partitions_with_work(
    replay: Replay, assigned: Sequence[int], done: Collection[int]
) -> list[int]:
    """The owned partitions on which `replay` has emission work, in order (a handoff is
    recorded; the log does not say it is done, nor has this instance finished it)."""
    if replay.state is not ReplayState.IN_PROGRESS:
        return []
    return [
        p
        for p in assigned
        if p < replay.partitions
        and p in replay.handoffs
        and not replay.partition_done(p)
        and p not in done
    ]


def _with(mapping: Mapping[int, int], key: int, value: int) -> Mapping[int, int]:
    return MappingProxyType({**mapping, key: value})
