"""Dead letters (CONTRACT section 5): the `lattice.dlq.*` headers a DLQ record carries.

A dead letter keeps the original key, value, headers and timestamp; what went wrong is in
headers (UTF-8 strings). v1 had the six below; v2 adds `lattice.dlq.model`, present when the
rejection depends on one model of the write set (too long for that model's window, that
model failed on the input, that model's output was refused): the record still reached the
other write models. Without it, the record reached no model. v2 also adds
`lattice.dlq.truncated-from` and `lattice.dlq.headers-dropped` on a reduced dead letter,
written when the broker refused the full one.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from schemas.atoms import Stage

HEADER_PREFIX = "lattice.dlq."
MODEL_HEADER = HEADER_PREFIX + "model"
NULL_VALUE_HEADER = HEADER_PREFIX + "null-value"


class DeadLetterHeaders(msgspec.Struct, frozen=True, kw_only=True, rename="kebab"):
    """The `lattice.dlq.*` headers of one dead letter, without the prefix."""

    topic: str
    partition: int
    offset: int
    stage: Stage
    error_class: str
    error: str
    model: str | None = None  # v2: the one write model this dead letter is for
    null_value: bool = False  # the original record had neither key nor value
    # v2, reduced dead letters (the broker refused the full one, e.g. the DLQ's
    # max.message.bytes is below the input's size): the original value's length before it
    # was cut, and whether the original headers (and the key past 512 bytes) were dropped.
    truncated_from: int | None = None
    headers_dropped: bool = False

    def source(self) -> str:
        """`<topic>/<partition>/<offset>` of the input record, as output headers write it."""
        return f"{self.topic}/{self.partition}/{self.offset}"


def encode_dead_letter_headers(info: DeadLetterHeaders) -> list[tuple[str, bytes]]:
    """The headers in their fixed order; `model` and `null-value` only when they apply."""
    headers = [
        ("topic", info.topic),
        ("partition", str(info.partition)),
        ("offset", str(info.offset)),
        ("stage", info.stage),
        ("error-class", info.error_class),
        ("error", info.error),
    ]
    if info.model is not None:
        headers.append(("model", info.model))
    if info.null_value:
        headers.append(("null-value", "true"))
    if info.truncated_from is not None:
        headers.append(("truncated-from", str(info.truncated_from)))
    if info.headers_dropped:
        headers.append(("headers-dropped", "true"))
    return [(HEADER_PREFIX + name, text.encode("utf-8")) for name, text in headers]


def decode_dead_letter_headers(headers: Iterable[tuple[str, bytes]]) -> DeadLetterHeaders:
    """The `lattice.dlq.*` headers of a DLQ record (others are ignored).

    Raises `msgspec.ValidationError` when one is missing or not of its type.
    """
    fields = {
        name.removeprefix(HEADER_PREFIX): value.decode("utf-8")
        for name, value in headers
        if name.startswith(HEADER_PREFIX)
    }
    # Header values are strings: strict=False reads "41" as 41 and "true" as True; headers
    # of a later version are ignored.
    return msgspec.convert(fields, DeadLetterHeaders, strict=False)
