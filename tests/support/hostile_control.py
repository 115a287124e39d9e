"""Hostile control commands: the oracle and the Hypothesis strategies.

The oracle (`judge`) is written from CONTRACT section 3 (ControlCommand and Legal
transitions) and section 4 with the standard library, not the production decoder: a
malformed or illegal record is rejected, a legal one moves the routing as the transitions
say. The strategies (`control_probes`) draw malformed bytes and JSON, wrong types, huge
strings, unknown models and migrations and illegal transitions, with legal commands mixed
in; their migration ids and models are `Ref`s, filled in as the record is written
(`tests.support.hostile_control_checks.ControlScript`).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from hypothesis import strategies as st

from schemas.routing import MigrationState
from stream.core.routing import RoutingState
from tests.support.hostile import (
    CORRUPTIONS,
    Corruption,
    Json,
    has_surrogate,
    json_values,
    no_constants,
    seeds,
    unknown_fields,
    utf8,
    wrong_types,
)

# ---------------------------------------------------------------------------------------
# Control: the oracle (CONTRACT section 3, ControlCommand and Legal transitions; section 4)

MIGRATION_TAGS = ("pause_migration", "resume_migration", "cancel_migration", "rollback", "finalize")
OPERATOR_TAGS = ("start_migration", *MIGRATION_TAGS, "start_replay", "cancel_replay")
# Only processors append these (unsigned, the log trusts them): this test never writes one.
INTERNAL_TAGS = frozenset(
    {"handoff", "backfill_progress", "window_closed", "migration_failed", "model_fingerprint"}
    | {"replay_handoff", "replay_progress"}
)
ACTIVE = (MigrationState.IN_PROGRESS, MigrationState.PAUSED, MigrationState.FAILED)
INT_KEY = re.compile(r"-?(0|[1-9][0-9]{0,17})", re.ASCII)
BACKFILL_FIELDS: dict[str, Callable[[Json], bool]] = {
    "batch_size": lambda v: is_int(v) and v >= 1,
    "max_concurrent": lambda v: is_int(v) and v >= 1,
    "dual_write": lambda v: isinstance(v, bool),
    "target_query_threshold": lambda v: is_number(v) and 0 <= v <= 1,
    "rollback_window_secs": lambda v: is_int(v) and v >= 0,
}


def is_int(value: object) -> bool:
    return type(value) is int


def is_number(value: object) -> bool:
    return type(value) in (int, float)


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 256


def is_offsets(value: object) -> bool:
    return isinstance(value, dict) and all(
        INT_KEY.fullmatch(k) and is_int(v) and v >= 0 for k, v in value.items()
    )


def control_doc(value: bytes | None) -> dict[str, Json] | None:
    """The command a control record holds, or None when it is malformed."""
    text = None if value is None else utf8(value)
    if text is None:
        return None
    try:
        doc = json.loads(text, parse_constant=no_constants)
    except ValueError:
        return None
    if has_surrogate(doc) or not isinstance(doc, dict):
        return None
    tag = doc.get("command")
    assert not (isinstance(tag, str) and tag in INTERNAL_TAGS), f"an internal event: {doc}"
    if tag not in OPERATOR_TAGS:
        return None
    required: dict[str, Callable[[Json], bool]] = {}
    # Optional strings may be null: the project's own writers (CLI, processors) say null.
    optional: dict[str, Callable[[Json], bool]] = {
        "command_id": lambda v: v is None or isinstance(v, str),
        "issued_by": lambda v: v is None or isinstance(v, str),
    }
    if tag == "start_migration":
        required = dict.fromkeys(("migration_id", "source_model", "target_model"), is_identifier)
        optional["backfill"] = lambda v: (
            isinstance(v, dict)
            and all(k in BACKFILL_FIELDS and BACKFILL_FIELDS[k](f) for k, f in v.items())
        )
    elif tag in MIGRATION_TAGS:
        required = {"migration_id": is_identifier}
        if tag == "pause_migration":
            optional["reason"] = lambda v: v is None or isinstance(v, str)
    elif tag == "start_replay":
        required = {
            "replay_id": is_identifier,
            "model": is_identifier,
            "partitions": lambda v: is_int(v) and v >= 1,
            "from_offsets": is_offsets,
            "to_offsets": is_offsets,
        }
    else:
        required = {"replay_id": is_identifier}
    if any(name not in doc or not valid(doc[name]) for name, valid in required.items()):
        return None
    if any(name in doc and not valid(doc[name]) for name, valid in optional.items()):
        return None
    return doc


@dataclass(frozen=True)
class Routing:
    """What the oracle needs of a routing state: read from the real state before a record,
    then moved by the oracle alone."""

    stable: str
    models: frozenset[str]
    used: frozenset[str]
    query: str  # the query model now: what a pause freezes
    write_models: tuple[str, ...]
    migration: str | None = None
    source: str = ""
    target: str = ""
    state: MigrationState | None = None
    window_closed: bool = False
    dual_write: bool = True
    backfill_done: bool = False

    @classmethod
    def of(cls, state: RoutingState) -> Routing:
        status = state.status()
        routing = cls(
            stable=state.stable_model,
            models=state.models,
            used=state.used_ids,
            query=status.query_model,
            write_models=tuple(status.write_models),
        )
        migration = state.migration
        if migration is None:
            return routing
        return replace(
            routing,
            migration=migration.migration_id,
            source=migration.source,
            target=migration.target,
            state=migration.state,
            window_closed=migration.window_closed,
            dual_write=migration.backfill.dual_write,
            backfill_done=migration.backfill_done,
        )

    @property
    def active(self) -> bool:
        return self.state in ACTIVE or (
            self.state is MigrationState.COMPLETED and not self.window_closed
        )

    def other_model(self) -> str:
        """The tiny model that is not stable: every legal migration this test starts."""
        return "tinyb" if self.stable == "tiny" else "tiny"

    def projection(self) -> tuple[str, tuple[str, ...], str, MigrationState | None, str | None]:
        """(query model, write models, phase, state, migration id): the routing matrix."""
        if not self.active:
            routing: tuple[str, tuple[str, ...], str] = (self.stable, (self.stable,), "stable")
        elif self.state is MigrationState.COMPLETED:
            routing = (self.target, (self.source, self.target), "rollback_window")
        elif self.state is MigrationState.FAILED:
            routing = (self.source, (self.source,), "stable")
        else:
            writes = (self.source, self.target) if self.dual_write else (self.source,)
            routing = (self.query, writes, "migrating")
        return (*routing, self.state, self.migration)


def projection_of(state: RoutingState) -> tuple[Any, ...]:
    status = state.status()
    return (
        status.query_model,
        tuple(status.write_models),
        status.phase.value,
        status.state,
        status.migration_id,
    )


@dataclass(frozen=True)
class Judgement:
    """The oracle's verdict on one control record."""

    after: Routing | None  # None: rejected
    command: str = "unknown"  # what the rejection names: the tag, or unknown if malformed
    command_id: str | None = None
    migration_id: str | None = None


def judge(routing: Routing, value: bytes | None) -> Judgement:
    """Accepted (and the routing after it) or rejected, by the contract's transitions."""
    doc = control_doc(value)
    if doc is None:
        return Judgement(None)
    tag = doc["command"]
    migration_id: str | None = None
    if tag not in ("start_replay", "cancel_replay"):
        migration_id = doc["migration_id"]
    rejected = Judgement(None, tag, doc.get("command_id"), migration_id)
    after: Routing | None = None
    state = routing.state
    if tag == "start_migration":
        source, target = doc["source_model"], doc["target_model"]
        assert migration_id is not None
        if (
            not routing.active
            and migration_id not in routing.used
            and source == routing.stable
            and target in routing.models
            and target != source
        ):
            after = replace(
                routing,
                used=routing.used | {migration_id},
                migration=migration_id,
                source=source,
                target=target,
                state=MigrationState.IN_PROGRESS,
                window_closed=False,
                dual_write=doc.get("backfill", {}).get("dual_write", True),
                backfill_done=False,
                query=source,
            )
    elif tag in ("start_replay", "cancel_replay"):
        assert doc.get("model") not in routing.write_models, f"a legal replay: {doc}"
    elif migration_id != routing.migration:
        pass
    elif tag == "pause_migration" and state is MigrationState.IN_PROGRESS:
        after = replace(routing, state=MigrationState.PAUSED)
    elif tag == "resume_migration" and state in (MigrationState.PAUSED, MigrationState.FAILED):
        # The atoms topic is empty: backfill is all done (at its handoffs) or not at all.
        done = state is MigrationState.PAUSED and routing.backfill_done
        after = replace(
            routing,
            state=MigrationState.COMPLETED if done else MigrationState.IN_PROGRESS,
            backfill_done=done,
            query=routing.source,
        )
    elif tag == "cancel_migration" and state in ACTIVE:
        after = replace(routing, state=MigrationState.CANCELLED)
    elif tag in ("rollback", "finalize") and routing.active and state is MigrationState.COMPLETED:
        if tag == "rollback":
            after = replace(routing, state=MigrationState.ROLLED_BACK)
        else:
            after = replace(
                routing, state=MigrationState.FINALIZED, window_closed=True, stable=routing.target
            )
    return rejected if after is None else replace(rejected, after=after)


# ---------------------------------------------------------------------------------------
# Control: the strategies and the script that writes them


@dataclass(frozen=True)
class Ref:
    """A value filled in as the record is written, from the routing predicted by then."""

    name: Literal["current", "previous", "fresh", "stable", "other"]


ControlRecord = tuple[bytes | None, bytes | None]  # key, value


@dataclass(frozen=True)
class Probe:
    """One control record to write: a command (values may be `Ref`s) or raw bytes."""

    key: bytes | None
    doc: dict[str, Json] | None = None  # in the order it is written
    raw: bytes | None = None  # with `doc` None: the value as it is (None: a null value)
    ensure_ascii: bool = True
    corruption: Corruption | None = None


hostile_identifiers = st.one_of(
    st.sampled_from(["", "x" * 257, "😀" * 257]),  # 1 to 256 characters
    wrong_types,
)
identifiers = st.text(min_size=1, max_size=12) | st.sampled_from(["mig-none", "😀" * 256])
migration_refs = st.sampled_from(
    [Ref("current"), Ref("current"), Ref("current"), Ref("previous"), Ref("fresh")]
)
model_refs = st.sampled_from([Ref("stable"), Ref("other"), Ref("stable"), Ref("other")])
model_names = model_refs | st.sampled_from(["ghost", "TINY", "tiny ", "tinyb\x00"])
legal_backfills = st.fixed_dictionaries(
    {},
    optional={
        "batch_size": st.integers(1, 10**6) | st.just(2**62),
        "max_concurrent": st.integers(1, 64),
        "dual_write": st.booleans(),
        "target_query_threshold": st.floats(0, 1) | st.sampled_from([0, 1]),
        "rollback_window_secs": st.integers(0, 7200),
    },
)
bad_backfill_values = st.sampled_from([0, -1, 1.5, 1e3, "10", None, True, -0.1, 1e300, "true"])
offsets = st.dictionaries(st.sampled_from(["0", "1", "2", "-1"]), st.integers(0, 10), max_size=3)
free_text = st.none() | st.text(max_size=16) | st.just("c" * 5000)
FAULTS = ("none", "none", "none", "tag", "field", "drop", "backfill", "corrupt")
start_ids = st.just(Ref("fresh")) | migration_refs | identifiers
migration_ids = migration_refs | identifiers
ghost_models = st.sampled_from(["ghost", "nope", "TINY"])
partition_counts = st.integers(1, 3)
faults = st.sampled_from(FAULTS)
junk_tags = st.sampled_from(["", "START_MIGRATION", "pause", "explode", "start_migration "])
junk_or_wrong_tags = junk_tags | wrong_types
backfill_faults = st.sampled_from([*BACKFILL_FIELDS, "batchsize"])
control_keys = st.sampled_from([b"routing", b"routing", None, b"", b"\xff"])
operator_tags = st.sampled_from(OPERATOR_TAGS)
control_corruptions = st.builds(
    Corruption,
    st.sampled_from(CORRUPTIONS),
    st.floats(0, 1),
    st.integers(0, 1000),
)


@st.composite
def command_probes(draw: st.DrawFn) -> Probe:
    """A well-formed command (legal or not, by the routing it meets), or one with a fault:
    a junk tag, a field of the wrong type or length, a missing field, a bad backfill
    setting, or bytes that are no longer JSON."""
    tag = draw(operator_tags)
    doc: dict[str, Json] = {"command": tag}
    if tag == "start_migration":
        doc["migration_id"] = draw(start_ids)
        doc["source_model"] = draw(model_names)
        doc["target_model"] = draw(model_names)
        if draw(st.booleans()):
            doc["backfill"] = draw(legal_backfills)
    elif tag in MIGRATION_TAGS:
        doc["migration_id"] = draw(migration_ids)
        if tag == "pause_migration" and draw(st.booleans()):
            doc["reason"] = draw(free_text)
    elif tag == "start_replay":
        doc.update(
            replay_id=draw(identifiers),
            model=draw(ghost_models),
            partitions=draw(partition_counts),
            from_offsets=draw(offsets),
            to_offsets=draw(offsets),
        )
    else:
        doc["replay_id"] = draw(identifiers)
    for name in ("command_id", "issued_by"):
        if draw(st.booleans()):
            doc[name] = draw(free_text)
    doc.update((k, v) for k, v in draw(unknown_fields).items() if k not in doc)
    fault = draw(faults)
    style = random.Random(draw(seeds))  # which field a fault hits, the order of the fields
    fields = [name for name in doc if name != "command"]
    if fault == "tag":
        doc["command"] = draw(junk_or_wrong_tags)
    elif fault == "field" and fields:
        doc[style.choice(fields)] = draw(hostile_identifiers)
    elif fault == "drop":
        del doc[style.choice(["command", *fields])]
    elif fault == "backfill":
        backfill: dict[str, Json] = dict(draw(legal_backfills))
        name = draw(backfill_faults)
        backfill[name] = draw(bad_backfill_values) if name in BACKFILL_FIELDS else 1
        doc["backfill"] = backfill
    keys = list(doc)
    style.shuffle(keys)
    return Probe(
        key=draw(control_keys),
        doc={k: doc[k] for k in keys},
        ensure_ascii=draw(st.booleans()),
        corruption=draw(control_corruptions) if fault == "corrupt" else None,
    )


raw_probes = st.builds(
    Probe,
    key=st.just(b"routing"),
    raw=st.one_of(
        st.none(),
        st.binary(max_size=60),
        st.text(max_size=30).map(str.encode),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"", b"{}", b'{"command": null}', b'{"command": "rollback"}', b"[]"]),
    ),
)
control_probes = st.one_of(command_probes(), command_probes(), command_probes(), raw_probes)
