"""Hostile input on the real broker: Hypothesis-generated atom events and control commands.

Each test draws its cases with Hypothesis first (an inner `@given` that only collects, so
there is one broker round trip per test, not one per example), sends them all, runs the
processor with a tiny model and checks every input offset against an oracle written here
from CONTRACT sections 3 and 5 with the standard library (not the production decoder):

- atoms: valid events (created, deleted, null-value tombstones, null keys, unknown fields,
  odd but legal `created_at`, huge unicode up to `[limits] max_event_bytes`) give one output
  per write model; everything else (random bytes, invalid UTF-8, non-object JSON, missing or
  wrong-typed fields, blank text, values over the byte limit, key != atom_id, an atom_id over
  512 bytes, a bad `created_at` or `metadata`, ...) gives exactly one dead letter, at its
  offset, with the original key, value, headers and timestamp, the right
  `lattice.dlq.stage` and stale `lattice.dlq.*` input headers replaced. No crash.
- window retries: the same while the output topic refuses every write (its
  `message.timestamp.before.max.ms` is 0) until windows have failed, after writing their
  dead letters, and been retried at least twice: still exactly one dead letter per bad
  offset (outputs at least one: at-least-once).
- control: hostile ControlCommand records (malformed bytes and JSON, wrong types, huge
  strings, unknown models and migrations, illegal transitions), with legal commands mixed
  in, written to the control topic while a processor tails it. The real control plane folds
  the log; for every record the state before and after is checked: a rejected record
  changes nothing but `control_offset`/`updated_at` and shows as `last_rejection`; an
  accepted one moves the routing as the contract's transitions say. The processor's
  `embed.routing` status ends at the same routing and rejection.

Case counts: 2,000 distinct cases per kind in the default run; 20,000 in the `slow`
variants (CI runs those too: about 2.5 and 2 minutes here, most of it Hypothesis drawing).
LATTICE_TEST_HOSTILE_CASES lowers the slow count for a quick look, as
LATTICE_TEST_OUTAGE_SECS shortens the outage test.

Bugs these tests found, now fixed and kept as tests at the end (the strategies nest at
most `MAX_NESTING` deep; those tests go past the recursion limit):
- JSON nested past Python's recursion limit (about 1,000 levels: 2 KB, in a field the
  decoder ignores) raised RecursionError: an atom crashed the processor, at every restart;
  a control record crashed every replay of the log. Now a `decode` dead letter, and a
  rejection.
- a control record with invalid UTF-8 in a field the decoder ignores was applied, not
  rejected as malformed.
- an atom that is not JSON but has a schema error before the point where it breaks was a
  `validate` dead letter, not `decode`.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal, TypeVar

import anyio
import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

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
from schemas.embeddings import EmbeddingRecord
from schemas.routing import MigrationState, RoutingStatus
from stream.config import Config
from stream.core.records import SourceRecord
from stream.core.routing import RoutingState
from stream.processor.control import ControlPlane, record_time
from stream.processor.topics import prepare_topics
from tests.support.kafka import (
    atom_value,
    collect,
    create_topic,
    end_offsets,
    produce,
    read_all,
    unique,
)
from tests.support.processor import processor

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

CASES = 2_000
SLOW_CASES = int(os.environ.get("LATTICE_TEST_HOSTILE_CASES", "20000"))
PARTITIONS = 2
MAX_EVENT_BYTES = 2048  # [limits] max_event_bytes: small, so oversized input is cheap
MAX_ATOM_ID_BYTES = 512
MAX_NESTING = 64
DRAWN_TOGETHER = 10
CASE_HEADER = "hostile-case"  # on every control record this test writes
T = TypeVar("T")


def draw_all(strategy: st.SearchStrategy[T], count: int) -> list[T]:
    """`count` distinct examples of `strategy`, the same in every run.

    Drawn `DRAWN_TOGETHER` to an example (Hypothesis's cost per example is about that of a
    record, and 20,000 records must not take minutes), distinct within one; Hypothesis
    also repeats examples, so a quarter more are drawn than needed.
    """
    drawn: dict[str, T] = {}

    @settings(
        max_examples=-(-count * 5 // 4 // DRAWN_TOGETHER),
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    @given(st.lists(strategy, min_size=DRAWN_TOGETHER, max_size=DRAWN_TOGETHER, unique_by=repr))
    def gather(examples: list[T]) -> None:
        for example in examples:
            drawn.setdefault(repr(example), example)

    gather()
    assert len(drawn) >= count, f"Hypothesis gave {len(drawn)} distinct examples of {count}"
    return list(drawn.values())[:count]


# ---------------------------------------------------------------------------------------
# Atoms: the oracle (CONTRACT section 3, AtomEvent; section 5, dead-letter stages)

# Unicode's White_Space property. Python's str.isspace() also counts U+001C..U+001F, which
# Unicode does not; text made of those alone is left open (either outcome, but only one).
WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
PYTHON_ONLY_SPACE = frozenset("\x1c\x1d\x1e\x1f")
RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})([Tt ])([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-]([0-9]{2}):?([0-9]{2}))",
    re.ASCII,
)


@dataclass(frozen=True)
class Verdict:
    """What one input record must become: outputs, one dead letter, or either (not both)."""

    outcome: Literal["output", "dead", "either"]
    stages: frozenset[str] = frozenset()  # the stages a dead letter may name
    atom_id: str | None = None
    tombstone: bool = False
    metadata: dict[str, str] | None = None


def dead(*stages: str) -> Verdict:
    return Verdict("dead", frozenset(stages))


def utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity


def has_surrogate(value: object) -> bool:
    """Lone surrogates from \\uD800-style escapes: not Unicode text."""
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    return False


def created_at_verdict(value: object) -> bool | None:
    """RFC 3339 with a zone, or null: True; not: False; None where the contract is open
    (lower-case T/Z, a space separator, a leap second, year 0, an offset without colon)."""
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    match = RFC3339.fullmatch(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(match.group(i)) for i in (1, 2, 3, 5, 6, 7))
    separator, zone, off_hour, off_minute = match.group(4, 9, 10, 11)
    if off_hour is not None and (int(off_hour) > 23 or int(off_minute) > 59):
        return False
    if hour > 23 or minute > 59 or second > 60:
        return False
    if year == 0:  # RFC 3339 has a year 0000; Python's dates do not
        return None if 1 <= month <= 12 and 1 <= day <= 31 else False
    try:
        date(year, month, day)
    except ValueError:
        return False
    lenient = separator != "T" or zone == "z" or (off_hour is not None and ":" not in zone)
    return None if lenient or second == 60 else True


def atom_verdict(key: bytes | None, value: bytes | None) -> Verdict:
    """The contract's verdict on one record of the atoms topic."""
    if value is None:  # a compaction tombstone upstream, or nothing at all
        if key is None:
            return dead("decode", "validate")
        atom_id = utf8(key)
        if atom_id is None:
            return dead("decode", "validate")
        if not atom_id or len(key) > MAX_ATOM_ID_BYTES:
            return dead("validate")
        return Verdict("output", atom_id=atom_id, tombstone=True)
    if len(value) > MAX_EVENT_BYTES:
        return dead("decode")
    text = utf8(value)
    if text is None:
        return dead("decode")
    try:
        doc = json.loads(text, parse_constant=no_constants)
    except ValueError:
        return dead("decode")
    if has_surrogate(doc):
        return dead("decode", "validate")
    if not isinstance(doc, dict):
        return dead("decode")
    stages: set[str] = set()
    open_question = False
    kind, atom_id = doc.get("type"), doc.get("atom_id")
    if kind not in ("atom.created", "atom.deleted"):
        return dead("validate")
    if not isinstance(atom_id, str) or not atom_id or len(atom_id.encode()) > MAX_ATOM_ID_BYTES:
        stages.add("validate")
    metadata = doc.get("metadata")
    if kind == "atom.created":
        body = doc.get("text")
        if not isinstance(body, str) or all(c in WHITE_SPACE for c in body):
            stages.add("validate")
        elif all(c in WHITE_SPACE or c in PYTHON_ONLY_SPACE for c in body):
            open_question = True
        when = created_at_verdict(doc.get("created_at"))
        if when is False:
            stages.add("validate")
        open_question |= when is None
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            stages.add("validate")
    if key is not None:
        key_id = utf8(key)
        if key_id is None:
            stages |= {"decode", "validate"}
        elif key_id != atom_id:
            stages.add("validate")
    if stages:
        return dead(*stages)
    assert isinstance(atom_id, str)
    return Verdict(
        "either" if open_question else "output",
        frozenset({"validate"}) if open_question else frozenset(),
        atom_id=atom_id,
        tombstone=kind == "atom.deleted",
        metadata=metadata if kind == "atom.created" else None,
    )


# ---------------------------------------------------------------------------------------
# Atoms: the strategies

Json = Any
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
# Not st.recursive: it costs more to draw than the rest of a record (deep nesting: `deep`).
json_values: st.SearchStrategy[Json] = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    st.lists(st.dictionaries(st.text(max_size=3), scalars, max_size=2), max_size=2),
)
wrong_types = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=4), scalars, max_size=2),
)
atom_ids = st.one_of(
    st.text(string.ascii_letters + string.digits + "-_.:/", min_size=1, max_size=16),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=8),
    st.sampled_from(["é" * 256, "é" * 257, "x" * 512, "x" * 513, "🙂" * 128, "🙂" * 129]),
)
blank = st.text(st.sampled_from(sorted(WHITE_SPACE)), max_size=6)
texts = st.one_of(
    st.text(min_size=1, max_size=40),
    st.sampled_from(
        ["hello world", "a", "Übergrößenträger 🙂", "日本語のテキスト", "\u200b", "\x00"]
    ),
    # huge unicode, near and past the byte limit: astral (4 bytes, 12 escaped) and CJK (3)
    st.builds(
        operator.mul,
        st.text(
            st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, codec="utf-8"),
            min_size=1,
            max_size=4,
        ),
        st.integers(10, 500),
    ),
    st.builds(
        operator.mul,
        st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=4),
        st.integers(30, 700),
    ),
)
zones = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
legal_times = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=zones
).map(lambda moment: moment.isoformat())
odd_times = st.sampled_from(
    [
        "2026-11-27T10:00:00Z",
        "2026-11-27T10:00:00-00:00",
        "2026-11-27T10:00:00.123456789Z",
        "2026-11-27T10:00:00.1234567890123+14:00",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59-23:59",
        "2026-11-27t10:00:00z",
        "2026-11-27 10:00:00Z",
        "2026-11-27T23:59:60Z",
        "2026-11-27T10:00:00+0100",
        "0000-01-01T00:00:00Z",
        "2026-11-27T10:00:00",
        "2026-11-27",
        "2026-02-30T10:00:00Z",
        "2026-13-01T10:00:00Z",
        "2026-11-27T24:00:00Z",
        "2026-11-27T10:00:00+24:00",
        "2026-11-27T10:00:00+01:60",
        "2026-11-27T10:00Z",
        "20261127T100000Z",
        "2026-11-27T10:00:00.Z",
        "\uff12\uff10\uff12\uff16-11-27T10:00:00Z",
        "",
        "yesterday",
    ]
)
legal_metadata = st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=3)
bad_metadata = st.one_of(
    st.dictionaries(
        st.text(max_size=4), wrong_types.filter(lambda v: v is not None), min_size=1, max_size=2
    ),
    st.lists(st.text(max_size=3), max_size=2),
    st.text(max_size=6),
    st.integers(),
    st.booleans(),
)
unknown_fields: st.SearchStrategy[dict[str, Json]] = st.just({}) | st.dictionaries(
    st.sampled_from(["extra", "Type", "TEXT", "vector", "tenant", "atomId", "v"])
    | st.text(max_size=8),
    json_values,
    max_size=3,
).map(
    lambda d: {
        k: v for k, v in d.items() if k not in ("type", "atom_id", "text", "created_at", "metadata")
    }
)
Record = tuple[bytes | None, bytes | None]
Headers = list[tuple[str, bytes]]
# Strategies are built once, here: one built inside a composite is validated at every draw.
created_ats = st.none() | legal_times | odd_times
optional_metadata = st.none() | legal_metadata
key_choices = st.sampled_from(["same", "same", "same", "null", "null", "other", "bad", "empty"])
bad_keys = st.sampled_from([b"\xff", b"a\xc3\x28", b"\xed\xa0\x80"])
MUTATIONS = ("drop", "wrong_type", "bad_type", "blank_text", "long_id", "empty_id", "time")
mutation_lists = st.lists(st.sampled_from((*MUTATIONS, "metadata")), min_size=1, max_size=2)
required_fields = st.sampled_from(["type", "atom_id", "text"])
bad_tags = st.sampled_from(["atom.exploded", "ATOM.CREATED", "", "atom.created "])
long_ids = st.sampled_from(["é" * 257, "x" * 513, "🙂" * 129])
bad_times = odd_times | wrong_types
short_atom_ids = atom_ids.filter(lambda a: len(a.encode()) <= MAX_ATOM_ID_BYTES)
sizes = st.integers(MAX_EVENT_BYTES - 3, MAX_EVENT_BYTES + 3) | st.integers(
    MAX_EVENT_BYTES, 6 * MAX_EVENT_BYTES
)
seeds = st.integers(0, 2**32)


@st.composite
def atom_docs(draw: st.DrawFn) -> dict[str, Json]:
    """An event as a JSON object, valid but for an odd id, text or `created_at` drawn
    (some `atom.deleted` carry another variant's fields, ignored)."""
    atom_id = draw(atom_ids)
    doc: dict[str, Json] = dict(draw(unknown_fields))
    if draw(st.booleans()):
        doc.update(type="atom.created", atom_id=atom_id, text=draw(texts))
        if draw(st.booleans()):
            doc["created_at"] = draw(created_ats)
        if draw(st.booleans()):
            doc["metadata"] = draw(optional_metadata)
    else:
        doc.update(type="atom.deleted", atom_id=atom_id)
        if draw(st.booleans()):  # unknown to atom.deleted, so ignored whatever they hold
            doc.update(text=draw(wrong_types), metadata=draw(wrong_types))
    return doc


def encode(draw: st.DrawFn, doc: Json) -> bytes:
    """JSON text as a producer might write it: any key order, escaping and spacing."""
    style = random.Random(draw(seeds))  # one draw for all of it: Hypothesis is slow per draw
    if isinstance(doc, dict):
        keys = list(doc)
        style.shuffle(keys)
        doc = {k: doc[k] for k in keys}
    text = json.dumps(
        doc,
        ensure_ascii=style.random() < 0.5,
        separators=style.choice([(",", ":"), (", ", ": ")]),
    )
    before, after = (style.choice(["", "", " ", "\n", "\t\r\n"]) for _ in range(2))
    return (before + text + after).encode()


def key_for(draw: st.DrawFn, atom_id: object) -> bytes | None:
    """Mostly the atom_id or null; sometimes another id, invalid UTF-8 or empty."""
    choice = draw(key_choices)
    if choice == "same" and isinstance(atom_id, str):
        return atom_id.encode()
    if choice == "other":
        return draw(atom_ids).encode()
    if choice == "bad":
        return draw(bad_keys)
    if choice == "empty":
        return b""
    return None


@st.composite
def mutated_events(draw: st.DrawFn) -> Record:
    """A valid event with one or two things broken (or, by chance, still valid)."""
    doc = draw(atom_docs())
    for mutation in draw(mutation_lists):
        name = draw(required_fields)
        if mutation == "drop":
            doc.pop(name, None)
        elif mutation == "wrong_type":
            doc[name] = draw(wrong_types)
        elif mutation == "bad_type":
            doc["type"] = draw(bad_tags)
        elif mutation == "blank_text":
            doc["text"] = draw(blank)
        elif mutation == "long_id":
            doc["atom_id"] = draw(long_ids)
        elif mutation == "empty_id":
            doc["atom_id"] = ""
        elif mutation == "time":
            doc["created_at"] = draw(bad_times)
        else:
            doc["metadata"] = draw(bad_metadata)
    return key_for(draw, doc.get("atom_id")), encode(draw, doc)


@st.composite
def valid_events(draw: st.DrawFn) -> Record:
    """An event keyed by its atom_id or by null (valid unless its fields say otherwise)."""
    doc = draw(atom_docs())
    key = doc["atom_id"].encode() if draw(st.booleans()) else None
    return key, encode(draw, doc)


@st.composite
def tombstones(draw: st.DrawFn) -> Record:
    """A null value under a key (aiokafka sends no record with neither key nor value)."""
    atom_id = draw(atom_ids)
    return key_for(draw, atom_id) or atom_id.encode(), None


@st.composite
def oversized_events(draw: st.DrawFn) -> Record:
    """A valid created event padded to a size around the limit, or far past it."""
    atom_id = draw(short_atom_ids)
    doc = {"type": "atom.created", "atom_id": atom_id, "text": "t"}
    size = len(json.dumps(doc).encode())
    doc["text"] = "t" + "a" * max(0, draw(sizes) - size)
    return atom_id.encode(), json.dumps(doc).encode()


def nested(depth: int) -> Json:
    value: Json = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


CORRUPTIONS = ("truncate", "trailing", "bad_utf8", "bom", "constant", "deep")
TRAILING = (b"}", b"{}", b"x", b",", b"\x00", b'"')
BAD_UTF8 = (
    b"\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xe2\x82",
    b"\xf8\x88\x80\x80\x80",
)
CONSTANTS = (b"NaN", b"Infinity", b"-Infinity")


@dataclass(frozen=True)
class Corruption:
    """How to break a JSON object's bytes so that they are no longer JSON (`deep`: still
    JSON, nested `MAX_NESTING` deep at most, in a field the decoders ignore)."""

    how: str
    position: float  # where, as a fraction of the length
    variant: int

    def apply(self, value: bytes) -> bytes:
        body = value.rstrip()
        at = int(self.position * len(body))
        if self.how == "truncate":  # every proper prefix of an object is unfinished
            return body[: min(at, len(body) - 1)]
        if self.how == "trailing":
            return value + TRAILING[self.variant % len(TRAILING)]
        if self.how == "bad_utf8":
            return value[:at] + BAD_UTF8[self.variant % len(BAD_UTF8)] + value[at:]
        if self.how == "bom":
            return b"\xef\xbb\xbf" + value
        if self.how == "constant":
            return body[:-1] + b', "zz": ' + CONSTANTS[self.variant % len(CONSTANTS)] + b"}"
        deep = json.dumps(nested(1 + self.variant % MAX_NESTING)).encode()
        return body[:-1] + b', "zz": ' + deep + b"}"


corruptions = st.builds(
    Corruption, st.sampled_from(CORRUPTIONS), st.floats(0, 1), st.integers(0, 1000)
)
surely_valid_events = valid_events().filter(lambda r: atom_verdict(*r).outcome == "output")


@st.composite
def corrupted_events(draw: st.DrawFn) -> Record:
    """An event's bytes broken (see `Corruption`): a valid one, or one with a schema error
    before the break (not JSON all the same: a `decode` dead letter)."""
    key, value = draw(surely_valid_events | mutated_events())
    assert value is not None
    return key, draw(corruptions).apply(value)


garbage_values = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=40).map(str.encode),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b" ", b"\n", b"{}", b"null", b"[]", b'"atom.created"', b"{{}}"]),
)
garbage_keys = st.none() | atom_ids.map(str.encode) | st.binary(max_size=8)


@st.composite
def garbage(draw: st.DrawFn) -> Record:
    """Random bytes or text, and JSON that is not an object."""
    return draw(garbage_keys), draw(garbage_values)


headers: st.SearchStrategy[Headers] = st.just([]) | st.lists(
    st.tuples(
        st.sampled_from(["trace", "lattice.dlq.stage", "lattice.dlq.offset", "lattice.dlq.model"])
        | st.text(string.ascii_letters + ".-", min_size=1, max_size=8),
        st.binary(max_size=12),
    ),
    max_size=3,
)
atom_records = st.tuples(
    st.one_of(
        valid_events(),
        tombstones(),
        mutated_events(),
        mutated_events(),
        corrupted_events(),
        garbage(),
        oversized_events(),
    ),
    headers,
)


# ---------------------------------------------------------------------------------------
# Atoms: sending, checking, the tests

DLQ_PREFIX = "lattice.dlq."
DLQ_HEADERS = {
    DLQ_PREFIX + name for name in ("topic", "partition", "offset", "stage", "error-class", "error")
}


@dataclass(frozen=True)
class Sent:
    """One input record as produced, where it landed, and what it must become."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    partition: int
    offset: int
    verdict: Verdict

    def describe(self) -> str:
        return (
            f"input {self.partition}/{self.offset} key={self.key!r:.80} "
            f"value={self.value!r:.300}: expected {self.verdict}"
        )


async def send_atoms(
    bootstrap: str, topic: str, cases: Sequence[tuple[Record, Headers]]
) -> list[Sent]:
    """Produce every case (partition by index, explicit timestamps) and note where it went."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 * 1024 * 1024
    )
    base_ms = 1_700_000_000_000
    try:
        await producer.start()
        futures = [
            await producer.send(
                topic,
                key=key,
                value=value,
                headers=list(extra) or None,
                partition=index % PARTITIONS,
                timestamp_ms=base_ms + index,
            )
            for index, ((key, value), extra) in enumerate(cases)
        ]
        landed = [await future for future in futures]
    finally:
        await producer.stop()
    return [
        Sent(
            key,
            value,
            list(extra),
            base_ms + index,
            meta.partition,
            meta.offset,
            atom_verdict(key, value),
        )
        for index, (((key, value), extra), meta) in enumerate(zip(cases, landed, strict=True))
    ]


def check_output(sent: Sent, record: Any) -> None:
    """An embedding or tombstone for the right atom, from the right input offset."""
    verdict = sent.verdict
    assert verdict.atom_id is not None
    assert record.key == verdict.atom_id.encode(), sent.describe()
    if verdict.tombstone:
        assert record.value is None, sent.describe()
        return
    embedding = msgspec.json.decode(record.value, type=EmbeddingRecord)
    assert (embedding.atom_id, embedding.model) == (verdict.atom_id, "tiny"), sent.describe()
    assert (embedding.source.partition, embedding.source.offset) == (sent.partition, sent.offset)
    assert (embedding.metadata or None) == (verdict.metadata or None), sent.describe()


def check_letter(atoms: str, sent: Sent, letter: Any) -> None:
    """The original record, its non-DLQ headers and timestamp, with one set of DLQ headers."""
    context = f"{sent.describe()}; dead letter headers {letter.headers}"
    assert (letter.key, letter.value) == (sent.key, sent.value), context
    assert letter.timestamp == sent.timestamp_ms, context
    names = [name for name, _ in letter.headers if name.startswith(DLQ_PREFIX)]
    assert len(names) == len(set(names)), f"lattice.dlq.* headers repeated: {context}"
    assert DLQ_HEADERS <= set(names) <= DLQ_HEADERS | {DLQ_PREFIX + "null-value"}, context
    values = {name: value.decode("utf-8") for name, value in letter.headers if name in names}
    assert values[DLQ_PREFIX + "stage"] in sent.verdict.stages, context
    assert values[DLQ_PREFIX + "topic"] == atoms, context
    kept = [(n, v) for n, v in letter.headers if not n.startswith(DLQ_PREFIX)]
    assert kept == [(n, v) for n, v in sent.headers if not n.startswith(DLQ_PREFIX)], context


def check_atoms(
    atoms: str, sent: list[Sent], outputs: list[Any], letters: list[Any], *, retried: bool = False
) -> Counter[str]:
    """Every input offset ended as its verdict says; nothing else was written.

    `retried`: windows were retried, so an output may be written more than once
    (at-least-once), a dead letter still exactly once.
    """
    outputs_at: dict[tuple[int, int], list[Any]] = {}
    for record in outputs:
        topic, partition, offset = (
            dict(record.headers)["lattice.source-offset"].decode().rsplit("/", 2)
        )
        assert topic == atoms
        outputs_at.setdefault((int(partition), int(offset)), []).append(record)
    letters_at: dict[tuple[int, int], list[Any]] = {}
    for letter in letters:
        headers = dict(letter.headers)
        where = int(headers[DLQ_PREFIX + "partition"]), int(headers[DLQ_PREFIX + "offset"])
        letters_at.setdefault(where, []).append(letter)
    inputs = {(s.partition, s.offset) for s in sent}
    assert set(outputs_at) <= inputs and set(letters_at) <= inputs, "output of no input"
    tally: Counter[str] = Counter()
    for case in sent:
        out = outputs_at.get((case.partition, case.offset), [])
        dlq = letters_at.get((case.partition, case.offset), [])
        outcome = case.verdict.outcome
        if outcome == "either":
            outcome = "dead" if dlq else "output"
        if outcome == "output":
            reasons = [dict(letter.headers)[DLQ_PREFIX + "error"] for letter in dlq]
            assert not dlq, f"{case.describe()}; dead letter instead: {reasons}"
            assert len(out) >= 1 if retried else len(out) == 1, f"{case.describe()}: {len(out)}"
            for record in out:
                check_output(case, record)
        else:
            assert not out, f"{case.describe()}; output instead of a dead letter"
            assert len(dlq) == 1, f"{case.describe()}; {len(dlq)} dead letters"
            check_letter(atoms, case, dlq[0])
        tally[outcome] += 1
    return tally


async def hostile_atoms(bootstrap: str, make_config: Any, count: int) -> None:
    cases = draw_all(atom_records, count)
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = make_config(atoms, extra=f"[limits]\nmax_event_bytes = {MAX_EVENT_BYTES}\n")
    sent = await send_atoms(bootstrap, atoms, cases)
    async with processor(config) as running:
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS), within=240)
    outputs = await read_all(bootstrap, config.topics.embeddings("tiny"))
    letters = await read_all(bootstrap, config.topics.dlq)
    tally = check_atoms(atoms, sent, outputs, letters)
    print(f"{count} atom cases: {dict(tally)}")
    assert sum(running.stats.dead_letters.values()) == tally["dead"]
    assert min(tally["output"], tally["dead"]) > count // 5, "the mix is not hostile enough"


@pytest.mark.timeout(180)
async def test_hostile_atoms_become_outputs_or_exactly_one_dead_letter(
    bootstrap: str, make_config: Any
) -> None:
    await hostile_atoms(bootstrap, make_config, CASES)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_hostile_atoms_become_outputs_or_exactly_one_dead_letter_slow_set(
    bootstrap: str, make_config: Any
) -> None:
    await hostile_atoms(bootstrap, make_config, SLOW_CASES)


class WindowRetries(logging.Handler):
    """Counts the live path's window retries (its log line is the only sign of one)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._changed = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying the window" in record.getMessage():
            self.count += 1
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    async def at_least(self, count: int, *, within: float) -> None:
        with anyio.fail_after(within):
            while self.count < count:
                await self._changed.wait()


@contextmanager
def window_retries() -> Iterator[WindowRetries]:
    handler = WindowRetries()
    live_log = logging.getLogger("stream.processor.live")
    live_log.addHandler(handler)
    try:
        yield handler
    finally:
        live_log.removeHandler(handler)


async def set_topic_configs(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)]
        )
    finally:
        await admin.close()
    errors = [r[:2] for response in responses for r in response.resources if r[0] != 0]
    assert not errors, errors


@pytest.mark.timeout(240)
async def test_hostile_atoms_get_one_dead_letter_each_across_window_retries(
    bootstrap: str, make_config: Any
) -> None:
    cases = draw_all(atom_records, CASES)
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = make_config(
        atoms,
        extra=f"[limits]\nmax_event_bytes = {MAX_EVENT_BYTES}\n[batching]\nwindow_atoms = 500\n",
    )
    embeddings = config.topics.embeddings("tiny")
    # The output topic refuses every record while its timestamp may not lag the broker's
    # clock at all (InvalidTimestamp: the window fails and is retried); dead letters, to
    # another topic, go through.
    await create_topic(
        bootstrap, embeddings, partitions=PARTITIONS, **{"message.timestamp.before.max.ms": "0"}
    )
    sent = await send_atoms(bootstrap, atoms, cases)
    with window_retries() as retries:
        async with processor(config) as running:
            await retries.at_least(2, within=60)
            assert not running.committed, "a window went through before the topic took outputs"
            written = await read_all(bootstrap, config.topics.dlq)
            assert written, "the failed tries wrote dead letters (their retries must not again)"
            await set_topic_configs(
                bootstrap, embeddings, {"message.timestamp.before.max.ms": str(2**63 - 1)}
            )
            await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS), within=120)
    outputs = await read_all(bootstrap, embeddings)
    letters = await read_all(bootstrap, config.topics.dlq)
    tally = check_atoms(atoms, sent, outputs, letters, retried=True)
    print(f"{CASES} atom cases, {retries.count} window retries: {dict(tally)}")
    assert retries.count >= 2
    assert sum(running.stats.dead_letters.values()) == tally["dead"]


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


# ---------------------------------------------------------------------------------------
# Control: checking every fold, the tests


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


async def hostile_control(bootstrap: str, migration_config: Any, count: int) -> None:
    probes = draw_all(control_probes, count)
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    script = ControlScript()
    chunk = max(50, count // 40)  # the processor may complete a migration between chunks
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    async with processor(config), ControlPlane(config) as follower:
        await follower.replay()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(follower.tail)
            await producer.start()
            try:
                for start in range(0, count, chunk):
                    routing = await backfilled(follower)
                    first = script.written
                    records = script.records(routing, probes[start : start + chunk])
                    await send_control(producer, config.topics.control, records, first)
                for _ in range(10):  # end with no migration active: nothing left to do
                    routing = Routing.of(await follower.sync())
                    if not routing.active:
                        break
                    first = script.written
                    closer = [script.closer(routing)]
                    await send_control(producer, config.topics.control, closer, first)
                else:
                    raise AssertionError(f"the last migration did not end: {routing}")
            finally:
                await producer.stop()
            # The processor followed the same log, and its status says so.
            await collect(
                bootstrap,
                config.topics.routing,
                lambda records: (
                    bool(records)
                    and comparable(msgspec.json.decode(records[-1].value, type=RoutingStatus))
                    == comparable(follower.state.status())
                ),
                within=30,
            )
            tasks.cancel_scope.cancel()
    # Fold the whole log again, from its first record (no snapshot), noting every step.
    control = msgspec.structs.replace(config.control, snapshot_every=0)
    recorder = FoldRecorder(msgspec.structs.replace(config, control=control))
    async with recorder:
        await recorder.replay()
    tally = check_folds(recorder.folds)
    print(f"{count} control probes: {dict(tally)}")
    assert tally["written"] == script.written
    assert tally["rejected"] > count // 2 and tally["internal"] > 0
    for command in OPERATOR_TAGS[:6]:
        assert tally[f"accepted {command}"] > 0, f"no {command} was accepted: {dict(tally)}"


@pytest.mark.timeout(180)
async def test_hostile_control_commands_change_nothing_and_show_as_rejections(
    bootstrap: str, migration_config: Any
) -> None:
    await hostile_control(bootstrap, migration_config, CASES)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_hostile_control_commands_change_nothing_and_show_as_rejections_slow_set(
    bootstrap: str, migration_config: Any
) -> None:
    await hostile_control(bootstrap, migration_config, SLOW_CASES)


# ---------------------------------------------------------------------------------------
# Known bugs, found by the tests above (their strategies leave these inputs out): each test
# says what the contract expects, and fails until the processor does it.

DEEP = 5_000  # far past Python's recursion limit (1,000), in 10 KB


def deeply_nested(document: bytes) -> bytes:
    """`document` with a field it ignores holding arrays nested `DEEP` deep."""
    return document.rstrip()[:-1] + b', "zz": ' + b"[" * DEEP + b"]" * DEEP + b"}"


@pytest.mark.timeout(120)
async def test_an_atom_nested_past_the_recursion_limit_is_one_dead_letter(
    bootstrap: str, make_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = make_config(atoms)
    good = atom_value("a", "fine")
    deep = deeply_nested(atom_value("b", "nested"))
    await send_atoms(bootstrap, atoms, [((b"a", good), []), ((b"b", deep), [])])
    async with processor(config) as running:
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS), within=60)
    letters = await read_all(bootstrap, config.topics.dlq)
    assert [(r.key, dict(r.headers)["lattice.dlq.stage"]) for r in letters] == [(b"b", b"decode")]


@pytest.mark.timeout(60)
async def test_a_control_record_nested_past_the_recursion_limit_is_a_rejection(
    bootstrap: str, migration_config: Any
) -> None:
    config, _ = migration_config(unique("atoms"))
    await prepare_topics(config)
    command = b'{"command": "pause_migration", "migration_id": "m1"}'
    await produce(bootstrap, config.topics.control, [(b"routing", deeply_nested(command))])
    async with ControlPlane(config) as control:
        state = await control.replay()
    assert state.last_rejection is not None and state.last_rejection.command == "unknown"


@pytest.mark.timeout(60)
async def test_a_control_record_that_is_not_utf8_is_rejected(
    bootstrap: str, migration_config: Any
) -> None:
    config, _ = migration_config(unique("atoms"))
    await prepare_topics(config)
    start = b'{"command": "start_migration", "migration_id": "m1", "source_model": "tiny", '
    value = start + b'"target_model": "tinyb", "x": "\xff"}'
    await produce(bootstrap, config.topics.control, [(b"routing", value)])
    async with ControlPlane(config) as control:
        state = await control.replay()
    assert state.migration is None, f"a record that is not UTF-8 started {state.migration}"
    assert state.last_rejection is not None and state.last_rejection.command == "unknown"


@pytest.mark.timeout(120)
async def test_invalid_json_after_a_schema_error_is_a_decode_dead_letter(
    bootstrap: str, make_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = make_config(atoms)
    broken = [
        b'{"type": "atom.created", "atom_id": 5, "te',
        b'{"type": "atom.exploded", "atom_id": "a", "text": "x"',
        b'{"type": "atom.created", "atom_id": "a", "text": 7 "x"}',
    ]
    sent = await send_atoms(bootstrap, atoms, [((None, value), []) for value in broken])
    if {s.verdict for s in sent} != {dead("decode")}:
        pytest.fail("the oracle disagrees: these are not JSON")
    async with processor(config) as running:
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS), within=60)
    letters = await read_all(bootstrap, config.topics.dlq)
    assert [dict(r.headers)["lattice.dlq.stage"] for r in letters] == [b"decode"] * len(broken)
