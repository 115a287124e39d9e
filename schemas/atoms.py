"""AtomEvent: the input topic's messages, and the rules that make one valid (CONTRACT section 3)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from schemas.errors import LatticeError

MAX_ATOM_ID_BYTES = 512

Stage = Literal["decode", "validate", "embed", "produce"]


class AtomCreated(msgspec.Struct, tag_field="type", tag="atom.created", frozen=True, kw_only=True):
    """A new atom, or a new version of an existing one (same `atom_id`)."""

    atom_id: str
    text: str
    created_at: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    metadata: dict[str, str] | None = None


class AtomDeleted(msgspec.Struct, tag_field="type", tag="atom.deleted", frozen=True, kw_only=True):
    """The atom is gone: every write model's topic gets a tombstone for it."""

    atom_id: str


AtomEvent = AtomCreated | AtomDeleted


class InvalidAtom(LatticeError):
    """An input record that can never become an embedding; it becomes a dead letter."""

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(reason)
        self.stage: Stage = stage
        self.reason = reason


_decoder = msgspec.json.Decoder(AtomEvent)


def decode_atom(key: bytes | None, value: bytes | None, *, max_event_bytes: int) -> AtomEvent:
    """Decode and validate one record of the atoms topic.

    A null value under a non-null key is an upstream compaction tombstone and means
    `atom.deleted`. Raises `InvalidAtom` with the dead-letter stage and a readable reason.
    """
    if value is None:
        if key is None:
            raise InvalidAtom("validate", "record has neither a key nor a value")
        atom_id = _decode_key(key)
        _check_atom_id(atom_id)
        return AtomDeleted(atom_id=atom_id)
    if len(value) > max_event_bytes:
        raise InvalidAtom(
            "decode",
            f"event is {len(value)} bytes, over the limit of {max_event_bytes} bytes "
            "(limits.max_event_bytes)",
        )
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAtom("decode", f"value is not valid UTF-8 (byte {exc.start})") from exc
    try:
        event: AtomEvent = _decoder.decode(value)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if " - at `$" not in message and message.startswith("Expected `object`"):
            got = message.rsplit("got ", 1)[-1].strip("`")
            raise InvalidAtom("decode", f"value is not a JSON object (got {got})") from exc
        # The typed decoder stops at the first schema error; broken JSON after it is still
        # a `decode` failure (contract section 5), so the syntax is checked on its own.
        syntax = _syntax_error(value)
        if syntax is not None:
            raise InvalidAtom("decode", f"value is not valid JSON: {syntax}") from exc
        raise InvalidAtom("validate", message) from exc
    except msgspec.DecodeError as exc:
        raise InvalidAtom("decode", f"value is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # even in an ignored field: msgspec recurses per level
        raise InvalidAtom("decode", f"value nests too deeply to decode: {exc}") from exc
    _check_atom_id(event.atom_id)
    if isinstance(event, AtomCreated) and not event.text.strip():
        raise InvalidAtom("validate", "text must contain at least one non-whitespace character")
    if key is not None:
        key_id = _decode_key(key)
        if key_id != event.atom_id:
            raise InvalidAtom(
                "validate", f"record key {key_id!r} differs from atom_id {event.atom_id!r}"
            )
    return event


def _syntax_error(value: bytes) -> str | None:
    """Why `value` is not JSON at all, or None when it is."""
    try:
        msgspec.json.decode(value)
    except msgspec.DecodeError as exc:
        return str(exc)
    except RecursionError as exc:
        return str(exc)
    return None


def _decode_key(key: bytes) -> str:
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAtom("decode", f"key is not valid UTF-8 (byte {exc.start})") from exc


def _check_atom_id(atom_id: str) -> None:
    if not atom_id:
        raise InvalidAtom("validate", "atom_id must not be empty")
    size = len(atom_id.encode("utf-8"))
    if size > MAX_ATOM_ID_BYTES:
        raise InvalidAtom(
            "validate", f"atom_id is {size} bytes, over the limit of {MAX_ATOM_ID_BYTES} bytes"
        )
