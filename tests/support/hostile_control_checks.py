"""Hostile control commands through the broker: writing them, and checking every fold.

`ControlScript` turns probes into control records, filled in from the routing the oracle
predicts by then, with legal commands mixed in so that the log walks the whole lifecycle.
`FoldRecorder` is the real control plane noting each record it folds; `check_folds` checks
the state before and after every record against the oracle
(`tests.support.hostile_control.judge`): a rejected record changes nothing but
`control_offset`/`updated_at` and shows as `last_rejection`; an accepted one moves the
routing as the contract's transitions say.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import anyio
import msgspec
from aiokafka import AIOKafkaProducer

from schemas.control import (
    BackfillConfig,
    CancelMigration,
    ControlCommand,
    Finalize,
    MigrationCommand,
    PauseMigration,
    ResumeMigration,
    Rollback,
    StartMigration,
)
from schemas.routing import MigrationState, RoutingStatus
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import RoutingState
from stream.processor.control import ControlPlane, record_time
from tests.support.hostile import Json
from tests.support.hostile_control import (
    ControlRecord,
    Probe,
    Ref,
    Routing,
    judge,
    projection_of,
)

CASE_HEADER = "hostile-case"  # on every control record this test writes
DRIVER_EVERY = 10  # a legal command for the predicted routing after this many probes
BACKFILLS = (
    BackfillConfig(),
    BackfillConfig(dual_write=False),
    BackfillConfig(rollback_window_secs=0),  # the processor closes the window at once
    BackfillConfig(target_query_threshold=0.0, rollback_window_secs=3600),
)


class ControlScript:
    """Turns probes into control records, filling each in from the routing the oracle
    predicts by then, with a legal command every `DRIVER_EVERY` probes, so that the log
    walks the whole lifecycle (the processor completes backfills and closes windows)."""

    def __init__(self) -> None:
        self._ids = iter(range(10**9))
        self._turn = 0
        self._completed = 0
        self.written = 0

    def records(self, routing: Routing, probes: Sequence[Probe]) -> list[ControlRecord]:
        records: list[ControlRecord] = []
        for index, probe in enumerate(probes):
            value = self.value(probe, routing)
            records.append((probe.key, value))
            routing = judge(routing, value).after or routing
            if index % DRIVER_EVERY == DRIVER_EVERY - 1:
                legal = self.legal_command(routing)
                records.append((b"routing", legal))
                routing = judge(routing, legal).after or routing
        self.written += len(records)
        return records

    def closer(self, routing: Routing) -> ControlRecord:
        """The command that ends the active migration: the log ends with none active."""
        self._turn += 1
        kind = Rollback if routing.state is MigrationState.COMPLETED else CancelMigration
        command = kind(
            migration_id=routing.migration or "mig-none", command_id=f"close-{self._turn}"
        )
        self.written += 1
        return b"routing", msgspec.json.encode(command)

    def value(self, probe: Probe, routing: Routing) -> bytes | None:
        if probe.doc is None:
            return probe.raw
        doc = {k: self.fill(v, routing) for k, v in probe.doc.items()}
        value = json.dumps(doc, ensure_ascii=probe.ensure_ascii).encode()
        return value if probe.corruption is None else probe.corruption.apply(value)

    def fill(self, value: Json, routing: Routing) -> Json:
        if not isinstance(value, Ref):
            return value
        if value.name == "current":
            return routing.migration or "mig-none"
        if value.name == "previous":
            return min(routing.used - {routing.migration}, default="mig-none")
        if value.name == "fresh":
            return f"mig-{next(self._ids)}"
        return routing.stable if value.name == "stable" else routing.other_model()

    def legal_command(self, routing: Routing) -> bytes:
        """What an operator may do next (the processor may have moved on meanwhile)."""
        self._turn += 1
        turn, current = self._turn, routing.migration or "mig-none"
        command_id = f"legal-{turn}"
        command: ControlCommand
        kind: type[MigrationCommand]
        if not routing.active:
            command = StartMigration(
                migration_id=f"mig-{next(self._ids)}",
                source_model=routing.stable,
                target_model=routing.other_model(),
                backfill=BACKFILLS[turn % len(BACKFILLS)],
                command_id=command_id,
            )
        elif routing.state is MigrationState.IN_PROGRESS:
            kind = (PauseMigration, CancelMigration, PauseMigration)[turn % 3]
            command = kind(migration_id=current, command_id=command_id)
        elif routing.state is MigrationState.COMPLETED:
            self._completed += 1
            kind = (Rollback, Finalize)[self._completed % 2]
            command = kind(migration_id=current, command_id=command_id)
        else:
            kind = (ResumeMigration, ResumeMigration, CancelMigration)[turn % 3]
            command = kind(migration_id=current, command_id=command_id)
        return msgspec.json.encode(command)


class FoldRecorder(ControlPlane):
    """The real control plane, noting each record it folds with the states around it."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.folds: list[tuple[SourceRecord, RoutingState, RoutingState]] = []

    def _fold(self, state: RoutingState, message: SourceRecord) -> RoutingState:
        after = super()._fold(state, message)
        self.folds.append((message, state, after))
        return after


def unchanged(state: RoutingState) -> RoutingState:
    """The state less what every applied record sets (offset, time, last rejection)."""
    return replace(state, control_offset=None, updated_at=None, last_rejection=None)


def check_folds(folds: list[tuple[SourceRecord, RoutingState, RoutingState]]) -> Counter[str]:
    """Every record this test wrote did what the oracle says; returns what each did."""
    tally: Counter[str] = Counter()
    for message, before, after in folds:
        assert after.control_offset == message.offset
        case = dict(message.headers).get(CASE_HEADER)
        if case is None:  # the processor's own events
            tally["internal"] += 1
            continue
        assert int(case) == tally["written"], "every record once, in order"
        tally["written"] += 1
        routing = Routing.of(before)
        verdict = judge(routing, message.value)
        context = f"control record {message.offset} {message.value!r:.300} on {routing}"
        rejection = after.last_rejection
        if verdict.after is None:
            assert unchanged(after) == unchanged(before), f"{context}: a rejection changed state"
            assert rejection is not None and rejection is not before.last_rejection, context
            assert rejection.at == record_time(message.timestamp_ms or 0), context
            shown = (rejection.command, rejection.command_id, rejection.migration_id)
            assert shown == (verdict.command, verdict.command_id, verdict.migration_id), context
            assert rejection.reason, context
            tally["rejected"] += 1
        else:
            assert rejection is before.last_rejection, f"{context}: rejected: {rejection}"
            assert projection_of(after) == verdict.after.projection(), context
            assert after.stable_model == verdict.after.stable, context
            tally[f"accepted {verdict.command}"] += 1
    return tally


def comparable(status: RoutingStatus) -> RoutingStatus:
    return msgspec.structs.replace(status, control_offset=None, updated_at=None)


async def send_control(
    producer: AIOKafkaProducer, topic: str, records: Sequence[ControlRecord], first: int
) -> None:
    """Write records numbered from `first` (header `CASE_HEADER`) and wait for the acks."""
    futures = [
        await producer.send(
            topic, key=key, value=value, headers=[(CASE_HEADER, str(first + i).encode())]
        )
        for i, (key, value) in enumerate(records)
    ]
    for future in futures:
        await future


async def backfilled(follower: ControlPlane, *, within: float = 10) -> Routing:
    """The routing once a migration in progress has moved on: the processor backfills the
    empty atoms topic and completes it (unless a paused or cancelled one stops it)."""
    await follower.sync()
    with anyio.move_on_after(within):
        while (
            follower.state.migration
            and follower.state.migration.state is MigrationState.IN_PROGRESS
        ):
            last = follower.state.control_offset
            await follower.wait_applied(0 if last is None else last + 1)
    return Routing.of(follower.state)
