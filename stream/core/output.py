"""Encode output records: embeddings and tombstones with their headers. Pure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from schemas.embeddings import (
    ENCODING_HEADER,
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
_ENCODING_VALUES = {"json": b"json", "msgpack": b"msgpack"}


def output_headers(model: str, source: SourceRef) -> list[tuple[str, bytes]]:
    """Headers on every output record, tombstones included."""
    return [
        (MODEL_HEADER, model.encode("utf-8")),
        (SOURCE_OFFSET_HEADER, source.header().encode("utf-8")),
    ]


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
    encoding: Encoding = "json",
) -> OutRecord:
    """An EmbeddingRecord for one atom under one model, in the configured encoding."""
    fields: dict[str, Any] = {
        "atom_id": atom_id,
        "model": model,
        "dim": int(vector.shape[0]),
        "normalized": normalized,
        "source": source,
        "path": path,
        "migration_id": migration_id,
        "embedded_at": embedded_at,
    }
    if encoding == "msgpack":
        packed = vector.astype("<f4", copy=False).tobytes()
        value = _msgpack_encoder.encode(PackedEmbeddingRecord(vector=packed, **fields))
    else:
        value = _json_encoder.encode(EmbeddingRecord(vector=vector.tolist(), **fields))
    headers = output_headers(model, source)
    headers.append((ENCODING_HEADER, _ENCODING_VALUES[encoding]))
    return OutRecord(key=atom_id.encode("utf-8"), value=value, headers=headers)


def tombstone_output(*, atom_id: str, model: str, source: SourceRef) -> OutRecord:
    """A null value for a deleted atom."""
    return OutRecord(key=atom_id.encode("utf-8"), value=None, headers=output_headers(model, source))
