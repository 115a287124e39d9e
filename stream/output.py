"""Encode output records: embeddings and tombstones with their headers. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec
import numpy as np
import numpy.typing as npt

from schemas.embeddings import EmbeddingRecord, Path, SourceRef

MODEL_HEADER = "lattice.model"
SOURCE_OFFSET_HEADER = "lattice.source-offset"

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One record for an `embeddings.<model>` topic; `value` None is a tombstone."""

    key: bytes
    value: bytes | None
    headers: list[tuple[str, bytes]]


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
    path: Path,
    migration_id: str | None,
    embedded_at: datetime,
) -> OutputRecord:
    """An EmbeddingRecord for one atom under one model."""
    record = EmbeddingRecord(
        atom_id=atom_id,
        model=model,
        dim=int(vector.shape[0]),
        vector=vector.tolist(),
        normalized=normalized,
        source=source,
        path=path,
        migration_id=migration_id,
        embedded_at=embedded_at,
    )
    return OutputRecord(
        key=atom_id.encode("utf-8"),
        value=_encoder.encode(record),
        headers=output_headers(model, source),
    )


def tombstone_output(*, atom_id: str, model: str, source: SourceRef) -> OutputRecord:
    """A null value for a deleted atom."""
    return OutputRecord(
        key=atom_id.encode("utf-8"), value=None, headers=output_headers(model, source)
    )
