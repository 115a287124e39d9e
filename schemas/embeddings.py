"""EmbeddingRecord: the value on every `embeddings.<model>` topic, as JSON or msgpack.

JSON (the default) carries the vector as numbers. The optional msgpack encoding carries the
same fields with `vector` as raw little-endian float32 bytes (`dim` x 4), a third the size;
`msgpack-f16` carries it as little-endian IEEE half floats (`dim` x 2), for indexes that
store float16 anyway (a unit vector's components keep about 3 significant digits). Every
non-null value says which it is in the `lattice.encoding` header.

v2 added `model_fingerprint` (also in header `lattice.model-fingerprint`), and the atom's
`metadata` and `created_at`; all default to None, so v1 records still decode.
"""

from __future__ import annotations

import array
import struct
import sys
from datetime import datetime
from typing import Literal

import msgspec

EmbeddingPath = Literal["live", "backfill"]  # how a record was made: new atom or history
Encoding = Literal["json", "msgpack", "msgpack-f16"]

ENCODING_HEADER = "lattice.encoding"
FINGERPRINT_HEADER = "lattice.model-fingerprint"


class SourceRef(msgspec.Struct, frozen=True, kw_only=True):
    """Where the atom event that produced a record sits in the atoms topic."""

    topic: str
    partition: int
    offset: int

    def header(self) -> str:
        """The `lattice.source-offset` header value: `<topic>/<partition>/<offset>`."""
        return f"{self.topic}/{self.partition}/{self.offset}"


class EmbeddingRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One atom's vector under one model."""

    atom_id: str
    model: str
    dim: int
    vector: list[float]
    normalized: bool
    source: SourceRef
    path: EmbeddingPath = "live"
    migration_id: str | None = None
    embedded_at: datetime | None = None
    # v2: what made the vector, and the atom's own fields (absent in v1 records)
    model_fingerprint: str | None = None
    metadata: dict[str, str] | None = None
    created_at: datetime | None = None


class PackedEmbeddingRecord(msgspec.Struct, frozen=True, kw_only=True):
    """EmbeddingRecord as msgpack: `vector` is little-endian float32 bytes (`msgpack`) or
    float16 bytes (`msgpack-f16`)."""

    atom_id: str
    model: str
    dim: int
    vector: bytes
    normalized: bool
    source: SourceRef
    path: EmbeddingPath = "live"
    migration_id: str | None = None
    embedded_at: datetime | None = None
    # v2: what made the vector, and the atom's own fields (absent in v1 records)
    model_fingerprint: str | None = None
    metadata: dict[str, str] | None = None
    created_at: datetime | None = None


_json_decoder = msgspec.json.Decoder(EmbeddingRecord)
_msgpack_decoder = msgspec.msgpack.Decoder(PackedEmbeddingRecord)


def decode_embedding(value: bytes, encoding: str | None = None) -> EmbeddingRecord:
    """Decode an `embeddings.<model>` value in either encoding.

    `encoding` is the `lattice.encoding` header; records written before the header existed
    have none and are JSON. Raises `msgspec.DecodeError` or `ValueError` on bad input.
    """
    if encoding in (None, "json"):
        return _json_decoder.decode(value)
    width = _WIDTHS.get(encoding)
    if width is None:
        raise ValueError(f"unknown {ENCODING_HEADER} {encoding!r}")
    packed = _msgpack_decoder.decode(value)
    if len(packed.vector) != width * packed.dim:
        raise ValueError(
            f"vector holds {len(packed.vector)} bytes, dim {packed.dim} needs {width * packed.dim}"
        )
    fields = msgspec.structs.asdict(packed)
    if width == 2:
        fields["vector"] = list(struct.unpack(f"<{packed.dim}e", packed.vector))
    else:
        values = array.array("f")
        values.frombytes(packed.vector)
        if sys.byteorder == "big":
            values.byteswap()
        fields["vector"] = values.tolist()
    return EmbeddingRecord(**fields)


_WIDTHS = {"msgpack": 4, "msgpack-f16": 2}  # bytes per vector component
