"""Signed control records (issue 11): HMAC-SHA256 over a record's key and value. Pure.

A signed record carries two headers: `lattice.sig.key`, the id of the key that signed it,
and `lattice.sig`, the hex HMAC-SHA256 of `DOMAIN || len(key) || key || value` under that
key's secret. Two sets of key ids are accepted: processor keys sign internal events
(handoffs, progress, `window_closed`, ...), operator keys sign commands (`start_migration`,
`rollback`, `start_replay`, ...). So an operator key cannot forge backfill progress, and a
processor key cannot start a migration. Several ids per set allow rotation: sign with the
new key, keep the old one accepted while records it signed are in the log.

Verification is part of the fold: every instance must hold the same accepted ids and the
same `signed_from_offset`, or they would fold the log differently (the snapshot basis says
which policy a snapshot was folded under).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

KEY_HEADER = "lattice.sig.key"
SIGNATURE_HEADER = "lattice.sig"
DOMAIN = b"lattice-embed control v1\x00"  # a signature is only ever valid on a control record


def signature(secret: bytes, key: bytes | None, value: bytes) -> str:
    """The hex HMAC-SHA256 of a control record (its key length-prefixed: no ambiguity)."""
    key = key or b""
    message = DOMAIN + struct.pack(">I", len(key)) + key + value
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs what this process appends with one key."""

    key_id: str
    secret: bytes = field(repr=False)

    def headers(self, key: bytes | None, value: bytes) -> list[tuple[str, bytes]]:
        """The two headers of a signed record."""
        return [
            (KEY_HEADER, self.key_id.encode("utf-8")),
            (SIGNATURE_HEADER, signature(self.secret, key, value).encode("ascii")),
        ]


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """Which signatures the fold accepts, from which control offset on."""

    processor_keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    operator_keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    required: bool = False
    from_offset: int = 0  # records below it were appended before signing was required

    def basis(self) -> str:
        """What a snapshot records of the policy: it is usable only under the same one (key
        ids, never secrets)."""
        if not self.required:
            return ""
        processors = ",".join(sorted(self.processor_keys))
        operators = ",".join(sorted(self.operator_keys))
        return f"required from {self.from_offset}; processors {processors}; operators {operators}"

    def check(
        self,
        offset: int,
        key: bytes | None,
        value: bytes,
        headers: Iterable[tuple[str, bytes]],
        *,
        internal: bool,
    ) -> str | None:
        """None if the record is trusted, else the reason it is not."""
        if not self.required or offset < self.from_offset:
            return None
        found = dict(headers)
        key_id = found.get(KEY_HEADER, b"").decode("utf-8", "replace")
        given = found.get(SIGNATURE_HEADER)
        if not key_id or given is None:
            return "unsigned (signatures are required)"
        accepted = self.processor_keys if internal else self.operator_keys
        role = "processor" if internal else "operator"
        secret = accepted.get(key_id)
        if secret is None:
            return f"signed with key {key_id!r}, which is not an accepted {role} key"
        if not hmac.compare_digest(given, signature(secret, key, value).encode("ascii")):
            return f"bad signature for key {key_id!r} (forged or altered)"
        return None
