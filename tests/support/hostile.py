"""What the hostile-input tests (tests/integration/test_hostile_*.py) share.

- `draw_all`: many distinct Hypothesis cases drawn at once, the same in every run (an inner
  `@given` that only collects, so there is one broker round trip per test, not one per
  example), and the case counts: `CASES` (2,000) per kind in the default run, `SLOW_CASES`
  (20,000) in the `slow` variants; LATTICE_TEST_HOSTILE_CASES lowers the slow count for a
  quick look.
- the standard-library decoding both oracles start from (the oracles do not use the
  production decoder): UTF-8, JSON without NaN or Infinity, no lone surrogates.
- the JSON building blocks both kinds of input are drawn from, and `Corruption`: how a JSON
  object's bytes are broken (the strategies nest at most `MAX_NESTING` deep);
  `deeply_nested` goes far past the recursion limit, for the tests of the bugs found there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

CASES = 2_000
SLOW_CASES = int(os.environ.get("LATTICE_TEST_HOSTILE_CASES", "20000"))
PARTITIONS = 2
MAX_NESTING = 64
DRAWN_TOGETHER = 10
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
seeds = st.integers(0, 2**32)


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


DEEP = 5_000  # far past Python's recursion limit (1,000), in 10 KB


def deeply_nested(document: bytes) -> bytes:
    """`document` with a field it ignores holding arrays nested `DEEP` deep."""
    return document.rstrip()[:-1] + b', "zz": ' + b"[" * DEEP + b"]" * DEEP + b"}"
