"""Encode output records: embeddings and tombstones with their headers. Pure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from schemas.embeddings import (
    ENCODING_HEADER,
    FINGERPRINT_HEADER,
    EmbeddingPath,
    EmbeddingRecord,
    Encoding,
    PackedEmbeddingRecord,
    SourceRef,
)
from stream.core.records import OutRecord

MODEL_HEADER = "lattice.model"
SOURCE_OFFSET_HEADER = "lattice.source-offset"

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_ENCODING_VALUES = {"json": b"json", "msgpack": b"msgpack", "msgpack-f16": b"msgpack-f16"}
_PACKED_DTYPES = {"msgpack": "<f4", "msgpack-f16": "<f2"}


def output_headers(
    model: str, source: SourceRef, fingerprint: str | None = None
) -> list[tuple[str, bytes]]:
    """Headers on every output record, tombstones included."""
    headers = [
        (MODEL_HEADER, model.encode("utf-8")),
        (SOURCE_OFFSET_HEADER, source.header().encode("utf-8")),
    ]
    if fingerprint is not None:
        headers.append((FINGERPRINT_HEADER, fingerprint.encode("utf-8")))
    return headers


def embedding_output(
    *,
    atom_id: str,
    model: str,
    vector: npt.NDArray[np.float32],
    normalized: bool,
    source: SourceRef,
    path: EmbeddingPath,
    migration_id: str | None,
    embedded_at: datetime,
    fingerprint: str | None = None,
    metadata: dict[str, str] | None = None,
    created_at: datetime | None = None,
    encoding: Encoding = "json",
) -> OutRecord:
    """An EmbeddingRecord for one atom under one model, in the configured encoding.

    `fingerprint` names the model's weights and settings (field and header); `metadata` and
    `created_at` are the atom's own, copied through.
    """
    fields: dict[str, Any] = {
        "atom_id": atom_id,
        "model": model,
        "dim": int(vector.shape[0]),
        "normalized": normalized,
        "source": source,
        "path": path,
        "migration_id": migration_id,
        "embedded_at": embedded_at,
        "model_fingerprint": fingerprint,
        "metadata": metadata,
        "created_at": created_at,
    }
    dtype = _PACKED_DTYPES.get(encoding)
    if dtype is not None:
        packed = vector.astype(dtype, copy=False).tobytes()
        value = _msgpack_encoder.encode(PackedEmbeddingRecord(vector=packed, **fields))
    else:
        value = _json_encoder.encode(EmbeddingRecord(vector=vector.tolist(), **fields))
    headers = output_headers(model, source, fingerprint)
    headers.append((ENCODING_HEADER, _ENCODING_VALUES[encoding]))
    return OutRecord(key=atom_id.encode("utf-8"), value=value, headers=headers)


def tombstone_output(
    *, atom_id: str, model: str, source: SourceRef, fingerprint: str | None = None
) -> OutRecord:
    """A null value for a deleted atom."""
    headers = output_headers(model, source, fingerprint)
    return OutRecord(key=atom_id.encode("utf-8"), value=None, headers=headers)
