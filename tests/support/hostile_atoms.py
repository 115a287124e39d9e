"""Hostile atom events: the oracle and the Hypothesis strategies.

The oracle (`atom_verdict`) is written from CONTRACT sections 3 (AtomEvent) and 5
(dead-letter stages) with the standard library, not the production decoder. The strategies
(`atom_records`) draw valid events (created, deleted, null-value tombstones, null keys,
unknown fields, odd but legal `created_at`, huge unicode up to `[limits] max_event_bytes`)
and everything else (random bytes, invalid UTF-8, non-object JSON, missing or wrong-typed
fields, blank text, values over the byte limit, key != atom_id, an atom_id over 512 bytes, a
bad `created_at` or `metadata`, ...), each with headers that may include stale
`lattice.dlq.*` ones.
"""

from __future__ import annotations

import json
import operator
import random
import re
import string
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from hypothesis import strategies as st

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

MAX_EVENT_BYTES = 2048  # [limits] max_event_bytes: small, so oversized input is cheap
MAX_ATOM_ID_BYTES = 512


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
